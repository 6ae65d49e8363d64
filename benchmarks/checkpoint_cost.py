"""What activation checkpointing costs with HesScale's estimate, next to plain checkpointing.

A GPT (``--layers`` pre-LN blocks of width ``--width``, causal attention, a tied output layer)
on random tokens; every block under ``torch.utils.checkpoint`` with ``use_reentrant=False``
(PyTorch's and transformers' default) or ``True``, or none. For each, side by side in one run
(interleaved rounds, medians): a plain forward+backward and one with the HesScale estimate, and
the peak memory of each (above the parameters). Checkpointing recomputes each block's forward
once in the backward pass; with ``use_reentrant=False`` the rules read the recomputed tensors
in a graph-execution group of their own, which recomputes each block once more, and the
``recomputed`` column counts the blocks' forward passes per step to show it.

    python benchmarks/checkpoint_cost.py [--layers 4 --width 256 --context 128 --batch 8]
        [--rounds 5] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import hesscale
from hesscale.experiments.io import environment_record
from hesscale.experiments.networks import GPT
from hesscale.experiments.timing import interleaved_times, peak_memory

MODES = {"none": None, "non-reentrant": False, "reentrant": True}


class CheckpointedGPT(nn.Module):
    """:class:`GPT` whose blocks run under ``torch.utils.checkpoint`` (``mode`` None: not);
    counts the blocks' forward passes."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt, self.mode, self.block_calls = gpt, None, 0

    def _block(self, block, h):
        self.block_calls += 1
        return block(h)

    def forward(self, ids):
        gpt = self.gpt
        h = gpt.tok(ids) + gpt.pos[: ids.shape[1]]
        for block in gpt.blocks:
            if self.mode is None:
                h = self._block(block, h)
            else:
                h = checkpoint(self._block, block, h, use_reentrant=self.mode)
        return nn.functional.linear(gpt.ln_f(h), gpt.tok.weight).transpose(1, 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gpt = GPT(args.vocab, args.width, args.context, args.heads, args.layers, gpt2_init=True)
    model = hesscale.extend(CheckpointedGPT(gpt).to(args.device))
    ids = torch.randint(0, args.vocab, (args.batch, args.context), device=args.device)
    calls = {}  # (mode, method) -> the blocks' forward passes in one step

    def step(mode, method):
        def run():
            model.mode = MODES[mode]
            model.zero_grad(set_to_none=True)
            hesscale.request(model.parameters(), method)
            before = model.block_calls
            nn.functional.cross_entropy(model(ids), ids).backward()
            calls[(mode, method)] = model.block_calls - before
            hesscale.request(model.parameters(), None)

        return run

    fns = {(mode, method): step(mode, method) for mode in MODES for method in (None, "hesscale")}
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    times = interleaved_times(fns, rounds=args.rounds, warmup=1, device=args.device)
    memory = {key: peak_memory(fn, args.device) for key, fn in fns.items()}
    base_time = times[("none", None)]["median"]
    base_memory = memory[("none", None)]
    n = sum(p.numel() for p in model.parameters())
    print(
        f"\nGPT: {args.layers} blocks of width {args.width}, {n / 1e6:.1f}M parameters, "
        f"batch {args.batch} × {args.context} tokens"
    )
    print(
        f"{'checkpointing':<16}{'estimate':<11}{'median':>10}{'× plain':>9}{'× unchecked':>13}"
        f"{'peak memory':>13}{'× unchecked':>13}{'recomputed':>12}"
    )
    rows = []
    for (mode, method), stat in times.items():
        plain = times[(mode, None)]["median"]
        row = {
            "checkpointing": mode,
            "method": method,
            "seconds": stat["median"],
            "time_over_plain_same_mode": stat["median"] / plain,
            "time_over_unchecked_plain": stat["median"] / base_time,
            "peak_bytes": memory[(mode, method)],
            "memory_over_unchecked_plain": memory[(mode, method)] / base_memory,
            "block_forwards": calls[(mode, method)],
        }
        rows.append(row)
        print(
            f"{mode:<16}{method or '–':<11}{1000 * stat['median']:>8.0f}ms"
            f"{row['time_over_plain_same_mode']:>8.2f}x{row['time_over_unchecked_plain']:>12.2f}x"
            f"{row['peak_bytes'] / 2**20:>11.0f}MB{row['memory_over_unchecked_plain']:>12.2f}x"
            f"{row['block_forwards'] - args.layers:>12d}"
        )
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"environment": environment_record(), "arguments": vars(args), "runs": rows},
                f,
                indent=1,
            )
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
