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


def plot_tune(summary: dict, out: Path) -> None:
    """``curves_epochs.png``, ``curves_time.png`` and ``sensitivity.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{summary['problem']} ({summary['padding']} padding, {summary['epochs']} epochs)"
    panels = [
        (f"{split}_{metric}", f"{split.replace('_', '-')} {metric}")
        for split in ("train_eval", "valid", "test")
        for metric in ("loss", "acc")
    ]
    for axis, filename in (("epoch", "curves_epochs.png"), ("time", "curves_time.png")):
        fig, axes = plt.subplots(3, 2, figsize=(10, 10))
        for ax, (key, label) in zip(axes.flat, panels):
            for name, entry in summary["optimizers"].items():
                mean, err = _mean_band([c[key] for c in entry["seeds"]])
                xs, _ = _mean_band([c[axis] for c in entry["seeds"]])
                n = min(len(xs), len(mean))
                if n == 0:
                    continue
                ax.plot(xs[:n], mean[:n], label=name)
                ax.fill_between(
                    xs[:n],
                    [m - e for m, e in zip(mean, err)][:n],
                    [m + e for m, e in zip(mean, err)][:n],
                    alpha=0.25,
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
    for name, entry in summary["optimizers"].items():
        best_per_lr: dict[float, float] = {}
        for run in entry["search"]:
            value = run["final_test_loss"] if run["status"] == "finished" else math.inf
            best_per_lr[run["lr"]] = min(best_per_lr.get(run["lr"], math.inf), value)
        lrs = sorted(best_per_lr)
        ax.plot(
            lrs,
            [best_per_lr[lr] if math.isfinite(best_per_lr[lr]) else float("nan") for lr in lrs],
            marker="o",
            label=name,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size")
    ax.set_ylabel("final test loss (best β's per step size)")
    ax.set_title(f"Step-size sensitivity: {summary['problem']}", fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    plt.close(fig)
