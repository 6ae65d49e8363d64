"""HesScale rule of ``nn.Linear`` (Eq. 4–5 of the paper, without the activation factor).

For ``a = W h + b`` applied to the last dimension of ``h``, with every other dimension treated as
independent positions ``n``:

    ŝ_h[n, j] = Σ_i ŝ_a[n, i] · W[i, j]²                  (the sum of Eq. 4)
    ŝ_W[i, j] = Σ_n ŝ_a[n, i] · h[n, j]²                  (Eq. 5, summed over the batch)
    ŝ_b[i]    = Σ_n ŝ_a[n, i]
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import Backprop, LayerContext, buffer, register_rule, squared


def linear_rule(ctx: LayerContext) -> Backprop:
    """Eq. 4–5 for a fully connected layer; shapes ``h: (N, *, in)``, ``ŝ_a: (N, *, out)``."""
    module = ctx.module
    ws, weight = ctx.workspace, module.weight
    if ctx.individual:  # per example n: Σ over the other positions t
        n = ctx.input.shape[0]
        s_out = ctx.curvature_output.reshape(n, -1, module.out_features)
        h_sq = squared(ctx.input.reshape(n, -1, module.in_features))
        params = {"weight": torch.einsum("nto,nti->noi", s_out, h_sq)}
        if module.bias is not None:
            params["bias"] = s_out.sum(1)
    else:
        s_out = ctx.curvature_output.reshape(-1, module.out_features)
        h_sq = squared(ctx.input.reshape(-1, module.in_features))
        params = {"weight": torch.mm(s_out.T, h_sq, out=buffer(ws, "weight", weight))}
        if module.bias is not None:
            params["bias"] = torch.sum(s_out, 0, out=buffer(ws, "bias", module.bias))
    s_in = None
    if ctx.need_input_curvature:
        s_in = ctx.curvature_output @ squared(weight)  # a temporary: keeps peak memory low
    return Backprop(s_in, params)


register_rule(nn.Linear, linear_rule)
