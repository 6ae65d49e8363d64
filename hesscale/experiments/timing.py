"""Side-by-side timing and peak memory, shared by the benchmarks and the Fig. 2 reproduction.

Methods are interleaved round by round (in a fresh random order each round) so that machine
noise hits them alike; each reported time is the median over rounds of the mean time of the
calls in a round.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    rounds: int = 30,
    inner: int = 1,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Time every function side by side: ``{name: {"median": s, "mean": s, "stderr": s}}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = list(fns)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
        if progress is not None:
            progress(r)
    result = {}
    for name, values in samples.items():
        stderr = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
        result[name] = {
            "median": statistics.median(values),
            "mean": statistics.fmean(values),
            "stderr": stderr,
        }
    return result


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    return max(itertools.accumulate((e.cpu_memory_usage for e in events), initial=0))
