"""Cost of the optimizers' guard, of the step-size scaling and of clipping, side by side.

A training step (forward, backward, update) of AdaHesScale on the Fig. 2b network (64 inputs,
L hidden layers of 512 tanh units, 100 outputs) with and without the guard (on by default),
alone and with the step-size scaling (``delta``), clipping (``clip``) or both, interleaved round
by round; ratios over the plain step without the guard, and the guard's own cost in each
configuration. Without scaling or clipping the update ``m/d`` is otherwise never written out,
so there the guard costs three passes over the parameters (writing it, its norm, adding it);
with either, only its norm.

    python benchmarks/guard_cost.py [--rounds 30] [--layers 4] [--batch-size 128] [--device cuda]
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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = fig2b_network(args.layers).to(args.device)
    x = torch.randn(args.batch_size, 64, device=args.device)
    y = torch.randint(0, 100, (args.batch_size,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    steps = {}
    variants = {
        "without guard": {"guard": False},
        "guard": {},
        "scaling": {"delta": 1e-2, "guard": False},
        "scaling + guard": {"delta": 1e-2},
        "clipping": {"clip": 1.0, "guard": False},
        "clipping + guard": {"clip": 1.0},
        "clipping + scaling": {"clip": 1.0, "delta": 1e-2, "guard": False},
        "clipping + scaling + guard": {"clip": 1.0, "delta": 1e-2},
    }
    for name, options in variants.items():
        model = hesscale.extend(copy.deepcopy(base))
        opt = AdaHesScale(model.parameters(), lr=1e-4, **options)

        def step(model=model, opt=opt):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        steps[name] = step
    times = interleaved_times(steps, rounds=args.rounds, inner=1, device=args.device)
    base_t = times["without guard"]["median"]
    print(
        f"# Fig. 2b L={args.layers}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"device {args.device}; "
        f"step without guard {base_t * 1e3:.1f} ms"
    )
    for name in variants:
        extra = ""
        if name.endswith(" + guard"):  # the guard's own cost in that configuration
            without = times[name.removesuffix(" + guard")]["median"]
            extra = f"   (the guard: {times[name]['median'] / without:.3f}x)"
        print(f"{name:<28} {times[name]['median'] / base_t:6.3f}x{extra}")
    return {name: times[name]["median"] / base_t for name in variants}


if __name__ == "__main__":
    main()
