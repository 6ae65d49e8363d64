"""The estimators the paper compares HesScale against, behind ``hesscale.diagonal(method=...)``.

* ``exact``: ``diag(∇²_θ L)``, exact (dense blocks; small networks);
* ``ggn``: ``diag(G)``, ``G = Σ_n J_nᵀ H_n J_n``, exact;
* ``ggn_mc`` (BackPACK's DiagGGNMC) runs in the engine (``_ggn_mc``) from the factors of
  :func:`sample_hessian_factor`;
* ``hutchinson``: AdaHessian's ``(1/k) Σ_m z_m ⊙ (H z_m)``, ``z`` Rademacher;
* ``kfac_mc``: the diagonal of KFAC's ``A ⊗ B`` for Linear layers, ``A = (1/N) Σ_n x̄_n x̄_nᵀ``
  and ``B = (1/k) Σ_m Σ_n g_{nm} g_{nm}ᵀ`` with ``g = J_aᵀ v`` backpropagated MC factors;
* ``grad_sq``: ``g ⊙ g``, the squared batch gradient (the empirical-Fisher diagonal of Adam);
* ``empirical_fisher``: ``c Σ_n g_n ⊙ g_n``, the per-example gradients ``g_n`` of the loss at the
  data's labels (EWC's and pruning papers' "empirical Fisher", not ``grad_sq``), ``c = 1/N``
  for a mean reduction;
* ``fisher``: the same at labels sampled from the model, ``Σ_n (J_nᵀ v_n)²`` with ``v`` the
  sampled factors of :func:`sample_hessian_factor` (for CrossEntropyLoss ``√(1/N)(q − e_ŷ)``
  is the gradient of the loss at the sampled label ``ŷ ~ q``), averaged over ``samples``.
  It is GGN-MC's quantity, computed by ``torch.func`` outside the engine, so it runs on
  models and parameter sharing that the engine's per-example rules refuse.

Every function returns ``(loss, {name: estimate})`` and leaves the batch gradient in ``.grad``
as ``loss.backward()`` would. The stochastic ones take ``samples`` and a ``torch.Generator``.
The Monte-Carlo cores take their noise as arguments, so an experiment can ``vmap`` them over
examples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ._errors import UnsupportedModuleError
from .reference import exact_hessian_diagonal, ggn_diagonal
from .rules.losses import cross_entropy_coefficients


def _backward(model, loss_fn, inputs, target, loss_kwargs) -> tuple[Tensor, Tensor]:
    out = model(inputs)
    loss = loss_fn(out, target, **loss_kwargs)
    loss.backward()
    return loss.detach(), out.detach()


def _trainable(model) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _call(model, params, x):
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    return functional_call(model, {**params, **frozen, **dict(model.named_buffers())}, (x,))


def sample_hessian_factor(
    loss_fn: nn.Module, out: Tensor, target: Tensor, samples: int, generator=None, **loss_kwargs
) -> Tensor:
    """Monte-Carlo square-root factors ``v`` of the loss Hessian at the output: ``(k, *out.shape)``
    with ``E[v_n v_nᵀ] = ∇²_{f_n} L``, independent across examples.

    * CrossEntropyLoss: ``v = √A (q − e_ŷ)``, ``ŷ ~ Categorical(q)``, ``A = Σ_c a_c``;
    * MSELoss: ``v = √(2 s) z``, ``z ~ N(0, I)``, ``s`` the reduction's scale;
    * BCEWithLogitsLoss: ``v = √c (σ − ŷ)``, ``ŷ ~ Bernoulli(σ)``;
    * GaussianNLLLoss (mean): ``v = √(s / var) z``.
    """
    out = out.detach()
    shape = (samples, *out.shape)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        total = cross_entropy_coefficients(loss_fn, out, target).sum(1, keepdim=True)
        q = torch.softmax(out, 1)
        flat = q.movedim(1, -1).reshape(-1, q.shape[1])
        draws = torch.multinomial(flat, samples, replacement=True, generator=generator)
        onehot = nn.functional.one_hot(draws.T, q.shape[1]).to(q.dtype)  # (k, M, C)
        onehot = onehot.reshape(samples, *q.movedim(1, -1).shape).movedim(-1, 2)
        return total.sqrt() * (q - onehot)
    z = torch.randn(shape, dtype=out.dtype, device=out.device, generator=generator)
    scale = 1.0 / out.numel() if loss_fn.reduction == "mean" else 1.0
    if isinstance(loss_fn, nn.MSELoss):
        return (2 * scale) ** 0.5 * z
    if isinstance(loss_fn, nn.GaussianNLLLoss):
        var = loss_kwargs["var"].detach()
        var = var.unsqueeze(-1) if var.dim() == out.dim() - 1 else var
        return (scale / var.clamp(min=loss_fn.eps)).sqrt() * z
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        sig = torch.sigmoid(out)
        draw = torch.rand(shape, dtype=out.dtype, device=out.device, generator=generator) < sig
        c = 1 - target + (loss_fn.pos_weight * target if loss_fn.pos_weight is not None else target)
        if loss_fn.weight is not None:
            c = c * loss_fn.weight
        return (c * scale).sqrt() * (sig - draw.to(out.dtype))
    raise UnsupportedModuleError(
        f"{type(loss_fn).__name__} has no Monte-Carlo factor; the sampled estimators support "
        "CrossEntropyLoss, MSELoss, BCEWithLogitsLoss and GaussianNLLLoss"
    )


def hutchinson_from_probes(loss_of_params, params, probes) -> dict[str, Tensor]:
    """``(1/k) Σ_m z_m ⊙ H z_m`` for probes ``z: {name: (k, *shape)}`` (forward-over-reverse)."""

    def one(z):
        _, hz = jvp(grad(loss_of_params), (params,), (z,))
        return {n: z[n] * hz[n] for n in z}

    products = vmap(one)(probes)
    return {n: v.mean(0) for n, v in products.items()}


def rademacher_like(params: dict[str, Tensor], samples: int, generator=None) -> dict[str, Tensor]:
    """Independent ±1 probes shaped ``(k, *p.shape)`` for each parameter."""
    return {
        n: torch.randint(0, 2, (samples, *p.shape), generator=generator, device=p.device).to(
            p.dtype
        )
        * 2
        - 1
        for n, p in params.items()
    }


def exact(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    _batch_only("exact", individual)
    loss, _ = _backward(model, loss_fn, inputs, target, loss_kwargs)
    return loss, exact_hessian_diagonal(model, loss_fn, inputs, target, **loss_kwargs)


def ggn(model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs):
    _batch_only("ggn", individual)
    _require_output_loss(loss_fn)
    loss, _ = _backward(model, loss_fn, inputs, target, loss_kwargs)
    return loss, ggn_diagonal(model, loss_fn, inputs, target, **loss_kwargs)


def _batch_only(name: str, individual: bool) -> None:
    if individual:
        raise UnsupportedModuleError(
            f"{name} computes the batch's diagonal; per-example estimates (individual=True) are "
            "offered by hesscale, hesscale_gn, bl89, ggn_mc and kfac_mc"
        )


def _require_output_loss(loss_fn):
    if isinstance(loss_fn, nn.NLLLoss):
        raise UnsupportedModuleError(
            "the GGN estimators split the network at its logits: use CrossEntropyLoss on the "
            "logits instead of LogSoftmax followed by NLLLoss"
        )


def hutchinson(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    _batch_only("hutchinson", individual)
    loss, _ = _backward(model, loss_fn, inputs, target, loss_kwargs)
    params = _trainable(model)
    probes = rademacher_like(params, samples, generator)
    return loss, hutchinson_from_probes(
        lambda p: loss_fn(_call(model, p, inputs), target, **loss_kwargs), params, probes
    )


def kfac_mc(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    """Diagonal of KFAC for the Linear layers: ``diag(B)_i · diag(A)_j`` (bias: ``diag(B)_i``).

    ``individual=True`` gives each example's own KFAC diagonal, ``A_n = x_n x_nᵀ`` and
    ``B_n = (1/k) Σ_m g_{nm} g_{nm}ᵀ``, shaped ``(N, *param.shape)``.
    """
    _require_output_loss(loss_fn)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    others = [
        n
        for n, m in model.named_modules()
        if not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))
    ]
    if others:
        raise UnsupportedModuleError(
            f"kfac_mc supports Linear layers only; modules {others} have parameters"
        )
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o)))
        for n, m in linears.items()
    ]
    try:
        out = model(inputs)
    finally:
        for h in handles:
            h.remove()
    loss = loss_fn(out, target, **loss_kwargs)
    names = list(seen)
    outputs = [seen[n][1] for n in names]
    factors = sample_hessian_factor(loss_fn, out, target, samples, generator, **loss_kwargs)
    grads = torch.autograd.grad(out, outputs, factors, retain_graph=True, is_grads_batched=True)
    loss.backward()
    result = {}
    n = len(inputs)
    for name, g in zip(names, grads):
        module = linears[name]
        prefix = f"{name}." if name else ""
        x = seen[name][0].detach().reshape(n, -1, module.in_features)
        b_diag = (g * g).reshape(samples, n, -1, module.out_features).sum(2).mean(0)  # (N, out)
        a_diag = (x * x).sum(1)  # (N, in)
        positions = x.shape[1]
        if not individual:
            b_diag, a_diag, positions = b_diag.sum(0), a_diag.sum(0) / n, positions
        if module.weight.requires_grad:
            result[prefix + "weight"] = b_diag.unsqueeze(-1) * a_diag.unsqueeze(-2)
        if module.bias is not None and module.bias.requires_grad:
            result[prefix + "bias"] = b_diag * positions
    return loss.detach(), result


def grad_sq(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    _batch_only("grad_sq", individual)
    out = model(inputs)
    loss = loss_fn(out, target, **loss_kwargs)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    for (_, p), g in zip(named, grads):  # accumulate into .grad as loss.backward() would
        p.grad = g.clone() if p.grad is None else p.grad + g
    return loss.detach(), {n: g * g for (n, _), g in zip(named, grads)}


def _refuse_batch_coupling(model: nn.Module, name: str) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModuleError(
                f"{name} needs per-example gradients, but {type(module).__name__} "
                f"'{path}' in train mode couples the examples of a batch: call model.eval() "
                "first, or use method='hesscale' or 'hesscale_gn'"
            )


def _sum_of_squared_example_gradients(model, per_example_loss, *batched, memory=2**24):
    """``Σ_n (∇_θ ℓ_n)²`` with ``ℓ_n = per_example_loss(params, *[b[n] for b in batched])``,
    per-example gradients by ``vmap(grad)`` over chunks holding about ``memory`` numbers."""
    params = _trainable(model)
    per_example = vmap(
        grad(per_example_loss), in_dims=(None,) + (0,) * len(batched), randomness="different"
    )
    chunk = max(1, min(1024, memory // max(1, sum(p.numel() for p in params.values()))))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(batched[0]), chunk):
        grads = per_example(params, *[b[start : start + chunk] for b in batched])
        for n, g in grads.items():
            total[n] += (g * g).sum(0)
    return total


def empirical_fisher(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    _batch_only("empirical_fisher", individual)
    _refuse_batch_coupling(model, "empirical_fisher")
    if loss_kwargs:
        raise UnsupportedModuleError(
            f"empirical_fisher takes no further loss arguments, got {sorted(loss_kwargs)}"
        )
    loss, _ = _backward(model, loss_fn, inputs, target, {})

    def example_loss(params, x, y):  # the loss of a batch of one
        return loss_fn(_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    total = _sum_of_squared_example_gradients(model, example_loss, inputs, target)
    scale = 1.0 if getattr(loss_fn, "reduction", "mean") == "sum" else 1.0 / len(inputs)
    return loss, {n: t * scale for n, t in total.items()}


def fisher(
    model, loss_fn, inputs, target, samples=1, generator=None, individual=False, **loss_kwargs
):
    _batch_only("fisher", individual)
    _refuse_batch_coupling(model, "fisher")
    _require_output_loss(loss_fn)
    loss, out = _backward(model, loss_fn, inputs, target, loss_kwargs)
    factors = sample_hessian_factor(loss_fn, out, target, samples, generator, **loss_kwargs)

    def example_product(params, x, v):  # ⟨f(x_n), v_n⟩: its gradient is J_nᵀ v_n
        return (_call(model, params, x.unsqueeze(0)) * v.unsqueeze(0)).sum()

    # every (example, sample) pair is one "example": average the squares over the samples
    pairs = factors.movedim(0, 1).flatten(0, 1)  # (N·k, *out.shape[1:])
    repeated = inputs.repeat_interleave(samples, 0)
    total = _sum_of_squared_example_gradients(model, example_product, repeated, pairs)
    return loss, {n: t / samples for n, t in total.items()}


BASELINES = {
    "exact": exact,
    "ggn": ggn,
    "hutchinson": hutchinson,
    "kfac_mc": kfac_mc,
    "grad_sq": grad_sq,
    "empirical_fisher": empirical_fisher,
    "fisher": fisher,
}
