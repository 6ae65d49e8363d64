"""Time of one training step (forward, backward, update) of every optimizer over Adam's.

Measured side by side in one run (methods interleaved round by round) on the paper's Fig. 2
networks: 64 inputs, L hidden layers of 512 tanh units, 100 outputs, cross-entropy, at batch
sizes 1 and 128; and on the networks of DeepOBS problems (``--problems``) at their batch sizes.
``--fixed-batch STEPS`` first trains every optimizer on the timed batch, driving the loss
towards zero (the regime where curvature estimates become subnormal floats).

    python benchmarks/step_cost.py [--rounds 20] [--layers 1 2 4 8 16] [--batch-sizes 1 128]
        [--problems fmnist_2c2d cifar10_3c3d] [--fixed-batch 300]
"""

from __future__ import annotations

import argparse
import json

from hesscale.experiments.fig2 import OPTIMIZER_LABELS, time_point
from hesscale.experiments.io import environment_record
from hesscale.experiments.networks import fig2b_network
from hesscale.experiments.problems import build_network, get_problem


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
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    env = environment_record()
    print(
        f"# {env['processor']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"device {args.device} {env['cuda'] or ''}"
    )
    labels = list(OPTIMIZER_LABELS.values())
    print(f"{'batch':>5} {'L':>3} {'params':>9} " + "".join(f"{lb[:13]:>14}" for lb in labels))
    rows = []
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
