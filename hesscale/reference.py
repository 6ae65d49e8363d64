"""Exact curvature diagonals and an independent dense implementation of the HesScale recursion.

Ground truth for tests, experiments and benchmarks, meant for small networks (it builds dense
Hessians and Jacobians):

* :func:`exact_hessian_diagonal`: ``diag(∇²_θ L)`` via ``torch.func.hessian`` over
  ``functional_call``, per parameter tensor;
* :func:`double_backward_hessian_diagonal`: the same by double backward, for operations
  torch.func cannot transform;
* :func:`ggn_diagonal`: ``diag(J_θᵀ ∇²_f L J_θ)`` from ``torch.func.jacrev``;
* :func:`recursion_reference`: the paper's recursion written with dense per-layer Jacobians
  ``J`` and Hessians, ``ŝ_x = (J∘J)ᵀ ŝ_y + [σ''] diag(∇²_x ⟨g_y, f(x)⟩)`` — no layer rule of the
  engine is used, so it checks every rule independently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from ._methods import Method, get_method


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _loss_of_params(model, loss_fn, inputs, target, loss_kwargs) -> Callable:
    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(params: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, {**params, **frozen, **buffers}, (inputs,))
        return loss_fn(out, target, **loss_kwargs)

    return loss


def exact_hessian_diagonal(model, loss_fn, inputs, target, **loss_kwargs) -> dict[str, Tensor]:
    """``diag(∂²L/∂θ²)`` for every trainable parameter, exact (one dense block per tensor)."""
    params = _params(model)
    loss = _loss_of_params(model, loss_fn, inputs, target, loss_kwargs)
    result = {}
    for name, value in params.items():

        def of_one(v, name=name):
            return loss({**params, name: v})

        block = hessian(of_one)(value).reshape(value.numel(), value.numel())
        result[name] = block.diagonal().reshape(value.shape)
    return result


def double_backward_hessian_diagonal(
    model, loss_fn, inputs, target, **loss_kwargs
) -> dict[str, Tensor]:
    """``diag(∂²L/∂θ²)`` by differentiating each entry of the gradient once more (one backward
    pass per parameter entry): for operations that ``torch.func`` cannot transform (in-place
    views such as ``as_strided_``)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(inputs), target, **loss_kwargs)
    grads = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
    result = {}
    for (name, p), g in zip(params, grads):
        flat, diagonal = g.reshape(-1), torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        for i in range(p.numel()):
            if flat[i].requires_grad:
                (row,) = torch.autograd.grad(flat[i], p, retain_graph=True, allow_unused=True)
                diagonal[i] = row.reshape(-1)[i] if row is not None else 0.0
        result[name] = diagonal.reshape(p.shape)
    return result


def ggn_diagonal(model, loss_fn, inputs, target, **loss_kwargs) -> dict[str, Tensor]:
    """``diag(J_θᵀ H_f J_θ)`` with ``H_f = ∇²_f L`` the loss Hessian at the network output."""
    params = _params(model)
    buffers = dict(model.named_buffers())

    def output(p):
        return functional_call(model, {**p, **buffers}, (inputs,))

    out = output(params).detach()
    jac = jacrev(output)(params)
    h_out = hessian(lambda f: loss_fn(f, target, **loss_kwargs))(out)
    h_out = h_out.reshape(out.numel(), out.numel())
    result = {}
    for name, j in jac.items():
        j = j.reshape(out.numel(), -1)
        result[name] = torch.einsum("kj,kl,lj->j", j, h_out, j).reshape(params[name].shape)
    return result


def chain_modules(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of a chain model, in order."""
    return [m for m in model.modules() if not any(True for _ in m.children())]


def _replaying(module: nn.Module, rng_state: Tensor) -> Callable:
    """``f(x) = module(x)`` with the random state the module saw in the forward pass."""

    def f(x, params=None):
        torch.set_rng_state(rng_state)
        if params is None:
            return module(x)
        return functional_call(module, params, (x,))

    return f


def _dense_jacobian(f: Callable, x: Tensor, out_numel: int) -> Tensor:
    return torch.autograd.functional.jacobian(f, x).reshape(out_numel, x.numel())


def _second_order_diagonal(f: Callable, x: Tensor, g: Tensor) -> Tensor:
    h = torch.autograd.functional.hessian(lambda v: (g * f(v)).sum(), x)
    return h.reshape(x.numel(), x.numel()).diagonal().reshape(x.shape)


def _output_curvature(loss_fn, out, target, method: Method, loss_kwargs) -> Tensor:
    """Exact ``diag(∂²L/∂f²)``; for BL89 with cross-entropy, LogSoftmax treated element-wise.

    BL89 writes the cross-entropy as ``L = −Σ a ⊙ log q`` and applies the element-wise rule to
    LogSoftmax: ``ŝ = (q² − q) ⊙ (−a)``. The weights ``a`` are recovered from the exact
    derivatives, ``∇_z L = A q − a`` and ``diag ∇²_z L = A (q − q²)``.
    """
    out = out.detach()
    h = hessian(lambda f: loss_fn(f, target, **loss_kwargs))(out)
    exact = h.reshape(out.numel(), out.numel()).diagonal().reshape(out.shape)
    if method.exact_output or not isinstance(loss_fn, nn.CrossEntropyLoss):
        return exact
    z = out.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(z, target, **loss_kwargs), z)
    q = torch.softmax(out, 1)
    total = exact.sum(1, keepdim=True) / (q - q * q).sum(1, keepdim=True)
    a = total * q - grad
    return (q * q - q) * (-a)


def recursion_reference(
    model: nn.Module, loss_fn, inputs, target, method: str = "hesscale", **loss_kwargs
) -> dict[str, Tensor]:
    """The HesScale recursion with dense per-layer Jacobians and Hessians (see module docstring).

    Dropout masks are replayed by restoring the random state each module saw in the forward pass,
    so call it with the same seed as the estimate it is compared with.
    """
    config = get_method(method)
    modules = chain_modules(model)
    names = {id(p): n for n, p in model.named_parameters()}
    xs, states = [inputs.detach()], []
    for m in modules:
        states.append(torch.get_rng_state())
        xs.append(m(xs[-1]).detach())
    # exact gradients with respect to every module output, through the real network
    acts = [xs[0]]
    for m, state in zip(modules, states):
        torch.set_rng_state(state)
        acts.append(m(acts[-1]))
    loss = loss_fn(acts[-1], target, **loss_kwargs)
    grads = torch.autograd.grad(loss, acts[1:])
    s = _output_curvature(loss_fn, xs[-1], target, config, loss_kwargs)
    result: dict[str, Tensor] = {}
    for i in reversed(range(len(modules))):
        m, x, y, g = modules[i], xs[i], xs[i + 1], grads[i]
        f = _replaying(m, states[i])
        log_softmax = isinstance(m, nn.LogSoftmax)
        keep_second = config.second_order_term or (log_softmax and config.exact_output)
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            others = {k: v.detach() for k, v in m.named_parameters(recurse=False)}

            def of_param(w, pname=pname, others=others):
                return f(x, {**others, pname: w})

            jp = _dense_jacobian(of_param, p.detach(), y.numel())
            est = (jp * jp).T @ s.reshape(-1)
            if keep_second:
                est = est + _second_order_diagonal(of_param, p.detach(), g).reshape(-1)
            result[names[id(p)]] = est.reshape(p.shape)
        if i == 0:
            break
        if log_softmax and not config.exact_output:  # BL89: LogSoftmax as if element-wise
            q = y.exp()
            s = (1 - q) ** 2 * s + (q * q - q) * g
            continue
        j = _dense_jacobian(f, x, y.numel())
        s_new = ((j * j).T @ s.reshape(-1)).reshape(x.shape)
        if keep_second:
            s_new = s_new + _second_order_diagonal(f, x, g)
        s = s_new
    return result
