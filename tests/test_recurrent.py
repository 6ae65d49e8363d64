"""Recurrent layers: HesScale through time, whichever kernel PyTorch picked.

``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` (float64 on the CPU: PyTorch's own decomposition into
operations with rules) against torch.func where the theory makes the estimate exact: one time
step of width one, and the classifier after the recurrent layer. The fused kernels (oneDNN's
LSTM in float32 on the CPU, cuDNN on a GPU) are recomputed with the same operations: their
estimates equal the decomposition's, and the recomputation equals the layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import hesscale
from hesscale.reference import (
    double_backward_hessian_diagonal,
    exact_hessian_diagonal,
    ggn_diagonal,
)
from hesscale.rules.recurrent import stacked_recurrence

from .conftest import assert_close_dicts

D = torch.float64
LAYERS = {
    "rnn-tanh": lambda i, h, **kw: nn.RNN(i, h, **kw),
    "rnn-relu": lambda i, h, **kw: nn.RNN(i, h, nonlinearity="relu", **kw),
    "gru": lambda i, h, **kw: nn.GRU(i, h, **kw),
    "lstm": lambda i, h, **kw: nn.LSTM(i, h, **kw),
}
SETTINGS = {
    "one layer": {},
    "two layers, bidirectional, batch first": dict(
        num_layers=2, bidirectional=True, batch_first=True
    ),
    "no bias": dict(bias=False),
}


class Classifier(nn.Module):
    """A recurrent layer, then a Linear layer on the last step's output (or on the final
    hidden state, ``on_state``), optionally from given initial states or packed sequences."""

    def __init__(self, layer, head_inputs, on_state=False, packed=None, initial=False):
        super().__init__()
        self.rnn, self.head = layer, nn.Linear(head_inputs, 3)
        self.on_state, self.packed, self.initial = on_state, packed, initial

    def forward(self, x):
        rnn = self.rnn
        args = [x]
        if self.packed is not None:
            args = [pack_padded_sequence(x, self.packed, batch_first=rnn.batch_first)]
        if self.initial:
            directions = 2 if rnn.bidirectional else 1
            n = x.shape[0] if rnn.batch_first else x.shape[1]
            hidden = (
                rnn.proj_size or rnn.hidden_size if isinstance(rnn, nn.LSTM) else rnn.hidden_size
            )
            h0 = torch.linspace(-1, 1, rnn.num_layers * directions * n * hidden, dtype=x.dtype)
            h0 = h0.view(rnn.num_layers * directions, n, hidden)
            if isinstance(rnn, nn.LSTM):
                c0 = 0.5 * torch.ones(
                    rnn.num_layers * directions, n, rnn.hidden_size, dtype=x.dtype
                )
                args.append((h0, c0))
            else:
                args.append(h0)
        out, state = rnn(*args)
        if self.on_state or self.packed is not None:
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        last = out[:, -1] if rnn.batch_first else out[-1]
        return self.head(last)


def _classifier(name, setting, dtype=D, **options):
    torch.manual_seed(0)
    kw = SETTINGS[setting]
    layer = LAYERS[name](3, 4, **kw)
    width = 4 * (2 if kw.get("bidirectional") else 1)
    model = Classifier(layer, width, **options).to(dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)
    if kw.get("batch_first"):
        x = x.transpose(0, 1).contiguous()
    return model, x, torch.tensor([0, 2])


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_the_classifier_after_a_recurrent_layer_is_exact(name, setting, method):
    model, x, y = _classifier(name, setting)
    _, estimate = hesscale.diagonal(model, _loss, x, y, method=method)
    exact = exact_hessian_diagonal(model, _loss, x, y)
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(estimate[key], exact[key])
    assert all(torch.isfinite(v).all() for v in estimate.values())
    assert any(v.abs().sum() > 0 for k, v in estimate.items() if k.startswith("rnn."))


@pytest.mark.parametrize("name", ["rnn-tanh", "rnn-relu", "lstm"])
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_one_time_step_of_width_one_is_exact(name, method):
    """A chain of scalars (each parameter used once): HesScale is exact, HesScaleGN gives the
    exact GGN diagonal (the quadratic loss on the state: no loss-side softmax). PyTorch's GRU
    cell computes ``(h − n) z + n``, where ``n`` feeds two operations: not a chain."""
    torch.manual_seed(0)
    model = Classifier(LAYERS[name](1, 1), 1, on_state=True).to(D)
    x = torch.randn(1, 3, 1, dtype=D)
    target = torch.randn(3, 3, dtype=D)

    def quadratic(out, t):
        return 0.5 * ((out - t) ** 2).sum()

    _, estimate = hesscale.diagonal(model, quadratic, x, target, method=method)
    reference = exact_hessian_diagonal if method == "hesscale" else ggn_diagonal
    assert_close_dicts(estimate, reference(model, quadratic, x, target))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(
    "options", [{"initial": True}, {"packed": [5, 3]}], ids=["initial", "packed"]
)
def test_initial_states_and_packed_sequences(name, options):
    """torch.func cannot transform packed sequences: the head's truth by double backward."""
    model, x, y = _classifier(name, "one layer", **options)
    _, estimate = hesscale.diagonal(model, _loss, x, y)
    exact = double_backward_hessian_diagonal(model, _loss, x, y)
    torch.testing.assert_close(estimate["head.weight"], exact["head.weight"])
    assert all(torch.isfinite(v).all() for v in estimate.values())


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_the_fused_cpu_lstm_kernel_gives_the_decompositions_estimate(setting, method):
    """float32 LSTMs run oneDNN's fused kernel on the CPU (MkldnnRnnLayerBackward0); with
    oneDNN off PyTorch decomposes them: the same estimates."""
    model, x, y = _classifier("lstm", setting, dtype=torch.float32)
    _, fused = hesscale.diagonal(model, _loss, x, y, method=method)
    model.zero_grad()
    with torch.backends.mkldnn.flags(enabled=False):
        _, decomposed = hesscale.diagonal(model, _loss, x, y, method=method)
    assert_close_dicts(fused, decomposed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rnn-tanh", "rnn-relu", "gru", "lstm"])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_recomputation_of_a_fused_kernel_is_the_layer(name, proj, setting):
    """What the fused kernels' rule recomputes is the layer (every layer and direction, in
    PyTorch's weight order): the same outputs and final states."""
    if proj and name != "lstm":
        pytest.skip("proj_size is an LSTM's")
    torch.manual_seed(0)
    kw = SETTINGS[setting]
    layer = LAYERS[name](3, 4, **kw, **({"proj_size": proj} if proj else {})).to(D)
    x = torch.randn(2, 5, 3, dtype=D) if kw.get("batch_first") else torch.randn(5, 2, 3, dtype=D)
    out, state = layer(x)
    h, c = state if isinstance(state, tuple) else (state, None)
    mode = {"rnn-tanh": "RNN_TANH", "rnn-relu": "RNN_RELU", "gru": "GRU", "lstm": "LSTM"}[name]
    weights = [w for ws in layer._all_weights for w in (getattr(layer, n) for n in ws)]
    per = len(weights) // (layer.num_layers * (2 if layer.bidirectional else 1))
    h0 = torch.zeros_like(h)
    c0 = torch.zeros_like(c) if c is not None else None
    again = stacked_recurrence(
        mode,
        x,
        h0,
        c0,
        weights,
        layer.num_layers,
        layer.bidirectional,
        per,
        proj,
        layer.batch_first,
    )
    torch.testing.assert_close(again[0], out)
    torch.testing.assert_close(again[1], h)
    if c is not None:
        torch.testing.assert_close(again[2], c)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_cudnn_kernels_give_the_decompositions_estimate(name, setting):
    """On a GPU every recurrent layer runs cuDNN's fused kernel (CudnnRnnBackward0): its
    estimate equals the CPU decomposition's (float64 there, float32 here)."""
    model, x, y = _classifier(name, setting, dtype=torch.float32)
    _, gpu = hesscale.diagonal(model.cuda(), _loss, x.cuda(), y.cuda())
    model = model.cpu().double()
    model.zero_grad()
    _, cpu = hesscale.diagonal(model, _loss, x.double(), y)
    assert_close_dicts({k: v.cpu().double() for k, v in gpu.items()}, cpu, rtol=1e-4, atol=1e-6)
