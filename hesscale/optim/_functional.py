"""The update shared by every optimizer of :mod:`hesscale.optim`: Adam with a curvature estimate.

Algorithm 2 of the paper, generalised so that the Adam-style, Newton-style and AdaHessian
variants are one function:

.. math::
    g_t &\\leftarrow g_t + \\lambda \\theta_{t-1}            &&\\text{(L2 weight decay)}\\\\
    \\theta_{t-1} &\\leftarrow (1 - \\alpha\\lambda)\\,\\theta_{t-1}  &&\\text{(or decoupled)}\\\\
    m_t &\\leftarrow \\beta_1 m_{t-1} + (1-\\beta_1)\\, g_t \\\\
    v_t &\\leftarrow \\beta_2 v_{t-1} + (1-\\beta_2)\\, u_t,\\quad
        u_t = S_t^2 \\text{ (squared)} \\text{ or } S_t \\text{ (Newton)}
        &&\\text{(only on steps with an estimate } S_t)\\\\
    \\theta_t &\\leftarrow \\theta_{t-1} - \\frac{\\alpha\\, m_t / (1-\\beta_1^t)}
        {\\left(v_t / (1-\\beta_2^{\\tau}) + \\epsilon_{root}\\right)^{p} + \\epsilon}

with ``τ`` the number of curvature updates so far. AdaHesScale: ``S`` the HesScale estimate,
squared, ``p = 1/2``; with ``S = |g|`` this is exactly ``torch.optim.Adam``. The paper's
Algorithm 2 writes ``ε`` inside the square root (``eps=0, eps_root=1e-8``); the authors' code and
torch's Adam put it outside (the default here).

**Step-size scaling** (the paper authors' 2024 ``*Scaled`` optimizers), optional: with ``u`` every
parameter's update and ``d = (v_t/(1-β_2^τ) + ε_root)^p`` its curvature denominator, the
quadratic model predicts the change ``½ Σ d ⊙ u²``; all updates are multiplied by
``min(max_scale, √(2δ / T))``, ``T = Σ_params Σ d ⊙ u²``, so that it never exceeds ``δ``. (The
authors' code uses the moving average before its bias correction in ``d``; after ``1/(1-β_2)``
steps the two agree.)

**The guard**: before anything is written, an update that is not finite, or whose norm exceeds
100 times the parameters' norm, raises :class:`UpdateError` naming the parameter. It reads
the update once per step; the parameters' norm is kept as a lower bound between steps
(:class:`NormBound`) and read again when the bound cannot clear an update, or every 100 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOW_UP = 100.0  # an update this many times the parameters' norm is refused by the guard


class UpdateError(RuntimeError):
    """An optimizer update that the guard refused to write into the weights."""


@dataclass
class Direction:
    """One parameter's pending update ``θ ← decay · θ − scale · step_size · exp_avg / denom``.

    :meth:`ratio` turns ``denom`` into ``exp_avg / denom`` in place (the guard and the scaling
    need the update itself); :func:`apply_updates` then adds it instead of running
    ``addcdiv`` (the same update, rounded once more).
    """

    param: Tensor
    exp_avg: Tensor
    denom: Tensor
    step_size: float
    decay: float  # decoupled weight decay factor (1.0: none)
    curvature: Tensor | None = None  # d, for the step-size scaling
    clip: float | None = None  # the ratio is clipped to [-clip, clip] (Sophia, clip=...)
    divided: bool = False

    def ratio(self) -> Tensor:
        """``exp_avg / denom`` (the update divided by ``step_size``), clipped if asked."""
        if not self.divided:
            torch.div(self.exp_avg, self.denom, out=self.denom)
            if self.clip is not None:
                self.denom.clamp_(-self.clip, self.clip)
            self.divided = True
        return self.denom


def curvature_adam(
    params: list[Tensor],
    grads: list[Tensor],
    estimates: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    curvature_steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eps_root: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    squared: bool,
    power: float,
    maximize: bool = False,
    scaled: bool = False,
    clip: float | None = None,
    gamma: float | None = None,
) -> list[Direction]:
    """Update the moments in place and return each parameter's pending update (nothing is
    written to ``params``: :func:`apply_updates` does that).

    ``estimates[i]`` is None on steps without a curvature estimate (``update_every > 1``); then
    ``v`` keeps its value. ``steps`` and ``curvature_steps`` are the counts after this step.
    ``scaled`` keeps the curvature denominators for the step-size scaling.

    ``clip`` bounds every coordinate's step by ``clip · α`` (before the scaling):
    ``θ ← θ − α · clip(m̂ / d, clip)`` with ``d`` the denominator. ``gamma`` switches to Sophia's
    update (Liu et al. 2023): no bias corrections and the denominator ``max(γ v, ε)`` instead
    of ``v^p + ε`` (Sophia clips at 1: ``θ ← θ − α · clip(m / max(γ v, ε), 1)``).
    """
    directions = []
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        decay = 1.0
        if weight_decay != 0:
            if decoupled_weight_decay:
                decay = 1 - lr * weight_decay
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg, exp_avg_sq, estimate = exp_avgs[i], exp_avg_sqs[i], estimates[i]
        exp_avg.lerp_(grad, 1 - beta1)
        if estimate is not None:
            if squared:
                exp_avg_sq.mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)
            else:
                exp_avg_sq.mul_(beta2).add_(estimate, alpha=1 - beta2)
        if gamma is not None:  # Sophia
            curvature = exp_avg_sq * gamma
            denom = curvature.clamp(min=eps)
            directions.append(
                Direction(param, exp_avg, denom, lr, decay, curvature if scaled else None, clip)
            )
            continue
        bias_correction1 = 1 - beta1 ** steps[i]
        bias_correction2 = 1 - beta2 ** curvature_steps[i]
        step_size = lr / bias_correction1
        if power == 0.5 and eps_root == 0:  # the operations of torch.optim.Adam, in its order
            curvature = exp_avg_sq.sqrt() / bias_correction2**0.5
        else:
            curvature = (exp_avg_sq / bias_correction2).add_(eps_root).pow_(power)
        denom = curvature.add(eps) if scaled else curvature.add_(eps)
        # the ratio is m / d (m not bias-corrected): clip it at clip·(1 − β₁ᵗ) to bound m̂ / d
        bound = None if clip is None else clip * bias_correction1
        directions.append(
            Direction(param, exp_avg, denom, step_size, decay, curvature if scaled else None, bound)
        )
    return directions


def step_scale(directions: list[Direction], delta: float, max_scale: float, across=None) -> float:
    """``min(max_scale, √(2δ / T))`` with ``T = Σ d ⊙ u²`` over ``directions`` (one pass over
    each parameter and one synchronisation). ``across`` adds up per-parameter partial sums
    over the ranks of sharded parameters (:class:`hesscale.optim._sharded.RankSums`)."""
    terms = []
    for d in directions:  # Σ (r ⊙ d) ⊙ r, in any memory layout (channels_last weights)
        ratio = d.ratio()
        terms.append((ratio * d.curvature).mul_(ratio).sum() * d.step_size**2)
    terms = torch.stack([t.to(terms[0].device, torch.float64) for t in terms])
    total = float((terms if across is None else across(terms)).sum())
    if not math.isfinite(total):
        return max_scale  # the guard reports the update itself
    return max_scale if total <= 0 else min(max_scale, math.sqrt(2 * delta / total))


@dataclass
class NormBound:
    """A lower bound of the parameters' norm kept between steps, so that the guard reads the
    parameters only when the bound is too low to clear an update (and every ``refresh`` steps):
    after an update ``Δ`` and decoupled decay ``c ≤ 1``, ``‖θ'‖ ≥ c‖θ‖ − ‖Δ‖``."""

    value: float = 0.0
    age: int = 0
    refresh: int = 100


def _norms(tensors: list[Tensor]) -> Tensor:
    """The 2-norms of ``tensors``, in float64 on the CPU: one multi-tensor call, one sync."""
    return torch.stack([n.to(torch.float64) for n in torch._foreach_norm(tensors)]).cpu()


def check_updates(
    directions: list[Direction],
    scales: list[float],
    where,
    bound: NormBound | None = None,
    across=None,
) -> None:
    """The guard: raise :class:`UpdateError` for a non-finite or exploding update, before any
    parameter is written. ``where(i)`` describes parameter ``i`` for the message. Costs the
    update's norm (one pass over it) per step; the parameters' norm is read only when
    ``bound`` (kept by the optimizer, updated here as if the step were written) cannot clear
    the update. ``across`` adds up the squared norms of sharded parameters over the ranks (so
    every rank decides alike)."""
    if not directions:
        return

    def total(values: Tensor) -> Tensor:
        return values if across is None else across(values)

    factors = torch.tensor([d.step_size * s for d, s in zip(directions, scales)])
    update_sq = total(
        (_norms([d.ratio() for d in directions]) * factors.to(torch.float64)).square()
    )
    bad = ~torch.isfinite(update_sq)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        reason = "is not finite"
    else:
        total_update = float(update_sq.sum())
        decay = min(d.decay for d in directions)
        if (
            bound is None
            or bound.age >= bound.refresh
            or total_update > (BLOW_UP * bound.value) ** 2
        ):
            param_sq = total(_norms([d.param for d in directions]).square())
            total_param = float(param_sq.sum())
            if bound is not None:
                bound.value, bound.age = total_param**0.5, 0
            if total_param > 0 and total_update > (BLOW_UP**2) * total_param:
                i = int((update_sq / param_sq.clamp(min=1e-300)).argmax())
                reason = (
                    f"would grow the parameters' norm from {total_param**0.5:.3g} by "
                    f"{total_update**0.5:.3g} in one step"
                )
                raise UpdateError(_refusal(where(i), reason))
        if bound is not None:
            bound.value = max(0.0, decay * bound.value - total_update**0.5)
            bound.age += 1
        return
    raise UpdateError(_refusal(where(i), reason))


def _refusal(where: str, reason: str) -> str:
    return (
        f"the update of {where} {reason}; nothing was written into the weights. The curvature "
        "estimate is zero or tiny for some weights (common for ReLU networks), so the step is "
        "bounded only by eps: use a smaller lr, a larger eps, or the step-size scaling "
        "(delta=..., max_scale=...), or guard=False to write such updates anyway."
    )


def apply_updates(directions: list[Direction], scales: list[float]) -> None:
    """Write the updates: ``θ ← decay · θ − scale · step_size · m / denom``."""
    for d, scale in zip(directions, scales):
        if d.decay != 1.0:
            d.param.mul_(d.decay)
        if d.clip is not None:
            d.ratio()
        if d.divided:
            d.param.add_(d.denom, alpha=-d.step_size * scale)
        else:  # torch.optim.Adam's operation, bit for bit
            d.param.addcdiv_(d.exp_avg, d.denom, value=-d.step_size * scale)
