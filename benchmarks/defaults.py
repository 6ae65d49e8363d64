"""Do the optimizers train at their default hyperparameters? (issue: curvature optimizers that
train out of the box.)

Every configuration of ``hesscale train`` (the paper's optimizers, the ``-scaled`` ones and
Sophia) at its class's default step size (1e-3 for all but SGD, 0.01, and AdaHessian, 0.15),
``STEPS`` steps on three problems: Fashion-MNIST with DeepOBS' 2C2D (ReLU) and MLP (tanh)
networks, batch 128, and a VGG-style ReLU CNN on random 3×32×32 images (one fixed batch of 64,
ten classes), the case where AdaHesScale at lr 1e-3 went 2.30 → 87675 → 8e31 → nan. A run ends
as *diverged* when its loss is not finite or above 1e10, or when the guard refuses an update.
Prints the first and the last loss (mean of the last 10) of every run.

    python benchmarks/defaults.py [--steps 200] [--problems fmnist_2c2d fmnist_mlp vgg]
"""

from __future__ import annotations

import argparse
import inspect
import math
import warnings

import torch
from torch import nn

import hesscale
from hesscale.experiments.data import prepare
from hesscale.experiments.problems import build_network, get_problem
from hesscale.experiments.splits import splits_for
from hesscale.optim import OPTIMIZERS, UpdateError


def vgg() -> nn.Sequential:
    """Conv 32-32, pool, Conv 64-64, pool, Conv 128, pool, Linear 256, Linear 10 (ReLU)."""
    layers, inputs = [], 3
    for widths in ((32, 32), (64, 64), (128,)):
        for width in widths:
            layers += [nn.Conv2d(inputs, width, 3, padding=1), nn.ReLU()]
            inputs = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def batches(problem: str, steps: int):
    """``steps`` batches of the problem: Fashion-MNIST in a seeded order, or the VGG's one batch."""
    if problem == "vgg":
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        return vgg, [(x, y)] * steps
    spec = get_problem(problem)
    images, labels = splits_for(spec.dataset).train
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    chosen = [order[i * 128 : (i + 1) * 128] for i in range(steps)]
    return (lambda: build_network(spec)), [(prepare(images[i], False), labels[i]) for i in chosen]


def default_lr(spec) -> float:
    return inspect.signature(spec.cls).parameters["lr"].default


def run(name: str, make, data, device: str = "cpu") -> tuple[str, float, float]:
    torch.manual_seed(0)
    model = hesscale.extend(make().to(device))
    spec = OPTIMIZERS[name]
    lr = default_lr(spec)
    opt = spec.cls(model.parameters(), lr=lr, **spec.options)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())  # AdaGGNMC samples from its Hessian
    losses = []
    create_graph = name == "adahessian"
    for x, y in data:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        value = loss.item()
        if not math.isfinite(value) or value > 1e10:
            return "diverged", losses[0] if losses else value, value
        with warnings.catch_warnings():  # AdaHessian: create_graph's reference-cycle notice
            warnings.simplefilter("ignore", UserWarning)
            loss.backward(create_graph=create_graph)
        try:
            opt.step()
        except UpdateError:
            return "refused", losses[0] if losses else value, value
        losses.append(value)
    return "trained", losses[0], sum(losses[-10:]) / len(losses[-10:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--problems", nargs="+", default=["fmnist_2c2d", "fmnist_mlp", "vgg"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"{'problem':<13}{'optimizer':<22}{'lr':>8}  {'outcome':<9}{'first':>9}{'last':>10}")
    for problem in args.problems:
        make, data = batches(problem, args.steps)
        for name in args.optimizers:
            outcome, first, last = run(name, make, data, args.device)
            lr = default_lr(OPTIMIZERS[name])
            print(
                f"{problem:<13}{name:<22}{lr:>8g}  {outcome:<9}{first:>9.3f}{last:>10.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
