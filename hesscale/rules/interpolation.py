"""HesScale rules of interpolation (``F.interpolate``, ``nn.Upsample``): linear maps.

Every mode PyTorch offers for up- and down-sampling images and volumes is separable: along each
spatial dimension ``k`` the output is a weighted sum of the input, with a fixed matrix ``A_k``
(``out_k × in_k``; linear, cubic and their antialiased variants have fractional weights,
nearest has one 1 per row). So

    Y = X ×_1 A_1 ×_2 A_2 …,      ŝ_X = ŝ_Y ×_1 (A_1²)ᵀ ×_2 (A_2²)ᵀ …      ((J∘J)ᵀ ŝ_Y)

exact given a diagonal ``ŝ_Y`` (the operation is linear: no second-order term). Each ``A_k`` is
read off the operation itself, applied with the node's own sizes, scales and ``align_corners``
to unit impulses along that dimension, so the rule follows whatever PyTorch computes. Nearest
modes have 0/1 weights, ``J∘J = J``: their node's own backward applies it.
"""

from __future__ import annotations

import torch

from ._registry import NodeContext, input_shape, operation_rule, squared
from .shape import transpose_of

_aten = torch.ops.aten

# node -> (the forward operation, names of its saved scales)
_OPERATIONS = {
    "UpsampleLinear1DBackward0": (_aten.upsample_linear1d, ("scales",)),
    "UpsampleBilinear2DBackward0": (_aten.upsample_bilinear2d, ("scales_h", "scales_w")),
    "UpsampleBicubic2DBackward0": (_aten.upsample_bicubic2d, ("scales_h", "scales_w")),
    "UpsampleBilinear2DAaBackward0": (_aten._upsample_bilinear2d_aa, ("scales_h", "scales_w")),
    "UpsampleBicubic2DAaBackward0": (_aten._upsample_bicubic2d_aa, ("scales_h", "scales_w")),
    "UpsampleTrilinear3DBackward0": (
        _aten.upsample_trilinear3d,
        ("scales_d", "scales_h", "scales_w"),
    ),
}


def interpolation_matrices(ctx: NodeContext, like: torch.Tensor) -> list[torch.Tensor]:
    """``A_k`` (``out_k × in_k``) for every spatial dimension of the node's operation."""
    operation, scale_names = _OPERATIONS[type(ctx.node).__name__]
    scales = [ctx.saved(n) for n in scale_names]
    output_size = list(ctx.saved("output_size"))
    sizes = input_shape(ctx, 0)[2:]
    matrices = []
    for k, n in enumerate(sizes):
        shape = [n, 1] + [n if j == k else 1 for j in range(len(sizes))]
        impulses = torch.zeros(shape, dtype=like.dtype, device=like.device)
        index = [torch.arange(n, device=like.device), 0] + [
            torch.arange(n, device=like.device) if j == k else 0 for j in range(len(sizes))
        ]
        impulses[tuple(index)] = 1
        out = operation(impulses, output_size, ctx.saved("align_corners"), *scales)
        along = [slice(None), 0] + [slice(None) if j == k else 0 for j in range(len(sizes))]
        matrices.append(out[tuple(along)].T)  # (out_k, in_k): column i is impulse i's response
    return matrices


@operation_rule(*_OPERATIONS)
def interpolation_rule(ctx: NodeContext):
    """``ŝ_X = ŝ_Y ×_k (A_k²)ᵀ`` over the spatial dimensions."""
    s = ctx.s
    if s is None or not ctx.needs[0]:
        return (None,)
    result = s
    for k, a in enumerate(interpolation_matrices(ctx, s)):
        dim = 2 + k
        moved = result.movedim(dim, -1)
        result = (moved @ squared(a)).movedim(-1, dim)
    return (result,)


@operation_rule(
    "UpsampleNearest1DBackward0",
    "UpsampleNearest2DBackward0",
    "UpsampleNearest3DBackward0",
    "UpsampleNearestExact1DBackward0",
    "UpsampleNearestExact2DBackward0",
    "UpsampleNearestExact3DBackward0",
)
def nearest_rule(ctx: NodeContext):
    """Each output copies one input: ``ŝ_X = Jᵀ ŝ_Y``, the node's own backward."""
    return transpose_of(ctx)
