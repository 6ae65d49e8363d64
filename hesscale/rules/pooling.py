"""HesScale rules of pooling layers, 1d/2d/3d.

Pooling is linear in its input (max pooling piecewise), so the rule is ``ŝ_x = (J∘J)ᵀ ŝ_y`` with
no second-order term:

* max pooling: ``J`` selects the maximum of each window, its entries are 0 or 1, so ``J∘J = J``
  and ``ŝ_x`` scatters ``ŝ_y`` to the arg-max positions (summing where windows overlap): a
  selection (:mod:`hesscale.rules.shape`), computed by autograd's own backward with the indices
  it saved;
* average pooling: row ``o`` of ``J`` holds ``1/d_o`` on the ``d_o`` elements it averages, so
  ``(J∘J)ᵀ ŝ_y = Jᵀ (ŝ_y / d_o)``: the pooling's own backward applied to ``ŝ_y / d_o``. The
  divisor ``d_o`` varies at borders (``count_include_pad=False``, ``ceil_mode``) and is
  overridable (``divisor_override``); it is read off what the autograd node saved;
* adaptive average pooling: the same with the adaptive windows' sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import NodeContext, operation_rule
from .shape import transpose_of


def _inverse_divisor(
    kind: str, x: Tensor, kernel, stride, padding, ceil_mode, include_pad, divisor_override
) -> Tensor:
    """``1/d_o`` per output window: ``avgpool(1) / sumpool(1)`` with the pooling's settings."""
    ones = torch.ones_like(x[:1, :1])
    pool = F.avg_pool2d if kind == "2d" else F.avg_pool3d
    average = pool(ones, kernel, stride, padding, ceil_mode, include_pad, divisor_override)
    count = pool(ones, kernel, stride, padding, ceil_mode, False, divisor_override=1)
    return average / count


@operation_rule("AvgPool2DBackward0", "AvgPool3DBackward0")
def avg_pool_rule(ctx: NodeContext):
    """``ŝ_x = Jᵀ (ŝ_y / d_o)``, the squared Jacobian having entries ``1/d_o²`` (1d pooling
    runs as 2d between an unsqueeze and a squeeze)."""
    if ctx.s is None:
        return (None,)
    kind = "2d" if type(ctx.node).__name__ == "AvgPool2DBackward0" else "3d"
    inverse = _inverse_divisor(
        kind,
        ctx.saved("self"),
        ctx.saved("kernel_size"),
        ctx.saved("stride"),
        ctx.saved("padding"),
        ctx.saved("ceil_mode"),
        ctx.saved("count_include_pad"),
        ctx.saved("divisor_override"),
    )
    return transpose_of(ctx, (ctx.s * inverse,))


def _adaptive_window_sizes(in_size: int, out_size: int) -> list[int]:
    """Window lengths of adaptive pooling along one dimension (PyTorch's start/end formula)."""
    return [
        -((-(o + 1) * in_size) // out_size) - (o * in_size) // out_size for o in range(out_size)
    ]


@operation_rule("AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0")
def adaptive_avg_pool_rule(ctx: NodeContext):
    """``ŝ_x = Jᵀ (ŝ_y / d_o)`` with ``d_o`` the product of the adaptive window lengths."""
    if ctx.s is None:
        return (None,)
    x, s = ctx.saved("self"), ctx.s
    inverse = torch.ones((), dtype=s.dtype, device=s.device)
    for dim, (n_in, n_out) in enumerate(zip(x.shape[2:], s.shape[2:])):
        sizes = torch.tensor(_adaptive_window_sizes(n_in, n_out), dtype=s.dtype, device=s.device)
        shape = [1] * (s.dim() - 2)
        shape[dim] = n_out
        inverse = inverse / sizes.view(shape)
    return transpose_of(ctx, (s * inverse,))


def _reduced_like(t: Tensor, x: Tensor, dim, keepdim: bool) -> Tensor:
    """A reduction's output ``t`` with the reduced dimensions back (size 1), to broadcast."""
    if keepdim or t.dim() == x.dim():
        return t
    dims = range(x.dim()) if dim is None or len(dim) == 0 else sorted(d % x.dim() for d in dim)
    for d in dims:
        t = t.unsqueeze(d)
    return t


@operation_rule("AmaxBackward0", "AminBackward0", "MaxBackward1", "MinBackward1")
def extremum_rule(ctx: NodeContext):
    """``y = max`` (or ``min``) over dimensions, gradients shared evenly among the ``k`` tied
    maxima as autograd shares them: ``J`` holds ``1/k`` there, so ``ŝ_x = ŝ_y / k²`` on the ties
    (one arg-max: a selection)."""
    s = ctx.s
    if s is None or not ctx.needs[0]:
        return (None,)
    x, y = ctx.saved("self"), ctx.saved("result")
    named = type(ctx.node).__name__ in ("AmaxBackward0", "AminBackward0")
    dim = ctx.saved("dim") if named else None
    keepdim = bool(ctx.saved("keepdim")) if named else False
    y = _reduced_like(y, x, dim, keepdim)
    s = _reduced_like(s, x, dim, keepdim)
    ties = (x == y).to(s.dtype)
    count = ties.sum(
        dim=tuple(range(x.dim())) if not named or not dim else tuple(dim), keepdim=True
    )
    return (ties * s / (count * count),)
