"""HesScale rules of layers that move, drop or scale elements one to one.

For these the Jacobian is diagonal (Dropout: ``mask / (1 − p)``) or a 0/1 selection (Flatten,
Unflatten, Identity, zero padding), so ``ŝ_x = (J∘J)ᵀ ŝ_y``: reshaped, scaled by the squared mask,
or cropped.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._registry import Backprop, LayerContext, no_inplace, register_rule, squared

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
ZERO_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)


def reshape_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x = reshape(ŝ_y)`` for Flatten, Unflatten and Identity."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    return Backprop(ctx.curvature_output.reshape(ctx.input.shape))


def dropout_scale(module: nn.Module, x, y):
    """Forward capture: the squared Jacobian diagonal ``(m / (1 − p))²``, or None (identity).

    The scaled mask is read from the autograd node that the dropout call created (calling it on
    ones returns ``m / (1 − p)`` broadcast to the input).
    """
    node = y.grad_fn
    if not module.training or module.p == 0 or node is None:
        return None
    scale = node(y.new_ones(y.shape))
    scale = scale[0] if isinstance(scale, tuple) else scale
    return squared(scale.detach())


def dropout_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x = (m / (1 − p))² ⊙ ŝ_y``; identity in eval mode."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    if ctx.saved is None:
        return Backprop(ctx.curvature_output)
    return Backprop(ctx.saved.to(ctx.curvature_output.dtype) * ctx.curvature_output)


def zero_pad_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x`` is ``ŝ_y`` with the padding cropped (negative padding crops, and vice versa)."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    return Backprop(F.pad(ctx.curvature_output, [-p for p in ctx.module.padding]))


for _t in (nn.Flatten, nn.Unflatten, nn.Identity):
    register_rule(_t, reshape_rule)
for _t in DROPOUTS:
    register_rule(_t, dropout_rule, no_inplace, capture=dropout_scale)
for _t in ZERO_PADS:
    register_rule(_t, zero_pad_rule)
