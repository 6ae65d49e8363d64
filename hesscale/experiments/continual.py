"""Continual learning on permuted Fashion-MNIST with importance-weighted penalties (EWC).

Protocol: ``tasks`` tasks, each Fashion-MNIST with its own fixed pixel permutation (the first
task unpermuted); an MLP 784→256→256→10 with tanh, trained on each task in turn for
``steps_per_task`` steps of Adam (lr 1e-3, batch 128). After each task the penalty
:class:`hesscale.ImportancePenalty` is consolidated with importances ``ω = |h|``
(``criterion="curvature"``) from ``importance_batches`` batches of that task, ``h`` from the
method's estimator; "fine-tuning" trains without a penalty. Each method's strength ``λ`` is
chosen from ``strengths`` by the average *validation* accuracy over all tasks after the last
one; test accuracies of that choice are reported: the average over all tasks after the last
one, and after each task the average over the tasks seen so far. One JSON per run in
``runs/`` (atomic, reused by a rerun), ``continual.json`` and ``continual.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import hesscale

from .._progress import progress
from .io import atomic_write_json, environment_record, read_json
from .section7 import accuracy, batches, fmnist, mean_se, permute_pixels, prepared

# (label, estimator of ω); None: no penalty
METHODS: list[tuple[str, str | None]] = [
    ("fine-tuning", None),
    ("EWC · Fisher", "fisher"),
    ("EWC · empirical Fisher", "empirical_fisher"),
    ("EWC · GGN-MC", "ggn_mc"),
    ("EWC · HesScale", "hesscale"),
    ("EWC · HesScaleGN", "hesscale_gn"),
]
STRENGTHS = (1e1, 1e2, 1e3, 1e4, 1e5)  # ω is the curvature of a mean loss: λ up to about N


def _index(method: str) -> int:
    """Each estimator draws its own random numbers (Fisher and GGN-MC are one quantity)."""
    return [m for _, m in METHODS].index(method)


def network() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.Tanh(),
        nn.Linear(256, 256),
        nn.Tanh(),
        nn.Linear(256, 10),
    )


def permutations(tasks: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1_000 + seed)
    return [torch.arange(784)] + [torch.randperm(784, generator=gen) for _ in range(tasks - 1)]


def run_one(
    method: str | None,
    strength: float,
    seed: int,
    splits,
    tasks: int,
    steps_per_task: int,
    importance_batches: int,
) -> dict:
    """Train through all tasks; accuracies on every task (validation and test) after each."""
    torch.manual_seed(seed)
    model = network()
    loss_fn = nn.CrossEntropyLoss()
    penalty = hesscale.ImportancePenalty(model, strength)
    perms = permutations(tasks, seed)
    evaluation = {name: prepared(getattr(splits, name)) for name in ("valid", "test")}
    curves = {"valid": [], "test": []}
    seconds = {"train": 0.0, "importance": 0.0}
    for t, perm in enumerate(perms):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tic = time.perf_counter()
        for x, y in batches(splits.train, 128, steps_per_task, seed * 97 + t, perm):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if method is not None:
                loss = loss + penalty()
            loss.backward()
            opt.step()
        seconds["train"] += time.perf_counter() - tic
        if method is not None and t < tasks - 1:
            tic = time.perf_counter()
            task_batches = batches(splits.train, 128, importance_batches, seed * 89 + t, perm)
            gen = torch.Generator().manual_seed(seed * 83 + t + 7919 * _index(method))
            penalty.consolidate(
                hesscale.importance(
                    model,
                    loss_fn,
                    task_batches,
                    method,
                    "curvature",
                    generator=gen,
                    progress=False,
                )
            )
            seconds["importance"] += time.perf_counter() - tic
        model.eval()
        for name, (x, y) in evaluation.items():
            curves[name].append([accuracy(model, permute_pixels(x, p), y) for p in perms[: t + 1]])
        model.train()
    return {"curves": curves, "seconds": seconds}


def run(
    out: str | Path = "results/continual",
    tasks: int = 5,
    steps_per_task: int = 400,
    importance_batches: int = 20,
    strengths=STRENGTHS,
    methods=tuple(label for label, _ in METHODS),
    seeds: int = 1,
    splits=None,
    data_dir=None,
    download: bool = False,
) -> dict:
    """Run (or resume) the study; write ``continual.json`` and ``continual.png``; return it."""
    if tasks < 2:
        raise ValueError(f"continual learning needs at least 2 tasks, got {tasks}")
    estimators = dict(METHODS)
    unknown = [m for m in methods if m not in estimators]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(estimators)}")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    splits = fmnist(splits, data_dir, download)
    plan = [
        (label, strength, seed)
        for label in methods
        for strength in (strengths if estimators[label] is not None else (0.0,))
        for seed in range(seeds)
    ]
    runs = {}
    with progress(total=len(plan), desc="continual: method × λ × seed", unit="run") as bar:
        for label, strength, seed in plan:
            tag = label.replace(" · ", "_").replace(" ", "-").replace("-", "").lower()
            path = (
                out
                / "runs"
                / (
                    f"{tag}_l{strength:g}_s{seed}_t{tasks}_k{steps_per_task}_b{importance_batches}.json"
                )
            )
            if not path.exists():
                result = run_one(
                    estimators[label],
                    strength,
                    seed,
                    splits,
                    tasks,
                    steps_per_task,
                    importance_batches,
                )
                atomic_write_json(path, result)
            runs[(label, strength, seed)] = read_json(path, "continual run")
            bar.update()

    def final(label, strength, split):  # average accuracy over all tasks after the last one
        values = [
            sum(runs[(label, strength, s)]["curves"][split][-1]) / tasks for s in range(seeds)
        ]
        return mean_se(values)

    summary = {
        "config": {
            "tasks": tasks,
            "steps_per_task": steps_per_task,
            "importance_batches": importance_batches,
            "strengths": list(strengths),
            "seeds": seeds,
        },
        "environment": environment_record(),
        "methods": {},
    }
    for label in methods:
        candidates = strengths if estimators[label] is not None else (0.0,)
        best = max(candidates, key=lambda lam: final(label, lam, "valid")[0])
        per_task = [
            mean_se(
                [sum(runs[(label, best, s)]["curves"]["test"][t]) / (t + 1) for s in range(seeds)]
            )
            for t in range(tasks)
        ]
        summary["methods"][label] = {
            "strength": best,
            "final_test": final(label, best, "test"),
            "final_valid_by_strength": {
                f"{lam:g}": final(label, lam, "valid")[0] for lam in candidates
            },
            "seen_tasks_test": per_task,
            "first_task_test": [
                mean_se([runs[(label, best, s)]["curves"]["test"][t][0] for s in range(seeds)])
                for t in range(tasks)
            ],
            "importance_seconds": mean_se(
                [runs[(label, best, s)]["seconds"]["importance"] for s in range(seeds)]
            )[0],
        }
    atomic_write_json(out / "continual.json", summary)
    plot(summary, out)
    return summary


def table(summary: dict) -> str:
    lines = [f"{'method':<20}{'λ':>8}{'test acc., all tasks':>24}{'ω time (s)':>12}"]
    for label, entry in summary["methods"].items():
        mean, se = entry["final_test"]
        lines.append(
            f"{label:<20}{entry['strength']:>8g}{f'{mean:.4f} ± {se:.4f}':>24}"
            f"{entry['importance_seconds']:>12.2f}"
        )
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``continual.png``: after each task, the mean test accuracy over the tasks seen so far
    (left) and on the first task (right), one line per method at its chosen λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = summary["config"]
    tasks = list(range(1, config["tasks"] + 1))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", "-.", ":", (0, (5, 1))]
    markers = ["o", "s", "^", "D", "v"]
    for k, (label, entry) in enumerate(summary["methods"].items()):
        name = label if entry["strength"] == 0 else f"{label} (λ={entry['strength']:g})"
        for ax, key in zip(axes, ("seen_tasks_test", "first_task_test")):
            means = [m for m, _ in entry[key]]
            errors = [e for _, e in entry[key]]
            ax.errorbar(
                tasks,
                means,
                yerr=errors,
                linestyle=styles[k % 5],
                marker=markers[k % 5],
                capsize=3,
                label=name,
            )
    axes[0].set_title("mean test accuracy over the tasks trained so far", fontsize=9)
    axes[1].set_title("test accuracy on the first task (forgetting)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("test accuracy")
        ax.set_xticks(tasks)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Permuted Fashion-MNIST, {config['tasks']} tasks × {config['steps_per_task']} steps of "
        f"Adam; EWC penalty λ Σ ω (θ − θ*)², ω from {config['importance_batches']} batches, "
        f"λ chosen on validation; {config['seeds']} seed(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "continual.png", dpi=150)
    plt.close(fig)
