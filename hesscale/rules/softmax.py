"""HesScale rule of ``nn.LogSoftmax``, the last layer of a network trained with ``NLLLoss``.

For ``y = log softmax(z)`` with ``q = softmax(z)``, the Jacobian is ``J = I − 1 qᵀ`` and every
output has the same Hessian ``∇²y_k = −(diag(q) − q qᵀ)``. The diagonal rule for a
non-element-wise layer, ``ŝ_z = (J∘J)ᵀ ŝ_y + diag(Σ_k g_k ∇²y_k)``, becomes

    ŝ_z = ŝ_y ⊙ (1 − 2q) + q² · Σ_k ŝ_{y,k} − (Σ_k g_k) (q − q²),

which is exact after ``NLLLoss`` (there ``ŝ_y = 0`` and ``−Σ_k g_k`` is the example's weight,
giving Appendix A.1's ``q − q²``). LogSoftmax belongs to the loss, so the σ'' term is kept in the
Gauss-Newton variant as well. BL89 instead treats LogSoftmax as element-wise with
``σ' = 1 − q`` and ``σ'' = q² − q``:

    ŝ_z = (1 − q)² ⊙ ŝ_y + (q² − q) ⊙ g.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import Backprop, LayerContext, register_rule


def log_softmax_rule(ctx: LayerContext) -> Backprop:
    """The rule above along ``module.dim``; shapes of ``z``."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    dim = ctx.module.dim
    q = torch.exp(ctx.output)
    s, g = ctx.curvature_output, ctx.grad_output
    if not ctx.method.exact_output:
        return Backprop((1 - q) ** 2 * s + (q * q - q) * g)
    s_in = (
        s * (1 - 2 * q) + q * q * s.sum(dim, keepdim=True) - g.sum(dim, keepdim=True) * (q - q * q)
    )
    return Backprop(s_in)


def _check_dim(module: nn.Module) -> str | None:
    if module.dim is None:
        return "LogSoftmax needs an explicit dim (dim=None picks one by the input's rank)"
    return None


register_rule(nn.LogSoftmax, log_softmax_rule, _check_dim)
