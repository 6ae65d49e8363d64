"""HesScale rule of convolutions and transposed convolutions, 1d/2d/3d (Eq. 8–9 of the paper).

Every output element of a convolution depends on each weight at most once and on each input
element through at most one weight, so the squared Jacobians are the convolution's Jacobians
with squared entries. Eq. 8 (without the activation factor) and Eq. 9 are therefore the two
halves of an ordinary convolution backward pass, run on ``ŝ_a`` instead of the gradient with the
weights and inputs squared:

    ŝ_h = conv_input_backward(ŝ_a, W²)                    (Eq. 8: Σ_{m,n} ŝ_a W²)
    ŝ_W = conv_weight_backward(ŝ_a, h²)                   (Eq. 9: Σ_{m,n} ŝ_a h²)
    ŝ_b = Σ over batch and positions of ŝ_a

Strides, dilations, groups, zero padding (including ``'same'`` with even kernels, which pads
asymmetrically) and transposed convolutions all follow from the convolution backward itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import Backprop, LayerContext, NodeContext, operation_rule, register_rule, squared
from .normalization import batch_normalized_weight_curvature, layer_input

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _explicit_padding(module: nn.Module) -> list[tuple[int, int]]:
    """Left/right zero padding per spatial dimension, resolving ``'same'`` and ``'valid'``."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for d, k in zip(module.dilation, module.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def convolution_curvatures(
    s_out,
    h,
    weight,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    scratch: dict | None = None,
):
    """Eq. 8–9: ``(ŝ_h, ŝ_W, ŝ_b)`` by one ``aten.convolution_backward`` on ``ŝ`` with ``h²``
    and ``W²`` (symmetric zero padding; the squares are temporaries of ``scratch``). ``ŝ_h``
    reads only ``W²`` and ``ŝ_W`` only ``h²``: a square nobody reads is not computed (the
    backward then reads only the unsquared tensor's shape)."""
    return torch.ops.aten.convolution_backward(
        s_out,
        squared(h, scratch, "input") if need_weight else h,
        squared(weight, scratch, "weight") if need_input else weight,
        [weight.shape[1] * groups if transposed else weight.shape[0]] if need_bias else None,
        list(stride),
        list(padding),
        list(dilation),
        transposed,
        list(output_padding),
        groups,
        [need_input, need_weight, need_bias],
    )


def conv_rule(ctx: LayerContext) -> Backprop:
    """Eq. 8–9 for a convolution module; ``h: (N, C_in, *S)``, ``ŝ_a: (N, C_out, *S')``."""
    module = ctx.module
    transposed = isinstance(module, TRANSPOSED)
    h = ctx.input
    spatial = len(module.kernel_size)
    crop = None
    if transposed:
        padding = list(module.padding)
        # output_padding may come from an output_size argument of forward: read it off the shapes.
        output_padding = [
            y - ((x - 1) * s - 2 * p + d * (k - 1) + 1)
            for y, x, s, p, d, k in zip(
                ctx.output.shape[2:],
                ctx.input.shape[2:],
                module.stride,
                module.padding,
                module.dilation,
                module.kernel_size,
            )
        ]
    else:
        pads = _explicit_padding(module)
        output_padding = [0] * spatial
        if all(left == right for left, right in pads):
            padding = [left for left, _ in pads]
        else:  # asymmetric 'same': pad explicitly, convolve unpadded, crop ŝ_h back afterwards
            flat = [p for left_right in reversed(pads) for p in left_right]
            h = F.pad(h, flat)
            padding, crop = [0] * spatial, [-p for p in flat]
    has_bias = module.bias is not None

    def backward(s_out, h, need_input, need_params=True):
        return convolution_curvatures(
            s_out,
            h,
            module.weight,
            module.stride,
            padding,
            module.dilation,
            transposed,
            output_padding,
            module.groups,
            need_input,
            need_params,
            need_params and has_bias,
            ctx.scratch,
        )

    s_out = ctx.curvature_output
    normalized = ctx.normalized is not None and not transposed
    s_in, s_w, s_b = backward(
        s_out, h, ctx.need_input_curvature, not (ctx.individual or normalized)
    )
    if normalized:  # a train-mode BatchNorm reads the output: through its statistics
        groups = module.groups

        x_of = layer_input(h, ctx.scratch)

        def weight_gradient(u, x, weight):  # Σ_positions u ⊗ patches of x
            return torch.ops.aten.convolution_backward(
                u,
                x,
                weight,
                None,
                list(module.stride),
                list(padding),
                list(module.dilation),
                False,
                [0] * spatial,
                groups,
                [False, True, False],
            )[1]

        def products(us, squared_input):  # one weight gradient (the patches once) if ungrouped
            x = x_of(squared_input)
            if groups > 1:
                return [weight_gradient(u, x, module.weight) for u in us]
            shape = (len(us) * module.out_channels, *module.weight.shape[1:])
            weight = module.weight[:1].expand(shape)  # its shape only: no input gradient asked
            both = weight_gradient(torch.cat(us, 1), x, weight)
            return list(both.split(module.out_channels))

        def sums(squared_input):  # u = 1 everywhere: the batch's sum of inputs, one channel
            x = x_of(squared_input).sum(0, keepdim=True)  # per group, then repeated
            ones = s_out.new_ones(1, groups, *s_out.shape[2:])
            total = weight_gradient(ones, x, module.weight[:groups])
            return total.repeat_interleave(module.out_channels // groups, 0)

        s_w = batch_normalized_weight_curvature(ctx.normalized, products, sums, ctx.second_order)
        s_b = torch.zeros_like(module.bias) if has_bias else None
    if ctx.individual:  # one weight backward per example
        parts = [backward(s_out[i : i + 1], h[i : i + 1], False) for i in range(len(s_out))]
        s_w = torch.stack([p[1] for p in parts])
        s_b = torch.stack([p[2] for p in parts]) if has_bias else None
    if s_in is not None and crop is not None:
        s_in = F.pad(s_in, crop)
    params = {"weight": s_w}
    if has_bias:
        params["bias"] = s_b
    return Backprop(s_in, params)


@operation_rule("ConvolutionBackward0")
def convolution_node_rule(ctx: NodeContext):
    """``F.conv*d``/``F.conv_transpose*d`` outside a convolution module: Eq. 8–9 from what the
    node saved (input, weight, stride, padding, dilation, groups, transposition)."""
    if ctx.s is None:
        return None, None, None
    node = ctx.node
    return convolution_curvatures(
        ctx.s,
        ctx.saved("input"),
        ctx.saved("weight"),
        node._saved_stride,
        node._saved_padding,
        node._saved_dilation,
        node._saved_transposed,
        node._saved_output_padding,
        node._saved_groups,
        ctx.needs[0],
        ctx.needs[1],
        len(ctx.needs) > 2 and ctx.needs[2],
        ctx.scratch,
    )


def check_conv(module: nn.Module) -> str | None:
    """Only zero padding keeps the squared Jacobian equal to the Jacobian with squared weights."""
    if module.padding_mode != "zeros":
        return (
            f"padding_mode={module.padding_mode!r} is not supported (an input element can meet "
            "the same output through several weights); use padding_mode='zeros'"
        )
    return None


def convolution_input(module: nn.Module, node) -> tuple[int, str] | None:
    """Where autograd keeps a convolution's input (not for an asymmetric ``'same'`` padding,
    which PyTorch applies to the input before the convolution)."""
    symmetric = isinstance(module, TRANSPOSED) or all(a == b for a, b in _explicit_padding(module))
    if symmetric and type(node).__name__ == "ConvolutionBackward0":
        return 0, "input"
    return None


for _conv in CONVOLUTIONS + TRANSPOSED:
    register_rule(
        _conv,
        conv_rule,
        check_conv,
        needs_output=False,
        batch_norm=_conv in CONVOLUTIONS,
        saved_input=convolution_input,
    )
