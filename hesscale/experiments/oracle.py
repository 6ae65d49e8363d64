"""Oracle agreement: how well each importance score ranks the true effect of removing a weight.

Protocol: ``fmnist_mlp`` and ``fmnist_2c2d`` trained for one epoch with Adam (one network per
seed). On a fixed evaluation batch (the first ``examples`` validation images) and in float64,
the oracle is the true change of the loss ``|ΔL_i| = |L(θ with θ_i = 0) − L(θ)|`` for each of
``weights`` weights drawn uniformly from the Linear and convolution weights. Away from a
minimum the first-order term ``−g_i θ_i`` dominates ``ΔL_i``, which hides what the curvature
contributes; so a second oracle is its even part, ``|½(ΔL_i(θ_i → 0) + ΔL_i(θ_i → 2θ_i))|
= |½ H_ii θ_i² + O(θ_i⁴)|``, exactly what OBD's ``½ h θ²`` estimates. Every scorer of
:data:`SCORERS` (criterion × estimator, the estimate taken on the same batch) and the same
criteria on the true Hessian diagonal at the drawn weights (central second differences of the
loss, exact to ``O(δ²)`` in float64) are compared with the oracle by Spearman's rank
correlation: mean ± s.e. over seeds. This is Fig. 1's question asked the way pruning asks it.
One JSON per network and seed in ``seeds/`` (written atomically, reused by a rerun),
``oracle.json`` and ``oracle.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import hesscale
from hesscale.criteria import score
from hesscale.pruning import default_targets

from .._progress import progress
from .io import atomic_write_json, environment_record, read_json
from .section7 import (
    NETWORKS,
    SCORERS,
    fmnist,
    mean_se,
    networks_folder,
    prepared,
    spearman,
    trained_network,
)

EXACT = [("OBD · true H_ii", "obd"), ("Taylor2 · true H_ii", "taylor2")]
ORACLES = ("loss change", "even part")
ORACLE_TITLES = {
    "loss change": "oracle |L(θ_i → 0) − L(θ)|, the true loss change",
    "even part": "oracle |½(ΔL(θ_i → 0) + ΔL(θ_i → 2θ_i))| = |½H_ii θ_i²| + O(θ⁴)",
}


def _draw(model, weights: int, seed: int) -> list[tuple[str, int]]:
    """``weights`` distinct (parameter, flat index) pairs, uniform over the prunable weights."""
    names = default_targets(model)
    sizes = [model.get_parameter(n).numel() for n in names]
    gen = torch.Generator().manual_seed(10_000 + seed)
    flat = torch.randperm(sum(sizes), generator=gen)[:weights].sort().values
    offsets = torch.tensor([0] + sizes).cumsum(0)
    picks = []
    for index in flat.tolist():
        k = int(torch.searchsorted(offsets, index, right=True)) - 1
        picks.append((names[k], index - int(offsets[k])))
    return picks


@torch.no_grad()
def true_changes(model, loss_fn, x, y, picks, step: float = 1e-3):
    """For each pick, by forward passes in float64: ``ΔL`` of setting it to zero, the even
    part ``½(ΔL(θ_i → 0) + ΔL(θ_i → 2θ_i))``, and ``H_ii`` by the central second difference
    ``(L(θ_i + δ) − 2L(θ) + L(θ_i − δ)) / δ²`` (error ``O(δ²)``; ``δ = step``)."""
    base = loss_fn(model(x), y)
    removed, doubled, curvature = (torch.empty(len(picks), dtype=torch.float64) for _ in "abc")
    with progress(total=len(picks), desc="oracle: perturb each weight", unit="weight") as bar:
        for k, (name, index) in enumerate(picks):
            flat = model.get_parameter(name).view(-1)
            kept = flat[index].clone()

            def loss_at(value):
                flat[index] = value
                return loss_fn(model(x), y)

            removed[k] = loss_at(0.0) - base
            doubled[k] = loss_at(2 * kept) - base
            curvature[k] = (loss_at(kept + step) - 2 * base + loss_at(kept - step)) / step**2
            flat[index] = kept
            bar.update()
    return removed, (removed + doubled) / 2, curvature


def run_seed(problem: str, seed: int, folder: Path, splits, weights: int, examples: int) -> dict:
    model = trained_network(problem, seed, folder, splits).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = prepared(splits.valid, examples, torch.float64)
    picks = _draw(model, weights, seed)
    removed, even, exact_curvature = true_changes(model, loss_fn, x, y, picks)
    oracles = {"loss change": removed.abs(), "even part": even.abs()}

    def at_picks(tensors):
        return torch.stack([tensors[n].reshape(-1)[i] for n, i in picks]).double()

    theta = at_picks(dict(model.named_parameters())).detach()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    g = at_picks({n: p.grad for n, p in model.named_parameters()})
    curvature, seconds = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for method in sorted({m for _, _, m in SCORERS if m is not None}):
        tic = time.perf_counter()
        _, diag = hesscale.diagonal(model, loss_fn, x, y, method, generator=gen)
        seconds[method] = time.perf_counter() - tic
        curvature[method] = at_picks(diag)
    curvature["exact"] = exact_curvature
    scores = {
        label: score(criterion, theta, g, curvature.get(method))
        for label, criterion, method in SCORERS
    }
    scores.update(
        {label: score(criterion, theta, g, curvature["exact"]) for label, criterion in EXACT}
    )
    rho = {
        oracle: {label: spearman(s, target) for label, s in scores.items()}
        for oracle, target in oracles.items()
    }
    return {"problem": problem, "seed": seed, "spearman": rho, "estimate_seconds": seconds}


def run(
    out: str | Path = "results/oracle",
    seeds: int = 3,
    weights: int = 1000,
    examples: int = 250,
    networks=NETWORKS,
    splits=None,
    networks_dir=None,
    data_dir=None,
    download: bool = False,
) -> dict:
    """Run (or resume) the study; write ``oracle.json`` and ``oracle.png``; return the summary."""
    out = Path(out)
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    splits = fmnist(splits, data_dir, download)
    folder = networks_folder(out, networks_dir)
    results, seconds = {}, {}
    for problem in networks:
        per_seed = []
        for seed in range(seeds):
            path = out / "seeds" / f"{problem}_seed{seed}_w{weights}_n{examples}.json"
            if not path.exists():
                atomic_write_json(path, run_seed(problem, seed, folder, splits, weights, examples))
            per_seed.append(read_json(path, "oracle seed result"))
        results[problem] = {
            oracle: {
                label: dict(
                    zip(("mean", "se"), mean_se([r["spearman"][oracle][label] for r in per_seed])),
                    values=[r["spearman"][oracle][label] for r in per_seed],
                )
                for label in per_seed[0]["spearman"][oracle]
            }
            for oracle in ORACLES
        }
        seconds[problem] = {
            m: mean_se([r["estimate_seconds"][m] for r in per_seed])[0]
            for m in per_seed[0]["estimate_seconds"]
        }
    summary = {
        "config": {"seeds": seeds, "weights": weights, "examples": examples},
        "environment": environment_record(),
        "results": results,
        "estimate_seconds": seconds,
    }
    atomic_write_json(out / "oracle.json", summary)
    plot(summary, out)
    return summary


def _cell(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['se']:.3f}"


def table(summary: dict) -> str:
    """Spearman correlation with each oracle, mean ± s.e., per network."""
    results = summary["results"]
    columns = [(p, o) for p in results for o in ORACLES]
    lines = [f"{'scorer':<24}" + "".join(f"{p + ': ' + o:>30}" for p, o in columns)]
    for label in results[columns[0][0]][ORACLES[0]]:
        lines.append(
            f"{label:<24}" + "".join(f"{_cell(results[p][o][label]):>30}" for p, o in columns)
        )
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``oracle.png``: one panel per oracle, a bar per scorer and network (± one s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    problems = list(results)
    fig, axes = plt.subplots(1, len(ORACLES), figsize=(14, 5), sharey=True)
    width = 0.8 / len(problems)
    for ax, oracle in zip(axes, ORACLES):
        labels = list(results[problems[0]][oracle])
        for j, problem in enumerate(problems):
            entries = [results[problem][oracle][label] for label in labels]
            positions = [i + (j - (len(problems) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(
                positions,
                [e["mean"] for e in entries],
                width,
                yerr=[e["se"] for e in entries],
                capsize=3,
                label=problem,
                hatch=["", "//"][j % 2],
                edgecolor="black",
                linewidth=0.5,
            )
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(ORACLE_TITLES[oracle], fontsize=9)
    axes[0].set_ylabel("Spearman ρ with the oracle")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        title="network (1 epoch of Adam)",
        fontsize=8,
        ncol=len(problems),
        loc="lower center",
    )
    config = summary["config"]
    fig.suptitle(
        "Which score ranks weights like the true effect of removing them? "
        f"{config['weights']} random weights, {config['examples']} evaluation examples, "
        f"mean ± s.e. over {config['seeds']} trained networks",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "oracle.png", dpi=150)
    plt.close(fig)
