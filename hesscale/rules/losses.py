"""Exact diagonals of loss Hessians with respect to the network output (Appendix A).

Each rule returns, for the loss arguments that a network may produce, the exact diagonal of
``∂²L/∂u²`` per element of ``u`` (shaped like ``u``), for the loss as the user reduced it
(``'mean'`` includes the loss's own normaliser). The rules follow PyTorch's definitions of the
losses, including class weights, label smoothing, ignored targets and broadcasting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import UnsupportedModuleError
from .._methods import Method


@dataclass(frozen=True)
class LossRule:
    """``curvature(module, args, method) -> {argument name: ŝ}``; ``roles`` are the arguments
    a network may produce (``'input'``; ``'var'`` for GaussianNLLLoss)."""

    curvature: Callable[[nn.Module, dict, Method], dict[str, Tensor]]
    roles: tuple[str, ...] = ("input",)


def _classes_last(t: Tensor) -> Tensor:
    return t.movedim(1, -1) if t.dim() > 2 else t


def cross_entropy_coefficients(
    module: nn.CrossEntropyLoss, logits: Tensor, target: Tensor
) -> Tensor:
    """Coefficients ``a`` with ``L = −Σ_{n,c} a[n, c] log q[n, c]``, shaped like ``logits``.

    Class-index targets: ``a = (1 − ε) w_y [c = y] + (ε / C) w_c`` (zero for ignored targets),
    divided by ``Σ_n w_{y_n}`` for ``'mean'``. Probability targets ``p``:
    ``a = w_c ((1 − ε) p + ε / C)``, divided by the number of examples (and positions) for
    ``'mean'``.
    """
    classes = logits.shape[1]
    shape = [1, classes] + [1] * (logits.dim() - 2)
    weight = module.weight if module.weight is not None else logits.new_ones(classes)
    weight = weight.to(logits.dtype).view(shape)
    eps = module.label_smoothing
    if target.is_floating_point():
        a = weight * (target * (1 - eps) + eps / classes)
        norm = logits.numel() / classes
    else:
        valid = target != module.ignore_index
        safe = torch.where(valid, target, 0)
        onehot = F.one_hot(safe, classes).movedim(-1, 1).to(logits.dtype)
        w_target = (weight * onehot).sum(1, keepdim=True) * valid.unsqueeze(1)
        a = (1 - eps) * onehot * w_target + (eps / classes) * weight * valid.unsqueeze(1)
        norm = w_target.sum()
    return a / norm if module.reduction == "mean" else a


def _cross_entropy(module, args, method):
    """Exact: ``ŝ = A (q − q²)`` with ``A = Σ_c a_c`` (A.1); BL89: ``ŝ = a ⊙ (q − q²)``."""
    logits = args["input"]
    a = cross_entropy_coefficients(module, logits, args["target"])
    q = torch.softmax(logits, 1)
    variance = q - q * q
    if method.exact_output:
        return {"input": a.sum(1, keepdim=True) * variance}
    return {"input": a * variance}


def _nll(module, args, method):
    """NLLLoss is linear in its input: a zero Hessian (LogSoftmax's rule does the rest)."""
    return {"input": torch.zeros_like(args["input"])}


def _mean_scale(module, numel: int) -> float:
    return 1.0 / numel if module.reduction == "mean" else 1.0


def _mse(module, args, method):
    """``L = Σ (u − t)² [/ numel]``: ``ŝ = 2 [/ numel]``."""
    u = args["input"]
    target = args["target"]
    shape = torch.broadcast_shapes(u.shape, target.shape)
    s = u.new_full((), 2.0 * _mean_scale(module, shape.numel())).expand(shape)
    return {"input": s.sum_to_size(u.shape).contiguous()}


def _bce_with_logits(module, args, method):
    """``ℓ = −w [p·t log σ(u) + (1 − t) log(1 − σ(u))]``: ``ŝ = w (p·t + 1 − t) σ(u)(1 − σ(u))``."""
    u, t = args["input"], args["target"]
    sig = torch.sigmoid(u)
    coeff = 1 - t
    coeff = coeff + (module.pos_weight * t if module.pos_weight is not None else t)
    if module.weight is not None:
        coeff = coeff * module.weight
    s = coeff * sig * (1 - sig)
    return {"input": (s * _mean_scale(module, s.numel())).sum_to_size(u.shape)}


def _gaussian_nll(module, args, method):
    """``ℓ = ½ (log v + (u − t)² / v)`` with ``v = max(var, eps)`` (A.2):
    ``ŝ_u = 1 / v`` and ``ŝ_v = ((u − t)² / v − ½) / v²``, summed over broadcast copies of v."""
    u, t, var = args["input"], args["target"], args["var"]
    v = var.unsqueeze(-1) if var.dim() == u.dim() - 1 else var
    v = v.clamp(min=module.eps)
    sq = (u - t) ** 2
    shape = torch.broadcast_shapes(u.shape, t.shape, v.shape)
    scale = _mean_scale(module, shape.numel())
    s_u = (scale / v).expand(shape)
    s_v = ((sq / v - 0.5) / (v * v)).expand(shape) * scale
    s_var = s_v.sum_to_size(v.shape).reshape(var.shape)
    return {"input": s_u.sum_to_size(u.shape), "var": s_var}


LOSSES: dict[type[nn.Module], LossRule] = {
    nn.CrossEntropyLoss: LossRule(_cross_entropy),
    nn.NLLLoss: LossRule(_nll),
    nn.MSELoss: LossRule(_mse),
    nn.BCEWithLogitsLoss: LossRule(_bce_with_logits),
    nn.GaussianNLLLoss: LossRule(_gaussian_nll, roles=("input", "var")),
}


def is_loss(module: nn.Module) -> bool:
    """Whether ``module`` is a loss (one of PyTorch's ``_Loss`` classes)."""
    return isinstance(module, nn.modules.loss._Loss)


def loss_rule_for(module: nn.Module) -> LossRule:
    """The rule of a loss module, checking its configuration; raises UnsupportedModuleError."""
    rule = LOSSES.get(type(module))
    supported = ", ".join(sorted(t.__name__ for t in LOSSES))
    if rule is None:
        raise UnsupportedModuleError(
            f"loss {type(module).__name__} has no exact output diagonal in hesscale. "
            f"Supported losses: {supported}."
        )
    if module.reduction not in ("mean", "sum"):
        raise UnsupportedModuleError(
            f"loss {type(module).__name__} with reduction={module.reduction!r} is not supported: "
            "the estimate is of a scalar loss; use reduction='mean' or 'sum'"
        )
    return rule


def bind_loss_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The loss call's arguments by name (``input``, ``target``, ``var``)."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments
