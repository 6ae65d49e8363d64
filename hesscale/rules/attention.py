"""HesScale rule of ``F.scaled_dot_product_attention`` as one operation: PyTorch's fused kernels
(the CPU kernel and the GPU's flash, memory-efficient and cuDNN kernels; where PyTorch decomposes
attention into matrix products and a softmax, their own rules apply instead).

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
short contexts and quality studies).

**The probabilities from the saved log-sum-exp.** No fused kernel keeps ``A``; each saves the
log-sum-exp ``ℓ_t = log Σ_u exp z_tu`` of every query's logits, so that ``A_tu = exp(z_tu − ℓ_t)``
needs one product ``QKᵀ`` and no softmax. The rule forms ``A`` for a block of queries at a time
(at most ``_BLOCK_ELEMENTS`` entries per temporary), so its memory stays bounded at long
contexts like the kernels' own, and under ``is_causal`` a block reads only the keys its queries
can see. Every formula above is a sum over queries of per-query terms, so the blocks' results
add up to the whole. The kernels save ``ℓ`` in their own layouts (the memory-efficient kernel
pads it to a multiple of 32 queries, cuDNN adds a trailing dimension); the first call of each
kernel configuration checks that the rows of ``exp(z − ℓ)`` sum to one, and refuses the kernel
by name if they do not (a PyTorch version that saved something else must not give silently
wrong numbers). The rows are then normalised exactly, which also removes the rounding of an
``ℓ`` computed from bf16 inputs.

Masks (boolean or additive; the GPU kernels' ``attn_bias``), ``is_causal`` (top-left aligned,
as PyTorch defines it) and ``scale`` are read from the node; dropout inside attention and
nested (jagged) inputs are refused. The rule runs in float32 (the parameters' dtype) with
autocast off, whatever precision the kernel ran in: the logits must be formed as exactly as the
kernel formed them, or ``exp(z − ℓ)`` would amplify their rounding. Grouped-query attention
(``enable_gqa``: ``H_kv`` key/value heads, each shared by ``H / H_kv`` query heads as
``repeat_interleave`` shares them) runs the rule on the shared heads and sums each group's
curvature, the rule of a tensor used several times; the outputs of different heads are
different elements, so K and V stay exact given a diagonal ``ŝ``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ._registry import NodeContext, operation_rule, squared


@dataclass(frozen=True)
class _Kernel:
    """Under which names a fused kernel's backward node saved the log-sum-exp and the mask."""

    logsumexp: str
    mask: str | None
    nested: bool  # it saves cumulative sequence lengths (set for nested inputs)


KERNELS = {
    "ScaledDotProductFlashAttentionForCpuBackward0": _Kernel("logsumexp", "attn_mask", False),
    "ScaledDotProductFlashAttentionBackward0": _Kernel("logsumexp", None, True),
    "ScaledDotProductEfficientAttentionBackward0": _Kernel("log_sumexp", "attn_bias", False),
    "ScaledDotProductCudnnAttentionBackward0": _Kernel("logsumexp", "attn_bias", True),
}

_BLOCK_ELEMENTS = 2**24  # entries of one (…, queries, keys) temporary: 64 MB in float32
_ROW_SUM_TOLERANCE = 1e-2  # the largest |Σ_u exp(z_tu − ℓ_t) − 1| a kernel's ℓ may show
_checked: set = set()  # kernel configurations whose saved log-sum-exp was checked


def _row_logsumexp(lse: torch.Tensor, queries: int) -> torch.Tensor:
    """``ℓ`` shaped ``(…, T_q)`` from a kernel's layout (a trailing 1, padded query rows)."""
    if lse.dim() >= 2 and lse.shape[-1] == 1 and lse.shape[-2] == queries:
        lse = lse.squeeze(-1)
    return lse[..., :queries]


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _rows(mask: torch.Tensor | None, rows: slice, keys: int) -> torch.Tensor | None:
    """The mask's entries for a block of query rows and the first ``keys`` keys."""
    if mask is None:
        return None
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        mask = mask[..., rows, :]
    return mask[..., :keys] if mask.shape[-1] != 1 else mask


class _Probabilities:
    """``A = exp(z − ℓ)`` for blocks of queries, checked once per kernel configuration."""

    def __init__(self, ctx: NodeContext, q, k, c: float, causal: bool):
        name = type(ctx.node).__name__
        kernel = KERNELS[name]
        self.q, self.k, self.c, self.causal = q, k, c, causal
        self.lse = _row_logsumexp(ctx.saved(kernel.logsumexp), q.shape[-2])
        mask = ctx.saved(kernel.mask) if kernel.mask is not None else None
        self.mask = _additive(mask, q.dtype)
        self.key = (name, q.device.type, causal, mask is not None, q.shape[-2], k.shape[-2])

    def keys(self, rows: slice) -> int:
        """The keys a block of queries can see (all but those after its last query if causal)."""
        return min(rows.stop, self.k.shape[-2]) if self.causal else self.k.shape[-2]

    def __call__(self, rows: slice) -> torch.Tensor:
        keys = self.keys(rows)
        k = self.k[..., :keys, :]
        a = (self.q[..., rows, :] * self.c) @ k.transpose(-1, -2)
        mask = _rows(self.mask, rows, keys)
        if mask is not None:
            in_place = torch.broadcast_shapes(a.shape, mask.shape) == a.shape
            a = a.add_(mask) if in_place else a + mask
        if self.causal:
            t = torch.arange(rows.start, rows.start + a.shape[-2], device=a.device)
            hidden = t.unsqueeze(-1) < torch.arange(keys, device=a.device)
            a = a.masked_fill_(hidden, float("-inf"))
        lse = self.lse[..., rows]
        finite = torch.isfinite(lse)  # a row that sees no key has ℓ = −∞ and A = 0
        a = a.sub_(torch.where(finite, lse, 0.0).unsqueeze(-1)).exp_()
        total = a.sum(-1, keepdim=True)
        if self.key not in _checked:
            self._check(total, finite)
        return a.div_(total.clamp_min(torch.finfo(a.dtype).tiny))

    def _check(self, total, finite) -> None:
        seen = total.squeeze(-1)[finite & (total.squeeze(-1) > 0)]
        worst = float(seen[(seen - 1).abs().argmax()]) if seen.numel() else 1.0
        if not abs(worst - 1) <= _ROW_SUM_TOLERANCE:  # NaN fails too
            raise NotImplementedError(
                f"the log-sum-exp this kernel saved does not match the probabilities "
                f"recomputed from its query, key and mask (a row sums to {worst:.4g} "
                "instead of 1): this PyTorch version's kernel is not supported; run attention "
                "under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
            )
        _checked.add(self.key)


def _centred_squares(w, y, y_bar):
    """``Σ_u w_tu (Y_u − Ȳ_t)²`` for every ``t`` and feature, in three products."""
    return w @ squared(y) - 2 * y_bar * (w @ y) + squared(y_bar) * w.sum(-1, keepdim=True)


def _exact_query_curvature(s, a, v, k, o, k_bar, c):
    """``Σ_j ŝ_tj J_t[j,i]²`` with each query's Jacobian ``J_t`` formed explicitly."""
    m = torch.einsum("...tu,...uj,...ui->...tji", a, v, k)
    jac = c * (m - o.unsqueeze(-1) * k_bar.unsqueeze(-2))
    return torch.einsum("...tj,...tji->...ti", s, squared(jac))


def _block_rows(q, k, v, exact_q: bool) -> int:
    """Queries per block: each (…, rows, keys) temporary (and, for the exact query rule, each
    (…, rows, d_v, d) Jacobian) has at most ``_BLOCK_ELEMENTS`` entries."""
    per_row = math.prod(q.shape[:-2]) * max(
        k.shape[-2], v.shape[-1] * q.shape[-1] if exact_q else 1
    )
    return max(1, min(q.shape[-2], _BLOCK_ELEMENTS // max(per_row, 1)))


def _check_supported(ctx: NodeContext, q) -> None:
    if float(ctx.saved("dropout_p")) != 0.0:
        raise NotImplementedError("attention with dropout_p > 0 (use dropout_p=0)")
    nested = q.is_nested or (
        KERNELS[type(ctx.node).__name__].nested
        and isinstance(getattr(ctx.node, "_saved_cum_seq_q", None), torch.Tensor)
        and ctx.node._saved_cum_seq_q.numel() > 0
    )
    if nested:
        raise NotImplementedError("attention on nested (jagged) tensors (pad the batch instead)")


@operation_rule(*KERNELS)
def attention_rule(ctx: NodeContext):
    """The rules above; shapes ``(..., T, d)``."""
    q = ctx.saved("query")
    _check_supported(ctx, q)
    device = q.device.type
    autocast = torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return _attention_curvatures(ctx, q)


def _attention_curvatures(ctx: NodeContext, q):
    k, v, o = (ctx.saved(n) for n in ("key", "value", "output"))
    group = q.shape[-3] // k.shape[-3] if q.dim() >= 3 else 1
    if group > 1:  # grouped-query attention: query head h reads key/value head h // group
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = ctx.saved("scale")
    c = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    probabilities = _Probabilities(ctx, q, k, c, bool(ctx.saved("is_causal")))
    s, g = ctx.curvature_outputs[0], ctx.grad_outputs[0]
    second = ctx.second_order and g is not None
    need_q, need_k, need_v = ctx.needs[:3]
    exact_q = ctx.settings.attention == "exact"
    need_d = s is not None and (need_k or (need_q and not exact_q))
    need_e = second and (need_q or need_k)
    reaches_q = need_q and (need_d or need_e or (exact_q and s is not None))
    s_q = q.new_zeros(q.shape) if reaches_q else None
    s_k = k.new_zeros(k.shape) if need_k and (need_d or need_e) else None
    s_v = v.new_zeros(v.shape) if need_v and s is not None else None
    q_sq = squared(q) if need_k else None
    v_sq = squared(v) if need_d else None
    step = _block_rows(q, k, v, exact_q)
    for start in range(0, q.shape[-2], step):
        rows = slice(start, min(start + step, q.shape[-2]))
        keys = probabilities.keys(rows)
        a = probabilities(rows)
        a_sq = squared(a)
        s_b = s[..., rows, :] if s is not None else None
        o_b = o[..., rows, :]
        k_b, v_b = k[..., :keys, :], v[..., :keys, :]
        if s_v is not None:
            s_v[..., :keys, :] += a_sq.transpose(-1, -2) @ s_b
        gn = e = None  # A² ⊙ D and E of the docstring
        if need_d:
            gn = (
                s_b @ v_sq[..., :keys, :].transpose(-1, -2)
                - 2 * (s_b * o_b) @ v_b.transpose(-1, -2)
                + (s_b * squared(o_b)).sum(-1, keepdim=True)
            ).mul_(a_sq)
        if need_e:
            e = g[..., rows, :] @ v_b.transpose(-1, -2) - (g[..., rows, :] * o_b).sum(
                -1, keepdim=True
            )
        if s_k is not None:
            h = gn
            if e is not None:
                curved = a * (1 - 2 * a) * e
                h = curved if h is None else h + curved
            s_k[..., :keys, :] += (c * c) * (h.transpose(-1, -2) @ q_sq[..., rows, :])
        if s_q is not None:
            k_bar = a @ k_b
            w = None
            if exact_q and s_b is not None:
                s_q[..., rows, :] += _exact_query_curvature(s_b, a, v_b, k_b, o_b, k_bar, c)
            elif gn is not None:
                w = gn
            if e is not None:
                w = a * e if w is None else w + a * e
            if w is not None:
                s_q[..., rows, :] += (c * c) * _centred_squares(w, k_b, k_bar)
    if group > 1:
        s_k, s_v = (None if t is None else t.unflatten(-3, (-1, group)).sum(-3) for t in (s_k, s_v))
    return (s_q, s_k, s_v) + (None,) * (len(ctx.needs) - 3)
