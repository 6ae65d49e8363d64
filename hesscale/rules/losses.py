"""HesScale rules of the losses' fused autograd operations: exact loss-Hessian diagonals
(Appendix A).

In autograd's graph a loss is operations like any other. ``F.cross_entropy`` is LogSoftmax (its
rule in :mod:`hesscale.rules.softmax`) followed by NLLLoss, which is linear; MSE and
BCE-with-logits are single fused operations whose rules here give the exact second derivative;
GaussianNLLLoss is element-wise arithmetic. Below the loss value the curvature is zero and the
gradient is whatever the backward pass started with (``(c · loss).backward()``, a GradScaler),
so the rules give the exact diagonal of what is backpropagated, reduction included. The rules
follow PyTorch's definitions, with class weights, label smoothing, ignored targets, probability
targets and broadcasting.

:func:`cross_entropy_coefficients` serves the samplers of GGN-MC and KFAC-MC.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import UnsupportedModuleError
from ._registry import NodeContext, input_shape, operation_rule, squared, sum_to


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


def _reduction_scale(reduction: int, numel: int) -> float:
    """ATen's reduction enum: 0 none, 1 mean, 2 sum."""
    return 1.0 / numel if reduction == 1 else 1.0


@operation_rule("NllLossBackward0", "NllLoss2DBackward0")
def nll_rule(ctx: NodeContext):
    """NLLLoss is linear in the log-probabilities: no second-order term; its Jacobian ``u``
    (``−w_y/norm`` at the target class) is autograd's backward applied to ones, and
    ``ŝ_in = u² ŝ_out`` (zero right below the loss value)."""
    s = ctx.s
    if s is None or not ctx.needs[0]:
        return (None,) * len(ctx.needs)
    u = ctx.node(torch.ones_like(s))
    u = u[0] if isinstance(u, tuple) else u
    spread = s if s.dim() == 0 else s.unsqueeze(1)
    return (u * u * spread,) + (None,) * (len(ctx.needs) - 1)


@operation_rule("MseLossBackward0")
def mse_rule(ctx: NodeContext):
    """``ℓ = Σ (x − t)² [/ n]``: ``ŝ_x = (2(x − t)/n)² ŝ_ℓ + [second_order] (2/n) g_ℓ``, the same
    for the target if it needs one."""
    x, t = ctx.saved("self"), ctx.saved("target")
    reduction = ctx.saved("reduction")
    diff = x - t
    scale = _reduction_scale(reduction, torch.broadcast_shapes(x.shape, t.shape).numel())
    s, g = ctx.s, ctx.g
    s_in = None
    if s is not None:
        s_in = squared(2 * scale * diff) * s
    if ctx.second_order and g is not None:
        term = (2 * scale) * g.expand_as(diff) if reduction != 0 else 2 * g
        s_in = term if s_in is None else s_in + term
    return tuple(
        sum_to(s_in, input_shape(ctx, i)) if need and s_in is not None else None
        for i, need in enumerate(ctx.needs)
    )


@operation_rule("BinaryCrossEntropyWithLogitsBackward0")
def bce_with_logits_rule(ctx: NodeContext):
    """``ℓ = −w [p·t log σ(u) + (1 − t) log(1 − σ(u))] [/ n]``: with ``c = w (p·t + 1 − t)``,
    ``∂ℓ/∂u = (c σ − w p t)/n`` and ``∂²ℓ/∂u² = c σ(1 − σ)/n``."""
    if ctx.needs[1:] and any(ctx.needs[1:]):
        raise NotImplementedError(
            "BCEWithLogitsLoss with a target, weight or pos_weight that requires grad"
        )
    u, t = ctx.saved("self"), ctx.saved("target")
    weight, pos_weight = ctx.saved("weight"), ctx.saved("pos_weight")
    reduction = ctx.saved("reduction")
    sig = torch.sigmoid(u)
    positive = t if pos_weight is None else pos_weight * t
    c = positive + 1 - t
    w = 1.0 if weight is None else weight
    c = c * w
    scale = _reduction_scale(reduction, torch.broadcast_shapes(u.shape, t.shape).numel())
    s, g = ctx.s, ctx.g
    s_in = None
    if s is not None:
        jac = (c * sig - w * positive) * scale
        s_in = squared(jac) * s
    if ctx.second_order and g is not None:
        term = c * sig * (1 - sig) * scale * g
        s_in = term if s_in is None else s_in + term
    return (sum_to(s_in, input_shape(ctx, 0)),) + (None,) * (len(ctx.needs) - 1)


SUPPORTED_LOSSES = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
    nn.GaussianNLLLoss,
)


def is_loss(module: nn.Module) -> bool:
    """Whether ``module`` is a loss (one of PyTorch's ``_Loss`` classes)."""
    return isinstance(module, nn.modules.loss._Loss)


def check_loss(module: nn.Module) -> None:
    """Refuse, when it is extended, a loss whose graph has no rules or whose value is not a
    scalar; raises UnsupportedModuleError."""
    supported = ", ".join(sorted(t.__name__ for t in SUPPORTED_LOSSES))
    if type(module) not in SUPPORTED_LOSSES:
        raise UnsupportedModuleError(
            f"loss {type(module).__name__} has no HesScale rules in hesscale. "
            f"Supported losses: {supported}; any loss written with supported operations "
            "(F.*, arithmetic) works without hesscale.extend."
        )
    if module.reduction not in ("mean", "sum"):
        raise UnsupportedModuleError(
            f"loss {type(module).__name__} with reduction={module.reduction!r} is not supported: "
            "the estimate is of a scalar loss; use reduction='mean' or 'sum'"
        )


@functools.cache
def _forward_signature(loss_type: type) -> inspect.Signature:
    return inspect.signature(loss_type.forward)


def bind_loss_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The loss call's arguments by name (``input``, ``target``, ``var``)."""
    arguments = _forward_signature(type(module)).bind(module, *args, **kwargs).arguments
    arguments.pop(next(iter(arguments)))  # self
    return arguments
