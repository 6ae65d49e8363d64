"""Running the rules: the prehook of each planned node of autograd's graph applies its rule to
the gradient and curvature at the node's outputs (see :mod:`hesscale.engine`)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint
from torch import Tensor

from .._floating import flush_denormals, flushing_denormals
from .._ggn_mc import sampled_ggn_diagonals
from ..rules._registry import Backprop
from ..rules.normalization import batch_statistics

if TYPE_CHECKING:
    from ._plan import _NodeInfo, _Pass
    from ._record import _Forward, _LayerCall


def _on_node(pass_: _Pass, node, grads):
    """Prehook of a node: apply its rule (see the module docstring), with subnormal floats
    flushed to zero on the thread that runs it (:mod:`hesscale._floating`), under the autocast
    the forward pass ran in (or none) and with grad mode off (autograd turns it on under
    ``backward(create_graph=True)``; the estimates are not differentiated, and the rules write
    into reused buffers), and in the pass's own graph-execution group, so that what the rule
    reads of a region of ``torch.utils.checkpoint(use_reentrant=False)`` is recomputed for it
    (the region's tensors may be unpacked once per group; autograd's node unpacks them again
    in its own). Written without context managers where it can be: it runs once per node."""
    flush = not flushing_denormals() and torch.set_flush_denormal(True)
    graph = torch.is_grad_enabled()
    if graph:
        torch._C._set_grad_enabled(False)
    group = pass_.exec_group
    if group is not None:
        _set_exec_group(group)
    try:
        if _profiler_enabled():  # the rule's time (and its kernels') named in the profile
            with torch.profiler.record_function(f"hesscale {type(node).__name__}"):
                _apply_in_precision(pass_, node, grads)
        else:
            _apply_in_precision(pass_, node, grads)
    finally:
        if group is not None:
            _set_exec_group(None)
        if graph:
            torch._C._set_grad_enabled(True)
        if flush:
            torch.set_flush_denormal(False)


_profiler_enabled = torch._C._autograd._profiler_enabled
_set_exec_group = getattr(torch._C, "_set_graph_exec_group", None)


def new_exec_group():
    """A graph-execution group for one curvature pass (see :func:`_on_node`), or None where
    this PyTorch has none, or the backward pass already runs in one (they do not nest)."""
    group_type = getattr(torch.utils.checkpoint, "GraphExecGroup", None)
    if group_type is None or _set_exec_group is None or torch._C._get_graph_exec_group():
        return None
    return group_type()


def _apply_in_precision(pass_: _Pass, node, grads) -> None:
    if pass_.autocast is not None:  # the products in the forward's precision
        with torch.autocast(pass_.device, dtype=pass_.autocast):
            _apply(pass_, node, grads)
    elif pass_.backward_autocast:
        with torch.autocast(pass_.device, enabled=False):
            _apply(pass_, node, grads)
    else:
        _apply(pass_, node, grads)


def autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast runs ``device``'s products in on this thread, or None when off."""
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _as(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``t`` in ``dtype`` when both are floating and differ (mixed precision), else ``t``."""
    if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point():
        return t
    return t.to(dtype)


def _apply(pass_: _Pass, node, grads) -> None:
    info = pass_.info[node]
    dtype = pass_.dtype
    for g in grads:
        if g is not None and g.dtype != dtype and dtype is not None:
            grads = tuple(_as(g, dtype) for g in grads)
            break
    curvature = pass_.curvature
    if len(grads) == 1:
        outputs = (curvature.pop((node, 0), None),)
    else:
        outputs = tuple(curvature.pop((node, nr), None) for nr in range(len(grads)))
    if info.calls is not None:
        for output_nr, call in info.calls.items():
            _apply_layer(pass_, info, call, grads[output_nr], outputs[output_nr], node)
        return
    ctx = info.ctx
    ctx.grad_outputs, ctx.curvature_outputs = grads, outputs
    try:
        results = info.rule(ctx)
    except NotImplementedError as error:
        pass_._refuse(node, f"is used in a way its rule does not support: {error}", "")
    if info.fuses is not None:
        info.fuses.normalized = batch_statistics(ctx)
    if len(results) < len(info.edges) and any(info.needs[len(results) :]):
        raise RuntimeError(
            f"the rule of {type(node).__name__} returned {len(results)} curvatures for "
            f"{len(info.edges)} inputs; return one (or None) per input"
        )
    for (child, output_nr), need, param, s in zip(info.edges, info.needs, info.params, results):
        if not need or s is None:
            continue
        if param is not None:
            pass_.add_to_leaf(param, s)
        else:
            pass_.add(child, output_nr, s)
    info.ctx = None


def _saved_input(node, path: tuple) -> Tensor:
    """A layer's input from its nodes' saved tensors (:class:`hesscale.rules.Rule`'s
    ``saved_input``): unpacking it recomputes a checkpointed region in the pass's group."""
    levels, name, shape = path
    for _ in range(levels):
        node = node.next_functions[0][0]
    return getattr(node, f"_saved_{name}").reshape(shape)


def _apply_layer(pass_: _Pass, info: _NodeInfo, call: _LayerCall, grad, s, node) -> None:
    ctx = call.ctx
    if ctx.input is None:
        ctx.input = _as(_saved_input(node, call.input_path), pass_.dtype)
    if grad is None or s is None:
        shape, _, device = call.output_like
        dtype = ctx.output.dtype
        grad = torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
        s = torch.zeros(shape, dtype=dtype, device=device) if s is None else s
    ctx.grad_output, ctx.curvature_output, ctx.normalized = grad, s, call.normalized
    result: Backprop = call.rule.backprop(ctx)
    _store_layer(pass_, call, result.parameters)
    if ctx.need_input_curvature:
        if result.curvature_input is None:
            raise RuntimeError(f"the rule of '{call.path}' returned no input curvature")
        if info.params[0] is not None:
            pass_.add_to_leaf(info.params[0], result.curvature_input)
        else:
            child, nr = info.edges[0]
            pass_.add(child, nr, result.curvature_input)
    call.ctx = call.normalized = None
    if not pass_.retain:  # else another backward pass through this graph needs them
        call.input = call.output = call.saved = None


@functools.lru_cache(maxsize=1024)
def _meta_tensor(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A tensor of this shape and dtype on the ``meta`` device (no memory), for rules that read
    only the shape and dtype of a layer's output; shared, as making one costs more than a small
    layer's rule."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _store_layer(pass_: _Pass, call: _LayerCall, estimates: dict) -> None:
    """Hand a layer rule's parameter estimates to the pass; names and shapes are checked."""
    individual = pass_.options.individual
    pass_._layer_params(call)
    targets = call.targets
    for name, estimate in estimates.items():
        param = targets.get(name, targets)
        if param is None:  # not estimated in this pass
            continue
        if param is targets:
            raise RuntimeError(
                f"the rule of '{call.path}' returned an estimate for '{name}', which is not a "
                f"parameter of {type(call.module).__name__} (it has {sorted(targets)})"
            )
        examples = len(call.input if call.input is not None else call.ctx.input)
        expected = (examples, *param.shape) if individual else param.shape
        if estimate.shape != expected:
            raise RuntimeError(
                f"the rule of '{call.path}' returned an estimate of shape "
                f"{tuple(estimate.shape)} for '{name}', expected {tuple(expected)}"
                + (" (per example: does the rule support individual=True?)" if individual else "")
            )
        pass_.store.add(param, estimate)


def _on_monte_carlo(pass_: _Pass, forward: _Forward, grads) -> None:
    """Prehook at the network output under GGN-MC: sample, backpropagate, square."""
    with flush_denormals():
        _monte_carlo(pass_, forward)


def _monte_carlo(pass_: _Pass, forward: _Forward) -> None:
    options = pass_.options
    factors = forward.loss.factors(options.samples, options.generator)
    sampled = sampled_ggn_diagonals(
        forward.calls, forward.live_output, factors, options.individual, pass_.dtype
    )
    for call, estimates in sampled:
        _store_layer(pass_, call, estimates)
