"""The time laplace-torch's ``Laplace.fit`` takes with each backend, side by side in one run.

``laplace_redux.py`` records each fit once, next to its long predictive evaluations; this times
the fits alone, interleaved over ``--rounds`` rounds (median), on one task's fitted examples
and its MAP network of seed 0 (trained by ``laplace_redux.py`` into the same ``--out``, or
now). Prints seconds per method and their ratio to hesscale's HesScaleGN backend.

    python benchmarks/laplace_fit_cost.py [--task shakespeare_kinds] [--fit-examples 2000]
        [--rounds 2] [--methods ...] [--out results/laplace_redux]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path


def _redux():
    path = Path(__file__).resolve().parent / "laplace_redux.py"
    spec = importlib.util.spec_from_file_location("laplace_redux_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    redux = _redux()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", default=redux.TEXT_TASK, choices=[*redux.IMAGE_TASKS, redux.TEXT_TASK]
    )
    parser.add_argument("--fit-examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["Diag GGN (exact)", "LLLA KFAC (default)", "Diag HesScaleGN (hesscale)"],
        choices=list(redux.METHODS),
    )
    parser.add_argument("--epochs", type=int, default=5, help="of the MAP network")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/laplace_redux")
    args = parser.parse_args(argv)
    args.test_examples, args.angles = 1, [0]  # the task's test sets are not used here
    laplace, backends = redux._import_laplace()
    task = (
        redux.text_task(args) if args.task == redux.TEXT_TASK else redux.image_task(args.task, args)
    )
    model = task.map_network(0).eval()
    seconds = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            # a fresh copy each time: BackPACK leaves its hooks on the model it extends
            la, loader = redux.laplace_of(method, copy.deepcopy(model), task, laplace, backends)
            start = time.perf_counter()
            la.fit(loader)
            seconds[method].append(time.perf_counter() - start)
    medians = {m: statistics.median(v) for m, v in seconds.items()}
    reference = medians.get("Diag HesScaleGN (hesscale)")
    print(f"{args.task}: Laplace.fit on {args.fit_examples} examples, median of {args.rounds}")
    for method, value in medians.items():
        ratio = f"{value / reference:7.1f}x HesScaleGN's" if reference else ""
        print(f"  {method:<30} {value:8.2f} s {ratio}")
    return medians


if __name__ == "__main__":
    main()
