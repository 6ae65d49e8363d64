"""Where estimates are kept: the requests that ask for them, ``p.hess_diag`` and what is recorded
beside it, the hooks that announce a fresh estimate, and the rule by which estimates accumulate
over backward passes (see :mod:`hesscale.engine`).

**Accumulation.** Estimates accumulate as gradients do. A backward pass *adds* its estimate to
``p.hess_diag`` when the gradient it adds to is the one the previous estimating pass left:
``p.grad`` is the same tensor, not modified since (``zero_grad()``, which sets it to None,
``zero_grad(set_to_none=False)``, clipping or any other in-place change start afresh), and no
optimizer step has consumed the estimate (:func:`consume`). Otherwise it *writes over* it. So
gradient accumulation (``(loss / k).backward()`` over k micro-batches, then one step) gives the
estimate of the sum, as ``.grad`` holds the gradient of the sum, and ``zero_grad`` between steps
needs no counterpart. Per-example estimates (``individual=True``) never accumulate.

**Sharded parameters.** Under FSDP2 (``fully_shard``) the graph's leaves are unsharded
stand-ins of the model's sharded parameters. A stand-in carries a record (:data:`SHARDED`) of
the adapter that owns it (:mod:`hesscale.fsdp`): its estimate is handed to that adapter as soon as
it is complete (:meth:`PassEstimates.plan` lists it as announced), never kept on the stand-in;
the adapter reduce-scatters it and writes the sharded parameter's estimate through
:meth:`PassEstimates.write_sharded`, which follows the rule above with the sharded parameter's
own gradient.
"""

from __future__ import annotations

import weakref

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .._errors import UnsupportedModuleError
from .._methods import get_method

_REQUEST = "_hesscale_request"
_ESTIMATE_ID = "_hess_diag_id"
_LOSS_SCALE = "_hess_diag_loss_scale"
_ESTIMATE_HOOKS = "_hess_diag_hooks"
_LAST_GRAD = "_hess_diag_grad"  # (weakref to p.grad, its version) after the last writing pass
_CONSUMED = "_hess_diag_consumed"
ESTIMATE_ATTRIBUTE = "hess_diag"
SHARDED = "_hess_diag_sharded"  # a sharded parameter and its stand-in: their adapter's record


def owner_of(p: Tensor) -> Tensor:
    """The model's parameter whose estimate ``p`` (a graph leaf) gives: ``p`` itself, or, for
    the unsharded stand-in of a sharded parameter, the sharded parameter."""
    record = getattr(p, SHARDED, None)
    return p if record is None else record.owner


def leaf_of(p: Tensor) -> Tensor:
    """The graph leaf that stands for the model's parameter ``p`` (``p`` unless it is sharded
    and its unsharded stand-in exists)."""
    record = getattr(p, SHARDED, None)
    leaf = None if record is None else record.leaf
    return p if leaf is None else leaf


def request(params, method: str | None) -> None:
    """Ask that every following backward pass computes ``method``'s estimate for ``params``.

    ``method=None`` withdraws the request (the backward then computes gradients alone). This is
    what the optimizers call; estimates are written to ``p.hess_diag`` in each backward pass.
    """
    if method is not None:
        get_method(method)
    for p in params:
        setattr(p, _REQUEST, method)


class _EstimateHooks(dict):
    """A parameter's estimate hooks; copies and pickles of the parameter do not inherit them."""

    def __deepcopy__(self, memo):
        return _EstimateHooks()

    def __reduce__(self):
        return (_EstimateHooks, ())


def register_estimate_hook(param: Tensor, hook) -> RemovableHandle:
    """Call ``hook(param)`` in every backward pass right after ``param.hess_diag`` is written.

    Like ``Tensor.register_post_accumulate_grad_hook`` for gradients: the hook sees the fresh
    estimate while the backward pass goes on through the earlier layers (the data-parallel
    optimizers start the estimate's all-reduce there). Hooks run for requested estimates
    (:func:`request`), not for :func:`hesscale.diagonal`. Returns a handle whose ``remove()``
    unregisters the hook.
    """
    hooks = getattr(param, _ESTIMATE_HOOKS, None)
    if hooks is None:
        hooks = _EstimateHooks()
        setattr(param, _ESTIMATE_HOOKS, hooks)
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def loss_scale(param: Tensor) -> Tensor | None:
    """The scale ``S`` of a backpropagated ``S · L`` (``scaler.scale(loss)`` of a GradScaler: a
    one-element tensor times the loss, numbers aside) behind ``param.hess_diag``, or None; the
    same over every pass it accumulates, else None."""
    return getattr(param, _LOSS_SCALE, None)


def consume(param: Tensor) -> None:
    """Mark ``param.hess_diag`` as used by an optimizer step: the next pass writes over it."""
    setattr(param, _CONSUMED, True)


def _same_gradient(p: Tensor) -> bool:
    """Whether ``p.grad`` is what the last estimating pass left, untouched since."""
    record, grad = getattr(p, _LAST_GRAD, None), p.grad
    return (
        record is not None
        and grad is not None
        and record[0]() is grad
        and (grad._version == record[1])
    )


def accumulates(p: Tensor) -> bool:
    """Whether the next backward pass adds to ``p.hess_diag`` (the rule above)."""
    return (
        _same_gradient(p)
        and not getattr(p, _CONSUMED, True)
        and getattr(p, ESTIMATE_ATTRIBUTE, None) is not None
    )


class PassEstimates:
    """The parameter estimates of one backward pass.

    Each parameter's uses are summed (a parameter used several times gets the sum over its
    uses); the sum is then added to or written over ``p.hess_diag`` by the accumulation rule,
    when the pass ends or, for a parameter with estimate hooks, as soon as its last use is in.
    A requested parameter whose gradient this pass changed but that got no estimate (the
    loss reached it through something the engine could not see) is left without a valid
    estimate, so that no step uses a partial one.
    """

    def __init__(self, pass_id: int, dtype, options, method, forwards):
        self.id, self.dtype, self.options, self.method = pass_id, dtype, options, method
        self.forwards = forwards
        # per parameter, keyed by id(p) (a tensor's __hash__ is a Python function):
        self.uses: dict[int, int] = {}  # how many uses send an estimate
        self.received: dict[int, int] = {}
        self.sums: dict[int, tuple[Tensor, Tensor]] = {}  # (p, sum of its uses so far)
        self.announced: set[int] = set()  # those with estimate hooks: written at once
        self.carry: dict[int, bool] = {}  # whether the pass adds to p.hess_diag
        self.before: dict[int, tuple] = {}  # requested p -> (p, its gradient, version) before
        self.written: set[int] = set()
        self.scale: Tensor | None = None  # the backpropagated value's loss scale
        self.shardings: list = []  # the adapters of the sharded parameters the pass estimates

    @property
    def factor(self) -> Tensor | None:
        """The factor by which the backward pass scaled an extended loss (set by a hook on the
        loss value during this backward), when all forward passes agree on one: GGN-MC samples
        the Hessian of the unscaled loss."""
        forwards = self.forwards
        first = forwards[0].loss_factor
        if len(forwards) > 1 and any(f.loss_factor is not first for f in forwards):
            return None
        return first

    def plan(self, used: dict[int, Tensor], requested) -> None:
        """Before autograd runs: the parameters the pass estimates and those requested."""
        individual, carry, before = self.options.individual, self.carry, self.before
        for key, p in used.items():  # a nested pass (a reentrant checkpoint) adds its own
            if key in carry:
                continue
            record = getattr(p, SHARDED, None)
            if record is None:
                carry[key] = not individual and accumulates(p)
                continue
            carry[key] = True  # kept beyond its rule (no reused buffer), never on the stand-in
            self.announced.add(key)
            owner = record.owner
            carry[id(owner)] = not individual and accumulates(owner)
            if record.sharding not in self.shardings:
                self.shardings.append(record.sharding)
        for sharding in self.shardings:
            sharding.begin(self, requested)
        if self.options.announce:
            self.announced |= {key for key, p in used.items() if getattr(p, _ESTIMATE_HOOKS, None)}
        for p in requested:
            if id(p) not in before:
                grad = p.grad
                before[id(p)] = (p, grad, grad._version if grad is not None else None)

    def carries(self, p: Tensor) -> bool:
        """Whether the pass adds to ``p.hess_diag`` (then no rule may write into it)."""
        return self.carry.get(id(p), False)

    def add(self, p: Tensor, estimate: Tensor) -> None:
        """Add one use's estimate of ``p``."""
        if estimate.dtype != self.dtype and self.dtype is not None and estimate.is_floating_point():
            estimate = estimate.to(self.dtype)
        key = id(p)
        current = self.sums.get(key)
        self.sums[key] = (p, estimate if current is None else current[1] + estimate)
        if key in self.announced:
            received = self.received[key] = self.received.get(key, 0) + 1
            if received == self.uses.get(key, 1):
                self._write(*self.sums.pop(key))

    def _write(self, p: Tensor, estimate: Tensor) -> None:
        if self.options.individual is False and estimate.shape != p.shape:
            raise RuntimeError(
                f"a rule returned an estimate of shape {tuple(estimate.shape)} for a parameter "
                f"of shape {tuple(p.shape)}"
            )
        if self.method.monte_carlo and self.factor is not None:
            estimate = estimate * self.factor
        if estimate.requires_grad:
            estimate = estimate.detach()
        key = id(p)
        record = getattr(p, SHARDED, None)
        if record is not None and record.leaf is p:  # a stand-in: to its adapter
            record.sharding.deliver(record, estimate)
            self.written.add(key)
            return
        self._keep(p, estimate)

    def write_sharded(self, p: Tensor, estimate: Tensor) -> None:
        """Write a sharded parameter's estimate, reduce-scattered by its adapter as the pass
        ends, by the accumulation rule (with the sharded parameter's gradient)."""
        self._keep(p, estimate)

    def flush(self, params) -> None:
        """Write now what uses of ``params`` have sent (the rest of their uses got no
        gradient): their adapter's collective is about to start."""
        for p in params:
            pending = self.sums.pop(id(p), None)
            if pending is not None:
                self._write(*pending)

    def _keep(self, p: Tensor, estimate: Tensor) -> None:
        """Write or add ``estimate`` to ``p.hess_diag`` by the accumulation rule."""
        key = id(p)
        if self.options.collect is not None:
            self.options.collect[key] = estimate
        scale = self.scale
        if self.carry.get(key, False):
            # out of place: a tensor diagonal() returned may be the previous estimate
            estimate = getattr(p, ESTIMATE_ATTRIBUTE) + estimate
            if loss_scale(p) is not scale:
                scale = None
        setattr(p, ESTIMATE_ATTRIBUTE, estimate)
        setattr(p, _ESTIMATE_ID, self.id)
        setattr(p, _LOSS_SCALE, scale)
        setattr(p, _CONSUMED, False)
        self.written.add(key)
        hooks = getattr(p, _ESTIMATE_HOOKS, None) if self.options.announce else None
        if hooks:
            for hook in tuple(hooks.values()):
                hook(p)

    def finish(self, failed: bool) -> list[Tensor]:
        """Write what is pending and record each written parameter's gradient (the next pass
        accumulates onto it while it stays untouched). Returns the requested parameters whose
        gradient changed without an estimate; their estimates are made invalid. After a failed
        backward pass nothing is written."""
        sums, self.sums = self.sums, {}
        if not failed:
            for p, estimate in sums.values():  # all but announced ones, and uses never reached
                self._write(p, estimate)
        for sharding in self.shardings:  # their collectives end; sharded estimates written
            sharding.end(self, failed)
        if failed:
            return []
        missing = []
        for key, (p, grad, version) in self.before.items():
            now = p.grad
            if key in self.written:
                if now is not None:
                    setattr(p, _LAST_GRAD, (weakref.ref(now), now._version))
                continue
            if now is not None and (now is not grad or now._version != version):
                missing.append(p)
                invalidate(p)
        return missing


def refuse_missing(missing: list[Tensor], names: dict[int, str]) -> None:
    """Raise for parameters whose gradient changed in a pass that gave them no estimate."""
    if missing:
        listed = ", ".join(
            repr(names.get(id(p), f"a parameter of shape {tuple(p.shape)}")) for p in missing[:5]
        )
        raise UnsupportedModuleError(
            f"{listed}{' and more' if len(missing) > 5 else ''} received a gradient in this "
            "backward pass but no curvature: the loss reaches them through something the engine "
            "cannot see (an autograd Function whose backward runs autograd again, such as "
            "torch.utils.checkpoint with use_reentrant=True, or a parameter used outside the "
            "extended model's forward)."
        )


def invalidate(param: Tensor) -> None:
    """Leave ``param`` without a valid estimate: no optimizer step may use it."""
    setattr(param, _ESTIMATE_ID, None)
    setattr(param, _LAST_GRAD, None)


def estimate_id(param: Tensor) -> int | None:
    """An id of the backward pass that wrote ``param.hess_diag`` (None if none did)."""
    return getattr(param, _ESTIMATE_ID, None)
