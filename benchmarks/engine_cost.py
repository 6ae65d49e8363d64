"""Cost of the engine's estimates over a plain forward + backward, measured side by side.

Prints, for the paper's Fig. 2 networks at batch sizes 1 and 128, the time of a forward and
backward pass that computes each method's estimate divided by the time of the same pass
computing gradients alone (an un-extended copy of the model), and the ratio of peak memory
(the model's parameters, plus the estimates and buffers the engine keeps between steps, plus
the peak allocated during a warm step; the plain pass re-allocates its gradients each step).
Also reports an extended model with no estimate requested (what plain Adam on an extended
model pays), a residual MLP of the Fig. 2b size (4 blocks of two 512-wide tanh layers), the
cost of the graph mechanism alone (the walk and the prehooks with rules that do nothing), as a
ratio and per node of autograd's graph, ``(t_mechanism − t_plain) / nodes``, and the floor:
the forward pass and the recursion of gradients and HesScale curvatures of the same network
written out by hand in plain torch operations with the kernels the engine's rules use (no
autograd, no engine; the squares in reused buffers; it computes the engine's numbers, which a
test checks), so that the engine's ratio can be read against what its arithmetic alone costs
on the machine; ``hesscale/floor`` is the engine's time over the floor's, what the engine adds.

    python benchmarks/engine_cost.py [--rounds 20] [--batch-sizes 1 128] [--networks L=4 residual]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
from torch import nn

import hesscale
import hesscale.engine._apply as engine
from hesscale.experiments.networks import (
    ResidualTanhMLP,
    fig2a_network,
    fig2b_network,
    parameter_count,
    residual_network,
)
from hesscale.experiments.timing import interleaved_times, peak_memory
from hesscale.rules._registry import scratch_buffers

METHODS = ["hesscale", "hesscale_gn", "bl89", "ggn_mc"]
_aten = torch.ops.aten


def networks():
    for layers in (1, 2, 4, 8, 16):
        yield f"L={layers} (100 out)", lambda layers=layers: fig2b_network(layers)
    for outputs in (16, 64, 256, 512):
        yield f"1 hidden, {outputs} out", lambda outputs=outputs: fig2a_network(outputs)
    yield "residual 4x2 (100 out)", residual_network


def graph_nodes(loss) -> int:
    """The number of autograd nodes behind ``loss``."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return len(seen)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _ByHand:
    """The gradient and HesScale recursion (Eq. 1–5, the exact softmax cross-entropy diagonal at
    the output) written out in plain torch operations, with the kernels the engine's rules use:
    ``W²`` and ``h²`` in reused buffers, the tanh rule ``u (u ŝ − 2 h g)`` (``u = 1 − h²``) in
    three passes of ATen's fused tanh backward, the tanh gradient in one."""

    def __init__(self):
        self.squares: dict = {}  # "h", "w2" -> the reused buffer of a square
        self.estimates: dict = {}  # parameter -> its estimate (a buffer, overwritten each step)

    @staticmethod
    def _reused(store: dict, key, like):
        buf = store.get(key)
        if buf is None or buf.shape != like.shape:
            buf = store[key] = torch.empty_like(like)
        return buf

    @staticmethod
    def affine(layer: nn.Linear, h):
        """The forward pass of the layer: ``h Wᵀ + b``."""
        return torch.addmm(layer.bias, h, layer.weight.T)

    def linear(self, layer: nn.Linear, h, g, s, need_input: bool = True):
        """Gradients and estimates of ``a = h Wᵀ + b``; ``(g_h, ŝ_h)`` when needed."""
        weight, squares, estimates = layer.weight, self.squares, self.estimates
        weight.grad, layer.bias.grad = g.T @ h, g.sum(0)
        h_sq = torch.mul(h, h, out=self._reused(squares, "h", h))
        torch.mm(s.T, h_sq, out=self._reused(estimates, weight, weight))
        torch.sum(s, 0, out=self._reused(estimates, layer.bias, layer.bias))
        if not need_input:
            return None, None
        return g @ weight, s @ torch.mul(weight, weight, out=self._reused(squares, "w2", weight))

    @staticmethod
    def tanh(h, g, s):
        """``(g_a, ŝ_a)`` below ``h = tanh(a)``."""
        t = _aten.tanh_backward(s, h).addcmul_(h, g, value=-2)
        return _aten.tanh_backward(g, h), _aten.tanh_backward.grad_input(t, h, grad_input=t)

    @staticmethod
    def loss(a, y):
        """``(g, ŝ)`` of the mean cross-entropy at the logits ``a``."""
        p = torch.softmax(a, 1)
        g = p.clone()
        g[torch.arange(len(y)), y] -= 1
        return g / len(y), (p - p * p) / len(y)


def hand_written(model: nn.Module, x, y, do: _ByHand | None = None):
    """One step of the forward pass and of the recursion of a Linear/Tanh chain or of the
    residual MLP, by hand (no autograd, no engine): the floor of the engine's arithmetic.
    Gradients go to ``.grad``, estimates to ``do.estimates``."""
    do = do if do is not None else _ByHand()
    if isinstance(model, ResidualTanhMLP):
        return _residual_by_hand(model, x, y, do)
    layers = [m for m in model if isinstance(m, nn.Linear)]

    def run():
        with torch.no_grad():
            hs, h = [x], x
            for i, layer in enumerate(layers):
                a = do.affine(layer, h)
                if i < len(layers) - 1:
                    h = torch.tanh(a)
                    hs.append(h)
            g, s = do.loss(a, y)
            for i in reversed(range(len(layers))):
                g, s = do.linear(layers[i], hs[i], g, s, need_input=i > 0)
                if i > 0:
                    g, s = do.tanh(hs[i], g, s)

    return run


def _residual_by_hand(model: ResidualTanhMLP, x, y, do: _ByHand):
    """``h ← tanh(h + W₂ tanh(W₁ h))`` per block: the skip and the block's branch each carry
    ``(g, ŝ)`` down to ``h``, where they add."""

    def run():
        with torch.no_grad():
            h0 = torch.tanh(do.affine(model.inp, x))
            saved, h = [], h0
            for block in model.blocks:
                t = torch.tanh(do.affine(block[0], h))
                out = torch.tanh(h + do.affine(block[2], t))
                saved.append((h, t, out))
                h = out
            g, s = do.loss(do.affine(model.head, h), y)
            g, s = do.linear(model.head, h, g, s)
            for block, (h_in, t, out) in zip(reversed(model.blocks), reversed(saved)):
                g, s = do.tanh(out, g, s)
                g_t, s_t = do.linear(block[2], t, g, s)
                g_t, s_t = do.tanh(t, g_t, s_t)
                g_h, s_h = do.linear(block[0], h_in, g_t, s_t)
                g, s = g + g_h, s + s_h
            g, s = do.tanh(h0, g, s)
            do.linear(model.inp, x, g, s, need_input=False)

    return run


def measure(make, batch: int, rounds: int, device: str):
    torch.manual_seed(0)
    plain = make().to(device)
    model = hesscale.extend(copy.deepcopy(plain))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    outputs = model.out_features if hasattr(model, "out_features") else model[-1].out_features
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, outputs, (batch,), device=device)

    def step(net, method):
        def run():
            hesscale.request(net.parameters(), method)
            net.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()

        return run

    def mechanism_only():  # the walk and the prehooks; every rule replaced by nothing
        real, engine._apply = engine._apply, lambda pass_, node, grads: None
        try:
            step(model, "hesscale")()
        finally:
            engine._apply = real

    fns = {
        "plain": step(plain, None),
        "extended, no request": step(model, None),
        "mechanism": mechanism_only,
    }
    fns.update({m: step(model, m) for m in METHODS})
    fns["by hand"] = hand_written(copy.deepcopy(plain), x, y)
    times = interleaved_times(fns, rounds=rounds, inner=3 if batch == 1 else 1, device=device)
    hesscale.request(model.parameters(), None)
    # memory: the model's parameters, what the engine keeps between steps (estimates and
    # buffers), and the peak allocated during a warm step
    resident = _bytes(plain.parameters())
    memory = {}
    for name in fns:
        if name in ("mechanism", "by hand"):
            continue
        fresh = copy.deepcopy(plain)
        if name != "plain":
            fresh = hesscale.extend(fresh)
        method = name if name in METHODS else None
        run = step(fresh, method)
        run()  # cold step: allocates what is kept
        kept = [
            getattr(p, hesscale.ESTIMATE_ATTRIBUTE)
            for p in fresh.parameters()
            if hasattr(p, hesscale.ESTIMATE_ATTRIBUTE)
        ]
        state = getattr(fresh, "_hesscale_state", None)
        if state is not None:
            kept += [t for ws in state.workspaces.values() for t in ws.values()]
            kept += scratch_buffers(state.scratch)
        memory[name] = resident + _bytes(kept) + peak_memory(run, device)
        hesscale.request(fresh.parameters(), None)
    nodes = graph_nodes(loss_fn(plain(x), y))
    return parameter_count(plain), times, memory, nodes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument(
        "--networks", nargs="+", default=None, help="only the networks whose label starts so"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    rows = []
    names = ["extended, no request", "mechanism"] + METHODS + ["by hand"]
    header = (
        f"{'network':<22}{'batch':>6}{'params':>10} | "
        + " ".join(f"{n[:12]:>12}" for n in names)
        + f" | {'hesscale/floor':>14} {'nodes':>5} {'mech µs/node':>12}"
    )
    print("time over plain forward+backward (peak memory ratio in brackets)")
    print(header)
    for label, make in networks():
        if args.networks and not any(label.startswith(n) for n in args.networks):
            continue
        for batch in args.batch_sizes:
            count, times, memory, nodes = measure(make, batch, args.rounds, args.device)
            base_t, base_m = times["plain"]["median"], max(memory["plain"], 1)
            cells = []
            row = {
                "network": label,
                "batch": batch,
                "params": count,
                "plain_seconds": base_t,
                "plain_peak_bytes": memory["plain"],
                "graph_nodes": nodes,
            }
            for n in names:
                ratio_t = times[n]["median"] / base_t
                ratio_m = memory[n] / base_m if n in memory else None  # not a real step
                row[n] = {
                    "time_ratio": ratio_t,
                    "memory_ratio": ratio_m,
                    "seconds": times[n]["median"],
                }
                memory_cell = f"{ratio_m:4.2f}" if ratio_m is not None else "  - "
                cells.append(f"{ratio_t:5.2f}x({memory_cell})")
            per_node = (times["mechanism"]["median"] - base_t) / nodes * 1e6
            row["mechanism_microseconds_per_node"] = per_node
            over_floor = times["hesscale"]["median"] / times["by hand"]["median"]
            row["hesscale_over_floor"] = over_floor
            rows.append(row)
            print(
                f"{label:<22}{batch:>6}{count:>10} | "
                + " ".join(f"{c:>12}" for c in cells)
                + f" | {over_floor:13.2f}x {nodes:>5} {per_node:12.1f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
