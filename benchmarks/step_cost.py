"""Time of one training step (forward, backward, update) of every optimizer over Adam's.

Measured side by side in one run (methods interleaved round by round) on the paper's Fig. 2
networks: 64 inputs, L hidden layers of 512 tanh units, 100 outputs, cross-entropy, at batch
sizes 1 and 128; and on the networks of DeepOBS problems (``--problems``) at their batch sizes.
``--fixed-batch STEPS`` first trains every optimizer on the timed batch, driving the loss
towards zero (the regime where the moments and estimates become subnormal floats), and then
also times AdaHesScale with hesscale's flush-to-zero (the default) against the same step with
it patched out, side by side (``--flush-only``: that comparison alone).

    python benchmarks/step_cost.py [--rounds 20] [--layers 1 2 4 8 16] [--batch-sizes 1 128]
        [--problems fmnist_2c2d cifar10_3c3d] [--fixed-batch 1500 [--flush-only]]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json

import torch
from torch import nn

import hesscale
import hesscale.engine._apply as engine
import hesscale.optim._base as optim_base
from hesscale.experiments.fig2 import OPTIMIZER_LABELS, time_point
from hesscale.experiments.io import environment_record
from hesscale.experiments.networks import fig2b_network
from hesscale.experiments.problems import build_network, get_problem
from hesscale.experiments.timing import interleaved_times
from hesscale.optim import AdaHesScale

TINY = torch.finfo(torch.float32).tiny


@contextlib.contextmanager
def no_flush():
    """hesscale's flush-to-zero patched out (the rules and the update see subnormal floats)."""
    saved = engine.flushing_denormals, engine.flush_denormals, optim_base.flush_denormals
    nothing = lambda *args, **kwargs: contextlib.nullcontext()
    engine.flushing_denormals = lambda: True
    engine.flush_denormals = optim_base.flush_denormals = nothing
    try:
        yield
    finally:
        engine.flushing_denormals, engine.flush_denormals, optim_base.flush_denormals = saved


def flush_comparison(layers: int, batch: int, steps: int, rounds: int) -> dict:
    """AdaHesScale on one reused batch, trained ``steps`` steps, with and without the flush."""
    torch.manual_seed(0)
    base = fig2b_network(layers)
    x, y = torch.randn(batch, 64), torch.randint(0, 100, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    runs, subnormal = {}, {}
    for name, context in (("flush", contextlib.nullcontext), ("no flush", no_flush)):
        model = hesscale.extend(copy.deepcopy(base))
        opt = AdaHesScale(model.parameters(), lr=1e-3, guard=False)

        def step(model=model, opt=opt, context=context):
            with context():
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

        for _ in range(steps):
            step()
        moments = [t for st in opt.state.values() for k, t in st.items() if k.startswith("exp")]
        values = torch.cat([t.flatten() for t in moments])
        subnormal[name] = float(((values != 0) & (values.abs() < TINY)).float().mean())
        runs[name] = step
    times = interleaved_times(runs, rounds=rounds, inner=5)
    ratio = times["no flush"]["median"] / times["flush"]["median"]
    print(
        f"fixed batch {batch}, L={layers}, after {steps} steps: subnormal moments "
        f"{subnormal['flush']:.0%} with hesscale's flush, {subnormal['no flush']:.0%} without; "
        f"step {1000 * times['flush']['median']:.2f} ms with, "
        f"{1000 * times['no flush']['median']:.2f} ms without ({ratio:.2f}x)",
        flush=True,
    )
    return {
        "layers": layers,
        "batch": batch,
        "steps": steps,
        "subnormal": subnormal,
        "seconds": {k: v["median"] for k, v in times.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--problems", nargs="*", default=[], help="DeepOBS problems' networks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--fixed-batch",
        type=int,
        default=0,
        metavar="STEPS",
        help="first train every optimizer STEPS steps on the one batch that is timed (the loss "
        "goes towards zero, the estimates towards subnormal floats)",
    )
    parser.add_argument(
        "--flush-only", action="store_true", help="with --fixed-batch: only the flush comparison"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    env = environment_record()
    print(
        f"# {env['processor']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"device {args.device} {env['cuda'] or ''}"
    )
    rows = []
    if args.fixed_batch:
        for batch in args.batch_sizes:
            for layers in args.layers:
                rows.append(flush_comparison(layers, batch, args.fixed_batch, args.rounds))
    if args.flush_only:
        args.batch_sizes, args.problems = [], []
    labels = list(OPTIMIZER_LABELS.values())
    if args.batch_sizes or args.problems:
        header = "".join(f"{lb[:13]:>14}" for lb in labels)
        print(f"{'batch':>5} {'L':>3} {'params':>9} " + header)
    for batch in args.batch_sizes:
        for layers in args.layers:
            point = time_point(
                lambda layers=layers: fig2b_network(layers),
                batch=batch,
                loss="ce",
                include_forward=True,
                rounds=args.rounds,
                device=args.device,
                exact=False,
                pretrain=args.fixed_batch,
            )
            rows.append({"batch": batch, "layers": layers, **point})
            cells = "".join(f"{point['ratio_to_adam'][lb]:>14.2f}" for lb in labels)
            print(f"{batch:>5} {layers:>3} {point['params']:>9} {cells}", flush=True)
    for name in args.problems:
        problem = get_problem(name)
        point = time_point(
            lambda problem=problem: build_network(problem),
            batch=problem.batch_size,
            loss="ce",
            include_forward=True,
            rounds=args.rounds,
            device=args.device,
            exact=False,
            input_shape=problem.input_shape,
        )
        rows.append({"batch": problem.batch_size, "problem": name, **point})
        cells = "".join(f"{point['ratio_to_adam'][lb]:>14.2f}" for lb in labels)
        print(f"{problem.batch_size:>5} {name:<14} {point['params']:>9} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
