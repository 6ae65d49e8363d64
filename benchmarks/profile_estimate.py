"""Where the time of one estimate goes: a ``torch.profiler`` summary of a plain forward+backward
and of one with HesScale's estimate, on one of ``model_cost``'s models.

For each step: its wall time, the time the GPU was busy (the union of its kernels' intervals)
and so the fraction it waited; the GPU time of the kernels the rules launched and their share
of all kernel time; the CPU time spent inside the rules (Python and kernel launches) per rule
call, i.e. per hooked node of autograd's graph. The engine names each rule call in the profile
(``hesscale <node>``) while a profiler runs. If the GPU waits, the step is bound by the Python
that prepares its kernels, not by arithmetic. On a CPU the GPU columns are empty.

    python benchmarks/profile_estimate.py [--model hf-gpt2] [--batch 8 --context 1024]
        [--device cuda] [--autocast bf16] [--attention flash] [--method hesscale]
        [--json out.json] [--table out.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import hesscale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_cost import BACKENDS, MODELS, build  # noqa: E402


def _union(intervals) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(prof, wall: float) -> dict:
    """The figures of one profiled step (times in milliseconds)."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = _union((e.time_range.start, e.time_range.end) for e in kernels) / 1e3
    kernel_total = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    rules = [e for e in events if e.name.startswith("hesscale ")]
    rules_gpu = sum(e.device_time_total for e in rules) / 1e3
    rules_cpu = sum(e.cpu_time_total for e in rules) / 1e3
    return {
        "wall_ms": wall * 1e3,
        "gpu_busy_ms": busy,
        "gpu_busy_fraction": busy / (wall * 1e3) if kernels else None,
        "kernels": len(kernels),
        "kernel_ms": kernel_total,
        "rule_calls": len(rules),
        "rules_gpu_ms": rules_gpu,
        "rules_gpu_share": rules_gpu / kernel_total if kernel_total else None,
        "rules_cpu_ms": rules_cpu,
        "rules_cpu_us_per_call": 1e3 * rules_cpu / len(rules) if rules else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hf-gpt2", choices=MODELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16"], default=None)
    parser.add_argument("--attention", choices=list(BACKENDS), default="auto")
    parser.add_argument("--method", default="hesscale")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=None, help="write the top operations' table here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    problem = build(args.model, args.context)
    device = args.device
    model = hesscale.extend(problem.model.to(device))
    x = problem.inputs(args.batch).to(device)
    y = problem.targets(x).to(device)
    device_type = torch.device(device).type
    backend = BACKENDS[args.attention]

    def step(method):
        hesscale.request(model.parameters(), method)
        model.zero_grad(set_to_none=True)
        with (
            sdpa_kernel(backend) if backend is not None else contextlib.nullcontext(),
            torch.autocast(device_type, torch.bfloat16, enabled=args.autocast == "bf16"),
        ):
            loss = problem.loss(model, x, y)
        loss.backward()
        hesscale.request(model.parameters(), None)

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    result = {"model": args.model, "batch": args.batch, "context": args.context, "steps": {}}
    tables = []
    for label, method in (("forward+backward", None), (f"estimate {args.method}", args.method)):
        for _ in range(args.warmup):
            step(method)
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step(method)
            sync()
            wall = time.perf_counter() - start
        result["steps"][label] = summarize(prof, wall)
        sort = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        tables.append(f"== {label}\n" + prof.key_averages().table(sort_by=sort, row_limit=15))
    for label, row in result["steps"].items():
        print(f"{label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
    if args.json:
        _atomic_write(args.json, json.dumps(result, indent=1))
    if args.table:
        _atomic_write(args.table, "\n".join(tables))


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
