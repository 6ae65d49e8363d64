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
    fns: dict[str, Callable[[], object] | tuple[Callable[[], object], Callable[[object], object]]],
    rounds: int = 30,
    inner: int = 1,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Time every function side by side: ``{name: {"median": s, "mean": s, "stderr": s}}``.

    A value may be a pair ``(prepare, run)``: ``prepare()`` runs untimed before each timed
    ``run(prepared)`` (e.g. a forward pass outside the clock of an update).
    """
    pairs = {
        name: fn if isinstance(fn, tuple) else ((lambda: None), (lambda _, fn=fn: fn()))
        for name, fn in fns.items()
    }
    for prepare, run in pairs.values():
        for _ in range(warmup):
            run(prepare())
    order = list(fns)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            prepare, run = pairs[name]
            total = 0.0
            for _ in range(inner):
                prepared = prepare()
                _sync(device)
                start = time.perf_counter()
                run(prepared)
                _sync(device)
                total += time.perf_counter() - start
            samples[name].append(total / inner)
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
    # each operation's own allocations and frees (an operation's total includes those of the
    # operations it calls, which would count them twice)
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0),
        key=lambda e: e.time_range.start,
    )
    return max(itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0))


def spawn_on_free_port(worker: Callable, args: tuple, processes: int) -> None:
    """``worker(rank, *args, port)`` in ``processes`` spawned processes, with a free local
    port for their process group's rendezvous."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(*args, port), nprocs=processes, join=True)
