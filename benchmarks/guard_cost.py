"""Cost of the optimizers' guard, of the step-size scaling and of clipping, side by side.

A training step (forward, backward, update) of AdaHesScale on the Fig. 2b network (64 inputs,
L hidden layers of 512 tanh units, 100 outputs) with the guard (the default), without it, and
with the step-size scaling (``delta``) or clipping (``clip``), interleaved round by round;
ratios over the step without the guard.

    python benchmarks/guard_cost.py [--rounds 30] [--layers 4] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import hesscale
from hesscale.experiments.networks import fig2b_network
from hesscale.experiments.timing import interleaved_times
from hesscale.optim import AdaHesScale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = fig2b_network(args.layers)
    x = torch.randn(args.batch_size, 64)
    y = torch.randint(0, 100, (args.batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    steps = {}
    variants = {
        "without guard": {"guard": False},
        "guard": {},
        "guard + scaling": {"delta": 1e-2},
        "guard + clipping": {"clip": 1.0},
    }
    for name, options in variants.items():
        model = hesscale.extend(copy.deepcopy(base))
        opt = AdaHesScale(model.parameters(), lr=1e-4, **options)

        def step(model=model, opt=opt):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        steps[name] = step
    times = interleaved_times(steps, rounds=args.rounds, inner=1)
    base_t = times["without guard"]["median"]
    print(
        f"# Fig. 2b L={args.layers}, batch {args.batch_size}, {torch.get_num_threads()} threads; "
        f"step without guard {base_t * 1e3:.1f} ms"
    )
    for name in variants:
        print(f"{name:<18} {times[name]['median'] / base_t:6.3f}x")
    return {name: times[name]["median"] / base_t for name in variants}


if __name__ == "__main__":
    main()
