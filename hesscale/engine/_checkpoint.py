"""Reentrant activation checkpointing: ``torch.utils.checkpoint(fn, *args, use_reentrant=True)``.

Its forward pass runs ``fn`` without a graph; its backward node recomputes ``fn`` with one and
backpropagates through it with a second, nested ``torch.autograd.backward``. The outer pass sees
only that node, whose edges lead to the tensor arguments (the parameters used inside are not
among them). So the engine replaces the node's ``run_function`` for one pass with a
:class:`Recompute`, which records the recomputation as a forward pass of the extended models
(layer calls included) and marks its outputs. The nested backward then runs a curvature pass
of its own that

* starts from the gradient and curvature the outer pass delivered at the node's outputs (its
  prehook keeps them),
* adds its parameter estimates to the outer pass's (written when the outer pass ends, summed
  with every other use, by the accumulation rule), and
* hands the curvature at the detached arguments back to the outer pass, at the node's edges,
  before the producers of the arguments run.

HesScaleGN drops the second-order terms inside the region when the node lies on the network
side. The region is recomputed once, by checkpoint itself; the engine adds no recomputation.
``torch.utils.checkpoint(..., use_reentrant=False)`` needs none of this: its graph is autograd's
ordinary one, and the rules read the recomputed tensors in a graph-execution group of their own
(:func:`hesscale.engine._apply._on_node`).
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


class Recompute:
    """The ``run_function`` of one checkpoint node during one pass (see the module docstring).

    Args:
        outer: the outer pass.
        node: the checkpoint's backward node.
        info: its planning record (edges to the tensor arguments, which of them need ``ŝ``,
            whether it lies on the network side).
    """

    def __init__(self, outer, node, info):
        self.outer, self.node, self.info = outer, node, info
        self.original = node.run_function
        self.gradients: tuple = ()  # at the node's outputs, from its prehook
        self.curvatures: tuple = ()
        self.inputs: list = []  # the detached tensor arguments of the recomputation
        self.outputs: tuple = ()  # its traced outputs
        node.run_function = self

    def restore(self) -> None:
        self.node.run_function = self.original
        self.outer = self.node = self.info = None
        self.inputs, self.outputs, self.curvatures, self.gradients = [], (), (), ()

    def stash(self, ctx) -> tuple:
        """The node's rule: keep what reached its outputs; the nested pass delivers ``ŝ`` at
        its inputs while the node runs."""
        self.gradients, self.curvatures = ctx.grad_outputs, ctx.curvature_outputs
        return (None,) * len(ctx.needs)

    def __call__(self, *args):
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
            outputs = self.original(*args)
        finally:
            for key, state in states.items():
                state.current = previous[key]
        first.state.on_exit_root(forward)
        traced = _trace(outputs, forward)
        self.outputs = traced if isinstance(traced, tuple) else (traced,)
        return traced

    # --- what the nested pass asks of it ---------------------------------------------------
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

    def captured(self) -> dict[int, tuple]:
        """``{id(detached argument): outer edge}`` for the arguments whose ``ŝ`` the outer pass
        needs (the node's edges are its tensor arguments, in order)."""
        info = self.info
        return {
            id(t): edge
            for t, edge, need in zip(self.inputs, info.edges, info.needs)
            if need and edge[0] is not None
        }
