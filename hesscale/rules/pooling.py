"""HesScale rules of pooling layers, 1d/2d/3d.

Pooling is linear in its input (max pooling piecewise), so the rule is ``ŝ_x = (J∘J)ᵀ ŝ_y`` with
no second-order term:

* max pooling: ``J`` selects the maximum of each window, its entries are 0 or 1, so ``J∘J = J``
  and ``ŝ_x`` scatters ``ŝ_y`` to the arg-max positions (summing where windows overlap);
* average pooling: row ``o`` of ``J`` holds ``1/d_o`` on the ``d_o`` elements it averages, so
  ``(J∘J)ᵀ ŝ_y = Jᵀ (ŝ_y / d_o)``: the pooling's own backward applied to ``ŝ_y / d_o``. The
  divisor ``d_o`` varies at borders (``count_include_pad=False``, ``ceil_mode``) and is
  overridable (``divisor_override``); it is read off the module itself;
* adaptive average pooling: the same with the adaptive windows' sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import Backprop, LayerContext, register_rule

MAX_POOLS = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _pool_transpose(module: nn.Module, x: Tensor, v: Tensor) -> Tensor:
    """``Jᵀ v`` for a pooling module at input ``x`` (its own backward pass, re-run locally)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (out,) = torch.autograd.grad(module(leaf), leaf, v)
    return out


def max_pool_indices(module: nn.Module, x: Tensor, output: Tensor) -> Tensor | None:
    """Forward capture: the arg-max indices autograd saved for the pooling's own backward.

    They are the flat spatial positions per ``(n, c)``; reading them saves the rule a second
    pooling pass. None when autograd saved none (an input without gradient): the rule then
    recomputes them.
    """
    node = output.grad_fn
    if node is not None and not hasattr(node, "_saved_result1") and node.next_functions:
        node = node.next_functions[0][0]  # 1d pooling runs as 2d, then squeezes
    indices = getattr(node, "_saved_result1", None) if node is not None else None
    if indices is None or indices.numel() != output.numel() or indices.dtype != torch.int64:
        return None
    return indices.view(output.shape)


def max_pool_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x[i] = Σ_{o : argmax(o) = i} ŝ_y[o]``; shapes ``(N, C, *S)``."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    m = ctx.module
    idx = ctx.saved
    if idx is None:
        _, idx = MAX_POOLS[type(m)](
            ctx.input,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.ceil_mode,
            return_indices=True,
        )
    x = ctx.input
    s_in = torch.zeros(x.shape[:2] + (x[0, 0].numel(),), dtype=x.dtype, device=x.device)
    s_in.scatter_add_(2, idx.flatten(2), ctx.curvature_output.flatten(2))
    return Backprop(s_in.view_as(x))


def _avg_pool_inverse_divisor(module: nn.Module, x: Tensor) -> Tensor:
    """``1/d_o`` per output window: ``avgpool(1) / sumpool(1)`` with the module's settings."""
    ones = torch.ones_like(x[:1, :1])
    average = module(ones)
    dims = len(ones.shape) - 2
    kernel, stride, padding = (
        torch.nn.modules.utils._ntuple(dims)(v)
        for v in (module.kernel_size, module.stride, module.padding)
    )
    if dims == 1:  # avg_pool1d has no divisor_override: count through the 2d version
        count = F.avg_pool2d(
            ones.unsqueeze(-2),
            (1, kernel[0]),
            (1, stride[0]),
            (0, padding[0]),
            module.ceil_mode,
            count_include_pad=False,
            divisor_override=1,
        ).squeeze(-2)
    else:
        pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
        count = pool(ones, kernel, stride, padding, module.ceil_mode, False, divisor_override=1)
    return average / count


def avg_pool_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x = Jᵀ (ŝ_y / d_o)``, the squared Jacobian having entries ``1/d_o²``."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    scaled = ctx.curvature_output * _avg_pool_inverse_divisor(ctx.module, ctx.input)
    return Backprop(_pool_transpose(ctx.module, ctx.input, scaled))


def _adaptive_window_sizes(in_size: int, out_size: int) -> list[int]:
    """Window lengths of adaptive pooling along one dimension (PyTorch's start/end formula)."""
    return [
        -((-(o + 1) * in_size) // out_size) - (o * in_size) // out_size for o in range(out_size)
    ]


def adaptive_avg_pool_rule(ctx: LayerContext) -> Backprop:
    """``ŝ_x = Jᵀ (ŝ_y / d_o)`` with ``d_o`` the product of the adaptive window lengths."""
    if not ctx.need_input_curvature:
        return Backprop(None)
    x, y = ctx.input, ctx.output
    inverse = torch.ones((), dtype=x.dtype, device=x.device)
    for dim, (n_in, n_out) in enumerate(zip(x.shape[2:], y.shape[2:])):
        sizes = torch.tensor(_adaptive_window_sizes(n_in, n_out), dtype=x.dtype, device=x.device)
        shape = [1] * (y.dim() - 2)
        shape[dim] = n_out
        inverse = inverse / sizes.view(shape)
    return Backprop(_pool_transpose(ctx.module, x, ctx.curvature_output * inverse))


def _check_max_pool(module: nn.Module) -> str | None:
    if module.return_indices:
        return "return_indices=True is not supported (the output must be a single tensor)"
    return None


for _t in MAX_POOLS:
    register_rule(_t, max_pool_rule, _check_max_pool, capture=max_pool_indices)
for _t in AVG_POOLS:
    register_rule(_t, avg_pool_rule)
for _t in ADAPTIVE_AVG_POOLS:
    register_rule(_t, adaptive_avg_pool_rule)
