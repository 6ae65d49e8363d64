"""HesScale rules of element-wise arithmetic between tensors, with broadcasting.

``y = a + α b`` and ``y = a − α b``: ``ŝ_a = ŝ_y`` and ``ŝ_b = α² ŝ_y``, each summed over the
dimensions that broadcasting expanded (linear: no second-order term).

``y = a ⊙ b`` (gates such as ``a * sigmoid(b)``, SwiGLU, dropout masks): ``∂²y/∂a² = 0``, so each
factor's rule has no second-order term on its diagonal,

    ŝ_a = Σ_bcast b² ⊙ ŝ_y,        ŝ_b = Σ_bcast a² ⊙ ŝ_y.

When both factors are the same tensor (``x * x``) the product is a square, and the exact rule
``ŝ_x = 4x² ŝ_y + [second_order] 2 g_y`` is used instead of the two one-sided terms.

``y = a / b``: ``ŝ_a = Σ_bcast ŝ_y / b²`` and
``ŝ_b = Σ_bcast [(a/b²)² ŝ_y + [second_order] (2a/b³) g_y]``.

``addcmul(c, a, b, value=v) = c + v a ⊙ b`` and ``addcdiv(c, a, b, value=v) = c + v a / b``:
``ŝ_c = Σ_bcast ŝ_y`` and the product's or quotient's rules scaled by ``v`` (``v²`` on ``ŝ``,
``v`` on the second-order term).
"""

from __future__ import annotations

from ._registry import NodeContext, input_shape, operation_rule, squared, sum_to
from .shape import transpose_of


def _same_input(ctx: NodeContext) -> bool:
    (a, i), (b, j) = ctx.node.next_functions[:2]
    return a is not None and a is b and i == j


@operation_rule("AddBackward0", "SubBackward0")
def add_rule(ctx: NodeContext):
    """``a ± α b``: the backward gives ``(ŝ, ±α ŝ)`` summed to shape; scale the second by ±α."""
    s_a, s_b = transpose_of(ctx)
    if s_b is not None:
        alpha = float(ctx.saved("alpha"))
        sign = -1.0 if type(ctx.node).__name__ == "SubBackward0" else 1.0
        if sign * alpha != 1.0:
            s_b = s_b * (sign * alpha)
    return s_a, s_b


@operation_rule("MulBackward0")
def mul_rule(ctx: NodeContext):
    """``a ⊙ b``: one-sided rules, or the square's exact rule when ``a`` is ``b``."""
    s, g = ctx.s, ctx.g
    if _same_input(ctx):
        x = ctx.saved("self")
        s_x = None if s is None else squared(x).mul_(s).mul_(4)
        if ctx.second_order and g is not None:
            s_x = g * 2 if s_x is None else s_x.add_(g, alpha=2)
        return s_x, None
    if s is None:
        return None, None
    s_a = s_b = None
    if ctx.needs[0]:
        s_a = sum_to(squared(ctx.saved("other")) * s, input_shape(ctx, 0))
    if ctx.needs[1]:
        s_b = sum_to(squared(ctx.saved("self")) * s, input_shape(ctx, 1))
    return s_a, s_b


@operation_rule("DivBackward0")
def div_rule(ctx: NodeContext):
    """``a / b``: see the module docstring."""
    s, g = ctx.s, ctx.g
    b = ctx.saved("other")
    s_a = s_b = None
    if ctx.needs[0] and s is not None:
        s_a = sum_to(s / squared(b), input_shape(ctx, 0))
    if len(ctx.needs) > 1 and ctx.needs[1]:
        a = ctx.saved("self")
        b_sq = squared(b)
        if s is not None:
            s_b = squared(a / b_sq) * s
        if ctx.second_order and g is not None:
            term = 2 * a / (b_sq * b) * g
            s_b = term if s_b is None else s_b + term
        s_b = sum_to(s_b, input_shape(ctx, 1))
    return s_a, s_b


def _other_edges(ctx: NodeContext) -> bool:
    """Whether the two factors of a three-input node (``c, a, b``) are one tensor."""
    (a, i), (b, j) = ctx.node.next_functions[1:3]
    return a is not None and a is b and i == j


@operation_rule("AddcmulBackward0")
def addcmul_rule(ctx: NodeContext):
    """``c + v a ⊙ b``."""
    s, g = ctx.s, ctx.g
    v = float(ctx.saved("value"))
    s_c = sum_to(s, input_shape(ctx, 0)) if s is not None and ctx.needs[0] else None
    a, b = ctx.saved("tensor1"), ctx.saved("tensor2")
    if _other_edges(ctx):  # c + v a²
        s_a = None if s is None else squared(a) * s * (4 * v * v)
        if ctx.second_order and g is not None:
            term = g * (2 * v)
            s_a = term if s_a is None else s_a + term
        return s_c, sum_to(s_a, input_shape(ctx, 1)) if s_a is not None else None, None
    if s is None:
        return s_c, None, None
    s_a = sum_to(squared(b) * s * (v * v), input_shape(ctx, 1)) if ctx.needs[1] else None
    s_b = sum_to(squared(a) * s * (v * v), input_shape(ctx, 2)) if ctx.needs[2] else None
    return s_c, s_a, s_b


@operation_rule("AddcdivBackward0")
def addcdiv_rule(ctx: NodeContext):
    """``c + v a / b``."""
    s, g = ctx.s, ctx.g
    v = float(ctx.saved("value"))
    a, b = ctx.saved("tensor1"), ctx.saved("tensor2")
    s_c = sum_to(s, input_shape(ctx, 0)) if s is not None and ctx.needs[0] else None
    s_a = s_b = None
    b_sq = squared(b)
    if ctx.needs[1] and s is not None:
        s_a = sum_to(s / b_sq * (v * v), input_shape(ctx, 1))
    if ctx.needs[2]:
        if s is not None:
            s_b = squared(a / b_sq) * s * (v * v)
        if ctx.second_order and g is not None:
            term = 2 * v * a / (b_sq * b) * g
            s_b = term if s_b is None else s_b + term
        s_b = sum_to(s_b, input_shape(ctx, 2)) if s_b is not None else None
    return s_c, s_a, s_b
