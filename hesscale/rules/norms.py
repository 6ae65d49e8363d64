"""HesScale rule of vector norms ``y = ‖x‖_p`` over some dimensions (``torch.linalg.vector_norm``,
``Tensor.norm``, ``F.normalize``'s denominator; ConvNeXt-V2's GRN, cross-covariance attention).

Each output is a function of its own slice of ``x``, so the rule is exact given a diagonal
``ŝ_y``. With ``|x|^p`` summed to ``y^p`` over the slice::

    ∂y/∂x_i = sign(x_i) |x_i|^{p−1} / y^{p−1},
    ∂²y/∂x_i² = (p − 1) |x_i|^{p−2} / y^{p−1} · (1 − |x_i|^p / y^p),
    ŝ_x = (∂y/∂x)² ŝ_y + [second_order] g_y ∂²y/∂x²,

for p = 2: ``x/y`` and ``1/y − x²/y³``. Where ``y = 0`` the norm is not differentiable; the
rule gives 0 there, as PyTorch's gradient does. Orders ∞, −∞ and 0 are not smooth and refused.
"""

from __future__ import annotations

import math

import torch

from ._registry import NodeContext, operation_rule


@operation_rule("LinalgVectorNormBackward0")
def vector_norm_rule(ctx: NodeContext):
    """The rule above; shapes of ``x``."""
    if not ctx.needs[0]:
        return (None,)
    p = float(ctx.saved("ord"))
    if math.isinf(p) or p == 0 or p < 1:
        raise NotImplementedError(f"vector norms of order {p:g} (orders ≥ 1 are supported)")
    x, y = ctx.saved("self"), ctx.saved("result")
    dim, keepdim = ctx.saved("dim"), ctx.saved("keepdim")
    if not keepdim and y.dim() < x.dim():
        dims = range(x.dim()) if dim is None or len(dim) == 0 else sorted(d % x.dim() for d in dim)
        for d in dims:
            y = y.unsqueeze(d)
    s, g = ctx.s, ctx.g
    if s is not None and s.dim() < x.dim():
        s = s.reshape(y.shape)
    if g is not None and g.dim() < x.dim():
        g = g.reshape(y.shape)
    safe = torch.where(y > 0, y, torch.ones_like(y))
    zero = y == 0
    if p == 2.0:
        df = x / safe
        d2f = (1 - df * df) / safe
    else:
        ax = x.abs()
        ratio = ax / safe
        df = torch.sign(x) * ratio.pow(p - 1)
        d2f = (p - 1) * ratio.pow(p - 2) / safe * (1 - ratio.pow(p))
    df = df.masked_fill(zero, 0)
    result = None if s is None else df * df * s
    if ctx.second_order and g is not None:
        term = d2f.masked_fill(zero, 0) * g
        result = term if result is None else result + term
    return (result,)
