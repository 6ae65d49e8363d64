"""HesScale rule of ``F.scaled_dot_product_attention`` as one operation (PyTorch's fused CPU
kernel; where PyTorch decomposes attention into matrix products and a softmax, their own rules
apply instead).

Per batch entry and head, with ``A = softmax(c QKᵀ + mask)``, ``O = A V``, ``K̄ = A K`` and, for
the curvature ``ŝ`` and gradient ``g`` at ``O``, ``D_tu = Σ_j ŝ_tj (V_uj − O_tj)²`` and
``E_tu = g_t·V_u − g_t·O_t``:

    ŝ_V = (A²)ᵀ ŝ                                                      (O is linear in V)
    ŝ_K = c² (A² ⊙ D)ᵀ Q² + [second_order] c² (A (1 − 2A) ⊙ E)ᵀ Q²
    ŝ_Q[t,i] = Σ_j ŝ_tj J_t[j,i]² + [second_order] c² Σ_u A_tu E_tu (K_ui − K̄_ti)²,
    with J_t = c (Σ_u A_tu V_u K_uᵀ − O_t K̄_tᵀ), the Jacobian of O_t with respect to Q_t.

Every output element depends on ``K_u`` through one logit, so the K rule is exact given a
diagonal ``ŝ``, and so is the V rule. ``O_t`` depends on all of ``Q_t``, so the exact Q rule forms
the ``d_v × d`` Jacobian of each query: ``T_q T_k d_v d`` multiply-adds per head, more than the
attention itself (``2 T_q T_k d``); it keeps the cancellation that the softmax's shift
invariance gives (chaining the product and softmax rules loses it). Masks (boolean or additive),
``is_causal`` and ``scale`` are read from the node; dropout is refused. Grouped-query attention
(``enable_gqa``: ``H_kv`` key/value heads, each shared by ``H / H_kv`` query heads as
``repeat_interleave`` shares them) runs the rule on the shared heads and sums each group's
curvature, the rule of a tensor used several times; the outputs of different heads are
different elements, so K and V stay exact given a diagonal ``ŝ``.
"""

from __future__ import annotations

import math

import torch

from ._registry import NodeContext, operation_rule, squared


def _attention_weights(q, k, mask, causal: bool, c: float):
    logits = c * q @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask
    if causal:
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, -1)


@operation_rule("ScaledDotProductFlashAttentionForCpuBackward0")
def attention_rule(ctx: NodeContext):
    """The rules above; shapes ``(..., T, d)``."""
    if float(ctx.saved("dropout_p")) != 0.0:
        raise NotImplementedError("attention with dropout_p > 0 (use dropout_p=0)")
    q, k, v, o = (ctx.saved(n) for n in ("query", "key", "value", "output"))
    group = q.shape[-3] // k.shape[-3] if q.dim() >= 3 else 1
    if group > 1:  # grouped-query attention: query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = ctx.saved("scale")
    c = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = ctx.saved("attn_mask")
    a = _attention_weights(q, k, mask, bool(ctx.saved("is_causal")), c)
    s, g = ctx.curvature_outputs[0], ctx.grad_outputs[0]
    second = ctx.second_order and g is not None
    need_q, need_k, need_v = ctx.needs[:3]
    a_sq = squared(a)
    s_q = s_k = s_v = None
    if s is not None and need_v:
        s_v = a_sq.transpose(-1, -2) @ s
    e = None
    if second and (need_q or need_k):
        e = g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True)
    if need_k:
        terms = []
        if s is not None:
            d = (
                s @ squared(v).transpose(-1, -2)
                - 2 * (s * o) @ v.transpose(-1, -2)
                + (s * squared(o)).sum(-1, keepdim=True)
            )
            terms.append(a_sq * d)
        if e is not None:
            terms.append(a * (1 - 2 * a) * e)
        if terms:
            s_k = (c * c) * (sum(terms).transpose(-1, -2) @ squared(q))
    if need_q:
        k_bar = a @ k
        if s is not None:
            m = torch.einsum("...tu,...uj,...ui->...tji", a, v, k)
            jac = c * (m - o.unsqueeze(-1) * k_bar.unsqueeze(-2))
            s_q = torch.einsum("...tj,...tji->...ti", s, squared(jac))
        if e is not None:
            w = a * e
            centred = (
                w @ squared(k) - 2 * k_bar * (w @ k) + squared(k_bar) * w.sum(-1, keepdim=True)
            )
            term = (c * c) * centred
            s_q = term if s_q is None else s_q + term
    if group > 1:
        s_k, s_v = (None if t is None else t.unflatten(-3, (-1, group)).sum(-3) for t in (s_k, s_v))
    return (s_q, s_k, s_v) + (None,) * (len(ctx.needs) - 3)
