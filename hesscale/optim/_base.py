"""``CurvatureAdam``: the thin ``torch.optim.Optimizer`` over :func:`curvature_adam`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .._floating import flush_denormals
from ..engine import ESTIMATE_ATTRIBUTE, consume, estimate_id, loss_scale, request
from ._distributed import EstimateReducer
from ._functional import NormBound, apply_updates, check_updates, curvature_adam, step_scale
from ._sharded import is_sharded, local, rank_sums


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class CurvatureAdam(Optimizer):
    """Adam-style optimizer whose second moment averages a curvature estimate (Algorithm 2).

    Subclasses choose the estimate (``method``, an engine method requested for every backward
    pass that needs one) and its use (``squared``, ``power``). The estimate is read from
    ``p.hess_diag``, which the engine writes during ``loss.backward()`` of an extended model and
    loss: the training loop is that of ``torch.optim.Adam``.

    Args:
        params: parameters or parameter groups.
        lr: step size ``α``.
        betas: ``(β₁, β₂)``.
        eps: added to the denominator (outside the root, as in Adam).
        eps_root: added inside the root (the paper's Algorithm 2 uses ``ε`` there).
        weight_decay: ``λ``; an L2 penalty added to the gradient (as DeepOBS), or
        decoupled_weight_decay: if True, decoupled decay ``θ ← (1 − αλ) θ`` (as AdamW).
        update_every: refresh the curvature every k-th step only; in between, the backward pass
            computes gradients alone and ``v`` is kept (as Sophia does).
        maximize: maximize the objective.
        distributed: average the estimates across the ranks of ``torch.distributed``, as
            DistributedDataParallel averages gradients: in buckets whose all-reduce starts
            during the backward pass, as soon as their estimates exist (see
            :mod:`hesscale.optim._distributed`). None (default): when a process group of several
            ranks exists. Nothing is communicated on steps without an estimate.
        bucket_cap_mb: the largest bucket of estimates sent in one all-reduce.
        process_group: the ranks to average over (default: the default group).
        delta: turn on the paper authors' step-size scaling (see
            :mod:`hesscale.optim._functional`): the quadratic model's predicted change of the
            loss, ``½ Σ d ⊙ u²`` over all parameters, is at most ``delta``. None (default): off.
        max_scale: the largest factor the scaling applies to the updates.
        clip: bound every coordinate's step by ``clip · lr`` (before the scaling):
            ``θ ← θ − α · clip(m̂ / (√v̂ + ε), clip)``, as Sophia clips its ratio. Where the
            curvature estimate is tiny next to the gradient (the first layers of ReLU networks),
            the Newton-like ratio is otherwise bounded only by ε. None (default): off.
        guard: refuse (``UpdateError``, naming the parameter) an update that is not finite or
            that would grow the parameters' norm by more than 100× in one step, before it is
            written into the weights.

    With ``torch.amp.GradScaler`` (``scaler.step(opt)``), the loss scale is removed from the
    gradients and from the estimates, and a step skipped for overflow leaves the curvature
    averages untouched.
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf

    method: str | None = None
    squared: bool = True
    power: float = 0.5

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_root: float = 0.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        update_every: int = 1,
        maximize: bool = False,
        distributed: bool | None = None,
        bucket_cap_mb: float = 25.0,
        process_group=None,
        delta: float | None = None,
        max_scale: float = 1.0,
        clip: float | None = None,
        guard: bool = True,
    ):
        if isinstance(lr, Tensor):
            lr = float(lr)
        _check(0.0 <= lr, f"Invalid learning rate: {lr}")
        _check(0.0 <= eps, f"Invalid epsilon value: {eps}")
        _check(0.0 <= eps_root, f"Invalid eps_root value: {eps_root}")
        _check(0.0 <= betas[0] < 1.0, f"Invalid beta parameter at index 0: {betas[0]}")
        _check(0.0 <= betas[1] < 1.0, f"Invalid beta parameter at index 1: {betas[1]}")
        _check(0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")
        _check(
            isinstance(update_every, int) and update_every >= 1,
            f"Invalid update_every value: {update_every} (a positive integer)",
        )
        _check(bucket_cap_mb > 0, f"Invalid bucket_cap_mb value: {bucket_cap_mb}")
        _check(delta is None or delta > 0, f"Invalid delta value: {delta} (positive, or None)")
        _check(max_scale > 0, f"Invalid max_scale value: {max_scale}")
        _check(clip is None or clip > 0, f"Invalid clip value: {clip} (positive, or None)")
        _check(
            not distributed or (dist.is_available() and dist.is_initialized()),
            "distributed=True averages the estimates across the ranks of a torch.distributed "
            "process group, but none is initialized: call torch.distributed.init_process_group "
            "first (torchrun sets up its environment), or leave distributed=None",
        )
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            eps_root=eps_root,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            update_every=update_every,
            maximize=maximize,
            delta=delta,
            max_scale=max_scale,
            clip=clip,
        )
        super().__init__(params, defaults)
        self.guard = guard
        self.distributed = distributed
        self.bucket_cap_mb = bucket_cap_mb
        self.process_group = process_group
        self._consumed: dict[int, int] = {}
        self._norm_bound = NormBound()  # the guard's lower bound of the parameters' norm
        self._reducers: dict[int, EstimateReducer] = {}
        for group in self.param_groups:
            self._request(group, self._wants_estimate(group))
            for p in group["params"]:
                if p.requires_grad:
                    self._initialize(p)
        if self._averages_across_ranks():  # hooks in place before the first backward pass
            for index in range(len(self.param_groups)):
                self._reducer(index)

    def _initialize(self, p: Tensor) -> None:
        """``p``'s state: zero moments (sharded like ``p`` under FSDP) and step counts.

        Made when the optimizer is, not at its first step: ``torch.distributed.checkpoint``
        loads into an optimizer's existing state (otherwise it runs a step with zero gradients
        to create it, which finds no curvature estimate)."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["curvature_step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # --- what the next backward pass must compute ----------------------------------------
    def _wants_estimate(self, group) -> bool:
        steps = [self.state[p]["step"] for p in group["params"] if p in self.state]
        step = int(max(steps)) if steps else 0
        return step % group["update_every"] == 0

    def _request(self, group, wanted: bool) -> None:
        if self.method is not None:
            request(group["params"], self.method if wanted else None)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_consumed"):
            self._request(self.param_groups[-1], True)
            for p in self.param_groups[-1]["params"]:
                if p.requires_grad:
                    self._initialize(p)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._norm_bound = NormBound()
        for group in self.param_groups:
            self._request(group, self._wants_estimate(group))

    # --- the estimate ---------------------------------------------------------------------
    def _estimates(self, group, params: list[Tensor]) -> list[Tensor]:
        """Fresh estimates of the last backward pass; a RuntimeError says how to fix the loop."""
        result = []
        for p in params:
            ident = estimate_id(p)
            if ident is None or self._consumed.get(id(p)) == ident:
                raise RuntimeError(
                    f"{type(self).__name__}.step() found no {self.method} estimate from the last "
                    f"backward pass for a parameter of shape {tuple(p.shape)}. Extend the model "
                    "before training (model = hesscale.extend(model); for AdaGGNMC also "
                    "loss_fn = hesscale.extend(loss_fn)) and call loss.backward() before every "
                    "step() (torch.autograd.grad computes no estimate; a loss that reaches the "
                    "parameter through an autograd Function the engine cannot see, such as "
                    "torch.utils.checkpoint with use_reentrant=True, gives none either)."
                )
            self._consumed[id(p)] = ident
            consume(p)
            result.append(getattr(p, ESTIMATE_ATTRIBUTE))
        return result

    def _unscale(self, params, grads, estimates, grad_scale):
        """Divide gradients (unless the scaler did) and estimates by the loss scale.

        The estimates are of the backpropagated ``S · L``; ``S`` is the scaler's scale, or, when
        ``scaler.unscale_`` already ran (gradient clipping), the scale the engine found in the
        backpropagated value (:func:`hesscale.engine.loss_scale`).
        """
        if grad_scale is not None:
            inv = 1.0 / grad_scale
            grads = [g * inv.to(g.dtype) if torch.is_tensor(inv) else g * inv for g in grads]
        unscaled = []
        for p, estimate in zip(params, estimates):
            if estimate is None:
                unscaled.append(None)
                continue
            scale = grad_scale if grad_scale is not None else loss_scale(p)
            if scale is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step() under a GradScaler after scaler.unscale_: the "
                    "gradients were unscaled, but the estimate of a parameter of shape "
                    f"{tuple(p.shape)} carries no recognisable loss scale. Backpropagate "
                    "scaler.scale(loss) itself (dividing it or the loss by a number is fine), "
                    "with the same scale in every pass that accumulates into one step."
                )
            unscaled.append(estimate / scale)
        return grads, unscaled

    def _write(self, pending, params: list[Tensor]) -> None:
        """Scale (one quadratic term over every parameter that scales), guard, then write.
        ``params``: the parameters of ``pending``'s updates (sharded ones: their sums run over
        all ranks)."""
        directions = [d for _, _, d in pending]
        scaled = [self.param_groups[index]["delta"] is not None for index, _, _ in pending]
        scaling = [d for d, s in zip(directions, scaled) if s]
        scaling_sums = rank_sums([p for p, s in zip(params, scaled) if s])
        factors = {}
        for index, group in enumerate(self.param_groups):
            if group["delta"] is not None and scaling:
                factors[index] = step_scale(
                    scaling, group["delta"], group["max_scale"], scaling_sums
                )
        scales = [factors.get(index, 1.0) for index, _, _ in pending]
        if self.guard:

            def where(k):
                index, i, _ = pending[k]
                return (
                    f"parameter {i} of parameter group {index} (shape {tuple(params[k].shape)}) "
                    f"of {type(self).__name__}"
                )

            check_updates(directions, scales, where, self._norm_bound, rank_sums(params))
        apply_updates(directions, scales)

    def _update_options(self, group) -> dict:
        """Further switches of :func:`curvature_adam` for a group (the clipping; Sophia's)."""
        return {"clip": group.get("clip")}

    def _prepare_estimates(self) -> None:
        """Hook for estimators computed in ``step`` rather than in the backward pass."""

    def _reducer(self, index: int) -> EstimateReducer:
        """The (lazily made) reducer of parameter group ``index``'s replicated parameters
        (FSDP's sharded ones arrive averaged, :mod:`hesscale.fsdp`)."""
        if index not in self._reducers:
            replicated = [p for p in self.param_groups[index]["params"] if not is_sharded(p)]
            self._reducers[index] = EstimateReducer(
                replicated, self.bucket_cap_mb, self.process_group
            )
        return self._reducers[index]

    def _averages_across_ranks(self) -> bool:
        if self.distributed is not None:
            return self.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def step(self, closure=None):
        """One update; ``closure`` re-evaluates the model (forward, backward), returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and found_inf.item() != 0:
            return loss  # overflow: skip the step, gradients and curvature alike
        with flush_denormals():  # subnormal moments are 100x slower on x86 (hesscale._floating)
            self._update(found_inf)
        return loss

    def _update(self, found_inf) -> None:
        self._prepare_estimates()
        grad_scale = getattr(self, "grad_scale", None)
        pending = []  # (group index, position in group, Direction)
        stepped = []  # the parameter of each
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._initialize(p)
            update_curvature = self._wants_estimate(group)
            estimates = self._estimates(group, params) if update_curvature else [None] * len(params)
            grads = [p.grad.detach() for p in params]
            if update_curvature and self._averages_across_ranks():
                replicated = [i for i, p in enumerate(params) if not is_sharded(p)]
                if replicated:
                    averaged = self._reducer(index).reduce(
                        [params[i] for i in replicated], [estimates[i] for i in replicated]
                    )
                    for i, estimate in zip(replicated, averaged):
                        estimates[i] = estimate
            originals = params
            if any(is_sharded(p) for p in params):  # each rank updates its shards
                params = [local(p) for p in params]
                grads = [local(g) for g in grads]
                estimates = [local(e) for e in estimates]
            if found_inf is not None:  # under a GradScaler: remove the loss scale
                grads, estimates = self._unscale(params, grads, estimates, grad_scale)
            states = [self.state[p] for p in originals]
            for state in states:
                state["step"] += 1
                if update_curvature:
                    state["curvature_step"] += 1
            beta1, beta2 = group["betas"]
            directions = curvature_adam(
                params,
                grads,
                estimates,
                [local(state["exp_avg"]) for state in states],
                [local(state["exp_avg_sq"]) for state in states],
                [state["step"] for state in states],
                [state["curvature_step"] for state in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                eps_root=group["eps_root"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                squared=self.squared,
                power=self.power,
                maximize=group["maximize"],
                scaled=group["delta"] is not None,
                **self._update_options(group),
            )
            pending += [(index, i, d) for i, d in enumerate(directions)]
            stepped += originals
            self._request(group, self._wants_estimate(group))
        self._write(pending, stepped)
