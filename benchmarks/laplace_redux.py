"""Laplace Redux on data available here: calibration under dataset shift with laplace-torch's
backends and hesscale's, and the time each takes to fit.

Tasks: DeepOBS' ``fmnist_mlp``, ``fmnist_2c2d`` and ``fmnist_resnet`` on Fashion-MNIST test
images rotated by 0°–180° (the rotated-MNIST shift of Laplace Redux), and ``shakespeare_kinds``:
a small transformer that tells from 64 bytes of a play whether it is a comedy, a history or a
tragedy (:mod:`hesscale.experiments.plays`), on held-out passages of the training plays, on
passages of three plays it never saw, and on passages with 10 % and 30 % of their bytes
replaced. For each task and seed: the MAP network (Adam; reused when trained before), then
Laplace approximations fitted on ``--fit-examples`` training examples — laplace-torch's exact
GGN diagonal (BackPACK; torch.func Jacobians through its curvlinops backend on the ResNet
and the transformer, which BackPACK refuses), its empirical-Fisher diagonal (BackPACK), KFAC
(curvlinops), its recommended default last-layer KFAC, and hesscale's backend with HesScaleGN
and GGN-MC — each with the prior precision that maximises the marginal likelihood. On each
shifted test set: accuracy, NLL, ECE and Brier score with laplace-torch's default predictive,
the linearised network's (GLM) with the probit approximation (sampling the weights of an
all-weight diagonal posterior, ``pred_type="nn"``, ruins the predictions: Immer et al. 2021),
and the seconds each fit took. A backend that refuses a network is recorded with its reason.
One JSON per (task, seed, method), written atomically (a rerun resumes); ``laplace_redux.json``
and the table ``laplace_redux.md`` over every task run into ``--out``, and one figure per task,
``<task>.png``.

    python benchmarks/laplace_redux.py [--tasks fmnist_mlp fmnist_2c2d fmnist_resnet
        shakespeare_kinds] [--seeds 0 1 2] [--epochs 5] [--fit-examples 50000]
        [--test-examples 2000] [--angles 0 30 60 90 120 150 180] [--jacobian-batch 16]
        [--methods ...] [--out results/laplace_redux]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hesscale.experiments.calibration import calibration_metrics, rotate
from hesscale.experiments.data import prepare
from hesscale.experiments.io import atomic_write_json, environment_record
from hesscale.experiments.plays import PassageClassifier, corrupt, play_splits
from hesscale.experiments.problems import get_problem
from hesscale.experiments.splits import splits_for
from hesscale.experiments.train import RunConfig, trained_model

METHODS = {  # name: (subset_of_weights, hessian_structure, backend, backend_kwargs)
    "Diag GGN (exact)": ("all", "diag", "BackPackGGN", {}),
    "Diag EF (BackPACK)": ("all", "diag", "BackPackEF", {}),
    "KFAC (curvlinops)": ("all", "kron", "CurvlinopsGGN", {}),
    "LLLA KFAC (default)": ("last_layer", "kron", "CurvlinopsGGN", {}),
    "Diag HesScaleGN (hesscale)": ("all", "diag", "HesScaleBackend", {"method": "hesscale_gn"}),
    "Diag GGN-MC (hesscale)": ("all", "diag", "HesScaleBackend", {"method": "ggn_mc"}),
}
METRICS = ("accuracy", "nll", "ece", "brier")
IMAGE_TASKS = ("fmnist_mlp", "fmnist_2c2d", "fmnist_resnet")
TEXT_TASK = "shakespeare_kinds"


def _import_laplace():
    """laplace-torch and the backends by name. laplace-torch imports torchvision, whose wheel
    on this machine needs benchmarks/zoo.py's workaround first (never in the library)."""
    path = Path(__file__).resolve().parent / "zoo.py"
    spec = importlib.util.spec_from_file_location("benchmark_zoo", path)
    zoo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = zoo
    spec.loader.exec_module(zoo)
    zoo.import_torchvision()
    import laplace
    import laplace.curvature

    from hesscale.laplace import HesScaleBackend

    backends = {
        "BackPackGGN": laplace.curvature.BackPackGGN,
        "BackPackEF": laplace.curvature.BackPackEF,
        "CurvlinopsGGN": laplace.curvature.CurvlinopsGGN,
        "HesScaleBackend": HesScaleBackend,
    }
    return laplace, backends


@dataclass
class Task:
    """What a task gives the methods: the examples the curvature is fitted on, the test sets
    (the first without shift) and each seed's MAP network."""

    name: str
    fit_loader: DataLoader
    shifts: dict[str, tuple[Tensor, Tensor]]
    shift_axis: str
    map_network: Callable[[int], nn.Module]
    exact_backend: str = "BackPackGGN"
    exact_loader: DataLoader | None = None  # smaller batches for torch.func's Jacobians


def image_task(name: str, args) -> Task:
    problem = get_problem(name)
    splits = splits_for(problem.dataset, args.data_dir)
    gen = torch.Generator().manual_seed(0)
    fit_idx = torch.randperm(len(splits.train[0]), generator=gen)[: args.fit_examples]
    test_idx = torch.randperm(len(splits.test[0]), generator=gen)[: args.test_examples]
    train_x = prepare(splits.train[0][fit_idx], augment=False)
    loader = DataLoader(TensorDataset(train_x, splits.train[1][fit_idx]), batch_size=128)
    test_x = prepare(splits.test[0][test_idx], augment=False)
    test_y = splits.test[1][test_idx]
    shifts = {f"{a}°": (rotate(test_x, a), test_y) for a in args.angles}

    def network(seed: int) -> nn.Module:
        config = RunConfig(
            problem=name, optimizer="adam", lr=args.lr, epochs=args.epochs, seed=seed
        )
        return trained_model(config, Path(args.out) / "map", splits, show_progress=False)[0]

    # BackPACK runs nn.Sequential networks only: the ResNet's exact GGN diagonal comes from
    # torch.func Jacobians (laplace-torch's GGN interface under its curvlinops backend)
    exact, exact_loader = "BackPackGGN", None
    if name == "fmnist_resnet":  # (batch, classes, parameters) Jacobians and their graphs
        exact = "CurvlinopsGGN"
        exact_loader = DataLoader(loader.dataset, batch_size=16)
    return Task(name, loader, shifts, "rotation of the test images", network, exact, exact_loader)


def text_task(args) -> Task:
    splits = play_splits(args.data_dir, length=64)
    gen = torch.Generator().manual_seed(0)
    fit_idx = torch.randperm(len(splits.train[0]), generator=gen)[: args.fit_examples]
    # the exact diagonal's Jacobians are (batch, classes, parameters): a smaller batch
    loader = DataLoader(
        TensorDataset(splits.train[0][fit_idx], splits.train[1][fit_idx]), batch_size=32
    )
    test_x, test_y = (t[: args.test_examples] for t in splits.test)
    held_x, held_y = (t[: args.test_examples] for t in splits.held_out)
    shifts = {
        "test": (test_x, test_y),
        "unseen plays": (held_x, held_y),
        "10 % bytes replaced": (corrupt(test_x, 0.1, gen), test_y),
        "30 % bytes replaced": (corrupt(test_x, 0.3, gen), test_y),
    }

    def network(seed: int) -> nn.Module:
        path = Path(args.out) / "map" / f"{TEXT_TASK}_s{seed}_e{args.epochs}.pt"
        torch.manual_seed(seed)
        model = PassageClassifier()
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
        data = DataLoader(TensorDataset(*splits.train), batch_size=64, shuffle=True)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        for epoch in range(args.epochs):
            for x, y in data:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            with torch.no_grad():
                valid = (model(splits.valid[0]).argmax(-1) == splits.valid[1]).float().mean()
            print(f"  {TEXT_TASK} seed {seed} epoch {epoch + 1}: valid accuracy {valid:.3f}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        return model

    # BackPACK has no transformer layers: the exact GGN diagonal from torch.func Jacobians
    return Task(TEXT_TASK, loader, shifts, "test set", network, exact_backend="CurvlinopsGGN")


def _predictive(la, model):
    """The predictive probabilities of a batch: the MAP network's softmax (``la`` None) or the
    linearised network's (GLM) predictive with the probit approximation, laplace-torch's
    default, which needs every output's Jacobian with respect to the posterior's weights."""
    if la is None:
        return lambda xb: torch.softmax(model(xb), -1)
    return lambda xb: la(xb, pred_type="glm", link_approx="probit")


def evaluate(predict, shifts: dict, batch: int) -> dict:
    metrics = {}
    for label, (x, y) in shifts.items():
        with torch.no_grad():
            probs = torch.cat([predict(x[i : i + batch]).detach() for i in range(0, len(x), batch)])
        metrics[label] = calibration_metrics(probs, y)
    return metrics


def laplace_of(name: str, model, task: Task, laplace, backends):
    """The unfitted Laplace approximation of ``METHODS[name]`` and the loader to fit it on (the
    exact diagonal's own backend and, where torch.func builds its Jacobians, smaller batches)."""
    subset, structure, backend, kwargs = METHODS[name]
    loader = task.fit_loader
    if name == "Diag GGN (exact)":
        backend = task.exact_backend
        loader = task.exact_loader or loader
    la = laplace.Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backends[backend],
        backend_kwargs=dict(kwargs),
    )
    return la, loader


def run_method(name, model, task: Task, args, laplace, backends) -> dict:
    record = {"method": name}
    model.eval()
    if name == "MAP":
        record["shifts"] = evaluate(_predictive(None, model), task.shifts, 500)
        return record
    exact = name == "Diag GGN (exact)"
    record["backend"] = task.exact_backend if exact else METHODS[name][2]
    try:
        la, loader = laplace_of(name, model, task, laplace, backends)
        start = time.perf_counter()
        la.fit(loader)
        record["fit_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        la.optimize_prior_precision(method="marglik")
        record["prior_seconds"] = time.perf_counter() - start
        record["prior_precision"] = float(la.prior_precision.mean())
    except Exception as error:  # this backend does not run on this network
        record["status"] = "refused"
        record["reason"] = "".join(traceback.format_exception_only(error)).strip()[:400]
        return record
    record["status"] = "fitted"
    batch = 500 if METHODS[name][0] == "last_layer" else args.jacobian_batch  # Jacobians: (B, C, P)
    record["shifts"] = evaluate(_predictive(la, model), task.shifts, batch)
    return record


def _summary(records: list[dict]) -> dict:
    """Per method and test set: mean and standard deviation of each metric over seeds."""
    table = {}
    for r in records:
        for label, metrics in r.get("shifts", {}).items():
            for metric, value in metrics.items():
                table.setdefault(r["method"], {}).setdefault(label, {}).setdefault(
                    metric, []
                ).append(value)
    return {
        method: {
            label: {
                m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                for m, v in metrics.items()
            }
            for label, metrics in shifts.items()
        }
        for method, shifts in table.items()
    }


def plot(task: Task, summary: dict, fits: dict, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    labels = {"accuracy": "accuracy ↑", "nll": "NLL ↓", "ece": "ECE ↓", "brier": "Brier ↓"}
    shifts = list(task.shifts)
    xs = range(len(shifts))
    for method, per_shift in summary.items():
        seconds = fits.get(method)
        label = method if seconds is None else f"{method}, fit {seconds:.0f} s"
        style = "-" if "hesscale" in method else ("--" if method != "MAP" else ":")
        for ax, metric in zip(axes, METRICS):
            mean = [per_shift[s][metric][0] for s in shifts]
            std = [per_shift[s][metric][1] for s in shifts]
            line = ax.plot(xs, mean, style, marker="o", ms=3, label=label)[0]
            ax.fill_between(
                xs,
                [m - d for m, d in zip(mean, std)],
                [m + d for m, d in zip(mean, std)],
                color=line.get_color(),
                alpha=0.15,
            )
    for ax, metric in zip(axes, METRICS):
        ax.set_xticks(list(xs), shifts, rotation=30 if len(shifts) < 6 else 0, fontsize=8)
        ax.set_xlabel(task.shift_axis)
        ax.set_title(labels[metric])
        ax.grid(alpha=0.3)
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(
        f"{task.name}: Laplace approximations under dataset shift (mean ± std over {seeds} "
        "seeds; fit: seconds for the curvature of the fitted examples)"
    )
    rows = -(-len(summary) // 4)  # legend rows below the panels
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks", nargs="+", default=[*IMAGE_TASKS, TEXT_TASK], choices=[*IMAGE_TASKS, TEXT_TASK]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5, help="MAP training epochs (Adam)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fit-examples", type=int, default=50000)
    parser.add_argument("--test-examples", type=int, default=2000, help="per test set")
    parser.add_argument("--angles", nargs="+", type=int, default=[0, 30, 60, 90, 120, 150, 180])
    parser.add_argument(
        "--jacobian-batch", type=int, default=16, help="test examples per Jacobian (memory)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["MAP", *METHODS], choices=["MAP", *METHODS]
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/laplace_redux")
    args = parser.parse_args(argv)
    laplace, backends = _import_laplace()
    out = Path(args.out)
    results = []
    for name in args.tasks:
        task = text_task(args) if name == TEXT_TASK else image_task(name, args)
        _same_settings(out / name / "settings.json", args, name)
        records = []
        for seed in args.seeds:
            for method in args.methods:
                path = out / name / f"s{seed}" / f"{method.replace(' ', '_')}.json"
                if path.exists():
                    records.append(json.loads(path.read_text()))
                    continue
                model = task.map_network(seed)
                print(f"{name} seed {seed}: {method} ...", flush=True)
                record = run_method(method, model, task, args, laplace, backends)
                record |= {"task": name, "seed": seed}
                atomic_write_json(path, record)
                records.append(record)
        summary = _summary(records)
        fits = {}
        for r in records:
            if "fit_seconds" in r:
                fits.setdefault(r["method"], []).append(r["fit_seconds"])
        fit_means = {k: statistics.fmean(v) for k, v in fits.items()}
        plot(task, summary, fit_means, len(args.seeds), out / f"{name}.png")
        results.append(
            {
                "task": name,
                "seeds": sorted({r["seed"] for r in records}),
                "settings": json.loads((out / name / "settings.json").read_text()),
                "summary": summary,
                "fit_seconds": fit_means,
                "refused": {r["method"]: r["reason"] for r in records if "reason" in r},
            }
        )
        _print(name, summary, fit_means, list(task.shifts))
    # the tasks of earlier invocations stay in the summary files beside this one's
    path = out / "laplace_redux.json"
    earlier = json.loads(path.read_text())["results"] if path.exists() else []
    names = {r["task"] for r in results}
    order = [*IMAGE_TASKS, TEXT_TASK]
    merged = sorted(
        [r for r in earlier if r["task"] not in names] + results,
        key=lambda r: order.index(r["task"]),
    )
    atomic_write_json(path, {"results": merged, "environment": environment_record()})
    tmp = out / "laplace_redux.md.tmp"
    tmp.write_text(table(merged))
    os.replace(tmp, out / "laplace_redux.md")


def table(results: list[dict]) -> str:
    """Per task, one row per method: the fit's seconds; accuracy, NLL and ECE without shift;
    NLL and ECE under the largest shift; the NLL averaged over all test sets."""
    lines = []
    for r in results:
        shifts = list(next(iter(r["summary"].values())))
        first, last = shifts[0], shifts[-1]
        lines += [
            f"**{r['task']}** (seeds {', '.join(map(str, r['seeds']))}; {r['settings']})",
            "",
            f"| method | fit (s) | accuracy | NLL | ECE | NLL {last} | ECE {last} | NLL, mean |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, per_shift in r["summary"].items():
            a, b = per_shift[first], per_shift[last]
            mean_nll = statistics.fmean(per_shift[s]["nll"][0] for s in shifts)
            fit = r["fit_seconds"].get(method)
            lines.append(
                f"| {method} | {'' if fit is None else f'{fit:.1f}'} | "
                f"{a['accuracy'][0]:.3f} | {a['nll'][0]:.3f} ± {a['nll'][1]:.3f} | "
                f"{a['ece'][0]:.3f} | {b['nll'][0]:.3f} ± {b['nll'][1]:.3f} | "
                f"{b['ece'][0]:.3f} | {mean_nll:.3f} |"
            )
        for method, reason in r["refused"].items():
            lines.append(f"| {method} | refused: {reason.splitlines()[-1][:90]} | | | | | | |")
        lines.append("")
    return "\n".join(lines)


def _same_settings(path: Path, args, name: str) -> None:
    """A rerun resumes only the run it continues: the settings that change a task's numbers
    are written with its first result, and a rerun with others is refused."""
    keys = ("epochs", "lr", "fit_examples", "test_examples", "jacobian_batch")
    settings = {k: getattr(args, k) for k in keys}
    if name != TEXT_TASK:
        settings["angles"] = list(args.angles)
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise SystemExit(
                f"{path.parent} holds results of other settings ({changed}, before → now): "
                "pass another --out, or delete it to start again"
            )
    else:
        atomic_write_json(path, settings)


def _print(name, summary, fits, shifts) -> None:
    first, last = shifts[0], shifts[-1]
    print(f"\n{name}: NLL and ECE on '{first}' / '{last}', mean over seeds")
    for method, per_shift in summary.items():
        a, b = per_shift[first], per_shift[last]
        fit = f"fit {fits[method]:7.1f} s" if method in fits else " " * 12
        print(
            f"  {method:<30} acc {a['accuracy'][0]:.3f}  NLL {a['nll'][0]:.3f}/{b['nll'][0]:.3f}"
            f"  ECE {a['ece'][0]:.3f}/{b['ece'][0]:.3f}  {fit}"
        )


if __name__ == "__main__":
    main()
