"""HesScale through time for recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``), whichever
kernel PyTorch picked.

Where PyTorch runs a recurrent layer as ordinary operations (``nn.RNN`` and ``nn.GRU`` on the
CPU, any of them in float64), each operation's rule applies and the curvature flows back
through time like the gradient: at every step the element-wise rule of each gate, the
products' rules for the input and recurrent matrices (whose estimates are summed over the time
steps, a parameter used T times), and the sums where a state feeds several operations (its
cross terms dropped, as the paper drops off-diagonal terms). Where PyTorch fuses a whole layer
into one kernel (oneDNN's LSTM on the CPU, ``MkldnnRnnLayerBackward0``; cuDNN on a GPU,
``CudnnRnnBackward0``), the rule recomputes the layer from what the kernel's node saved with
those same operations (:func:`recurrence`, PyTorch's own equations in the form of its own
cells, ``proj_size`` included) and runs a nested curvature pass over them: the estimate is the
same whichever kernel ran. (The form matters where a value feeds several operations: PyTorch's
GRU writes ``h' = (h − n) ⊙ z + n``, so ``n`` feeds two, and the cross term between them is
dropped; ``(1 − z) ⊙ n + z ⊙ h`` would keep it. The rule follows PyTorch's.)
Dropout between layers inside the kernel (``dropout > 0`` in train mode) cannot be recomputed
and is refused by name. The cells::

    RNN:   h' = act(W_ih x + b_ih + W_hh h + b_hh)
    GRU:   r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(…),
           n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (h − n) ⊙ z + n
    LSTM:  i, f, g, o = σ, σ, tanh, σ of W_ih x + b_ih + W_hh h + b_hh,  c' = f ⊙ c + i ⊙ g,
           h' = o ⊙ tanh(c')  (times W_hr with proj_size)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import NodeContext, operation_rule

MODES = {0: "RNN_RELU", 1: "RNN_TANH", 2: "LSTM", 3: "GRU"}  # PyTorch's (and cuDNN's) codes


def _step(mode: str, x_proj, h, c, w_hh, b_hh, w_hr):
    """One time step from the input's projection ``x_proj = W_ih x + b_ih``."""
    if mode == "GRU":
        hidden = F.linear(h, w_hh, b_hh)
        x_r, x_z, x_n = x_proj.chunk(3, -1)
        h_r, h_z, h_n = hidden.chunk(3, -1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (h - n) * z + n, None  # as PyTorch's own GRU cell (n feeds two operations)
    gates = x_proj + F.linear(h, w_hh, b_hh)
    if mode == "LSTM":
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (F.linear(h, w_hr) if w_hr is not None else h), c
    return (torch.relu(gates) if mode == "RNN_RELU" else torch.tanh(gates)), None


def recurrence(mode, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False):
    """One layer in one direction: ``(outputs (T, N, H_out), h_T, c_T)`` for a time-major input
    ``x (T, N, I)`` and initial states ``h (N, H_out)``, ``c (N, H)`` (LSTM)."""
    projected = F.linear(x, w_ih, b_ih)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        h, c = _step(mode, projected[t], h, c, w_hh, b_hh, w_hr)
        outputs[t] = h
    return torch.stack(outputs), h, c


@operation_rule("MkldnnRnnLayerBackward0")
def onednn_layer_rule(ctx: NodeContext):
    """oneDNN's kernel of one LSTM layer in one direction (the CPU's, float32): inputs
    ``(input, w_ih, w_hh, b_ih, b_hh, hx, cx)``, outputs ``(output, h_n, c_n, workspace)``."""
    mode = MODES[int(ctx.saved("mode"))]
    if ctx.saved("batch_sizes"):
        raise NotImplementedError("oneDNN's recurrent kernel on packed sequences")
    names = ("input", "weight0", "weight1", "weight2", "weight3", "hx_", "cx_")
    inputs = [ctx.saved(n) for n in names]
    reverse = bool(ctx.saved("reverse"))

    def layer(x, w_ih, w_hh, b_ih, b_hh, hx, cx):
        biases = (b_ih, b_hh) if ctx.saved("has_biases") else (None, None)
        return recurrence(
            mode, x, hx, cx if mode == "LSTM" else None, w_ih, w_hh, *biases, reverse=reverse
        )

    return tuple(ctx.backpropagate(layer, inputs))


onednn_layer_rule.backpropagates_through = True


@operation_rule("CudnnRnnBackward0")
def cudnn_rule(ctx: NodeContext):
    """cuDNN's kernel of a whole ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (every layer and
    direction): inputs ``(input, weights…, hx, cx)``, outputs ``(output, h_n, c_n, …)``."""
    mode = MODES[int(ctx.saved("mode"))]
    if ctx.saved("batch_sizes"):
        raise NotImplementedError("cuDNN's recurrent kernel on packed sequences")
    if float(ctx.saved("dropout")) > 0 and bool(ctx.saved("train")):
        raise NotImplementedError("dropout between recurrent layers inside cuDNN's kernel")
    dtype = ctx.dtype
    weights = [w.to(dtype) if dtype is not None else w for w in ctx.saved("weight")]
    layers, bidirectional = int(ctx.saved("num_layers")), bool(ctx.saved("bidirectional"))
    proj = int(ctx.saved("proj_size") or 0)
    batch_first = bool(ctx.saved("batch_first"))
    per = len(weights) // (layers * (2 if bidirectional else 1))
    hx, cx = ctx.saved("hx"), ctx.saved("cx")
    inputs = [ctx.saved("input"), *weights, hx, cx]

    def network(x, *rest):
        ws, h0, c0 = rest[: len(weights)], rest[len(weights)], rest[len(weights) + 1]
        return stacked_recurrence(
            mode, x, h0, c0, ws, layers, bidirectional, per, proj, batch_first
        )

    return tuple(ctx.backpropagate(network, inputs))


cudnn_rule.backpropagates_through = True


def stacked_recurrence(mode, x, h0, c0, weights, layers, bidirectional, per, proj, batch_first):
    """A whole multi-layer (bidirectional) recurrent network in PyTorch's weight order (per
    layer and direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``): ``(output, h_n, c_n)``."""
    if batch_first:
        x = x.transpose(0, 1)
    directions = 2 if bidirectional else 1
    hs, cs = [], []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k * per : (k + 1) * per]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if per >= 4 else (None, None)
            w_hr = w[-1] if proj else None
            c = c0[k] if c0 is not None and mode == "LSTM" else None
            out, h, c = recurrence(mode, x, h0[k], c, w_ih, w_hh, b_ih, b_hh, w_hr, direction == 1)
            outputs.append(out)
            hs.append(h)
            cs.append(c)
        x = torch.cat(outputs, -1) if directions == 2 else outputs[0]
    out = x.transpose(0, 1) if batch_first else x
    return out, torch.stack(hs), torch.stack(cs) if mode == "LSTM" else None
