"""Plots of a tune, drawn from its summary alone."""

from __future__ import annotations

import math
from pathlib import Path


def _mean_band(series: list[list[float]]):
    """Mean and standard error per position over the seeds that reached it."""
    length = max(len(s) for s in series)
    means, errors = [], []
    for i in range(length):
        values = [s[i] for s in series if i < len(s) and math.isfinite(s[i])]
        if not values:
            break
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0
        means.append(mean)
        errors.append(math.sqrt(var / len(values)))
    return means, errors


_LINESTYLES = ("-", "--", "-.", ":")


def eps_suffix(summary: dict) -> str:
    """The label's ε part (``, ε = 1e-06``) for a tune with its own ε; empty otherwise."""
    return "" if summary.get("eps") is None else f", ε = {summary['eps']:g}"


def _style(index: int) -> dict:
    """Colour and line style of the ``index``-th optimizer: the line style changes with the
    colour, so methods whose curves coincide (HesScale and HesScaleGN on piecewise-linear
    networks) stay visible."""
    return {"color": f"C{index % 10}", "linestyle": _LINESTYLES[index % len(_LINESTYLES)]}


def sensitivity_points(search: list[dict]) -> tuple[list[tuple[float, float]], list[float]]:
    """Per step size, the final test loss of its best finished β pair, and the step sizes at
    which every run diverged (drawn as crosses on the plot's top edge)."""
    best: dict[float, float] = {}
    for run in search:
        value = run["final_test_loss"] if run["status"] == "finished" else math.inf
        best[run["lr"]] = min(best.get(run["lr"], math.inf), value)
    finite = [(lr, best[lr]) for lr in sorted(best) if math.isfinite(best[lr])]
    diverged = [lr for lr in sorted(best) if not math.isfinite(best[lr])]
    return finite, diverged


def plot_tune(summary: dict, out: Path) -> None:
    """``curves_epochs.png``, ``curves_time.png`` and ``sensitivity.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = eps_suffix(summary)
    capped = summary.get("max_batches")
    epochs = f"{summary['epochs']} epochs" + (f" of {capped} batches" if capped else "")
    title = f"{summary['problem']} ({summary['padding']} padding, {epochs}{eps})"
    panels = [
        (f"{split}_{metric}", f"{split.replace('_', '-')} {metric}")
        for split in ("train_eval", "valid", "test")
        for metric in ("loss", "acc")
    ]
    for axis, filename in (("epoch", "curves_epochs.png"), ("time", "curves_time.png")):
        fig, axes = plt.subplots(3, 2, figsize=(10, 10))
        for ax, (key, label) in zip(axes.flat, panels):
            for index, (name, entry) in enumerate(summary["optimizers"].items()):
                style = _style(index)
                mean, err = _mean_band([c[key] for c in entry["seeds"]])
                xs, _ = _mean_band([c[axis] for c in entry["seeds"]])
                n = min(len(xs), len(mean))
                if n == 0:
                    continue
                ax.plot(xs[:n], mean[:n], label=name, **style)
                ax.fill_between(
                    xs[:n],
                    [m - e for m, e in zip(mean, err)][:n],
                    [m + e for m, e in zip(mean, err)][:n],
                    alpha=0.25,
                    color=style["color"],
                )
            ax.set_xlabel("epoch" if axis == "epoch" else "training time [s]")
            ax.set_ylabel(label)
            if key.endswith("loss"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{title}: mean ± standard error over seeds")
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    top_edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    any_diverged = False
    for index, (name, entry) in enumerate(summary["optimizers"].items()):
        style = _style(index)
        finite, diverged = sensitivity_points(entry["search"])
        if finite:
            ax.plot(*zip(*finite), marker="o", label=name, **style)
        if diverged:
            any_diverged = True
            ax.plot(
                diverged,
                [0.97 - 0.02 * index] * len(diverged),
                marker="x",
                linestyle="none",
                color=style["color"],
                transform=top_edge,
                clip_on=False,
            )
    if any_diverged:
        ax.plot([], [], marker="x", linestyle="none", color="0.3", label="every run diverged")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size")
    ax.set_ylabel("final test loss (best β's per step size)")
    ax.set_title(f"Step-size sensitivity: {summary['problem']}, {epochs}{eps}", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    plt.close(fig)
