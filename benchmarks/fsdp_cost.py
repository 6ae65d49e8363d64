"""Sharded-training cost: an FSDP2 step with AdaHesScale over one with AdamW, and the memory
per rank against DistributedDataParallel, side by side in one run.

Spawns N processes (gloo on CPU, nccl with ``--device cuda``, a GPU each); every rank builds
the same GPT (``--layers`` blocks of width ``--width``, a tied output layer) five times and
times interleaved training steps (forward, backward, update) of: FSDP2 (``fully_shard`` per
block and at the root) with ``torch.optim.AdamW``, with AdaHesScale (``clip=1.0,
delta=1e-4``; estimates reduce-scattered per FSDP group during the backward pass,
:mod:`hesscale.fsdp`) and with AdaHesScale refreshing its curvature every 10th step
(``update_every=10``, the Sophia-style setting); DDP with AdamW and with AdaHesScale. Per
configuration and rank: the time of a step, the training state that stays between steps
(parameters, gradients, optimizer state and estimates held by the rank, and its ratio to a DDP
rank's with the same optimizer) and the peak memory a step allocates above it. Rank 0 prints
the table and writes ``--json``.

    python benchmarks/fsdp_cost.py [--processes 2] [--layers 4] [--width 256] [--context 64]
        [--batch 16] [--rounds 10] [--device cpu|cuda] [--json results/fsdp_cost.json]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import hesscale
from hesscale.experiments.io import atomic_write_json, environment_record
from hesscale.experiments.networks import GPT
from hesscale.experiments.timing import interleaved_times, peak_memory, spawn_on_free_port
from hesscale.optim import AdaHesScale

CONFIGS = {  # name: (sharded, optimizer, update_every)
    "FSDP AdamW": (True, "adamw", 1),
    "FSDP AdaHesScale": (True, "adahesscale", 1),
    "FSDP AdaHesScale, update_every=10": (True, "adahesscale", 10),
    "DDP AdamW": (False, "adamw", 1),
    "DDP AdaHesScale": (False, "adahesscale", 1),
}


def _local_bytes(t) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _state_bytes(model: nn.Module, opt) -> int:
    """What the rank holds between steps: parameters, gradients, estimates, optimizer state."""
    total = 0
    for p in model.parameters():
        estimate = getattr(p, "hess_diag", None)
        total += _local_bytes(p) + _local_bytes(p.grad) + _local_bytes(estimate)
        for value in opt.state.get(p, {}).values():
            total += _local_bytes(value) if torch.is_tensor(value) and value.dim() else 0
    return total


def _build(args, device, sharded: bool, optimizer: str, update_every: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(args.vocab, args.width, args.context, heads=4, layers=args.layers, gpt2_init=True)
    model = model.to(device)
    if sharded:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model)
    hesscale.extend(model)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    else:
        # the README's setting that needs no step-size search: clipping and the step-size
        # scaling on (the scaling's sums run across the ranks); unclipped, unscaled AdaHesScale
        # diverges on this GPT within a few steps and the guard stops it
        opt = AdaHesScale(
            net.parameters(), lr=1e-4, clip=1.0, delta=1e-4, update_every=update_every
        )
    return model, net, opt


def worker(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = args.device.startswith("cuda")
    device = f"cuda:{rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=args.processes)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    g = torch.Generator().manual_seed(1 + rank)
    local = max(1, args.batch // args.processes)
    ids = torch.randint(0, args.vocab, (local, args.context), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()
    fns, built = {}, {}
    chosen = {k: v for k, v in CONFIGS.items() if k in args.configs or "AdamW" in k}
    for name, (sharded, optimizer, update_every) in chosen.items():
        model, net, opt = _build(args, device, sharded, optimizer, update_every)
        built[name] = (model, opt)

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(ids[:, :-1]), ids[:, 1:]).backward()
            opt.step()

        fns[name] = step
    # every rank runs the same order: interleaved_times shuffles with a shared seed
    times = interleaved_times(fns, rounds=args.rounds, warmup=2, seed=0, device=device)
    memory = {}
    for name, step in fns.items():
        model, opt = built[name]
        held = _state_bytes(model, opt)
        memory[name] = {"state": held, "step_peak": peak_memory(step, device)}
    gathered = [None] * args.processes
    dist.all_gather_object(gathered, memory)
    if rank == 0:
        params = sum(p.numel() for p in built["DDP AdamW"][0].parameters())
        adamw = {True: times["FSDP AdamW"]["median"], False: times["DDP AdamW"]["median"]}
        rows = []
        for name, (sharded, _, _) in chosen.items():
            state = max(m[name]["state"] for m in gathered)
            peak = max(m[name]["step_peak"] for m in gathered)
            rows.append(
                {
                    "config": name,
                    "ms": times[name]["median"] * 1e3,
                    "over_adamw": times[name]["median"] / adamw[sharded],
                    "state_mb": state / 2**20,
                    "step_peak_mb": peak / 2**20,
                }
            )
        ddp_state = {r["config"].split(",")[0].split()[-1]: r["state_mb"] for r in rows
                     if r["config"].startswith("DDP")}  # fmt: skip
        print(
            f"{args.processes} processes ({'nccl, GPUs' if gpu else 'gloo, CPU'}), GPT "
            f"{args.layers}x{args.width} ({params / 1e6:.1f}M parameters), context "
            f"{args.context}, global batch {args.batch}"
        )
        print(
            f"  {'configuration':<36}{'ms/step':>9}{'/AdamW':>8}{'state MB/rank':>15}"
            f"{'/DDP':>7}{'step peak MB':>14}"
        )
        for r in rows:  # state against DDP's with the same optimizer
            ddp = ddp_state.get(r["config"].split(",")[0].split()[-1])
            r["state_over_ddp"] = r["state_mb"] / ddp if ddp else None
            over_ddp = f"{r['state_over_ddp']:6.2f}x" if ddp else " " * 7
            print(
                f"  {r['config']:<36}{r['ms']:9.1f}{r['over_adamw']:7.2f}x"
                f"{r['state_mb']:15.1f}{over_ddp}{r['step_peak_mb']:14.1f}"
            )
        if args.json:
            atomic_write_json(
                args.json,
                {"arguments": vars(args), "rows": rows, "environment": environment_record()},
            )
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over ranks)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, a GPU each)")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        choices=list(CONFIGS),
        metavar="NAME",
        help="configurations to run (the AdamW ones always run, as the references)",
    )
    parser.add_argument("--json", default=None, help="write the table here as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.processes:
        parser.error(f"--device cuda needs a GPU per process ({torch.cuda.device_count()} found)")
    spawn_on_free_port(worker, (args,), args.processes)


if __name__ == "__main__":
    main()
