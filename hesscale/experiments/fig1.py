"""Fig. 1 of the paper: approximation quality of Hessian-diagonal estimators.

Protocol (Section 4): a network of 6 inputs, three hidden layers of 16 tanh units and 10 outputs,
PyTorch's default initialisation, cross-entropy; inputs ``x ~ N(0, I)``, labels uniform over the
10 classes; 1000 examples, one at a time; 40 initialisations. For each example and method, the
L1 distance between the method's estimate and the exact Hessian diagonal is summed over layers
and averaged over the examples; each method's average is divided by HesScale's for the same
initialisation. ``|diag(H)|`` (the error of an all-zero estimate) is the reference line.

All examples of one initialisation are processed as one batch with per-example estimates
(``individual=True``, sum reduction: each example's loss is its own cross-entropy), which gives
the same numbers as a loop over single examples. Each initialisation's result is written
atomically to ``seeds/seed_XXXX.json``; a rerun skips finished seeds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import hesscale
from hesscale.baselines import hutchinson_from_probes, kfac_mc, rademacher_like
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .io import atomic_write_json, environment_record, progress
from .networks import fig1_network

REFERENCE = "|diag(H)|"
# (label, method, samples); the order is the figure's
METHODS: list[tuple[str, str, int]] = [
    ("HesScale", "hesscale", 1),
    ("HesScaleGN", "hesscale_gn", 1),
    ("BL89", "bl89", 1),
    ("diag(G)", "ggn", 1),
    ("GGN-MC1", "ggn_mc", 1),
    ("GGN-MC50", "ggn_mc", 50),
    ("AdaHessian-MC1", "hutchinson", 1),
    ("AdaHessian-MC50", "hutchinson", 50),
    ("KFAC-MC1", "kfac_mc", 1),
    ("KFAC-MC50", "kfac_mc", 50),
    ("g²", "grad_sq", 1),
]
CHUNK = 250  # examples per vmap call of the dense per-example computations


def _layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Each Linear layer's name and its parameters' names."""
    return [
        (name, [f"{name}.{p}" for p, _ in m.named_parameters()])
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]


def _single_example_loss(model, loss_fn) -> Callable:
    def loss(params, x, y):
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    return loss


def _chunked(fn: Callable, *args: Tensor) -> dict[str, Tensor]:
    parts = [fn(*(a[i : i + CHUNK] for a in args)) for i in range(0, len(args[0]), CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _per_example(diagonal_fn, model, loss_fn, x, y) -> dict[str, Tensor]:
    """A reference diagonal of :mod:`hesscale.reference` for every example, vmapped."""

    def one(xi, yi):
        return diagonal_fn(model, loss_fn, xi.unsqueeze(0), yi.unsqueeze(0))

    return _chunked(vmap(one), x, y)


def per_example_exact(model, loss_fn, x, y) -> dict[str, Tensor]:
    """``diag(∇²_θ ℓ_n)`` for every example ``n``."""
    return _per_example(exact_hessian_diagonal, model, loss_fn, x, y)


def per_example_ggn(model, loss_fn, x, y) -> dict[str, Tensor]:
    """The exact GGN diagonal of every example."""
    return _per_example(ggn_diagonal, model, loss_fn, x, y)


def per_example_hutchinson(model, loss_fn, x, y, samples, generator) -> dict[str, Tensor]:
    """AdaHessian's ``z ⊙ Hz`` per example, ``samples`` Rademacher probes each."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = _single_example_loss(model, loss_fn)
    probes = rademacher_like(
        {n: p.expand(len(x), *p.shape) for n, p in params.items()}, samples, generator
    )
    probes = {n: z.transpose(0, 1) for n, z in probes.items()}  # (N, k, *shape)

    def one(xi, yi, zi):
        return hutchinson_from_probes(lambda p: loss(p, xi, yi), params, zi)

    parts = []
    for i in range(0, len(x), CHUNK):
        sl = slice(i, i + CHUNK)
        parts.append(vmap(one)(x[sl], y[sl], {n: z[sl] for n, z in probes.items()}))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def per_example_grad_sq(model, loss_fn, x, y) -> dict[str, Tensor]:
    """``g_n ⊙ g_n`` with ``g_n`` each example's gradient."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = vmap(grad(_single_example_loss(model, loss_fn)), (None, 0, 0))(params, x, y)
    return {n: g * g for n, g in grads.items()}


def estimate(label, method, samples, model, loss_fn, x, y, generator) -> dict[str, Tensor]:
    """Per-example estimates ``{name: (N, *shape)}`` of one method of the figure."""
    if method in ("hesscale", "hesscale_gn", "bl89", "ggn_mc"):
        _, result = hesscale.diagonal(
            model,
            loss_fn,
            x,
            y,
            method=method,
            individual=True,
            samples=samples,
            generator=generator,
        )
        return result
    if method == "kfac_mc":
        _, result = kfac_mc(
            model, loss_fn, x, y, samples=samples, generator=generator, individual=True
        )
        return result
    if method == "ggn":
        return per_example_ggn(model, loss_fn, x, y)
    if method == "hutchinson":
        return per_example_hutchinson(model, loss_fn, x, y, samples, generator)
    if method == "grad_sq":
        return per_example_grad_sq(model, loss_fn, x, y)
    raise ValueError(f"unknown method {method!r} of label {label!r}")


def run_seed(seed: int, examples: int, dtype=torch.float64) -> dict:
    """One initialisation: per method, the mean (over examples) L1 error, total and per layer."""
    torch.manual_seed(seed)
    model = fig1_network().to(dtype)
    data = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(examples, 6, generator=data, dtype=dtype)
    y = torch.randint(0, 10, (examples,), generator=data)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    layers = _layers(model)
    exact = per_example_exact(model, loss_fn, x, y)

    def errors(est: dict[str, Tensor]) -> dict[str, float]:
        per_layer = {
            layer: float(sum((est[n] - exact[n]).abs().flatten(1).sum(1) for n in names).mean())
            for layer, names in layers
        }
        return {"total": sum(per_layer.values()), "per_layer": per_layer}

    result = {REFERENCE: errors({n: torch.zeros_like(v) for n, v in exact.items()})}
    noise = torch.Generator().manual_seed(20_000 + seed)
    for label, method, samples in METHODS:
        model.zero_grad(set_to_none=True)
        result[label] = errors(estimate(label, method, samples, model, loss_fn, x, y, noise))
    base = result["HesScale"]["total"]
    for entry in result.values():
        entry["normalized"] = entry["total"] / base
    return result


def run(out: str | Path = "results/fig1", seeds: int = 40, examples: int = 1000) -> dict:
    """Run (or resume) the whole protocol; write ``fig1.json`` and the plots; return the summary."""
    out = Path(out)
    seed_dir = out / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    config = {"seeds": seeds, "examples": examples, "dtype": "float64"}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    with progress(total=seeds, desc="fig1 initialisations", unit="init") as bar:
        for seed in range(seeds):
            path = seed_dir / f"seed_{seed:04d}_n{examples}.json"
            if not path.exists():
                atomic_write_json(
                    path, {"seed": seed, "examples": examples, "errors": run_seed(seed, examples)}
                )
            bar.update(1)
    per_seed = [
        json.loads((seed_dir / f"seed_{s:04d}_n{examples}.json").read_text())["errors"]
        for s in range(seeds)
    ]
    labels = [REFERENCE] + [label for label, _, _ in METHODS]
    summary = {
        "config": config,
        "environment": environment_record(),
        "seconds": time.perf_counter() - start,
        "methods": {
            label: {
                "normalized": [r[label]["normalized"] for r in per_seed],
                "mean_normalized": sum(r[label]["normalized"] for r in per_seed) / seeds,
                "total": [r[label]["total"] for r in per_seed],
                "per_layer": {
                    layer: [r[label]["per_layer"][layer] for r in per_seed]
                    for layer in per_seed[0][label]["per_layer"]
                },
            }
            for label in labels
        },
    }
    atomic_write_json(out / "fig1.json", summary)
    plot(summary, out)
    return summary


def table(summary: dict) -> str:
    """Mean normalised error per method, best first, as printed at the end of a run."""
    rows = sorted(summary["methods"].items(), key=lambda kv: kv[1]["mean_normalized"])
    lines = [f"{'method':<18}{'mean error / HesScale':>24}{'min':>10}{'max':>10}"]
    for label, entry in rows:
        values = entry["normalized"]
        lines.append(
            f"{label:<18}{entry['mean_normalized']:>24.3f}{min(values):>10.3f}{max(values):>10.3f}"
        )
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``fig1a.png`` (a dot per initialisation per method, log scale) and ``fig1b.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    labels = [label for label, _, _ in METHODS] + [REFERENCE]
    seeds = len(methods["HesScale"]["normalized"])
    colors = plt.cm.viridis([i / max(seeds - 1, 1) for i in range(seeds)])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, label in enumerate(labels):
        values = methods[label]["normalized"]
        jitter = [(k - seeds / 2) / (seeds * 3) for k in range(seeds)]
        ax.scatter([i + j for j in jitter], values, c=colors, s=12, zorder=3)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("normalized L1 error (HesScale = 1)")
    ax.set_title(f"Hessian-diagonal approximation error, {seeds} initializations")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig1a.png", dpi=130)
    plt.close(fig)

    layer_names = list(methods["HesScale"]["per_layer"])
    floor = 1e-8  # errors at machine precision (exact last layers) are drawn at this floor
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(labels)
    palette = plt.cm.tab20([i / 20 for i in range(len(labels))])
    for i, label in enumerate(labels):
        means = [
            max(sum(methods[label]["per_layer"][layer]) / seeds, floor) for layer in layer_names
        ]
        ax.bar(
            [k + (i - len(labels) / 2 + 0.5) * width for k in range(len(layer_names))],
            means,
            width,
            label=label,
            color=palette[i],
        )
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(
        range(len(layer_names)),
        [
            f"layer {k + 1}" + (" (output)" if k == len(layer_names) - 1 else "")
            for k in range(len(layer_names))
        ],
    )
    ax.set_ylabel("mean L1 error per example")
    ax.set_title(f"Layer-wise error, mean over initializations (bars at {floor:g}: exact)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "fig1b.png", dpi=130)
    plt.close(fig)


__all__ = ["METHODS", "REFERENCE", "run", "run_seed", "table", "plot"]
