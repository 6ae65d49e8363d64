"""HesScale rules of matrix products: ``nn.Linear`` and ``mm``/``addmm``/``bmm``/``baddbmm``
(``F.linear``, ``matmul``, ``einsum``, ``@``), Eq. 4–5 of the paper without the activation
factor.

For ``Y = A B`` (batched or not), every element of ``Y`` is linear in each factor, so the
diagonal rule has no second-order term on either factor's diagonal and (J∘J) is the product
with the other factor squared:

    ŝ_A = ŝ_Y (B²)ᵀ,        ŝ_B = (A²)ᵀ ŝ_Y                     (Eq. 4 and Eq. 5)

``addmm(C, A, B, β, α) = β C + α A B`` scales these by ``α²`` and gives ``ŝ_C = β² ŝ_Y`` summed
over the broadcast rows. For ``nn.Linear`` (``a = h Wᵀ + b``, positions ``n`` other than the
features) this is

    ŝ_h[n, j] = Σ_i ŝ_a[n, i] W[i, j]²,   ŝ_W[i, j] = Σ_n ŝ_a[n, i] h[n, j]²,   ŝ_b = Σ_n ŝ_a.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import (
    Backprop,
    LayerContext,
    NodeContext,
    buffer,
    input_shape,
    operation_rule,
    register_rule,
    squared,
    sum_to,
)
from .normalization import batch_normalized_weight_curvature, layer_input


def linear_rule(ctx: LayerContext) -> Backprop:
    """Eq. 4–5 for a fully connected layer; shapes ``h: (N, *, in)``, ``ŝ_a: (N, *, out)``."""
    module = ctx.module
    weight, bias = module._parameters["weight"], module._parameters["bias"]  # not __getattr__
    ws, scratch = ctx.workspace, ctx.scratch
    if ctx.normalized is not None and ctx.input.dim() == 2:  # BatchNorm1d on (N, out)
        x_of = layer_input(ctx.input, scratch)

        def products(us, squared_input):  # one product for all the u's
            return list((torch.cat(us, 1).T @ x_of(squared_input)).split(module.out_features))

        def sums(squared_input):
            return x_of(squared_input).sum(0, keepdim=True)

        params = {
            "weight": batch_normalized_weight_curvature(
                ctx.normalized, products, sums, ctx.second_order
            )
        }
        if bias is not None:
            params["bias"] = torch.zeros_like(bias)
    elif ctx.individual:  # per example n: Σ over the other positions t
        n = ctx.input.shape[0]
        s_out = ctx.curvature_output.reshape(n, -1, module.out_features)
        h_sq = squared(ctx.input.reshape(n, -1, module.in_features), scratch, "input")
        params = {"weight": torch.einsum("nto,nti->noi", s_out, h_sq)}
        if bias is not None:
            params["bias"] = s_out.sum(1)
    else:
        s_out, h = ctx.curvature_output, ctx.input
        s_out = s_out if s_out.dim() == 2 else s_out.reshape(-1, module.out_features)
        h_sq = squared(h if h.dim() == 2 else h.reshape(-1, module.in_features), scratch, "input")
        params = {"weight": torch.mm(s_out.T, h_sq, out=buffer(ws, "weight", weight))}
        if bias is not None:
            params["bias"] = torch.sum(s_out, 0, out=buffer(ws, "bias", bias))
    s_in = None
    if ctx.need_input_curvature:
        s_in = ctx.curvature_output @ squared(weight, scratch, "weight")
    return Backprop(s_in, params)


def _product_curvatures(ctx, s, a_name, b_name, need_a: bool, need_b: bool, scale: float = 1.0):
    """``(ŝ_A, ŝ_B)`` of ``Y = scale · A B`` for 2-D or batched 3-D factors (each factor is
    read only when the other one's curvature is needed: autograd saves no more than that)."""
    if s is None:
        return None, None
    a = ctx.saved(a_name) if need_b else None
    b = ctx.saved(b_name) if need_a else None
    s_a = s @ squared(b, ctx.scratch, "mat2").transpose(-1, -2) if need_a else None
    s_b = squared(a, ctx.scratch, "mat1").transpose(-1, -2) @ s if need_b else None
    if scale != 1.0:
        factor = scale * scale
        s_a = s_a * factor if s_a is not None else None
        s_b = s_b * factor if s_b is not None else None
    return s_a, s_b


@operation_rule("MmBackward0")
def mm_rule(ctx: NodeContext):
    """``Y = A B``: both factors' rules above."""
    return _product_curvatures(ctx, ctx.s, "self", "mat2", ctx.needs[0], ctx.needs[1])


@operation_rule("BmmBackward0")
def bmm_rule(ctx: NodeContext):
    """``Y_b = A_b B_b`` for every batch entry ``b``."""
    return _product_curvatures(ctx, ctx.s, "self", "mat2", ctx.needs[0], ctx.needs[1])


@operation_rule("AddmmBackward0", "BaddbmmBackward0")
def addmm_rule(ctx: NodeContext):
    """``Y = β C + α A B`` (``F.linear`` on 2-D inputs; ``baddbmm`` batched, as in
    ``nn.MultiheadAttention`` with weights): ``ŝ_C = β² Σ_broadcast ŝ_Y``."""
    s = ctx.s
    if s is None:
        return None, None, None
    a_name, b_name = (
        ("mat1", "mat2")
        if type(ctx.node).__name__ == "AddmmBackward0"
        else (
            "batch1",
            "batch2",
        )
    )
    alpha, beta = float(ctx.saved("alpha")), float(ctx.saved("beta"))
    s_a, s_b = _product_curvatures(ctx, s, a_name, b_name, ctx.needs[1], ctx.needs[2], alpha)
    s_c = None
    if ctx.needs[0]:
        s_c = sum_to(s, input_shape(ctx, 0))
        if beta != 1.0:
            s_c = s_c * (beta * beta)
    return s_c, s_a, s_b


def linear_input(module: nn.Module, node) -> tuple[int, str] | None:
    """Where autograd keeps a Linear layer's input: ``addmm``'s or ``mm``'s first factor,
    below the view that restores the leading dimensions of an N-D input."""
    levels = 0
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0") and levels < 1:
        node, levels = node.next_functions[0][0], levels + 1
    name = type(node).__name__
    if name == "AddmmBackward0":
        return levels, "mat1"
    if name == "MmBackward0":
        return levels, "self"
    return None


register_rule(nn.Linear, linear_rule, needs_output=False, batch_norm=True, saved_input=linear_input)
