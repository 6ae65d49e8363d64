"""Every operation rule is exact given an exact diagonal Hessian at its output.

Each case is one operation (or a small composite that exercises it) whose inputs are the model's
parameters, followed by the separable quadratic ``ℓ(y) = Σ ½ S ⊙ y² + c ⊙ y``: its Hessian with
respect to the output ``y`` is exactly ``diag(S)`` and its gradient ``S ⊙ y + c`` arbitrary. The
theory says the rule then gives the exact Hessian diagonal with respect to the inputs,
``diag(Jᵀ S J) + Σ_k g_k diag(∇²f_k)`` (HesScale), and the exact GGN diagonal without the second
term (HesScaleGN, where the operation is inside the network). Both are checked against torch.func
in float64. Losses are checked as the value backpropagated (their output Hessian is zero).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesscale
from hesscale.reference import (
    double_backward_hessian_diagonal,
    exact_hessian_diagonal,
    ggn_diagonal,
)

from .conftest import assert_close_dicts

D = torch.float64


class Operation(nn.Module):
    """Parameters ``p`` fed to ``fn(p)``; the input ``x`` is unused."""

    def __init__(self, fn, shapes: dict, positive=(), constants=None):
        super().__init__()
        self.fn = fn
        self.p = nn.ParameterDict()
        for name, shape in shapes.items():
            value = torch.randn(shape, dtype=D)
            if name in positive:
                value = value.abs() + 0.5
            self.p[name] = nn.Parameter(value)
        self.constants = constants or {}

    def forward(self, x):
        return self.fn(dict(self.p), **self.constants)


def _written(a, write):
    """``a`` copied, then written in place by ``write`` (into a view of it)."""
    t = a * 1.0
    write(t)
    return t


def quadratic(out, target):
    s, c = target
    return (0.5 * s * out**2 + c * out).sum()


IDX = torch.tensor([[0, 2, 2], [1, 0, 3]])

OPERATIONS = {
    # element-wise functions
    "tanh": (lambda p: torch.tanh(p["a"]), {"a": (3, 4)}),
    "sigmoid": (lambda p: p["a"].sigmoid(), {"a": (3, 4)}),
    "relu": (lambda p: F.relu(p["a"]), {"a": (3, 4)}),
    "relu-inplace": (lambda p: (p["a"] * 1.0).relu_(), {"a": (3, 4)}),
    "leaky-relu-inplace": (lambda p: F.leaky_relu(p["a"] * 1.0, 0.2, inplace=True), {"a": (3, 4)}),
    "elu-inplace": (lambda p: F.elu(p["a"] * 1.0, 0.7, inplace=True), {"a": (3, 4)}),
    "selu-inplace": (lambda p: F.selu(p["a"] * 1.0, inplace=True), {"a": (3, 4)}),
    "celu-inplace": (lambda p: F.celu(p["a"] * 1.0, 0.6, inplace=True), {"a": (3, 4)}),
    "threshold-inplace": (
        lambda p: F.threshold(p["a"] * 1.0, 0.1, -1.0, inplace=True),
        {"a": (3, 4)},
    ),
    "hardswish": (lambda p: F.hardswish(4 * p["a"]), {"a": (3, 4)}),
    "hardswish-inplace": (lambda p: F.hardswish(4 * p["a"], inplace=True), {"a": (3, 4)}),
    "hardsigmoid": (lambda p: F.hardsigmoid(4 * p["a"]), {"a": (3, 4)}),
    "mish": (lambda p: F.mish(p["a"]), {"a": (3, 4)}),
    "softshrink": (lambda p: F.softshrink(p["a"], 0.4), {"a": (3, 4)}),
    "hardshrink": (lambda p: F.hardshrink(p["a"], 0.4), {"a": (3, 4)}),
    "threshold": (lambda p: F.threshold(p["a"], 0.1, 0.0), {"a": (3, 4)}),
    "leaky_relu": (lambda p: F.leaky_relu(p["a"], 0.2), {"a": (3, 4)}),
    "elu": (lambda p: F.elu(p["a"], 0.7), {"a": (3, 4)}),
    "selu": (lambda p: torch.selu(p["a"]), {"a": (3, 4)}),
    "gelu": (lambda p: F.gelu(p["a"]), {"a": (3, 4)}),
    "gelu-tanh": (lambda p: F.gelu(p["a"], approximate="tanh"), {"a": (3, 4)}),
    "silu": (lambda p: F.silu(p["a"]), {"a": (3, 4)}),
    "softplus": (lambda p: F.softplus(3 * p["a"], beta=1.5, threshold=2.0), {"a": (3, 4)}),
    "logsigmoid": (lambda p: F.logsigmoid(p["a"]), {"a": (3, 4)}),
    "hardtanh": (lambda p: F.hardtanh(p["a"], -0.5, 0.5), {"a": (3, 4)}),
    "relu6": (lambda p: F.relu6(4 * p["a"]), {"a": (3, 4)}),
    "exp": (lambda p: p["a"].exp(), {"a": (3, 4)}),
    "log": (lambda p: p["a"].log(), {"a": (3, 4)}, ("a",)),
    "pow2": (lambda p: p["a"] ** 2, {"a": (3, 4)}),
    "pow3": (lambda p: p["a"].pow(3), {"a": (3, 4)}),
    "pow-half": (lambda p: p["a"] ** 0.5, {"a": (3, 4)}, ("a",)),
    "sqrt": (lambda p: p["a"].sqrt(), {"a": (3, 4)}, ("a",)),
    "rsqrt": (lambda p: torch.rsqrt(p["a"]), {"a": (3, 4)}, ("a",)),
    "reciprocal": (lambda p: 1 / p["a"], {"a": (3, 4)}, ("a",)),
    "sin-cos": (lambda p: p["a"].sin() + p["b"].cos(), {"a": (3, 4), "b": (3, 4)}),
    "abs": (lambda p: p["a"].abs(), {"a": (3, 4)}),
    "clamp": (lambda p: p["a"].clamp(-0.3, 0.4) + p["b"].clamp(max=0.2), {"a": (5,), "b": (5,)}),
    "clamp-min-max": (
        lambda p: torch.clamp_min(p["a"], -0.3) + torch.clamp_max(p["b"], 0.2),
        {"a": (5,), "b": (5,)},
    ),
    # arithmetic with scalars and tensors, broadcasting
    "scalar-arithmetic": (
        lambda p: (2.5 * p["a"] - 1) / 3 + (1 - p["b"]) - p["c"],
        {"a": (4,), "b": (4,), "c": (4,)},
    ),
    "add-broadcast-alpha": (
        lambda p: torch.add(p["a"], p["b"], alpha=-1.5),
        {"a": (3, 4), "b": (4,)},
    ),
    "sub-alpha": (lambda p: torch.sub(p["a"], p["b"], alpha=2.0), {"a": (3, 4), "b": (3, 1)}),
    "mul-broadcast": (lambda p: p["a"] * p["b"], {"a": (3, 4), "b": (1, 4)}),
    "mul-constant-mask": (
        lambda p, m: p["a"] * m,
        {"a": (3, 4)},
        (),
        {"m": torch.rand(3, 4, dtype=D)},
    ),
    "square-as-product": (lambda p: p["a"] * p["a"], {"a": (3, 4)}),
    "div": (lambda p: p["a"] / p["b"], {"a": (3, 4), "b": (4,)}, ("b",)),
    "gate-sigmoid": (lambda p: p["a"] * torch.sigmoid(p["b"]), {"a": (3, 4), "b": (3, 4)}),
    # matrix products
    "mm": (lambda p: p["a"] @ p["b"], {"a": (3, 4), "b": (4, 2)}),
    "linear-2d": (
        lambda p: F.linear(p["x"], p["w"], p["b"]),
        {"x": (3, 4), "w": (2, 4), "b": (2,)},
    ),
    "linear-3d": (
        lambda p: F.linear(p["x"], p["w"], p["b"]),
        {"x": (2, 3, 4), "w": (2, 4), "b": (2,)},
    ),
    "bmm": (lambda p: torch.bmm(p["a"], p["b"]), {"a": (2, 3, 4), "b": (2, 4, 2)}),
    "matmul-broadcast": (lambda p: p["a"] @ p["b"], {"a": (2, 3, 4), "b": (4, 2)}),
    "einsum": (
        lambda p: torch.einsum("bij,bjk->bik", p["a"], p["b"]),
        {"a": (2, 3, 4), "b": (2, 4, 2)},
    ),
    "addmm-scaled": (
        lambda p: torch.addmm(p["c"], p["a"], p["b"], beta=0.5, alpha=2.0),
        {"c": (3, 2), "a": (3, 4), "b": (4, 2)},
    ),
    "baddbmm-scaled": (
        lambda p: torch.baddbmm(p["c"], p["a"], p["b"], beta=0.5, alpha=2.0),
        {"c": (1, 3, 2), "a": (2, 3, 4), "b": (2, 4, 2)},
    ),
    # convolutions
    "conv2d": (
        lambda p: F.conv2d(p["x"], p["w"], p["b"], stride=2, padding=1, groups=2),
        {"x": (2, 4, 5, 5), "w": (4, 2, 3, 3), "b": (4,)},
    ),
    "conv1d-dilation": (
        lambda p: F.conv1d(p["x"], p["w"], dilation=2),
        {"x": (2, 2, 7), "w": (3, 2, 2)},
    ),
    "conv-transpose2d": (
        lambda p: F.conv_transpose2d(p["x"], p["w"], p["b"], stride=2, output_padding=1),
        {"x": (1, 2, 3, 3), "w": (2, 3, 2, 2), "b": (3,)},
    ),
    # shapes, selections and reductions
    "views": (
        lambda p: p["a"].view(4, 3).reshape(2, 6).flatten().unsqueeze(0).squeeze(0),
        {"a": (3, 4)},
    ),
    "permute-transpose": (
        lambda p: p["a"].permute(2, 0, 1).transpose(0, 1).contiguous().mT,
        {"a": (2, 3, 4)},
    ),
    "expand": (
        lambda p: p["a"].expand(3, 2, 4) * torch.arange(1.0, 4.0, dtype=D).view(3, 1, 1),
        {"a": (2, 4)},
    ),
    "cat-stack": (
        lambda p: torch.cat([torch.stack([p["a"], p["b"]]).flatten(), p["a"][0]]),
        {"a": (2, 3), "b": (2, 3)},
    ),
    "split-chunk": (
        lambda p: torch.cat(
            [
                q.flatten() * (i + 1)
                for i, q in enumerate(p["a"].split([1, 3], 1) + p["a"].chunk(2, 0))
            ]
        ),
        {"a": (2, 4)},
    ),
    "slice-select-index": (
        lambda p: torch.cat([p["a"][:, 1:3].flatten(), p["a"][1], p["a"][[0, 0, 2]].flatten()]),
        {"a": (3, 4)},
    ),
    "unbind-pad": (
        lambda p: torch.cat([F.pad(q, (1, 2)) for q in p["a"].unbind(0)]),
        {"a": (2, 3)},
    ),
    "reflect-replicate-pad": (  # border entries copied into several outputs (TResNet)
        lambda p: torch.cat(
            [
                F.pad(p["a"], (2, 1), mode="reflect").flatten(),
                F.pad(p["b"], (1, 2, 2, 1), mode="reflect").flatten(),
                F.pad(p["b"], (2, 1, 1, 2), mode="replicate").flatten(),
                F.pad(p["c"], (1, 1, 1, 0, 0, 1), mode="replicate").flatten(),
                F.pad(p["c"], (1, 1, 1, 1, 1, 1), mode="reflect").flatten(),
            ]
        ),
        {"a": (2, 2, 4), "b": (1, 2, 3, 4), "c": (1, 1, 2, 3, 3)},
    ),
    "flip-roll-repeat": (
        lambda p: torch.cat(
            [p["a"].flip(1).flatten(), p["a"].roll(1, 0).flatten(), p["a"].repeat(2, 1).flatten()]
        ),
        {"a": (2, 3)},
    ),
    "gather-index-select-narrow": (
        lambda p, i: torch.cat(
            [
                p["a"].gather(1, i).flatten(),
                p["a"].index_select(1, i[0]).flatten(),
                p["a"].narrow(1, 1, 2).flatten(),
            ]
        ),
        {"a": (2, 4)},
        (),
        {"i": torch.tensor([[0, 3, 3], [2, 1, 0]])},
    ),
    "masked-fill-diagonal": (
        lambda p, m: torch.cat([p["a"].masked_fill(m, 0.0).flatten(), p["a"].diagonal()]),
        {"a": (3, 3)},
        (),
        {"m": torch.tensor([[True, False, False], [False, True, True], [False, False, False]])},
    ),
    "unfold-as-strided": (
        lambda p: torch.cat(
            [p["a"].unfold(0, 3, 2).flatten(), p["a"].as_strided((2, 2), (2, 1)).flatten()]
        ),
        {"a": (7,)},
    ),
    "squeeze-variants": (
        lambda p: torch.cat(
            [p["a"].squeeze().flatten(), p["a"].squeeze(0).flatten(), p["a"].squeeze((0, 2))]
        ),
        {"a": (1, 3, 1)},
    ),
    "unsafe-split": (
        lambda p: torch.cat([q * (i + 2) for i, q in enumerate(torch.unsafe_split(p["a"], 2))]),
        {"a": (4,)},
    ),
    "sum-mean": (
        lambda p: torch.stack(
            [p["a"].sum(), p["a"].sum(1).sum(), p["a"].mean(), p["a"].mean((0,)).sum()]
        ),
        {"a": (3, 4)},
    ),
    "global-average-pool": (lambda p: p["a"].mean((2, 3)), {"a": (2, 3, 4, 4)}),
    "embedding": (lambda p, i: F.embedding(i, p["w"]), {"w": (4, 3)}, (), {"i": IDX}),
    "embedding-padding": (
        lambda p, i: F.embedding(i, p["w"], padding_idx=2),
        {"w": (4, 3)},
        (),
        {"i": IDX},
    ),
    # pooling
    "max-pool2d": (lambda p: F.max_pool2d(p["a"], 3, stride=1, padding=1), {"a": (2, 2, 4, 4)}),
    "max-pool1d": (lambda p: F.max_pool1d(p["a"], 2), {"a": (2, 2, 6)}),
    "max-pool3d": (lambda p: F.max_pool3d(p["a"], 2), {"a": (1, 2, 4, 4, 4)}),
    "avg-pool2d": (
        lambda p: F.avg_pool2d(
            p["a"], 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False
        ),
        {"a": (2, 2, 5, 5)},
    ),
    "avg-pool1d": (lambda p: F.avg_pool1d(p["a"], 3, stride=2, padding=1), {"a": (2, 2, 7)}),
    "avg-pool2d-divisor": (
        lambda p: F.avg_pool2d(p["a"], 2, divisor_override=3),
        {"a": (1, 2, 4, 4)},
    ),
    "avg-pool3d": (lambda p: F.avg_pool3d(p["a"], 2, stride=1), {"a": (1, 1, 3, 3, 3)}),
    "adaptive-avg-pool3d": (
        lambda p: F.adaptive_avg_pool3d(p["a"], (2, 1, 3)),
        {"a": (1, 2, 3, 4, 5)},
    ),
    "adaptive-avg-pool2d": (lambda p: F.adaptive_avg_pool2d(p["a"], (2, 3)), {"a": (2, 2, 5, 5)}),
    "global-avg-pool2d-channels-last": (  # a mean, then an in-place as_strided_
        lambda p: F.adaptive_avg_pool2d(p["a"].contiguous(memory_format=torch.channels_last), 1),
        {"a": (2, 3, 4, 4)},
    ),
    "as-strided-inplace-overlapping": (
        lambda p: (p["a"] * 1.0).as_strided_((3, 3), (1, 2)),
        {"a": (7,)},
    ),
    # in-place writes (into views: CopySlices; into whole tensors: their own nodes)
    "zero-into-view": (lambda p: _written(p["a"], lambda t: t[:, :2].zero_()), {"a": (3, 4)}),
    "relu-into-view": (lambda p: _written(p["a"], lambda t: t[:, 1:].relu_()), {"a": (3, 4)}),
    "scale-into-view": (lambda p: _written(p["a"], lambda t: t[1:].mul_(-2.5)), {"a": (3, 4)}),
    "add-into-view": (
        lambda p: _written(p["a"], lambda t: t[:, 1:].add_(p["b"])),
        {"a": (3, 4), "b": (3, 3)},
    ),
    "copy-into-view": (
        lambda p: _written(p["a"], lambda t: t[:, 0].copy_(p["b"])),
        {"a": (3, 4), "b": (3,)},
    ),
    "setitem-broadcast": (
        lambda p: _written(p["a"], lambda t: t.__setitem__((slice(None), slice(0, 2)), p["b"])),
        {"a": (3, 4), "b": (2,)},
    ),
    "copy-whole": (lambda p: torch.zeros(3, 4, dtype=D).copy_(p["a"] ** 2), {"a": (3, 4)}),
    "zero-whole": (lambda p: torch.cat([(p["a"] * 1.0).zero_(), p["a"]]), {"a": (3, 4)}),
    "fill-whole": (lambda p: torch.cat([(p["a"] * 1.0).fill_(2.0), p["a"]]), {"a": (3, 4)}),
    "index-put": (
        lambda p: (p["a"] * 1.0).index_put_((torch.tensor([0, 2]),), p["b"]),
        {"a": (3, 4), "b": (2, 4)},
    ),
    "amax": (lambda p: torch.amax(p["a"], dim=(1, 2)), {"a": (2, 3, 4)}),
    "amin-keepdim": (lambda p: torch.amin(p["a"], dim=1, keepdim=True), {"a": (3, 4)}),
    "amax-tied": (  # each element tied with a constant copy: autograd gives it 1/2
        lambda p: torch.stack([p["a"], p["a"].detach()]).amax(0),
        {"a": (3, 4)},
    ),
    "max-over-a-dimension": (lambda p: p["a"].max(1)[0], {"a": (3, 4)}),
    "min-over-all": (lambda p: p["a"].min(), {"a": (3, 4)}),
    "adaptive-max-pool2d": (
        lambda p: F.adaptive_max_pool2d(p["a"], (2, 3)),
        {"a": (2, 2, 5, 5)},
    ),
    "addcmul": (
        lambda p: torch.addcmul(p["c"], p["a"], p["b"], value=-0.7),
        {"c": (3, 4), "a": (3, 4), "b": (4,)},
    ),
    "addcmul-square": (
        lambda p: torch.addcmul(p["c"], p["a"], p["a"], value=0.6),
        {"c": (3, 4), "a": (3, 4)},
    ),
    "addcdiv": (
        lambda p: torch.addcdiv(p["c"], p["a"], p["b"], value=1.3),
        {"c": (4,), "a": (3, 4), "b": (3, 4)},
        ("b",),
    ),
    # interpolation (linear maps, exact with squared weights)
    "upsample-nearest": (lambda p: F.interpolate(p["a"], scale_factor=2), {"a": (2, 2, 3, 2)}),
    "upsample-nearest-exact": (
        lambda p: F.interpolate(p["a"], size=(5, 3), mode="nearest-exact"),
        {"a": (1, 2, 3, 2)},
    ),
    "upsample-bilinear": (
        lambda p: F.interpolate(p["a"], size=(5, 7), mode="bilinear"),
        {"a": (2, 2, 3, 4)},
    ),
    "upsample-bilinear-align-corners": (
        lambda p: F.interpolate(p["a"], scale_factor=1.5, mode="bilinear", align_corners=True),
        {"a": (1, 2, 3, 4)},
    ),
    "downsample-bilinear-antialias": (
        lambda p: F.interpolate(p["a"], size=(2, 3), mode="bilinear", antialias=True),
        {"a": (1, 2, 5, 7)},
    ),
    "upsample-bicubic": (
        lambda p: F.interpolate(p["a"], size=(5, 6), mode="bicubic"),
        {"a": (1, 2, 3, 4)},
    ),
    "upsample-bicubic-align-corners": (
        lambda p: F.interpolate(p["a"], size=(5, 6), mode="bicubic", align_corners=True),
        {"a": (1, 1, 3, 4)},
    ),
    "downsample-bicubic-antialias": (
        lambda p: F.interpolate(p["a"], size=(3, 2), mode="bicubic", antialias=True),
        {"a": (1, 2, 6, 5)},
    ),
    "upsample-linear-1d": (
        lambda p: F.interpolate(p["a"], size=7, mode="linear"),
        {"a": (2, 2, 4)},
    ),
    "upsample-trilinear": (
        lambda p: F.interpolate(p["a"], size=(3, 4, 3), mode="trilinear"),
        {"a": (1, 1, 2, 3, 2)},
    ),
    # vector norms
    "vector-norm-2": (
        lambda p: torch.linalg.vector_norm(p["a"], dim=(2, 3), keepdim=True),
        {"a": (2, 3, 2, 2)},
    ),
    "vector-norm-2-all": (lambda p: p["a"].norm(), {"a": (3, 4)}),
    "vector-norm-3": (lambda p: torch.linalg.vector_norm(p["a"], 3, dim=1), {"a": (3, 4)}),
    "vector-norm-1.5": (lambda p: torch.linalg.vector_norm(p["a"], 1.5, dim=0), {"a": (3, 4)}),
    # unfold and fold
    "unfold": (lambda p: F.unfold(p["a"], 2, padding=1, stride=2), {"a": (2, 2, 3, 4)}),
    "fold": (lambda p: F.fold(p["a"], (3, 4), 2), {"a": (2, 8, 6)}),
    # normalization
    "layer-norm": (
        lambda p: F.layer_norm(p["x"], (4,), p["w"], p["b"]),
        {"x": (2, 3, 4), "w": (4,), "b": (4,)},
    ),
    "layer-norm-2d-no-affine": (lambda p: F.layer_norm(p["x"], (3, 4)), {"x": (2, 3, 4)}),
    "group-norm": (
        lambda p: F.group_norm(p["x"], 2, p["w"], p["b"]),
        {"x": (2, 4, 3, 3), "w": (4,), "b": (4,)},
    ),
    "batch-norm-train": (
        lambda p: F.batch_norm(p["x"], None, None, p["w"], p["b"], training=True),
        {"x": (4, 3, 2, 2), "w": (3,), "b": (3,)},
    ),
    "batch-norm1d-train-no-affine": (
        lambda p: F.batch_norm(p["x"], None, None, training=True),
        {"x": (5, 3)},
    ),
    "batch-norm-eval": (
        lambda p, m, v: F.batch_norm(p["x"], m, v, p["w"], p["b"], training=False),
        {"x": (4, 3, 2, 2), "w": (3,), "b": (3,)},
        (),
        {"m": torch.randn(3, dtype=D), "v": torch.rand(3, dtype=D) + 0.5},
    ),
    # softmax inside a network
    "softmax": (lambda p: torch.softmax(p["a"], 1), {"a": (3, 5)}),
    "safe-softmax-a-row-masked": (  # attention's math kernel: a row of −∞ gives p = 0
        lambda p, hide: torch._safe_softmax(p["a"].masked_fill(hide, float("-inf")), 1),
        {"a": (3, 5)},
        (),
        {"hide": torch.tensor([[False, True, False, False, True], [True] * 5, [False] * 5])},
    ),
    "softmax-dim0": (lambda p: p["a"].softmax(0), {"a": (4, 3)}),
    "log-softmax": (lambda p: F.log_softmax(p["a"], -1), {"a": (3, 5)}),
}


LOSS_SIDE = {"log-softmax"}


def test_a_cast_passes_curvature_through_in_the_cast_dtype():
    """``ToCopyBackward0``: J = I, so ŝ passes through, rounded to float32 on the way."""
    torch.manual_seed(0)
    model = Operation(lambda p: p["a"].float().double() * 2, {"a": (3,)})
    target = (torch.rand(3, dtype=D) + 0.1, torch.randn(3, dtype=D))
    x = torch.zeros(1, dtype=D)
    _, estimate = hesscale.diagonal(model, quadratic, x, target)
    exact = exact_hessian_diagonal(model, quadratic, x, target)
    torch.testing.assert_close(estimate["p.a"], exact["p.a"], rtol=1e-6, atol=0)


def _build(name, seed=0):
    spec = OPERATIONS[name]
    fn, shapes = spec[0], spec[1]
    positive = spec[2] if len(spec) > 2 else ()
    constants = spec[3] if len(spec) > 3 else None
    torch.manual_seed(seed)
    model = Operation(fn, shapes, positive, constants)
    out = model(None)
    s = torch.rand(out.shape, dtype=D) + 0.1
    c = torch.randn(out.shape, dtype=D)
    return model, (s, c)


# linear operations torch.func cannot transform (in-place views): their Hessian (which is
# also their GGN, the quadratic being the only curvature) by double backward
DOUBLE_BACKWARD = {"global-avg-pool2d-channels-last", "as-strided-inplace-overlapping"}
# operations PyTorch cannot differentiate twice: their truth is that of the same function
# written with operations it can
TWINS = {"hardsigmoid": lambda p: F.relu6(4 * p["a"] + 3) / 6}
# PyTorch computes in-place CELU with its input scale 1/α, and hardsigmoid's slope 1/6,
# rounded to float32
TOLERANCES = {
    "celu-inplace": dict(rtol=1e-7, atol=1e-12),
    "hardsigmoid": dict(rtol=1e-7, atol=1e-12),
}


def test_the_double_backward_reference_agrees_with_torch_func():
    model, target = _build("softmax")  # a dense, non-linear Hessian
    x = torch.zeros(1, dtype=D)
    assert_close_dicts(
        double_backward_hessian_diagonal(model, quadratic, x, target),
        exact_hessian_diagonal(model, quadratic, x, target),
    )


@pytest.mark.parametrize("name", OPERATIONS)
def test_rule_is_exact_given_a_diagonal_output_hessian(name):
    model, target = _build(name)
    x = torch.zeros(1, dtype=D)
    _, estimate = hesscale.diagonal(model, quadratic, x, target, method="hesscale")
    truth = model
    if name in TWINS:
        truth = Operation(TWINS[name], {})
        truth.p = model.p
    if name in DOUBLE_BACKWARD:
        exact = double_backward_hessian_diagonal(truth, quadratic, x, target)
        ggn = exact
    else:
        exact = exact_hessian_diagonal(truth, quadratic, x, target)
    tolerance = TOLERANCES.get(name, {})
    assert_close_dicts(estimate, exact, **tolerance)
    model.zero_grad()
    _, gn = hesscale.diagonal(model, quadratic, x, target, method="hesscale_gn")
    if name in LOSS_SIDE:  # LogSoftmax belongs to the loss: its term is kept under HesScaleGN
        assert_close_dicts(gn, estimate)
    else:
        if name not in DOUBLE_BACKWARD:
            ggn = ggn_diagonal(truth, quadratic, x, target)
        assert_close_dicts(gn, ggn, **tolerance)


class Logits(nn.Module):
    def __init__(self, shape, var=False):
        super().__init__()
        self.z = nn.Parameter(torch.randn(shape, dtype=D))
        self.v = nn.Parameter(torch.rand(shape, dtype=D) + 0.5) if var else None

    def forward(self, x):
        return self.z if self.v is None else (self.z, self.v)


def _labels(*shape, classes=4):
    return torch.randint(0, classes, shape)


LOSSES = {
    "ce": (lambda o, t: F.cross_entropy(o, t), (5, 4), lambda: _labels(5)),
    "ce-sum-weight-smoothing-ignore": (
        lambda o, t: F.cross_entropy(
            o,
            t,
            weight=torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=D),
            label_smoothing=0.1,
            ignore_index=1,
            reduction="sum",
        ),
        (5, 4),
        lambda: torch.tensor([0, 1, 2, 3, 1]),
    ),
    "ce-probabilities": (
        lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2),
        (5, 4),
        lambda: torch.softmax(torch.randn(5, 4, dtype=D), 1),
    ),
    "ce-spatial": (lambda o, t: F.cross_entropy(o, t), (2, 4, 3), lambda: _labels(2, 3)),
    "nll-after-log-softmax": (
        lambda o, t: F.nll_loss(o.log_softmax(1), t),
        (5, 4),
        lambda: _labels(5),
    ),
    "mse": (lambda o, t: F.mse_loss(o, t), (5, 4), lambda: torch.randn(5, 4, dtype=D)),
    "mse-sum": (
        lambda o, t: F.mse_loss(o, t, reduction="sum"),
        (5, 4),
        lambda: torch.randn(5, 4, dtype=D),
    ),
    "bce-with-logits": (
        lambda o, t: F.binary_cross_entropy_with_logits(
            o,
            t,
            weight=torch.tensor([0.2, 1.0, 0.7, 1.5], dtype=D),
            pos_weight=torch.tensor([0.5, 2.0, 1.0, 1.2], dtype=D),
        ),
        (5, 4),
        lambda: torch.randint(0, 2, (5, 4)).to(D),
    ),
    "gaussian-nll": (
        lambda o, t: F.gaussian_nll_loss(o[0], t, o[1]),
        (5, 4),
        lambda: torch.randn(5, 4, dtype=D),
    ),
    "scaled-loss": (lambda o, t: 3.0 * F.cross_entropy(o, t) ** 2, (5, 4), lambda: _labels(5)),
}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_rules_give_the_exact_output_diagonal(name):
    loss, shape, target_fn = LOSSES[name]
    torch.manual_seed(0)
    model = Logits(shape, var=name == "gaussian-nll")
    target = target_fn()
    x = torch.zeros(1, dtype=D)
    for method in ("hesscale", "hesscale_gn"):
        model.zero_grad()
        _, estimate = hesscale.diagonal(model, loss, x, target, method=method)
        assert_close_dicts(estimate, exact_hessian_diagonal(model, loss, x, target))


def test_scalar_addition_inside_decompositions_passes_curvature_through():
    """``AddBackward1`` (tensor + number, made by decompositions such as ``F.rms_norm``'s
    ``mean + ε``) has J = I."""
    from hesscale.rules._registry import NodeContext
    from hesscale.rules.shape import selection_rule

    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    y = F.rms_norm(x, (3,))
    stack, node = [y.grad_fn], None
    while stack:
        n = stack.pop()
        if type(n).__name__ == "AddBackward1":
            node = n
            break
        stack.extend(c for c, _ in n.next_functions if c is not None)
    assert node is not None
    s = torch.rand(2, 1, dtype=D)
    ctx = NodeContext(node, (s,), (s,), (True,), True, hesscale.METHODS["hesscale"], D)
    (s_in,) = selection_rule(ctx)
    torch.testing.assert_close(s_in, s)


class RMSNormed(nn.Module):
    """``nn.RMSNorm`` (a layer rule) applied to a parameter."""

    def __init__(self, shape, normalized, affine):
        super().__init__()
        self.x = nn.Parameter(torch.randn(shape, dtype=D))
        self.norm = nn.RMSNorm(normalized, eps=1e-5, elementwise_affine=affine).to(D)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, _):
        return self.norm(self.x)


@pytest.mark.parametrize("normalized, affine", [((4,), True), ((3, 4), False)])
def test_rms_norm_layer_is_exact_given_a_diagonal_output_hessian(normalized, affine):
    torch.manual_seed(0)
    model = RMSNormed((2, 3, 4), normalized, affine)
    out = model(None)
    target = (torch.rand(out.shape, dtype=D) + 0.1, torch.randn(out.shape, dtype=D))
    x = torch.zeros(1, dtype=D)
    _, estimate = hesscale.diagonal(model, quadratic, x, target)
    assert_close_dicts(estimate, exact_hessian_diagonal(model, quadratic, x, target))
    model.zero_grad()
    _, gn = hesscale.diagonal(model, quadratic, x, target, method="hesscale_gn")
    assert_close_dicts(gn, ggn_diagonal(model, quadratic, x, target))


class NormalizedLayer(nn.Module):
    """A Linear layer or convolution of a fixed input, then a train-mode BatchNorm."""

    def __init__(self, layer, norm, shape):
        super().__init__()
        self.layer, self.norm = layer.to(D), norm.to(D)
        self.register_buffer("x", torch.randn(shape, dtype=D))
        if self.norm.affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, _):
        return self.norm(self.layer(self.x))


NORMALIZED_LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), lambda: nn.BatchNorm1d(3), (6, 4)),
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), lambda: nn.BatchNorm2d(3), (3, 2, 4, 4)),
    "conv-stride-groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2),
        lambda: nn.BatchNorm2d(6),
        (3, 4, 5, 5),
    ),
    "conv-same-even": (
        lambda: nn.Conv2d(2, 3, 2, padding="same", bias=False),
        lambda: nn.BatchNorm2d(3),
        (2, 2, 3, 3),
    ),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), lambda: nn.BatchNorm1d(3), (4, 2, 5)),
    "conv3d-no-affine": (
        lambda: nn.Conv3d(2, 3, 2),
        lambda: nn.BatchNorm3d(3, affine=False),
        (2, 2, 3, 3, 3),
    ),
}


@pytest.mark.parametrize("name", NORMALIZED_LAYERS)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_weights_before_a_train_mode_batch_norm_are_exact_given_a_diagonal_output_hessian(
    name, method
):
    """The fused rule differentiates the layer's weights through the batch statistics: exact
    (and the bias exactly 0, its true value); the per-layer rule is not (a guard against a
    vacuous check)."""
    layer, norm, shape = NORMALIZED_LAYERS[name]
    torch.manual_seed(0)
    model = NormalizedLayer(layer(), norm(), shape)
    out = model(None)
    target = (torch.rand(out.shape, dtype=D) + 0.1, torch.randn(out.shape, dtype=D))
    x = torch.zeros(1, dtype=D)
    reference = exact_hessian_diagonal if method == "hesscale" else ggn_diagonal
    import copy

    frozen = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(frozen)  # the same forward, no running statistics
    expected = reference(frozen, quadratic, x, target)
    _, estimate = hesscale.diagonal(hesscale.extend(model), quadratic, x, target, method=method)
    if "layer.bias" in estimate:  # the true value is 0 (up to the reference's rounding)
        assert (estimate.pop("layer.bias") == 0).all()
        bias = expected.pop("layer.bias")
        assert bias.abs().max() < 1e-12 * expected["layer.weight"].abs().max()
    assert_close_dicts(estimate, expected)
    model.zero_grad()
    hesscale.extend(model, batch_norm="per-layer")
    _, per_layer = hesscale.diagonal(model, quadratic, x, target, method=method)
    assert not torch.allclose(per_layer["layer.weight"], expected["layer.weight"], rtol=1e-3)


class LibraryRMSNorm(nn.Module):
    """An RMSNorm as other libraries write it (Hugging Face's LlamaRMSNorm)."""

    def __init__(self, width, eps=1e-6, offset=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width, dtype=D) + 0.5)
        self.variance_epsilon, self.offset = eps, offset

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.offset + self.weight) * x


class LibraryNormed(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.x = nn.Parameter(torch.randn(2, 3, 4, dtype=D))
        self.norm = norm

    def forward(self, _):
        return self.norm(self.x)


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_rms_norms_of_other_libraries_are_recognised_by_what_they_compute(method):
    """A module that computes RMSNorm gets its exact layer rule; a look-alike that computes
    something else (Gemma's 1 + γ) is not recognised and runs through its operations."""
    from hesscale.rules import layer_rule_for
    from hesscale.rules.normalization import OTHER_RMS_NORM

    rms, gemma_like = LibraryRMSNorm(4), LibraryRMSNorm(4, offset=1.0)
    state = torch.get_rng_state()
    assert layer_rule_for(rms, "norm") is OTHER_RMS_NORM
    assert layer_rule_for(gemma_like, "norm") is None
    assert torch.equal(torch.get_rng_state(), state)  # the check draws from its own generator
    torch.manual_seed(0)
    model = LibraryNormed(LibraryRMSNorm(4))
    out = model(None)
    target = (torch.rand(out.shape, dtype=D) + 0.1, torch.randn(out.shape, dtype=D))
    x = torch.zeros(1, dtype=D)
    reference = exact_hessian_diagonal if method == "hesscale" else ggn_diagonal
    _, estimate = hesscale.diagonal(model, quadratic, x, target, method=method)
    assert_close_dicts(estimate, reference(model, quadratic, x, target))
