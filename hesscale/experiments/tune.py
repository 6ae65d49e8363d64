"""``hesscale tune``: the paper's hyperparameter search, selection and reruns, with plots.

For every optimizer: the grid β₁ ∈ {0, 0.9} × β₂ ∈ {0.99, 0.999, 0.9999} × a log-spaced range of
step sizes (SGD: step sizes only), each run with seed 0; the best configuration minimises the
area under the validation-loss curve (the mean over the evaluations; a diverged run has an
infinite area); it is rerun with further seeds. The paper chose each method's range "to create a
convex curve"; here that choice is a rule: while the best step size lies on the edge of the
range searched (or every run diverged), the range grows by one step on that side, up to the
budget's ``extend`` steps, so a problem on which a method wants smaller steps than usual (the
Newton-like AdaHesScale on ReLU networks) still gets an interior optimum. Every run is a file
of its own (see :mod:`.train`), so a killed tune loses nothing finished and continues where it
stopped.

Plots: learning curves against epochs and against wall-clock time (mean with a standard-error
band over seeds; Figs. 3, 4, 6, 7), and step-size sensitivity (final test loss of the best β's
per step size; Figs. 5, 8, 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from hesscale.optim import OPTIMIZERS

from .io import atomic_write_json, environment_record
from .plots import eps_suffix, plot_tune
from .problems import get_problem
from .splits import splits_for
from .train import RunConfig, train

BETA1S = (0.0, 0.9)
BETA2S = (0.99, 0.999, 0.9999)
# log10 of the step-size range searched per optimizer
LR_RANGES = {
    "sgd": (-3.0, 0.0),
    "adam": (-5.0, -2.0),
    "adahessian": (-4.0, -1.0),
    "adaggnmc": (-6.0, -3.0),
    "adabl89": (-5.0, -2.0),
    "adahesscale": (-5.0, -2.0),
    "adahesscalegn": (-5.0, -2.0),
    "adam-scaled": (-5.0, -2.0),
    "adahesscale-scaled": (-5.0, -2.0),
    "adahesscalegn-scaled": (-5.0, -2.0),
    "adahesscale-clipped": (-5.0, -2.0),
    "adahesscalegn-clipped": (-5.0, -2.0),
    "adahesscale-clipped-scaled": (-5.0, -2.0),
    "sophia": (-5.0, -2.0),
}


@dataclass(frozen=True)
class Budget:
    """How much a tune spends."""

    epochs: int | None  # None: the paper's epochs for the problem
    lr_points: int | None  # None: one per decade
    seeds: int
    betas: tuple[tuple[float, float], ...] | None = None  # None: the full grid
    max_batches: int | None = None
    extend: int = 0  # step sizes added beyond the range while the best lies on its edge
    widen: int = 0  # decades added to each side of the optimizer's step-size range


BUDGETS = {
    # sized so that fmnist_mlp with all optimizers takes about an hour on a 2-core CPU
    "default": Budget(epochs=2, lr_points=4, seeds=3, extend=3),
    "paper": Budget(epochs=None, lr_points=7, seeds=30, extend=3),
    "tiny": Budget(epochs=1, lr_points=2, seeds=2, betas=((0.9, 0.999),), max_batches=3),
    # a first look on CPUs: two epochs of 100 batches, three step sizes, the default betas
    "quick": Budget(epochs=2, lr_points=3, seeds=1, betas=((0.9, 0.999),), max_batches=100),
    # robustness to the step size: six decades, one step size per decade, the default betas
    "sensitivity": Budget(epochs=2, lr_points=None, seeds=3, betas=((0.9, 0.999),), widen=1),
}


def step_size_exponents(
    optimizer: str, points: int | None, widen: int = 0
) -> tuple[list[float], float]:
    """log10 of the step sizes searched first, and their spacing (one decade for one point;
    ``points=None``: one per decade of the range widened by ``widen`` decades on each side)."""
    low, high = LR_RANGES[optimizer]
    low, high = low - widen, high + widen
    if points is None:
        return [low + i for i in range(int(round(high - low)) + 1)], 1.0
    if points == 1:
        return [(low + high) / 2], 1.0
    spacing = (high - low) / (points - 1)
    return [low + spacing * i for i in range(points)], spacing


def next_exponent(searched: list[dict], exponents: list[float], spacing: float) -> float | None:
    """Where to extend the range: one step beyond the edge the best run lies on, else None.

    Every run diverged: one step below the smallest step size.
    """
    finite = [r for r in searched if math.isfinite(r["auc"])]
    if not finite:
        return min(exponents) - spacing
    best = math.log10(min(finite, key=lambda r: r["auc"])["lr"])
    if math.isclose(best, min(exponents), abs_tol=1e-9):
        return min(exponents) - spacing
    if math.isclose(best, max(exponents), abs_tol=1e-9):
        return max(exponents) + spacing
    return None


def area_under_validation_loss(record: dict) -> float:
    """The selection criterion: mean validation loss over the evaluations (inf if diverged)."""
    losses = record["curves"]["valid_loss"]
    if record["status"] != "finished" or not losses or not all(map(math.isfinite, losses)):
        return math.inf
    return sum(losses) / len(losses)


def grid(
    optimizer: str, budget: Budget, exponents: list[float]
) -> list[tuple[float, tuple[float, float]]]:
    """(step size, betas) pairs for the step sizes ``10**exponents``."""
    betas = (
        list(budget.betas or [(b1, b2) for b1 in BETA1S for b2 in BETA2S])
        if OPTIMIZERS[optimizer].betas
        else [(0.9, 0.999)]  # SGD and Sophia: not used
    )
    return [(10**e, b) for b in betas for e in exponents]


def tune(
    problem: str,
    optimizers: list[str],
    budget: str = "default",
    out: str | Path = "results/tune",
    padding: str = "valid",
    data_dir=None,
    download: bool = False,
    device: str = "cpu",
    eps: float | None = None,
    text_file=None,
) -> dict:
    """Search, select, rerun and plot; returns the summary written to ``out/summary.json``.

    ``eps`` replaces the adaptive optimizers' ε (default 1e-8) in every run; such a tune is kept
    apart, in ``out/<problem>_eps<eps>``, so that searches with different ε never mix.
    """
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps}")
    spec = get_problem(problem)
    plan = BUDGETS[budget]
    epochs = plan.epochs or spec.paper_epochs
    out = Path(out) / (problem if eps is None else f"{problem}_eps{eps:g}")
    splits = splits_for(spec.dataset, data_dir, download, spec.context, text_file)
    summary: dict = {
        "problem": problem,
        "budget": budget,
        "epochs": epochs,
        "max_batches": plan.max_batches,
        "padding": padding,
        "eps": eps,
        "directory": str(out),
        "environment": environment_record(),
        "optimizers": {},
    }

    def config(name, lr, betas, seed):
        adaptive = {} if eps is None or not OPTIMIZERS[name].eps else {"eps": eps}
        return RunConfig(
            problem=problem,
            optimizer=name,
            lr=lr,
            betas=betas,
            epochs=epochs,
            seed=seed,
            padding=padding,
            max_batches=plan.max_batches,
            text_file=None if text_file is None else str(text_file),
            **adaptive,
        )

    for name in optimizers:
        runs = out / name
        searched = []

        def search(exponents):
            for lr, betas in grid(name, plan, exponents):
                record = train(config(name, lr, betas, 0), runs, splits, device=device)
                searched.append(
                    {
                        "lr": lr,
                        "betas": list(betas),
                        "status": record["status"],
                        "auc": area_under_validation_loss(record),
                        "final_test_loss": record["curves"]["test_loss"][-1],
                    }
                )

        exponents, spacing = step_size_exponents(name, plan.lr_points, plan.widen)
        search(exponents)
        for _ in range(plan.extend):
            extra = next_exponent(searched, exponents, spacing)
            if extra is None:
                break
            exponents.append(extra)
            search([extra])
        best = min(searched, key=lambda r: r["auc"])
        reruns = [
            train(config(name, best["lr"], tuple(best["betas"]), seed), runs, splits, device=device)
            for seed in range(plan.seeds)
        ]
        summary["optimizers"][name] = {
            "search": searched,
            "best": best,
            "seeds": [r["curves"] for r in reruns],
            "status": [r["status"] for r in reruns],
            "seconds_per_epoch": sum(r["seconds_per_epoch"] for r in reruns) / len(reruns),
        }
        atomic_write_json(out / "summary.json", summary)
    plot_tune(summary, out)
    return summary


def report(summary: dict) -> str:
    """Best step size, final test accuracy and loss (mean ± standard error), time per epoch."""
    width = max([len("optimizer")] + [len(n) for n in summary["optimizers"]]) + 2
    lines = [
        f"{summary['problem']}: {summary['epochs']} epochs"
        + (f" of {summary['max_batches']} batches" if summary.get("max_batches") else "")
        + f", padding {summary['padding']}"
        + eps_suffix(summary),
        f"{'optimizer':<{width}}{'best lr':>10}{'β1':>5}{'β2':>8}{'test acc':>18}"
        f"{'test loss':>20}{'s/epoch':>9}",
    ]
    for name, entry in summary["optimizers"].items():
        accs = [c["test_acc"][-1] for c in entry["seeds"]]
        losses = [c["test_loss"][-1] for c in entry["seeds"]]
        best = entry["best"]
        b1, b2 = (
            (f"{best['betas'][0]:g}", f"{best['betas'][1]:g}")
            if OPTIMIZERS[name].betas
            else ("-", "-")
        )
        lines.append(
            f"{name:<{width}}{best['lr']:>10.2e}{b1:>5}{b2:>8}"
            f"{_mean_se(accs):>18}{_mean_se(losses):>20}{entry['seconds_per_epoch']:>9.1f}"
        )
    return "\n".join(lines)


def _mean_se(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return f"{mean:.4f}"
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return f"{mean:.4f} ± {math.sqrt(var / len(finite)):.4f}"
