"""HesScale rule of ``F.scaled_dot_product_attention`` as one operation (PyTorch's fused CPU
kernel; where PyTorch decomposes attention into matrix products and a softmax, their own rules
apply instead).

Per batch entry and head, with logits ``z = c QKᵀ + mask``, ``A = softmax(z)`` (row-wise),
``O = A V``, ``K̄ = A K`` and, for the curvature ``ŝ`` and gradient ``g`` at ``O``,
``D_tu = Σ_j ŝ_tj (V_uj − O_tj)²`` and ``E_tu = g_t·V_u − g_t·O_t``, the Hessian of the loss with
respect to query ``t``'s logits (given a diagonal ``ŝ``) has the diagonal

    h_tu = A_tu² D_tu + [second_order] A_tu (1 − 2A_tu) E_tu,

and it annihilates the all-ones vector (a row of ``A`` does not change when its logits are
shifted). The rules are

    ŝ_V = (A²)ᵀ ŝ                                                      (O is linear in V)
    ŝ_K = c² hᵀ Q²                                                     (one logit per key)
    ŝ_Q[t,i] = c² Σ_u w_tu (K_ui − K̄_ti)²,   w_tu = A_tu² D_tu + [second_order] A_tu E_tu.

Every output element depends on ``K_u`` through one logit, so the K rule is exact given a
diagonal ``ŝ``, and so is the V rule. ``O_t`` depends on ``Q_t`` through all of its logits: the
query rule above (``attention="centred"``, the default) drops the off-diagonal entries of the
logits' Gauss-Newton matrix after centring the keys at ``K̄_t`` (the shift invariance lets any
centre be used; at ``K̄_t`` the second-order part is exact, since ``Σ_u A_tu (K_u − K̄_t) = 0``).
It costs ``T_q T_k d`` multiply-adds per head, like attention itself.
``hesscale.extend(model, attention="exact")`` instead forms the ``d_v × d`` Jacobian of each
query's output,

    ŝ_Q[t,i] = Σ_j ŝ_tj J_t[j,i]² + [second_order] c² Σ_u A_tu E_tu (K_ui − K̄_ti)²,
    J_t = c (Σ_u A_tu V_u K_uᵀ − O_t K̄_tᵀ),

exact given a diagonal ``ŝ`` at ``T_q T_k d_v d`` per head (``d_v/2`` times attention's cost: for
short contexts and quality studies). Masks (boolean or additive), ``is_causal`` and ``scale`` are
read from the node; dropout is refused. Grouped-query attention (``enable_gqa``: ``H_kv``
key/value heads, each shared by ``H / H_kv`` query heads as ``repeat_interleave`` shares them)
runs the rule on the shared heads and sums each group's curvature, the rule of a tensor used
several times; the outputs of different heads are different elements, so K and V stay exact
given a diagonal ``ŝ``.
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


def _centred_squares(w, y, y_bar):
    """``Σ_u w_tu (Y_u − Ȳ_t)²`` for every ``t`` and feature, in three products."""
    return w @ squared(y) - 2 * y_bar * (w @ y) + squared(y_bar) * w.sum(-1, keepdim=True)


def _exact_query_curvature(s, a, v, k, o, k_bar, c):
    """``Σ_j ŝ_tj J_t[j,i]²`` with each query's Jacobian ``J_t`` formed explicitly."""
    m = torch.einsum("...tu,...uj,...ui->...tji", a, v, k)
    jac = c * (m - o.unsqueeze(-1) * k_bar.unsqueeze(-2))
    return torch.einsum("...tj,...tji->...ti", s, squared(jac))


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
    a = _attention_weights(q, k, ctx.saved("attn_mask"), bool(ctx.saved("is_causal")), c)
    s, g = ctx.curvature_outputs[0], ctx.grad_outputs[0]
    second = ctx.second_order and g is not None
    need_q, need_k, need_v = ctx.needs[:3]
    exact_q = ctx.settings.attention == "exact"
    a_sq = squared(a)
    s_v = a_sq.transpose(-1, -2) @ s if s is not None and need_v else None
    gn = e = None  # A² ⊙ D and E of the docstring
    if s is not None and (need_k or (need_q and not exact_q)):
        d = (
            s @ squared(v).transpose(-1, -2)
            - 2 * (s * o) @ v.transpose(-1, -2)
            + (s * squared(o)).sum(-1, keepdim=True)
        )
        gn = a_sq * d
    if second and (need_q or need_k):
        e = g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True)
    s_k = s_q = None
    if need_k:
        terms = [t for t in (gn, None if e is None else a * (1 - 2 * a) * e) if t is not None]
        if terms:
            s_k = (c * c) * (sum(terms).transpose(-1, -2) @ squared(q))
    if need_q:
        k_bar = a @ k
        w = None
        if exact_q and s is not None:
            s_q = _exact_query_curvature(s, a, v, k, o, k_bar, c)
        elif gn is not None:
            w = gn
        if e is not None:
            w = a * e if w is None else w + a * e
        if w is not None:
            term = (c * c) * _centred_squares(w, k, k_bar)
            s_q = term if s_q is None else s_q + term
    if group > 1:
        s_k, s_v = (None if t is None else t.unflatten(-3, (-1, group)).sum(-3) for t in (s_k, s_v))
    return (s_q, s_k, s_v) + (None,) * (len(ctx.needs) - 3)
