"""Data-parallel cost: a DDP training step with AdaHesScale over one with Adam, side by side.

Spawns N CPU processes (gloo); each times interleaved training steps (forward, backward,
update) of the same network under DistributedDataParallel with Adam, AdaHesScale and
AdaHesScaleGN (estimates averaged in buckets during the backward pass), AdaHesScale with the
overlap switched off (all estimates averaged in step(), after the backward pass), and one
all-reduce of all estimates alone. Rank 0 prints the ratios.

    python benchmarks/ddp_cost.py [--processes 2] [--layers 4] [--batch-size 128] [--rounds 20]
        [--device cuda]   (one GPU per process, nccl)
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn

import hesscale
from hesscale.experiments.networks import fig2b_network
from hesscale.experiments.timing import interleaved_times, spawn_on_free_port
from hesscale.optim import AdaHesScale, AdaHesScaleGN


def worker(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = args.device.startswith("cuda")
    device = f"cuda:{rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=args.processes)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    torch.manual_seed(0)
    base = hesscale.extend(fig2b_network(args.layers).to(device))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    local = args.batch_size // args.processes
    x = torch.randn(local, 64, device=device)
    y = torch.randint(0, 100, (local,), device=device)
    fns = {}
    for name, cls in (
        ("Adam", torch.optim.Adam),
        ("AdaHesScale", AdaHesScale),
        ("AdaHesScaleGN", AdaHesScaleGN),
        ("AdaHesScale, no overlap", AdaHesScale),
    ):
        model = copy.deepcopy(base)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = cls(ddp.parameters(), lr=1e-5)
        if name.endswith("no overlap"):  # the buckets are filled and sent in step()
            for reducer in opt._reducers.values():
                for handle in reducer._handles:
                    handle.remove()

        def step(ddp=ddp, opt=opt):
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step()

        fns[name] = step
    flat = torch.randn(sum(p.numel() for p in base.parameters()), device=device)
    fns["all-reduce of estimates alone"] = lambda: dist.all_reduce(flat)
    # every rank must run the same order: interleaved_times shuffles with a shared seed
    times = interleaved_times(fns, rounds=args.rounds, warmup=3, seed=0, device=device)
    if rank == 0:
        adam = times["Adam"]["median"]
        params = sum(p.numel() for p in base.parameters())
        print(
            f"{args.processes} processes ({'nccl, GPUs' if gpu else 'gloo, CPU'}), "
            f"{args.layers} hidden layers "
            f"({params} parameters), global batch {args.batch_size}"
        )
        for name, t in times.items():
            print(f"  {name:<30} {t['median'] * 1e3:8.2f} ms   {t['median'] / adam:5.2f}x Adam")
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, a GPU each)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and torch.cuda.device_count() < args.processes:
        parser.error(f"--device cuda needs a GPU per process ({torch.cuda.device_count()} found)")
    spawn_on_free_port(worker, (args,), args.processes)


if __name__ == "__main__":
    main()
