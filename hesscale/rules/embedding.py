"""HesScale layer rule of ``nn.Embedding``: a lookup, so each output row is one weight row.

The Jacobian entries are 0 or 1, so ``ŝ_W[r] = Σ_{p : idx_p = r} ŝ_y[p]``: an ``index_add`` of
the output curvature (the padding row, which PyTorch never updates, gets 0). The same rule runs
on the autograd node for ``F.embedding`` (a selection, :mod:`hesscale.rules.shape`); the layer
rule adds per-example estimates (``individual=True``) and GGN-MC for embedding modules.
"""

from __future__ import annotations

from torch import nn

from ._registry import Backprop, LayerContext, register_rule


def embedding_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_W`` by ``index_add`` (per example: ``scatter_add`` into ``(N, V, D)``)."""
    module, idx, s = ctx.module, ctx.input, ctx.curvature_output
    rows, dim = module.num_embeddings, module.embedding_dim
    if ctx.individual:
        n = idx.shape[0]
        flat_idx = idx.reshape(n, -1, 1).expand(-1, -1, dim)
        estimate = s.new_zeros(n, rows, dim).scatter_add_(1, flat_idx, s.reshape(n, -1, dim))
    else:
        estimate = s.new_zeros(rows, dim).index_add_(0, idx.reshape(-1), s.reshape(-1, dim))
    if module.padding_idx is not None:
        estimate[..., module.padding_idx, :] = 0
    return Backprop(None, {"weight": estimate})


def check_embedding(module: nn.Module) -> str | None:
    if module.scale_grad_by_freq:
        return (
            "scale_grad_by_freq=True is not supported (its gradient is not the Jacobian's); "
            "use scale_grad_by_freq=False"
        )
    if module.sparse:
        return "sparse=True is not supported (estimates are dense); use sparse=False"
    return None


register_rule(nn.Embedding, embedding_rule, check_embedding, needs_output=False)
