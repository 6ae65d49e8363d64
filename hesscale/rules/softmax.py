"""HesScale rules of LogSoftmax and Softmax along a dimension (exact given a diagonal ``ŝ_y``).

**LogSoftmax** ``y = log softmax(z)``, ``q = softmax(z)``: ``J = I − 1 qᵀ`` and every output has
the Hessian ``∇²y_k = −(diag(q) − q qᵀ)``, so

    ŝ_z = ŝ_y ⊙ (1 − 2q) + q² Σ_k ŝ_{y,k} − (Σ_k g_k) (q − q²).

After NLLLoss (``ŝ_y = 0``, ``−Σ_k g_k`` the example's weight) this is Appendix A.1's ``q − q²``:
``F.cross_entropy`` is LogSoftmax followed by NLLLoss in autograd's graph, so the exact output
diagonal of every cross-entropy variant (weights, label smoothing, probabilities, ignored
targets) comes out of this rule. LogSoftmax belongs to the loss: its second-order term is kept
under HesScaleGN as well. BL89 treats it element-wise, ``σ' = 1 − q``, ``σ'' = q² − q``:
``ŝ_z = (1 − q)² ⊙ ŝ_y + (q² − q) ⊙ g``.

**Softmax** ``p = softmax(z)``: ``J = diag(p) − p pᵀ`` and
``∂²p_k/∂z_i² = p_k(δ_ki − p_i)(1 − 2p_i) − p_k p_i(1 − p_i)``, so

    ŝ_z = p² ⊙ [(1 − 2p) ⊙ ŝ_y + Σ_k p_k² ŝ_{y,k}] + [second_order] p (1 − 2p) ⊙ (g − ⟨p, g⟩).
"""

from __future__ import annotations

import torch

from ._registry import NodeContext, operation_rule


def softmax_dim(ctx: NodeContext) -> int:
    """The saved ``dim``; autograd returns a negative one as an unsigned 64-bit number."""
    dim = int(ctx.saved("dim"))
    return dim - 2**64 if dim >= 2**63 else dim


@operation_rule("LogSoftmaxBackward0")
def log_softmax_rule(ctx: NodeContext):
    """The LogSoftmax rule above along the saved ``dim``; shapes of ``z``."""
    if not ctx.needs[0]:
        return (None,)
    q = torch.exp(ctx.saved("result"))
    dim = softmax_dim(ctx)
    s, g = ctx.s, ctx.g
    if not ctx.method.exact_output:  # BL89
        s_in = (q * q - q) * g if g is not None else torch.zeros_like(q)
        return (s_in if s is None else s_in + (1 - q) ** 2 * s,)
    variance = q - q * q
    s_in = -g.sum(dim, keepdim=True) * variance if g is not None else torch.zeros_like(q)
    if s is not None:
        s_in = s_in + s * (1 - 2 * q) + q * q * s.sum(dim, keepdim=True)
    return (s_in,)


@operation_rule("SoftmaxBackward0", "SafeSoftmaxBackward0")
def softmax_rule(ctx: NodeContext):
    """The Softmax rule above (for every method: BL89 differs only at the loss). PyTorch's safe
    softmax (attention's math kernel) gives ``p = 0`` on rows whose logits are all ``−∞``, where
    the rule gives 0 as well."""
    if not ctx.needs[0]:
        return (None,)
    p = ctx.saved("result")
    dim = softmax_dim(ctx)
    s, g = ctx.s, ctx.g
    s_in = None
    if s is not None:
        s_in = p * p * ((1 - 2 * p) * s + (p * p * s).sum(dim, keepdim=True))
    if ctx.second_order and g is not None:
        term = p * (1 - 2 * p) * (g - (p * g).sum(dim, keepdim=True))
        s_in = term if s_in is None else s_in + term
    return (s_in,)
