"""One-shot global pruning of trained Fashion-MNIST networks by each importance score.

Protocol: ``fmnist_mlp`` and ``fmnist_2c2d`` after one epoch of Adam (the networks of the
oracle study). Each scorer of :data:`SCORERS` scores the weights on ``score_batches`` training
batches of 128 (timed); the Linear and convolution weights are pruned globally to each
sparsity of :data:`SPARSITIES` (biases kept) through :func:`hesscale.prune`; test accuracy is
measured right after pruning and after ``finetune_steps`` steps of Adam (lr 1e-4, batch 128,
the masks kept). Every (network, scorer, sparsity) result is written to ``pruning.json``
atomically as it finishes, and a rerun continues from there; ``pruning.png`` plots accuracy
against sparsity.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

import hesscale

from .._progress import progress
from .io import atomic_write_json, environment_record, read_json
from .section7 import (
    NETWORKS,
    SCORERS,
    accuracy,
    batches,
    fmnist,
    networks_folder,
    prepared,
    trained_network,
)

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def fine_tune(model, data, steps: int, seed: int, lr: float = 1e-4) -> None:
    """``steps`` steps of Adam on random training batches of 128 (masks stay applied)."""
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in batches(data, 128, steps, seed):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    model.eval()


def run(
    out: str | Path = "results/pruning",
    sparsities=SPARSITIES,
    score_batches: int = 10,
    finetune_steps: int = 100,
    networks=NETWORKS,
    seed: int = 0,
    splits=None,
    networks_dir=None,
    data_dir=None,
    download: bool = False,
) -> dict:
    """Run (or resume) the study; write ``pruning.json`` and ``pruning.png``; return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pruning.json"
    config = {
        "sparsities": list(sparsities),
        "score_batches": score_batches,
        "finetune_steps": finetune_steps,
        "seed": seed,
    }
    summary = read_json(path, "pruning results") if path.exists() else {}
    if summary.get("config") != config:
        summary = {"config": config, "results": {}}
    summary["environment"] = environment_record()
    splits = fmnist(splits, data_dir, download)
    folder = networks_folder(out, networks_dir)
    test_x, test_y = prepared(splits.test)
    loss_fn = nn.CrossEntropyLoss()
    scoring = batches(splits.train, 128, score_batches, seed + 1)
    total = len(networks) * len(SCORERS) * len(sparsities)
    with progress(total=total, desc="pruning: network × scorer × sparsity", unit="run") as bar:
        for problem in networks:
            template = trained_network(problem, seed, folder, splits)  # never extended
            model = copy.deepcopy(template)
            entry = summary["results"].setdefault(
                problem, {"dense_accuracy": accuracy(model, test_x, test_y), "scorers": {}}
            )
            for k, (label, criterion, method) in enumerate(SCORERS):
                done = entry["scorers"].setdefault(label, {"runs": {}})
                if len(done["runs"]) == len(sparsities):
                    bar.update(len(sparsities))
                    continue
                gen = torch.Generator().manual_seed(seed + 7919 * k)  # independent draws
                tic = time.perf_counter()
                scores = hesscale.importance(
                    model,
                    loss_fn,
                    scoring,
                    method or "hesscale",
                    criterion,
                    generator=gen,
                    progress=False,
                )
                done["score_seconds"] = time.perf_counter() - tic
                for sparsity in sparsities:
                    key = f"{sparsity:g}"
                    if key not in done["runs"]:
                        pruned = copy.deepcopy(template)
                        hesscale.prune(pruned, scores, sparsity)
                        pruned_acc = accuracy(pruned, test_x, test_y)
                        fine_tune(pruned, splits.train, finetune_steps, seed + 2)
                        done["runs"][key] = {
                            "pruned": pruned_acc,
                            "fine_tuned": accuracy(pruned, test_x, test_y),
                        }
                        atomic_write_json(path, summary)
                    bar.update()
    atomic_write_json(path, summary)
    plot(summary, out)
    return summary


def table(summary: dict) -> str:
    """Test accuracy after pruning → after fine-tuning, per network, scorer and sparsity."""
    lines = []
    for problem, entry in summary["results"].items():
        sparsities = summary["config"]["sparsities"]
        lines.append(f"{problem} (dense test accuracy {entry['dense_accuracy']:.4f})")
        lines.append(
            f"{'scorer':<24}{'score s':>8}" + "".join(f"{f'{s:.0%}':>14}" for s in sparsities)
        )
        for label, done in entry["scorers"].items():
            cells = "".join(
                f"{done['runs'][f'{s:g}']['pruned']:>7.3f}→{done['runs'][f'{s:g}']['fine_tuned']:.3f}"
                for s in sparsities
            )
            lines.append(f"{label:<24}{done['score_seconds']:>8.2f}{cells}")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``pruning.png``: test accuracy against sparsity, one line per scorer; rows are networks,
    columns one-shot and after fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    config = summary["config"]
    sparsities = config["sparsities"]
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]
    for row, (problem, entry) in zip(axes, results.items()):
        for col, (ax, stage) in enumerate(zip(row, ("pruned", "fine_tuned"))):
            for k, (label, done) in enumerate(entry["scorers"].items()):
                xs = [s for s in sparsities if f"{s:g}" in done["runs"]]
                ys = [done["runs"][f"{s:g}"][stage] for s in xs]
                ax.plot(
                    [100 * s for s in xs],
                    ys,
                    styles[k % 4],
                    marker=markers[k % 9],
                    label=label,
                    linewidth=1.2,
                    markersize=4,
                )
            ax.axhline(entry["dense_accuracy"], color="grey", linewidth=0.8)
            ax.text(
                100 * sparsities[0],
                entry["dense_accuracy"],
                " unpruned",
                va="bottom",
                fontsize=7,
                color="grey",
            )
            stage_text = (
                "right after one-shot global pruning"
                if stage == "pruned"
                else f"after {config['finetune_steps']} steps of Adam fine-tuning"
            )
            ax.set_title(f"{problem}: {stage_text}", fontsize=9)
            ax.set_xlabel("weights removed (%)")
            ax.set_ylabel("test accuracy")
            if col == 0:
                ax.legend(fontsize=7, title=f"scores on {config['score_batches']} batches")
    fig.suptitle(
        "One-shot pruning of networks trained for one epoch (Linear/conv weights, "
        "global ranking; biases kept)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "pruning.png", dpi=150)
    plt.close(fig)
