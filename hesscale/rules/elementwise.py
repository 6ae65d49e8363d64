"""HesScale rule of element-wise activations: a table of first and second derivatives.

For ``h = σ(a)`` applied element-wise, Eq. 4 of the paper reads

    ŝ_a = σ'(a)² ⊙ ŝ_h + [second_order_term] · σ''(a) ⊙ g_h,

where ``ŝ_h`` already holds the sum ``Σ_k ŝ_{next,k} W_{k,i}²`` of the following layer and
``g_h = ∂L/∂h``. HesScaleGN drops the σ'' term; for piecewise-linear activations σ'' = 0 almost
everywhere, so both variants coincide.

Each table entry gives ``σ'`` and ``σ''`` as functions of the module (for its settings), the input
``a`` and the output ``h`` (whichever is cheaper). They must return fresh tensors: the rule
combines them in place, since on CPU every temporary of activation size costs more than the
arithmetic. An entry may also give ``σ'(a)² ⊙ ŝ`` in one go (``square_times``): for
piecewise-linear activations, ATen's fused backward kernels (``σ' ⊙ v``) apply it many times
faster than a ``torch.where`` over the activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._registry import Backprop, LayerContext, no_inplace, register_rule

Derivative = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Activation:
    """A table entry: ``df(module, a, h) = σ'(a)``, ``d2f(module, a, h) = σ''(a)``."""

    df: Derivative
    d2f: Derivative
    piecewise_linear: bool = False
    square_times: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor] | None = None


def _zero(module, a, h):
    return torch.zeros_like(a)


def _step(a: Tensor, positive: float, negative: float) -> Tensor:
    """``positive`` where ``a > 0``, else ``negative``, in ``a``'s dtype (no float32 detour)."""
    return torch.where(a > 0, a.new_full((), positive), a.new_full((), negative))


def _elu_negative(module, a, h):
    """α·eᵃ on the negative side, which equals ``h + α`` there."""
    return h + module.alpha


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _gelu_parts(module, a):
    """σ', σ'' of GELU, exact (erf) or with the tanh approximation."""
    if module.approximate == "tanh":
        u = _GELU_C * (a + _GELU_K * a**3)
        du = _GELU_C * (1 + 3 * _GELU_K * a**2)
        d2u = _GELU_C * 6 * _GELU_K * a
        t = torch.tanh(u)
        sech2 = 1 - t * t
        df = 0.5 * (1 + t) + 0.5 * a * sech2 * du
        d2f = sech2 * du + 0.5 * a * sech2 * (d2u - 2 * t * du * du)
        return df, d2f
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2.0)))
    return cdf + a * pdf, pdf * (2 - a * a)


def _softplus_sigmoid(module, a):
    """σ(βa) where the softplus is smooth; inside the linear region (βa > threshold) σ' = 1."""
    return torch.sigmoid(module.beta * a), module.beta * a > module.threshold


def _softplus_df(module, a, h):
    sig, linear = _softplus_sigmoid(module, a)
    return torch.where(linear, torch.ones_like(sig), sig)


def _softplus_d2f(module, a, h):
    sig, linear = _softplus_sigmoid(module, a)
    return torch.where(linear, torch.zeros_like(sig), module.beta * sig * (1 - sig))


def _silu_d2f(module, a, h):
    sig = torch.sigmoid(a)
    return sig * (1 - sig) * (2 + a * (1 - 2 * sig))


_aten = torch.ops.aten


def _relu_square_times(module, a, h, s):
    """``1[a > 0] ⊙ s`` (σ' ∈ {0, 1}, so σ'² = σ')."""
    return _aten.threshold_backward(s, a, 0)


def _leaky_relu_square_times(module, a, h, s):
    """``s`` where ``a > 0``, else ``slope² · s``."""
    return _aten.leaky_relu_backward(s, a, module.negative_slope**2, False)


def _hardtanh_square_times(module, a, h, s):
    """``1[min < a < max] ⊙ s``; ReLU6 is Hardtanh(0, 6)."""
    return _aten.hardtanh_backward(s, a, module.min_val, module.max_val)


def _elu_square_times(module, a, h, s):
    """``σ' ⊙ (σ' ⊙ s)`` with σ' = 1 for a > 0, else αeᵃ."""
    once = _aten.elu_backward(s, module.alpha, 1, 1, False, a)
    return _aten.elu_backward(once, module.alpha, 1, 1, False, a)


def _hardtanh_df(module, a, h):
    return ((a > module.min_val) & (a < module.max_val)).to(a.dtype)


ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.Tanh: Activation(  # σ' = 1 − h², σ'' = −2h(1 − h²)
        lambda m, a, h: torch.mul(h, h).neg_().add_(1),
        lambda m, a, h: torch.mul(h, h).neg_().add_(1).mul_(h).mul_(-2),
    ),
    nn.Sigmoid: Activation(  # σ' = h − h², σ'' = (h − h²)(1 − 2h)
        lambda m, a, h: torch.addcmul(h, h, h, value=-1),
        lambda m, a, h: torch.addcmul(h, h, h, value=-1).mul_(h.mul(-2).add_(1)),
    ),
    nn.ReLU: Activation(lambda m, a, h: _step(a, 1.0, 0.0), _zero, True, _relu_square_times),
    nn.LeakyReLU: Activation(
        lambda m, a, h: _step(a, 1.0, m.negative_slope), _zero, True, _leaky_relu_square_times
    ),
    nn.ReLU6: Activation(
        lambda m, a, h: ((a > 0) & (a < 6)).to(a.dtype), _zero, True, _hardtanh_square_times
    ),
    nn.Hardtanh: Activation(_hardtanh_df, _zero, True, _hardtanh_square_times),
    nn.ELU: Activation(
        lambda m, a, h: torch.where(a > 0, torch.ones_like(h), _elu_negative(m, a, h)),
        lambda m, a, h: torch.where(a > 0, torch.zeros_like(h), _elu_negative(m, a, h)),
        square_times=_elu_square_times,
    ),
    nn.SELU: Activation(
        lambda m, a, h: _SELU_SCALE * torch.where(a > 0, 1.0, _SELU_ALPHA * torch.exp(a)),
        lambda m, a, h: torch.where(a > 0, 0.0, _SELU_SCALE * _SELU_ALPHA * torch.exp(a)),
    ),
    nn.Softplus: Activation(_softplus_df, _softplus_d2f),
    nn.GELU: Activation(lambda m, a, h: _gelu_parts(m, a)[0], lambda m, a, h: _gelu_parts(m, a)[1]),
    nn.SiLU: Activation(
        lambda m, a, h: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))), _silu_d2f
    ),
    nn.LogSigmoid: Activation(
        lambda m, a, h: torch.sigmoid(-a),
        lambda m, a, h: -torch.sigmoid(a) * torch.sigmoid(-a),
    ),
}


def elementwise_rule(ctx: LayerContext) -> Backprop:
    """Eq. 4: ``ŝ_a = σ'(a)² ⊙ ŝ_h + [second_order_term] σ''(a) ⊙ g_h`` (shapes of ``a``)."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    act = ACTIVATIONS[type(ctx.module)]
    a, h = ctx.input, ctx.output
    if act.square_times is not None:
        s_in = act.square_times(ctx.module, a, h, ctx.curvature_output)
    else:
        df = act.df(ctx.module, a, h)
        s_in = df.mul_(df).mul_(ctx.curvature_output)
    if ctx.method.second_order_term and not act.piecewise_linear:
        s_in.addcmul_(act.d2f(ctx.module, a, h), ctx.grad_output)
    return Backprop(s_in)


for _type in ACTIVATIONS:
    register_rule(_type, elementwise_rule, no_inplace)
