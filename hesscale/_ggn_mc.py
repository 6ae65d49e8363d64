"""GGN-MC in the engine: the Monte-Carlo GGN diagonal of BackPACK's DiagGGNMC.

``diag(G) ≈ (1/k) Σ_m Σ_n (J_{θ,n}ᵀ v_{nm})²`` with ``v`` a square-root factor of the loss
Hessian sampled at the output (:func:`hesscale.baselines.sample_hessian_factor`). One extra
batched backward pass of the factors through the graph gives ``δ = J_aᵀ v`` at the output of
every layer call, per example (as long as the forward does not mix examples); each layer then
squares its
per-example parameter gradients ``g_n = ∂⟨δ_n, f(h_n)⟩/∂θ``:

    Linear:        g_n = Σ_t δ_{n,t} ⊗ h_{n,t}    (t: positions other than the batch)
    other layers:  torch.func.vmap over examples of the layer's own gradient

For a Linear layer without extra positions the sum of squares needs no per-example tensor:
``Σ_n (δ_n ⊗ h_n)² = (δ²)ᵀ (h²)``, the cost of one gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_gradients(module: nn.Module, h: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """``{name: (N, *shape)}``: the gradient of ``⟨δ_n, module(h_n)⟩`` for every example."""
    if isinstance(module, nn.Linear):
        n = h.shape[0]
        d = delta.reshape(n, -1, module.out_features)
        h = h.reshape(n, -1, module.in_features)
        grads = {"weight": torch.einsum("nto,nti->noi", d, h)}
        if module.bias is not None:
            grads["bias"] = d.sum(1)
        return {k: v for k, v in grads.items() if getattr(module, k).requires_grad}
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False) if p.requires_grad}

    def one(p, x, d):
        return grad(lambda q: (functional_call(module, q, (x[None],)) * d[None]).sum())(p)

    return vmap(one, (None, 0, 0))(params, h, delta)


def sampled_ggn_diagonals(
    records, output: Tensor, factors: Tensor, individual: bool, dtype: torch.dtype | None = None
):
    """``[(record, {name: estimate})]`` for records with parameters; factors ``(k, N, *out)``."""
    layers = [
        r for r in records if any(p.requires_grad for p in r.module.parameters(recurse=False))
    ]
    deltas = torch.autograd.grad(
        output, [r.live_output for r in layers], factors, retain_graph=True, is_grads_batched=True
    )
    k = factors.shape[0]
    results = []
    for record, delta in zip(layers, deltas):
        h = record.input.detach()
        if dtype is not None and h.is_floating_point():  # mixed precision: the params' dtype
            h, delta = h.to(dtype), delta.to(dtype)
        n = h.shape[0]
        if isinstance(record.module, nn.Linear) and h.dim() == 2 and not individual:
            d_sq = (delta * delta).reshape(k * n, -1)
            h_sq = (h * h).repeat(k, 1)
            estimates = {"weight": d_sq.T @ h_sq / k}
            if record.module.bias is not None:
                estimates["bias"] = d_sq.sum(0) / k
            results.append((record, estimates))
            continue
        h_rep = h.unsqueeze(0).expand(k, *h.shape).reshape(k * n, *h.shape[1:])
        grads = per_example_gradients(record.module, h_rep, delta.reshape(k * n, *delta.shape[2:]))
        estimates = {}
        for name, g in grads.items():
            sq = (g * g).reshape(k, n, *g.shape[1:]).mean(0)
            estimates[name] = sq if individual else sq.sum(0)
        results.append((record, estimates))
    return results
