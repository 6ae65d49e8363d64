"""Curvature passes inside another pass's backward, over a recomputation.

**Reentrant activation checkpointing** (``torch.utils.checkpoint(fn, *args,
use_reentrant=True)``): its forward pass runs ``fn`` without a graph; its backward node recomputes
``fn`` with one and backpropagates through it with a second, nested ``torch.autograd.backward``.
The outer pass sees only that node, whose edges lead to the tensor arguments (the parameters
used inside are not among them). So the engine replaces the node's ``run_function`` for one
pass with a :class:`Recompute`, which records the recomputation as a forward pass of the
extended models (layer calls included) and marks its outputs. The nested backward then runs a
curvature pass of its own that

* starts from the gradient and curvature the outer pass delivered at the node's outputs (its
  prehook keeps them),
* adds its parameter estimates to the outer pass's (written when the outer pass ends, summed
  with every other use, by the accumulation rule), and
* hands the curvature at the detached arguments back to the outer pass, at the node's edges,
  before the producers of the arguments run.

The region is recomputed once, by checkpoint itself; the engine adds no recomputation.
``torch.utils.checkpoint(..., use_reentrant=False)`` needs none of this: its graph is autograd's
ordinary one, and the rules read the recomputed tensors in a graph-execution group of their own
(:func:`hesscale.engine._apply._on_node`).

**Rules that backpropagate through a recomputation** (:func:`backpropagate_through`): a fused
kernel whose computation the operation rules know in pieces (a recurrent layer's cuDNN or
oneDNN kernel) recomputes it from what its node saved with ordinary operations, and a nested
pass over them gives the curvature at its inputs, the estimate the pieces' own rules give
wherever PyTorch runs the pieces instead.

Either way HesScaleGN drops the second-order terms inside when the node lies on the network
side.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from ._apply import autocast_dtype
from ._record import _Forward, _trace

_CHECKPOINT_FUNCTION = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


def is_reentrant_checkpoint(node) -> bool:
    """Whether ``node`` is the backward node of a reentrant ``torch.utils.checkpoint``."""
    cls = getattr(type(node), "_forward_cls", None)
    return cls is not None and cls is _CHECKPOINT_FUNCTION


class Nested:
    """What a nested pass needs of the recomputation it runs over: the outer pass, whether the
    recomputed operations lie on the network side, the curvature at the recomputation's outputs
    (``seeds``), and which of its leaves hand their curvature back (``captured``, ``deliver``).
    """

    def __init__(self, outer, network: bool):
        self.outer, self.network = outer, network
        self.curvatures: tuple = ()  # at the recomputation's outputs
        self.inputs: list = []  # the detached tensors it started from
        self.outputs: tuple = ()  # its traced outputs

    def record(self, fn, *args):
        """``fn(*args)`` recorded as a forward pass of the outer pass's models, its outputs
        marked (so that their backward runs the nested pass)."""
        outer = self.outer
        self.inputs = [a for a in args if torch.is_tensor(a)]
        states = {id(f.state): f.state for f in outer.forwards}
        first = outer.forwards[0]
        forward = _Forward(
            state=first.state,
            method=first.method,
            options=first.options,
            forced=first.forced,
            dtype=first.dtype,
            device=first.device,
            autocast=autocast_dtype(first.device),
            recompute=self,
        )
        previous = {key: state.current for key, state in states.items()}
        for state in states.values():
            state.current = forward
        forward.open_spans.append(torch._C._autograd._get_sequence_nr())
        try:
            outputs = fn(*args)
        finally:
            for key, state in states.items():
                state.current = previous[key]
        first.state.on_exit_root(forward)
        traced = _trace(outputs, forward)
        self.outputs = traced if isinstance(traced, tuple) else (traced,)
        return traced

    def seeds(self, roots) -> list[tuple]:
        """``(root, ŝ)`` for the nested backward's roots: the curvature the outer pass
        delivered at the node's output that each root recomputes."""
        result = []
        for root in roots:
            index = next((i for i, out in enumerate(self.outputs) if out is root), None)
            if index is None or index >= len(self.curvatures):
                continue
            result.append((root, self.curvatures[index]))
        return result

    def captured(self) -> dict[int, object]:
        """``{id(leaf): key}`` of the leaves whose curvature goes back to the outer pass."""
        raise NotImplementedError

    def deliver(self, key, s) -> None:
        """Hand the curvature ``s`` at the leaf ``key`` back."""
        raise NotImplementedError


class Recompute(Nested):
    """The ``run_function`` of one checkpoint node during one pass (see the module docstring).

    Args:
        outer: the outer pass.
        node: the checkpoint's backward node.
        info: its planning record (edges to the tensor arguments, which of them need ``ŝ``,
            whether it lies on the network side).
    """

    def __init__(self, outer, node, info):
        super().__init__(outer, info.network)
        self.node, self.info = node, info
        self.original = node.run_function
        node.run_function = self

    def restore(self) -> None:
        self.node.run_function = self.original
        self.outer = self.node = self.info = None
        self.inputs, self.outputs, self.curvatures = [], (), ()

    def stash(self, ctx) -> tuple:
        """The node's rule: keep what reached its outputs; the nested pass delivers ``ŝ`` at
        its inputs while the node runs."""
        self.curvatures = ctx.curvature_outputs
        return (None,) * len(ctx.needs)

    def __call__(self, *args):
        return self.record(self.original, *args)

    def captured(self) -> dict[int, tuple]:
        """``{id(detached argument): outer edge}`` for the arguments whose ``ŝ`` the outer pass
        needs (the node's edges are its tensor arguments, in order)."""
        info = self.info
        return {
            id(t): edge
            for t, edge, need in zip(self.inputs, info.edges, info.needs)
            if need and edge[0] is not None
        }

    def deliver(self, key, s) -> None:
        self.outer.add(key[0], key[1], s)


class Through(Nested):
    """A rule's recomputation (see :func:`backpropagate_through`): the curvature at its
    leaves is collected, one entry per leaf."""

    def __init__(self, outer, network: bool, curvatures: tuple):
        super().__init__(outer, network)
        self.curvatures = curvatures  # at the node's outputs
        self.results: dict[int, torch.Tensor] = {}

    def captured(self) -> dict[int, int]:
        return {id(t): i for i, t in enumerate(self.inputs) if t.requires_grad}

    def deliver(self, key, s) -> None:
        current = self.results.get(key)
        self.results[key] = s if current is None else current + s


def backpropagate_through(outer, network: bool, ctx, fn, inputs) -> list:
    """The curvature at ``inputs`` of ``fn(*inputs)`` given the gradient and curvature at its
    outputs (the node's, ``ctx``), by a nested pass over ``fn``'s operations; None for an
    input that needs none or that no curvature reaches. ``fn`` returns the node's outputs in
    order (those it does not return get none). The engine hands it to a rule as
    ``ctx.through(fn, inputs)``."""
    through = Through(outer, network, ctx.curvature_outputs)
    leaves = [
        t.detach().requires_grad_(need and t.is_floating_point()) if torch.is_tensor(t) else t
        for t, need in zip(inputs, list(ctx.needs) + [False] * len(inputs))
    ]
    with torch.enable_grad():
        outputs = through.record(fn, *leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    roots, gradients = [], []
    for out, g in zip(outputs, ctx.grad_outputs):
        if torch.is_tensor(out) and out.requires_grad:
            roots.append(out)
            gradients.append(torch.zeros_like(out) if g is None else g.to(out.dtype))
    if roots:
        torch.autograd.backward(roots, gradients)
    return [through.results.get(i) for i in range(len(inputs))]
