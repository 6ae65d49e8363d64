"""HesScale rules of operations that move, select, copy, sum or scale elements.

**Selections** (views, ``permute``, ``transpose``, ``expand``, ``cat``, ``stack``, ``split``,
slicing and indexing, padding, ``sum``, max pooling, embedding lookups, …): every entry of the
Jacobian is 0 or 1, so ``J∘J = J`` and the diagonal rule is the operation's own backward applied
to the curvature, ``ŝ_x = Jᵀ ŝ_y``. The autograd node computes exactly that when called on
``ŝ_y``, with what it saved; these rules add no code of their own and no second-order term
(the operations are linear).

**Scalings** multiply every element by a constant ``c`` (``x * 2``, ``x / 3``, ``−x``,
``mean``'s ``1/n``): ``J∘J = c J``, so ``ŝ_x = c · Jᵀ ŝ_y``.
"""

from __future__ import annotations

import torch

from ._registry import NodeContext, input_shape, operation_rule, sum_to

SELECTIONS = (
    "AddBackward1",
    "AliasBackward0",
    "AsStridedBackward0",
    "AsStridedBackward1",  # as_strided_ (in place), e.g. global average pooling channels_last
    "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0",
    "CatBackward0",
    "CloneBackward0",
    "CopyBackwards",  # copy_: the copied values pass, the overwritten ones are gone
    "FillBackward0",
    "FillBackward1",
    "FillBackward2",
    "FillBackward3",
    "IndexPutBackward0",  # index_put_ of values: each element written or kept
    "ConstantPadNdBackward0",
    "DiagonalBackward0",
    "ExpandBackward0",
    "FlipBackward0",
    "Im2ColBackward0",  # F.unfold: each column entry copies one input entry (or padding)
    "Col2ImBackward0",  # F.fold: sums of copies
    "GatherBackward0",
    "IndexBackward0",
    "IndexSelectBackward0",
    "MaskedFillBackward0",
    "MaxBackward0",  # max over a dimension: the saved index of each maximum
    "MinBackward0",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0",
    "PermuteBackward0",
    "ReflectionPad1DBackward0",  # padding by reflection or replication: copies of entries
    "ReflectionPad2DBackward0",
    "ReflectionPad3DBackward0",
    "ReplicationPad1DBackward0",
    "ReplicationPad2DBackward0",
    "ReplicationPad3DBackward0",
    "RepeatBackward0",
    "ReshapeAliasBackward0",
    "RollBackward0",
    "SelectBackward0",
    "SliceBackward0",
    "SplitBackward0",
    "SplitWithSizesBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "StackBackward0",
    "SumBackward0",
    "SumBackward1",
    "TBackward0",
    "ToCopyBackward0",
    "TransposeBackward0",
    "TransposeBackward1",  # transpose_ (in place), e.g. inside nn.RNN and nn.GRU
    "UnbindBackward0",
    "UnfoldBackward0",
    "UnsafeSplitBackward0",
    "UnsafeViewBackward0",
    "UnsqueezeBackward0",
    "ViewBackward0",
    "ZeroBackward0",
    "EmbeddingBackward0",
)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def transpose_of(ctx: NodeContext, curvatures=None) -> tuple:
    """``Jᵀ v`` for each input, from the node's own backward (None where nothing flows)."""
    curvatures = ctx.curvature_outputs if curvatures is None else curvatures
    if all(s is None for s in curvatures):
        return (None,) * len(ctx.needs)
    # the node's backward takes its outputs' dtype (bf16 under autocast: max pooling's kernel
    # refuses another), so the curvature is rounded to it as the gradient was
    expected = ctx.node._input_metadata
    curvatures = tuple(
        s.to(meta.dtype) if s is not None and s.dtype != meta.dtype else s
        for s, meta in zip(curvatures, expected)
    )
    results = _as_tuple(ctx.node(*curvatures))
    # autograd sums a broadcast gradient down to the input's shape after the node ran
    return tuple(
        sum_to(r, input_shape(ctx, i)) if need and r is not None else None
        for i, (r, need) in enumerate(zip(results, ctx.needs))
    )


@operation_rule(*SELECTIONS)
def selection_rule(ctx: NodeContext):
    """``ŝ_x = Jᵀ ŝ_y`` (Jacobian entries 0 or 1)."""
    if type(ctx.node).__name__ == "EmbeddingBackward0" and ctx.saved("scale_grad_by_freq"):
        raise NotImplementedError(
            "F.embedding with scale_grad_by_freq=True: its backward is not the transposed "
            "Jacobian; use scale_grad_by_freq=False"
        )
    return transpose_of(ctx)


@operation_rule("CopySlices")
def copy_slices_rule(ctx: NodeContext):
    """An in-place operation on a view (``x[:, :k].zero_()``, ``x[i] = y``, ``Dropout(
    inplace=True)`` on a flattened view, ``x[..., a:b] += y``): the base passes outside the
    view; inside, the operation's own backward, which autograd hides in the node. Its
    Jacobian with respect to the base is probed: it must be diagonal (an element-wise
    operation, a fill or a copy: ``(J∘J)ᵀ ŝ = d² ŝ`` with ``d`` the node's backward of ones),
    and every other operand must enter with weights 0 or 1 (a copied or added tensor: ``J∘J =
    J``); otherwise the operation is refused. The operation's second-order term cannot be seen
    through the node: an in-place activation module that has one (SiLU, Mish, Hardswish, ELU on a
    view) is refused when its forward pass runs, and a functional one is taken as linear."""
    s = ctx.s
    if s is None:
        return (None,) * len(ctx.needs)
    ones = torch.ones_like(s)
    slopes = transpose_of(ctx, (ones,))
    result = list(transpose_of(ctx, (s,)))
    if ctx.needs[0] and slopes[0] is not None:
        probe = torch.arange(s.numel(), dtype=s.dtype, device=s.device).remainder_(7).add_(1)
        probe = probe.view(s.shape)  # distinct values, no random state touched
        diagonal = torch.allclose(transpose_of(ctx, (probe,))[0], slopes[0] * probe)
        if not diagonal:
            raise NotImplementedError(
                "an in-place operation on a view that mixes the view's elements (only "
                "element-wise operations, fills and copies are supported): write it out of place"
            )
        result[0] = slopes[0] * slopes[0] * s
    for k in range(1, len(result)):
        weights = slopes[k]
        if result[k] is None or weights is None:
            continue
        if not bool(((weights == weights.round()) & (weights >= 0)).all()):
            raise NotImplementedError(
                "an in-place operation on a view whose other operand enters with weights other "
                "than 0 or 1 (x[...].sub_(y), .mul_(y), .div_(y) with y needing a gradient): "
                "write it out of place"
            )
    return tuple(result)


def _scaled(ctx: NodeContext, c: float):
    return tuple(None if v is None else v * c for v in transpose_of(ctx))


@operation_rule("NegBackward0")
def neg_rule(ctx: NodeContext):
    """``y = −x``: ``ŝ_x = ŝ_y``."""
    return (ctx.s,)


@operation_rule("MulBackward1")
def mul_scalar_rule(ctx: NodeContext):
    """``y = c x`` with a Python number ``c``: Jᵀ ŝ is ``c ŝ``, so ``ŝ_x = c · (c ŝ)``."""
    return _scaled(ctx, float(ctx.saved("other")))


@operation_rule("DivBackward1")
def div_scalar_rule(ctx: NodeContext):
    """``y = x / c``: ``ŝ_x = ŝ_y / c²``."""
    return _scaled(ctx, 1.0 / float(ctx.saved("other")))


@operation_rule("RsubBackward1")
def rsub_scalar_rule(ctx: NodeContext):
    """``y = c − α x``: ``ŝ_x = α² ŝ_y`` (the backward gives ``−α ŝ``)."""
    return _scaled(ctx, -float(ctx.saved("alpha")))


@operation_rule("MeanBackward0", "MeanBackward1")
def mean_rule(ctx: NodeContext):
    """``y = (1/n) Σ x``: ``ŝ_x = (1/n) Jᵀ ŝ_y`` with ``n`` inputs per output."""
    if ctx.s is None:
        return (None,)
    n = ctx.saved("self_sym_numel") / ctx.s.numel()
    return _scaled(ctx, 1.0 / float(n))
