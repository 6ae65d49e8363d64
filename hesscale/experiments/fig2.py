"""Fig. 2 of the paper: the computational cost of one update step, against Adam's.

Protocol (Section 4, and the authors' code where the text is silent): MSE loss against
``N(0, 1)`` targets, inputs ``N(0, I)``, batch size 1; the clock covers the backward pass and the
parameter update (the "update time"); each point is the mean of 30 updates after a warm-up,
with the methods interleaved round by round so that machine noise hits them alike.

(a) 64 inputs, one hidden layer of 512 tanh units, 2⁴ … 2⁹ outputs;
(b) 64 inputs, L hidden layers of 512 tanh units, 100 outputs, L = 1, 2, 4, … (128 with --full).

Each point is written atomically to ``points/``; a rerun skips finished points.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import hesscale
from hesscale.optim import OPTIMIZERS, CurvatureAdam

from .._progress import progress
from .io import atomic_write_json, environment_record, read_json
from .networks import fig2a_network, fig2b_network, parameter_count
from .timing import interleaved_times

OPTIMIZER_LABELS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adahessian": "AdaHessian",
    "adaggnmc": "AdaGGNMC",
    "adabl89": "AdaBL89",
    "adahesscale": "AdaHesScale",
    "adahesscalegn": "AdaHesScaleGN",
}
EXACT_LABELS = {"ggn": "GGN", "exact": "H"}
# dense exact diagonals are timed only below these sizes (outputs × params × batch elements of
# the Jacobian for the GGN; parameters for the Hessian)
AFFORDABLE = {"ggn": 5e7, "exact": 3e3}
LEARNING_RATE = 1e-5  # keeps curvature-scaled (Newton-style) steps finite over the timed steps


def _loss_and_targets(kind: str, outputs: int, batch: int, device, generator):
    if kind == "mse":
        target = torch.randn(batch, outputs, generator=generator).to(device)
        return nn.MSELoss(), target
    target = torch.randint(0, outputs, (batch,), generator=generator).to(device)
    return nn.CrossEntropyLoss(), target


def time_point(
    make_model,
    batch: int = 1,
    loss: str = "mse",
    include_forward: bool = False,
    rounds: int = 30,
    device: str = "cpu",
    optimizers: list[str] | None = None,
    exact: bool = True,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    pretrain: int = 0,
) -> dict:
    """Time one update of every optimizer (and affordable exact diagonals) on one network.

    ``input_shape``: one example's shape (default: the first layer's ``in_features``).
    ``pretrain``: steps each optimizer first takes on the (fixed) batch before the timing, which
    drives the loss towards zero and the curvature estimates towards subnormal values.
    """
    torch.manual_seed(seed)
    base = make_model().to(device)
    outputs = base[-1].out_features
    params = parameter_count(base)
    gen = torch.Generator().manual_seed(seed)
    shape = input_shape or (base[0].in_features,)
    x = torch.randn(batch, *shape, generator=gen).to(device)
    loss_fn, target = _loss_and_targets(loss, outputs, batch, device, gen)
    hesscale.extend(loss_fn)
    fns, models = {}, {}
    for name in optimizers or list(OPTIMIZER_LABELS):
        model = hesscale.extend(copy.deepcopy(base))
        cls = OPTIMIZERS[name].cls
        # timing of the algorithms as published: without the guard, which refuses the blow-ups
        # that random data and a fixed step size cause (its cost: benchmarks/guard_cost.py)
        options = {"guard": False} if issubclass(cls, CurvatureAdam) else {}
        opt = cls(model.parameters(), lr=LEARNING_RATE, **options)
        create_graph = name == "adahessian"
        models[OPTIMIZER_LABELS[name]] = model

        def forward(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            return loss_fn(model(x), target)

        def update(value, opt=opt, create_graph=create_graph):
            with warnings.catch_warnings():  # AdaHessian: the grad graph is dropped by zero_grad
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                value.backward(create_graph=create_graph)
            opt.step()

        if include_forward:
            fns[OPTIMIZER_LABELS[name]] = lambda f=forward, u=update: u(f())
        else:
            fns[OPTIMIZER_LABELS[name]] = (forward, update)
    for _ in range(pretrain):
        for label in models:
            fn = fns[label]
            fn() if callable(fn) else fn[1](fn[0]())
    if exact:
        for method, label in EXACT_LABELS.items():
            size = outputs * params * batch if method == "ggn" else params
            if size > AFFORDABLE[method]:
                continue
            model = copy.deepcopy(base)
            fns[label] = lambda model=model, method=method: hesscale.diagonal(
                model, loss_fn, x, target, method=method
            )
    times = interleaved_times(fns, rounds=rounds, warmup=3, device=device, seed=seed)
    finite = {
        label: all(torch.isfinite(p).all().item() for p in m.parameters())
        for label, m in models.items()
    }
    adam = times["Adam"]["mean"]
    return {
        "params": params,
        "times": times,
        "ratio_to_adam": {label: t["mean"] / adam for label, t in times.items()},
        "weights_finite": finite,
    }


def panels(full: bool) -> dict[str, list[tuple[int, object]]]:
    layers = [1, 2, 4, 8, 16] + ([32, 64, 128] if full else [])
    return {
        "a": [(2**k, lambda k=k: fig2a_network(2**k)) for k in range(4, 10)],
        "b": [(L, lambda L=L: fig2b_network(L)) for L in layers],
    }


def run(
    out: str | Path = "results/fig2",
    full: bool = False,
    batch: int = 1,
    loss: str = "mse",
    include_forward: bool = False,
    rounds: int = 30,
    device: str = "cpu",
) -> dict:
    """Run (or resume) both panels; write ``fig2.json``, the plots, and return the summary."""
    out = Path(out)
    config = dict(
        batch=batch,
        loss=loss,
        include_forward=include_forward,
        rounds=rounds,
        device=device,
        learning_rate=LEARNING_RATE,
    )
    tag = f"b{batch}_{loss}_{'fwd' if include_forward else 'upd'}_r{rounds}_{device}"
    todo = [(p, x, make) for p, points in panels(full).items() for x, make in points]
    start = time.perf_counter()
    results: dict[str, dict] = {"a": {}, "b": {}}
    with progress(total=len(todo), desc="fig2 networks", unit="net") as bar:
        for panel, xval, make in todo:
            path = out / "points" / f"{panel}_{xval}_{tag}.json"
            if not path.exists():
                atomic_write_json(
                    path, time_point(make, batch, loss, include_forward, rounds, device)
                )
            results[panel][str(xval)] = read_json(path, "Fig. 2 timing")
            bar.update(1)
    summary = {
        "config": config,
        "environment": environment_record(),
        "seconds": time.perf_counter() - start,
        "a_outputs": results["a"],
        "b_layers": results["b"],
    }
    atomic_write_json(out / "fig2.json", summary)
    plot(summary, out)
    return summary


NOT_TIMED = (
    "n/t: not timed. The dense exact diagonals are timed only while affordable: H up to "
    f"{AFFORDABLE['exact']:.0f} parameters, GGN up to {AFFORDABLE['ggn']:.0e} Jacobian entries "
    "(outputs × parameters × batch)."
)
# line styles that keep coinciding curves apart (AdaBL89, AdaHesScale and AdaHesScaleGN cost the
# same): each label has its own colour, dash pattern and marker
_STYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2))]
_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "h"]


def table(summary: dict) -> str:
    """Ratios of every method's update time to Adam's, one row per network."""
    labels = list(OPTIMIZER_LABELS.values()) + list(EXACT_LABELS.values())
    lines = [f"{'network':<16}{'params':>10} " + "".join(f"{lb[:13]:>14}" for lb in labels)]
    missing = False
    for panel, key, name in (("a", "a_outputs", "outputs"), ("b", "b_layers", "layers")):
        for xval, point in summary[key].items():
            cells = []
            for lb in labels:
                if lb in point["ratio_to_adam"]:
                    cells.append(f"{point['ratio_to_adam'][lb]:>14.2f}")
                else:
                    cells.append(f"{'n/t':>14}")
                    missing = True
            lines.append(f"{f'({panel}) {name}={xval}':<16}{point['params']:>10} {''.join(cells)}")
    if missing:
        lines.append(NOT_TIMED)
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``fig2a.png`` and ``fig2b.png``: update time against the number of parameters, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for panel, key, title in (
        ("a", "a_outputs", "one hidden layer, outputs 2⁴ … 2⁹"),
        ("b", "b_layers", "L hidden layers, 100 outputs"),
    ):
        points = summary[key]
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        labels = list(OPTIMIZER_LABELS.values()) + list(EXACT_LABELS.values())
        colours = plt.cm.tab10.colors
        cut = []
        for k, label in enumerate(labels):
            xs = [p["params"] for p in points.values() if label in p["times"]]
            ys = [p["times"][label]["mean"] for p in points.values() if label in p["times"]]
            if xs:
                ax.plot(
                    xs,
                    ys,
                    color=colours[k % len(colours)],
                    linestyle=_STYLES[k % len(_STYLES)],
                    marker=_MARKERS[k % len(_MARKERS)],
                    ms=4,
                    lw=1.4,
                    label=label,
                )
            if len(xs) < len(points):
                cut.append(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of parameters")
        step = (
            "forward + backward + update"
            if summary["config"]["include_forward"]
            else ("backward + update")
        )
        ax.set_ylabel(f"time per step [s] ({step})")
        ax.set_title(f"Fig. 2{panel}: {title}", fontsize=10)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
        if cut:
            fig.text(
                0.01,
                0.01,
                f"{', '.join(cut)}: dense exact diagonals, timed only for the smaller networks",
                fontsize=7,
                color="0.3",
            )
        fig.tight_layout(rect=(0, 0.03 if cut else 0, 1, 1))
        fig.savefig(out / f"fig2{panel}.png", dpi=130)
        plt.close(fig)


__all__ = ["run", "time_point", "table", "plot"]
