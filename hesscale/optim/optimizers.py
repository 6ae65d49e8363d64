"""The optimizers of the paper's comparison, each a thin subclass of :class:`CurvatureAdam`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._base import CurvatureAdam
from ._sharded import is_sharded


class Adam(CurvatureAdam):
    r"""``torch.optim.Adam`` (``decoupled_weight_decay=True``: AdamW) as a :class:`CurvatureAdam`:
    the estimate is :math:`|g|` (with the L2 term, as Adam's :math:`v` sees it), so the update is
    Adam's bit for bit, and the options of the curvature optimizers apply: the step-size scaling
    (``delta``, ``max_scale``) and the guard. Needs no extended model."""

    def _estimates(self, group, params: list[Tensor]) -> list[Tensor]:
        l2 = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
        return [p.grad.add(p, alpha=l2).abs() if l2 else p.grad.abs() for p in params]


class AdaHesScale(CurvatureAdam):
    r"""Adam on HesScale's Hessian-diagonal estimate (Algorithm 2 of the paper).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) \hat{S}_t^2,\quad
        \theta_t = \theta_{t-1}
            - \alpha \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`\hat{S}_t` the HesScale estimate of :math:`\operatorname{diag}\nabla^2_\theta L`
    computed in ``loss.backward()`` of an extended model and loss. See :class:`CurvatureAdam`
    for the arguments.
    """

    method = "hesscale"


class AdaHesScaleGN(AdaHesScale):
    """AdaHesScale on the Gauss-Newton variant HesScaleGN (the σ'' term dropped)."""

    method = "hesscale_gn"


class AdaBL89(AdaHesScale):
    """AdaHesScale's update on the Becker & LeCun (1989) estimate."""

    method = "bl89"


class AdaGGNMC(CurvatureAdam):
    r"""GGN-MC (one Monte-Carlo sample) as the paper's authors ran it.

    ``v`` averages the estimate itself and the step is Newton-style,
    :math:`\hat{m}_t / (\hat{v}_t + \epsilon)`; ``sqrt=True`` takes Adam's square root,
    :math:`\hat{m}_t / (\sqrt{\hat{v}_t} + \epsilon)`.
    """

    method = "ggn_mc"
    squared = False
    power = 1.0

    def __init__(self, params, lr: float = 1e-3, *, sqrt: bool = False, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.power = 0.5 if sqrt else 1.0


class AdaHessian(CurvatureAdam):
    r"""AdaHessian (Yao et al. 2021): Hutchinson's :math:`z \odot Hz` with one Rademacher probe.

    Convolution kernels (tensors of 3 or more dimensions) average :math:`|z \odot Hz|` over their
    spatial dimensions; the denominator is :math:`(\sqrt{\hat v_t})^k + \epsilon` with ``k`` the
    Hessian power. The Hessian-vector product differentiates the gradient, so the backward pass
    must keep its graph: ``loss.backward(create_graph=True)``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        *,
        hessian_power: float = 1.0,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        if not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"Invalid Hessian power value: {hessian_power}")
        super().__init__(params, lr=lr, **kwargs)
        self.power = hessian_power / 2
        self.generator = generator

    def _prepare_estimates(self) -> None:
        """One Hessian-vector product for all parameter groups, if any group updates its v."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        wanted = any(self._wants_estimate(g) for g in self.param_groups)
        self._products = (
            hutchinson_products(params, self.generator, type(self).__name__, spatial_average=True)
            if params and wanted
            else {}
        )

    def _estimates(self, group, params: list[Tensor]) -> list[Tensor]:
        return [self._products[p] for p in params]


def hutchinson_products(
    params: list[Tensor], generator, who: str, spatial_average: bool
) -> dict[Tensor, Tensor]:
    """One Rademacher probe for all parameters at once: ``z ⊙ Hz`` from the gradients' graph;
    ``spatial_average`` averages ``|z ⊙ Hz|`` over the spatial dimensions of convolution
    kernels (AdaHessian)."""
    if any(is_sharded(p) for p in params):
        raise RuntimeError(
            f"{who} with Hutchinson's estimate differentiates the gradient again, which a model "
            "sharded with FSDP2 (fully_shard) does not support: use an estimate of the backward "
            "pass (AdaHesScale, AdaHesScaleGN, or Sophia with estimator='hesscale_gn')"
        )
    if any(p.grad.grad_fn is None for p in params):
        raise RuntimeError(
            f"{who} with Hutchinson's estimate differentiates the gradient: call "
            "loss.backward(create_graph=True) before step()"
        )
    probes = [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
        for p in params
    ]
    with torch.enable_grad():
        try:
            hz = torch.autograd.grad([p.grad for p in params], params, probes)
        except RuntimeError as error:
            if "scaled_dot_product" not in str(error):
                raise
            raise RuntimeError(
                f"{who} differentiates the gradient, and PyTorch's fused attention kernel has "
                "no second derivative: run the forward and backward passes and the step under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
            ) from error
    products = {}
    for p, z, h in zip(params, probes, hz):
        d = z * h
        if spatial_average and d.dim() >= 3:
            d = d.abs().mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)
        products[p] = d.detach()
    return products


class Sophia(CurvatureAdam):
    r"""Sophia (Liu et al. 2023) on a diagonal curvature estimate of this library.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        h_t = \beta_2 h_{t-k} + (1-\beta_2) \hat h_t \text{ every } k \text{ steps},\\
        \theta_t = (1 - \alpha\lambda)\,\theta_{t-1}
            - \alpha\, \operatorname{clip}\!\left(\frac{m_t}{\max(\gamma h_t, \epsilon)}, 1\right)

    (no bias corrections, decoupled weight decay ``λ``). ``estimator`` chooses ``ĥ``:
    ``"hesscale_gn"`` (the default: HesScaleGN, deterministic, one backward pass),
    ``"hesscale"``, ``"ggn_mc"`` (GNB: a Gauss-Newton estimate from one label sampled from the
    model, as Sophia-G) or ``"hutchinson"`` (Sophia-H: ``z ⊙ Hz``, which needs
    ``loss.backward(create_graph=True)``). The clipping bounds every coordinate's step by ``α``,
    whatever the estimate: where it is zero or negative the step is ``α · sign(m)``.

    Args:
        lr: ``α`` (default 1e-3).
        betas: ``(β₁, β₂)`` (default (0.965, 0.99), Sophia's).
        gamma: ``γ`` (default 0.01).
        eps: ``ε`` (default 1e-12).
        weight_decay: ``λ`` (default 0.1).
        update_every: ``k`` (default 10).
        clip: the ratio's bound (default 1, Sophia's).
        kwargs: the other options of :class:`CurvatureAdam`.
    """

    squared = False
    power = 1.0
    ESTIMATORS = ("hesscale_gn", "hesscale", "ggn_mc", "hutchinson")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        eps: float = 1e-12,
        weight_decay: float = 0.1,
        update_every: int = 10,
        estimator: str = "hesscale_gn",
        generator: torch.Generator | None = None,
        clip: float = 1.0,
        **kwargs,
    ):
        if estimator not in self.ESTIMATORS:
            raise ValueError(
                f"Invalid estimator: {estimator!r}; choose one of {list(self.ESTIMATORS)}"
            )
        if not gamma > 0:
            raise ValueError(f"Invalid gamma value: {gamma}")
        self.method = None if estimator == "hutchinson" else estimator
        self.estimator = estimator
        self.generator = generator
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
            update_every=update_every,
            clip=clip,
            **kwargs,
        )
        for group in self.param_groups:
            group.setdefault("gamma", gamma)

    def _update_options(self, group) -> dict:
        return {"clip": group.get("clip", 1.0), "gamma": group["gamma"]}

    def _prepare_estimates(self) -> None:
        if self.estimator != "hutchinson":
            return
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        wanted = any(self._wants_estimate(g) for g in self.param_groups)
        self._products = (
            hutchinson_products(params, self.generator, "Sophia", spatial_average=False)
            if params and wanted
            else {}
        )

    def _estimates(self, group, params: list[Tensor]) -> list[Tensor]:
        if self.estimator == "hutchinson":
            return [self._products[p] for p in params]
        return super()._estimates(group, params)


SCALED_DELTA = 1e-4  # δ of the scaled configurations (see OptimizerSpec)


@dataclass(frozen=True)
class OptimizerSpec:
    """A named configuration of ``hesscale train`` and ``tune``: the class, the options it is
    built with, and which run settings reach it (SGD and Sophia keep their own β and ε).

    The ``-scaled`` configurations turn on the step-size scaling with ``δ = 1e-4`` (the
    predicted change of a mean loss of order one per step; measured to keep AdaHesScale
    training on the ReLU and tanh DeepOBS networks at every step size from 1e-5 to 1, where
    δ = 1e-2 let it reach losses of 70). The ``-clipped`` ones bound every coordinate's step
    by the step size (``clip=1``, Sophia's bound on Algorithm 2's update): the scaling bounds
    the quadratic model's predicted change, which stays small along directions of tiny
    curvature estimates however large the step (it does not stop a VGG-style ReLU CNN from
    diverging at lr 1e-3). ``-clipped-scaled`` does both. ``sophia`` is Sophia on HesScaleGN at
    its defaults.
    """

    cls: type[torch.optim.Optimizer]
    options: dict = field(default_factory=dict)
    betas: bool = True  # takes the run's (β₁, β₂)
    eps: bool = True  # takes the run's ε

    def build(self, params, lr: float, betas, eps: float) -> torch.optim.Optimizer:
        options = dict(self.options)
        if self.betas:
            options["betas"] = betas
        if self.eps:
            options["eps"] = eps
        return self.cls(params, lr=lr, **options)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(torch.optim.SGD, betas=False, eps=False),
    "adam": OptimizerSpec(torch.optim.Adam),
    "adahessian": OptimizerSpec(AdaHessian),
    "adaggnmc": OptimizerSpec(AdaGGNMC),
    "adabl89": OptimizerSpec(AdaBL89),
    "adahesscale": OptimizerSpec(AdaHesScale),
    "adahesscalegn": OptimizerSpec(AdaHesScaleGN),
    "adam-scaled": OptimizerSpec(Adam, {"delta": SCALED_DELTA}),
    "adahesscale-scaled": OptimizerSpec(AdaHesScale, {"delta": SCALED_DELTA}),
    "adahesscalegn-scaled": OptimizerSpec(AdaHesScaleGN, {"delta": SCALED_DELTA}),
    "adahesscale-clipped": OptimizerSpec(AdaHesScale, {"clip": 1.0}),
    "adahesscalegn-clipped": OptimizerSpec(AdaHesScaleGN, {"clip": 1.0}),
    "adahesscale-clipped-scaled": OptimizerSpec(AdaHesScale, {"clip": 1.0, "delta": SCALED_DELTA}),
    "sophia": OptimizerSpec(Sophia, betas=False, eps=False),
}  # the paper's comparison and the configurations that train out of the box, by the names
# that `hesscale train` and `tune` take
