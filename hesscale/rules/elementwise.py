"""HesScale rule of element-wise functions: a table of first and second derivatives.

For ``h = σ(a)`` applied element-wise, Eq. 4 of the paper reads

    ŝ_a = σ'(a)² ⊙ ŝ_h + [second_order] · σ''(a) ⊙ g_h,

where ``ŝ_h`` already holds the sum ``Σ_k ŝ_{next,k} W_{k,i}²`` of the following layer and
``g_h = ∂L/∂h``. HesScaleGN drops the σ'' term inside the network; for piecewise-linear functions
σ'' = 0 almost everywhere, so both variants coincide. The rule is exact given a diagonal ``ŝ_h``.

Each table entry is keyed by the autograd node of the function (``nn.Tanh``, ``torch.tanh`` and
``x.tanh()`` all make a ``TanhBackward0``) and gives ``σ'`` and ``σ''`` from what the node saved
(the input ``a`` as ``self`` or the output ``h`` as ``result``, whichever autograd keeps, and
the function's settings). They must return fresh tensors: the rule combines them in place, since
on CPU every temporary of activation size costs more than the arithmetic. An entry may instead
give ``σ'(a)² ⊙ ŝ`` in one go (``square_times``): for piecewise-linear functions, ATen's fused
backward kernels (``σ' ⊙ v``) apply it many times faster than a ``torch.where``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import NodeContext, operation_rule

Derivative = Callable[[NodeContext], Tensor]


@dataclass(frozen=True)
class Elementwise:
    """A table entry: ``df(ctx) = σ'(a)``, ``d2f(ctx) = σ''(a)`` (None: zero)."""

    df: Derivative | None
    d2f: Derivative | None
    square_times: Callable[[NodeContext, Tensor], Tensor] | None = None
    both: Callable[[NodeContext, Tensor, Tensor], Tensor] | None = None  # σ'²ŝ + σ''g, fused


_aten = torch.ops.aten
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _gelu_parts(ctx):
    """σ', σ'' of GELU, exact (erf) or with the tanh approximation."""
    a = ctx.saved("self")
    if ctx.saved("approximate") == "tanh":
        u = _GELU_C * (a + _GELU_K * a**3)
        du = _GELU_C * (1 + 3 * _GELU_K * a**2)
        d2u = _GELU_C * 6 * _GELU_K * a
        t = torch.tanh(u)
        sech2 = 1 - t * t
        df = 0.5 * (1 + t) + 0.5 * a * sech2 * du
        d2f = sech2 * du + 0.5 * a * sech2 * (d2u - 2 * t * du * du)
        return df, d2f
    # φ(a) = e^{−a²/2}/√(2π), Φ(a) = (1 + erf(a/√2))/2: σ' = Φ + aφ, σ'' = φ(2 − a²), computed
    # in place on this rule's own temporaries
    a_sq = a * a
    pdf = torch.exp(a_sq.mul_(-0.5)) * _INV_SQRT_2PI  # a_sq now holds −a²/2
    df = torch.erf(a * _INV_SQRT_2).mul_(0.5).add_(0.5).addcmul_(a, pdf)
    return df, pdf * a_sq.mul_(2).add_(2)  # 2·(−a²/2) + 2 = 2 − a²


def _softplus_parts(ctx):
    """σ(βa) where softplus is smooth; above the threshold it is linear (σ' = 1, σ'' = 0)."""
    a, beta = ctx.saved("self"), ctx.saved("beta")
    sig = torch.sigmoid(beta * a)
    linear = beta * a > ctx.saved("threshold")
    df = torch.where(linear, torch.ones_like(sig), sig)
    d2f = torch.where(linear, torch.zeros_like(sig), beta * sig * (1 - sig))
    return df, d2f


def _elu_parts(ctx):
    """ELU/SELU/CELU as autograd runs them: ``scale · a`` for a > 0, else
    ``scale · α (e^{c a} − 1)`` with ``c`` the input scale: σ' = scale·α·c·e^{ca}, σ'' = c σ'."""
    a = ctx.saved("self")
    alpha, scale, c = ctx.saved("alpha"), ctx.saved("scale"), ctx.saved("input_scale")
    negative = scale * alpha * c * torch.exp(c * torch.clamp(a, max=0))
    positive = a > 0
    df = torch.where(positive, torch.full_like(a, scale), negative)
    d2f = torch.where(positive, torch.zeros_like(a), negative * c)
    return df, d2f


def _elu_result_parts(ctx):
    """ELU/SELU in place (autograd keeps the output ``h``): for ``h ≤ 0`` (``a ≤ 0``),
    ``e^{ca} = h/(scale·α) + 1``, so σ' = c (h + scale·α) and σ'' = c σ'; else σ' = scale."""
    h = ctx.saved("result")
    alpha, scale, c = ctx.saved("alpha"), ctx.saved("scale"), ctx.saved("input_scale")
    negative = (h + scale * alpha) * c
    positive = h > 0
    df = torch.where(positive, torch.full_like(h, scale), negative)
    d2f = torch.where(positive, torch.zeros_like(h), negative * c)
    return df, d2f


def _celu_result_parts(ctx):
    """CELU in place, ELU with ``scale = 1`` and input scale ``c = 1/α``, which PyTorch rounds
    to float32: for ``h ≤ 0``, ``e^{ca} = h/α + 1``, σ' = c (h + α), σ'' = c σ'; else σ' = 1."""
    h, alpha = ctx.saved("result"), ctx.saved("alpha")
    c = float(torch.tensor(1.0 / alpha, dtype=torch.float32))
    negative = (h + alpha) * c
    positive = h > 0
    df = torch.where(positive, torch.ones_like(h), negative)
    d2f = torch.where(positive, torch.zeros_like(h), negative * c)
    return df, d2f


def _hardswish_parts(ctx):
    """``a · relu6(a + 3) / 6``: σ' = a/3 + 1/2 on [−3, 3] (0 below, 1 above, as PyTorch's
    backward), σ'' = 1/3 inside."""
    a = ctx.saved("self")
    inside = (a >= -3) & (a <= 3)
    df = torch.where(inside, a / 3 + 0.5, (a > 3).to(a.dtype))
    return df, inside.to(a.dtype).div_(3)


def _mish_parts(ctx):
    """``a · tanh(softplus(a))``: with ``t = tanh(softplus(a))``, ``u = 1 − t²`` and
    ``σ = sigmoid(a)``, σ' = t + a u σ and σ'' = 2 u σ + a u σ (1 − σ − 2 t σ)."""
    a = ctx.saved("self")
    t = torch.tanh(F.softplus(a))
    u = 1 - t * t
    sig = torch.sigmoid(a)
    df = t + a * u * sig
    d2f = u * sig * (2 + a * (1 - sig - 2 * t * sig))
    return df, d2f


def _silu_parts(ctx):
    a = ctx.saved("self")
    sig = torch.sigmoid(a)
    return sig * (1 + a * (1 - sig)), sig * (1 - sig) * (2 + a * (1 - 2 * sig))


def _pow_parts(ctx):
    """``a^p``: σ' = p a^{p−1}, σ'' = p (p − 1) a^{p−2}."""
    a, p = ctx.saved("self"), ctx.saved("exponent")
    p = float(p)
    return p * a ** (p - 1), p * (p - 1) * a ** (p - 2) if p != 1 else torch.zeros_like(a)


def _first(parts):
    return lambda ctx: parts(ctx)[0]


def _second(parts):
    return lambda ctx: parts(ctx)[1]


def _mask(condition):
    """A piecewise-linear function with slope 1 where ``condition(ctx)`` holds, else 0."""
    return lambda ctx: condition(ctx).to(ctx.dtype or torch.get_default_dtype())


def _inside(a, ctx):
    """Where ``clamp(a, min, max)`` passes ``a`` through (a bound may be None)."""
    low, high = ctx.saved("min"), ctx.saved("max")
    inside = torch.ones_like(a, dtype=torch.bool)
    if low is not None:
        inside &= a >= low
    if high is not None:
        inside &= a <= high
    return inside


def _result(ctx):
    return ctx.saved("result")


def _tanh_both(ctx, s, g):
    """``u (u ŝ − 2 h g)`` with ``u = 1 − h²``, in three passes: ATen's fused tanh backward
    kernel multiplies by ``u`` in one (``v ↦ v (1 − h²)``)."""
    h = _result(ctx)
    t = _aten.tanh_backward(s, h).addcmul_(h, g, value=-2)
    return _aten.tanh_backward.grad_input(t, h, grad_input=t)


def _sigmoid_both(ctx, s, g):
    """``u (u ŝ + (1 − 2h) g)`` with ``u = h − h²``, in four passes (ATen's sigmoid backward
    kernel multiplies by ``u`` in one)."""
    h = _result(ctx)
    t = _aten.sigmoid_backward(s, h).add_(g).addcmul_(h, g, value=-2)
    return _aten.sigmoid_backward.grad_input(t, h, grad_input=t)


TABLE: dict[str, Elementwise] = {
    # σ' = 1 − h², σ'' = −2h(1 − h²)
    "TanhBackward0": Elementwise(
        lambda c: torch.mul(_result(c), _result(c)).neg_().add_(1),
        lambda c: torch.mul(_result(c), _result(c)).neg_().add_(1).mul_(_result(c)).mul_(-2),
        both=_tanh_both,
    ),
    # σ' = h − h², σ'' = (h − h²)(1 − 2h)
    "SigmoidBackward0": Elementwise(
        lambda c: torch.addcmul(_result(c), _result(c), _result(c), value=-1),
        lambda c: torch.addcmul(_result(c), _result(c), _result(c), value=-1).mul_(
            _result(c).mul(-2).add_(1)
        ),
        both=_sigmoid_both,
    ),
    # ReLU: σ' ∈ {0, 1}, so σ'² = σ'
    "ReluBackward0": Elementwise(
        None, None, lambda c, s: _aten.threshold_backward(s, _result(c), 0)
    ),
    "ThresholdBackward0": Elementwise(
        None,
        None,
        lambda c, s: _aten.threshold_backward(s, c.saved("self"), c.saved("threshold")),
    ),
    "LeakyReluBackward0": Elementwise(
        None,
        None,
        lambda c, s: _aten.leaky_relu_backward(
            s, c.saved("self"), c.saved("negative_slope") ** 2, False
        ),
    ),
    # in place: the output's sign is the input's
    "LeakyReluBackward1": Elementwise(
        None,
        None,
        lambda c, s: _aten.leaky_relu_backward(
            s, c.saved("result"), c.saved("negative_slope") ** 2, True
        ),
    ),
    "ThresholdBackward1": Elementwise(
        None,
        None,
        lambda c, s: _aten.threshold_backward(s, c.saved("self"), c.saved("threshold")),
    ),
    # σ' = 1/6 on (−3, 3) (as PyTorch's kernel rounds it): σ'² ŝ by the kernel twice
    "HardsigmoidBackward0": Elementwise(
        None,
        None,
        lambda c, s: _aten.hardsigmoid_backward(
            _aten.hardsigmoid_backward(s, c.saved("self")), c.saved("self")
        ),
    ),
    # piecewise linear with slope 0 or 1
    "SoftshrinkBackward0": Elementwise(
        None, None, lambda c, s: _aten.softshrink_backward(s, c.saved("self"), c.saved("lambd"))
    ),
    "HardshrinkBackward0": Elementwise(
        None, None, lambda c, s: _aten.hardshrink_backward(s, c.saved("self"), c.saved("lambd"))
    ),
    # Hardtanh and ReLU6: 1 inside (min, max)
    "HardtanhBackward0": Elementwise(
        None,
        None,
        lambda c, s: _aten.hardtanh_backward(
            s, c.saved("self"), c.saved("min_val"), c.saved("max_val")
        ),
    ),
    "EluBackward0": Elementwise(_first(_elu_parts), _second(_elu_parts)),
    "EluBackward1": Elementwise(_first(_elu_result_parts), _second(_elu_result_parts)),
    "CeluBackward1": Elementwise(_first(_celu_result_parts), _second(_celu_result_parts)),
    "HardswishBackward0": Elementwise(_first(_hardswish_parts), _second(_hardswish_parts)),
    "MishBackward0": Elementwise(_first(_mish_parts), _second(_mish_parts)),
    "GeluBackward0": Elementwise(_first(_gelu_parts), _second(_gelu_parts)),
    "SiluBackward0": Elementwise(_first(_silu_parts), _second(_silu_parts)),
    "SoftplusBackward0": Elementwise(_first(_softplus_parts), _second(_softplus_parts)),
    # log σ(a): σ' = σ(−a), σ'' = −σ(a)σ(−a)
    "LogSigmoidBackward0": Elementwise(
        lambda c: torch.sigmoid(-c.saved("self")),
        lambda c: -torch.sigmoid(c.saved("self")) * torch.sigmoid(-c.saved("self")),
    ),
    "ExpBackward0": Elementwise(lambda c: _result(c).clone(), lambda c: _result(c).clone()),
    "LogBackward0": Elementwise(
        lambda c: c.saved("self").reciprocal(), lambda c: c.saved("self").pow(-2).neg_()
    ),
    "PowBackward0": Elementwise(_first(_pow_parts), _second(_pow_parts)),
    # √a: σ' = 1/(2h), σ'' = −1/(4h³)
    "SqrtBackward0": Elementwise(
        lambda c: _result(c).reciprocal().mul_(0.5), lambda c: _result(c).pow(-3).mul_(-0.25)
    ),
    # a^{−1/2}: σ' = −h³/2, σ'' = 3h⁵/4
    "RsqrtBackward0": Elementwise(
        lambda c: _result(c).pow(3).mul_(-0.5), lambda c: _result(c).pow(5).mul_(0.75)
    ),
    # 1/a: σ' = −h², σ'' = 2h³
    "ReciprocalBackward0": Elementwise(
        lambda c: _result(c).pow(2).neg_(), lambda c: _result(c).pow(3).mul_(2)
    ),
    "SinBackward0": Elementwise(
        lambda c: c.saved("self").cos(), lambda c: c.saved("self").sin().neg_()
    ),
    "CosBackward0": Elementwise(
        lambda c: c.saved("self").sin().neg_(), lambda c: c.saved("self").cos().neg_()
    ),
    "AbsBackward0": Elementwise(lambda c: c.saved("self").sign(), None),
    "ClampBackward1": Elementwise(_mask(lambda c: _inside(c.saved("self"), c)), None),
    "ClampMinBackward0": Elementwise(_mask(lambda c: c.saved("self") >= c.saved("min")), None),
    "ClampMaxBackward0": Elementwise(_mask(lambda c: c.saved("self") <= c.saved("max")), None),
}


@operation_rule(*TABLE)
def elementwise_rule(ctx: NodeContext):
    """Eq. 4: ``ŝ_a = σ'(a)² ⊙ ŝ_h + [second_order] σ''(a) ⊙ g_h`` (shapes of ``a``)."""
    if not ctx.needs[0]:
        return (None,)
    entry = TABLE[type(ctx.node).__name__]
    s, g = ctx.s, ctx.g
    if entry.both is not None and s is not None and g is not None and ctx.second_order:
        return (entry.both(ctx, s, g),)
    s_in = None
    if s is not None:
        if entry.square_times is not None:
            s_in = entry.square_times(ctx, s)
        else:
            df = entry.df(ctx)
            s_in = df.mul_(df).mul_(s)
    if ctx.second_order and entry.d2f is not None and g is not None:
        term = entry.d2f(ctx).mul_(g)
        s_in = term if s_in is None else s_in.add_(term)
    return (s_in,)
