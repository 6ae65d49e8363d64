"""Fig. 1 of the paper: approximation quality of Hessian-diagonal estimators.

Protocol (Section 4): a network of 6 inputs, three hidden layers of 16 tanh units and 10 outputs,
PyTorch's default initialisation, cross-entropy; inputs ``x ~ N(0, I)``, labels uniform over the
10 classes; 1000 examples, one at a time; 40 initialisations. For each example and method, the
L1 distance between the method's estimate and the exact Hessian diagonal is summed over layers
and averaged over the examples; each method's average is divided by HesScale's for the same
initialisation. ``|diag(H)|`` (the error of an all-zero estimate) is the reference line.

All examples of one initialisation are processed as one batch with per-example estimates
(``individual=True``, sum reduction: each example's loss is its own cross-entropy), which gives
the same numbers as a loop over single examples (the loop is used where a network has
parameters outside layers with per-example rules). Each initialisation's result is written
atomically to ``seeds/``; a rerun skips finished seeds.

``architecture`` asks the same question of graphs (:data:`ARCHITECTURES`): a residual MLP, a
gated (SwiGLU) MLP, a residual CNN, a ResNet with train-mode BatchNorm, a tiny language model
with tied embeddings, a pre-LN transformer encoder layer and a one-block GPT (causal
attention, tied head), all of about the Fig. 1 size. The references (exact diagonals, GGN,
Hutchinson, g²) differentiate attention with PyTorch's math kernel; the engine sees the fused
kernel where PyTorch uses it. A method that does not apply to a network (KFAC-MC beyond Linear
layers, GGN-MC on normalisation weights) is reported as not defined. Train-mode BatchNorm
couples the examples of a batch, so on the ResNet each "example" is a batch of 8 and its loss
the batch's summed cross-entropy. Where a network has a rule with variants, the other variant
is a row of its own (``HesScale, exact attention``; ``HesScale, per-layer BN``).

``trained=T`` measures after ``T`` steps of full-batch Adam (lr 1e-2) on 256 examples labelled
by a teacher network of the same architecture (another initialisation), on fresh examples
labelled by the same teacher: the regime where curvature is no longer that of random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale import UnsupportedModuleError
from hesscale.baselines import hutchinson_from_probes, kfac_mc, rademacher_like
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal
from hesscale.rules import Settings

from .._progress import progress
from .io import atomic_write_json, environment_record, read_json
from .networks import (
    GatedMLP,
    LSTMClassifier,
    ResidualCNN,
    ResidualTanhMLP,
    TinyLM,
    TinyResNet,
    TinyTransformer,
    fig1_network,
    tiny_convnext,
    tiny_efficientnet,
    tiny_gpt,
    tiny_swin,
)

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


def _vectors(generator, n, dtype):
    return torch.randn(n, 6, generator=generator, dtype=dtype), torch.randint(
        0, 10, (n,), generator=generator
    )


def _images(generator, n, dtype):
    return torch.randn(n, 1, 6, 6, generator=generator, dtype=dtype), torch.randint(
        0, 10, (n,), generator=generator
    )


def _rgb(generator, n, dtype):
    return torch.randn(n, 3, 8, 8, generator=generator, dtype=dtype), torch.randint(
        0, 10, (n,), generator=generator
    )


def _sequences(generator, n, dtype):
    return torch.randn(n, 4, 6, generator=generator, dtype=dtype), torch.randint(
        0, 10, (n,), generator=generator
    )


def _tokens(generator, n, dtype):
    ids = torch.randint(0, 10, (n, 4), generator=generator)
    return ids, torch.randint(0, 10, (n, 4), generator=generator)


@dataclass(frozen=True)
class Architecture:
    """A network of the protocol: its factory, its data ``(generator, examples, dtype) ->
    (inputs, labels)``, how many examples share one loss (train-mode BatchNorm couples them),
    and the labels of the rule variants (:data:`VARIANTS`) that apply to it."""

    make: Callable[[], nn.Module]
    data: Callable
    group: int = 1
    variants: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(fig1_network, _vectors),
    "residual": Architecture(lambda: ResidualTanhMLP(6, 16, 2, 10), _vectors),
    "gated": Architecture(GatedMLP, _vectors),
    "cnn": Architecture(ResidualCNN, _images),
    "resnet": Architecture(TinyResNet, _images, group=8, variants=("HesScale, per-layer BN",)),
    "lm": Architecture(TinyLM, _tokens),
    "transformer": Architecture(
        TinyTransformer, _sequences, variants=("HesScale, exact attention",)
    ),
    "gpt": Architecture(tiny_gpt, _tokens, variants=("HesScale, exact attention",)),
    # model zoos' architectures at reduced width (torchvision's own classes)
    "convnext": Architecture(tiny_convnext, _rgb),
    "efficientnet": Architecture(
        tiny_efficientnet, _rgb, group=8, variants=("HesScale, per-layer BN",)
    ),
    "swin": Architecture(tiny_swin, _rgb, variants=("HesScale, exact attention",)),
    "lstm": Architecture(LSTMClassifier, _sequences),
}
# label: the settings of hesscale.extend under which HesScale runs for that row
VARIANTS: dict[str, dict] = {
    "HesScale, exact attention": {"attention": "exact"},
    "HesScale, per-layer BN": {"batch_norm": "per-layer"},
}
DEFAULT_SETTINGS = dataclasses.asdict(Settings())


def _layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Each module that owns parameters, and its parameters' names."""
    return [
        (
            name or "<root>",
            [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)],
        )
        for name, m in model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def _math_attention():
    """PyTorch's math kernel for attention, which torch.func can differentiate twice."""
    return sdpa_kernel(SDPBackend.MATH)


def _loss_of_group(model, loss_fn) -> Callable:
    def loss(params, x, y):
        return loss_fn(functional_call(model, params, (x,)), y)

    return loss


def _groups(t: Tensor, group: int) -> Tensor:
    """``(n, ...)`` as ``(n / group, group, ...)``: the examples that share one loss."""
    return t.reshape(len(t) // group, group, *t.shape[1:])


def _chunked(fn: Callable, *args: Tensor) -> dict[str, Tensor]:
    parts = [fn(*(a[i : i + CHUNK] for a in args)) for i in range(0, len(args[0]), CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _batched(fn: Callable, in_dims=0) -> Callable:
    """``vmap(fn)``, or, where torch.func cannot batch an operation of the network (the fused
    recurrent kernels), the same computation one example at a time."""
    batched = vmap(fn, in_dims)

    def run(*args):
        try:
            return batched(*args)
        except (RuntimeError, NotImplementedError):
            dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
            n = next(
                (len(a) if torch.is_tensor(a) else len(next(iter(a.values()))))
                for a, d in zip(args, dims)
                if d is not None
            )
            rows = []
            for i in range(n):
                one = [
                    a
                    if d is None
                    else (a[i] if torch.is_tensor(a) else {k: v[i] for k, v in a.items()})
                    for a, d in zip(args, dims)
                ]
                rows.append(fn(*one))
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    return run


def _per_group(diagonal_fn, model, loss_fn, x, y, group: int = 1) -> dict[str, Tensor]:
    """A reference diagonal of :mod:`hesscale.reference` for every group of examples."""

    def one(xg, yg):
        return diagonal_fn(model, loss_fn, xg, yg)

    return _chunked(_batched(one), _groups(x, group), _groups(y, group))


def per_example_exact(model, loss_fn, x, y, group: int = 1) -> dict[str, Tensor]:
    """``diag(∇²_θ ℓ_n)`` for every example (or group of examples) ``n``."""
    return _per_group(exact_hessian_diagonal, model, loss_fn, x, y, group)


def per_example_ggn(model, loss_fn, x, y, group: int = 1) -> dict[str, Tensor]:
    """The exact GGN diagonal of every example (or group)."""
    return _per_group(ggn_diagonal, model, loss_fn, x, y, group)


def per_example_hutchinson(
    model, loss_fn, x, y, samples, generator, group: int = 1
) -> dict[str, Tensor]:
    """AdaHessian's ``z ⊙ Hz`` per example (or group), ``samples`` Rademacher probes each."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = _loss_of_group(model, loss_fn)
    xs, ys = _groups(x, group), _groups(y, group)
    probes = rademacher_like(
        {n: p.expand(len(xs), *p.shape) for n, p in params.items()}, samples, generator
    )
    probes = {n: z.transpose(0, 1) for n, z in probes.items()}  # (N, k, *shape)

    def one(xg, yg, zg):
        return hutchinson_from_probes(lambda p: loss(p, xg, yg), params, zg)

    parts = []
    for i in range(0, len(xs), CHUNK):
        sl = slice(i, i + CHUNK)
        parts.append(_batched(one)(xs[sl], ys[sl], {n: z[sl] for n, z in probes.items()}))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def per_example_grad_sq(model, loss_fn, x, y, group: int = 1) -> dict[str, Tensor]:
    """``g_n ⊙ g_n`` with ``g_n`` each example's (or group's) gradient."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = _loss_of_group(model, loss_fn)
    grads = _batched(grad(loss), (None, 0, 0))(params, _groups(x, group), _groups(y, group))
    return {n: g * g for n, g in grads.items()}


@contextmanager
def _settings(model: nn.Module, settings: dict):
    """``hesscale.extend(model, **settings)`` inside, the defaults after."""
    hesscale.extend(model, **settings)
    try:
        yield
    finally:
        hesscale.extend(model, **DEFAULT_SETTINGS)


def estimate(
    label, method, samples, model, loss_fn, x, y, generator, group: int = 1, reference=None
) -> dict[str, Tensor]:
    """Estimates ``{name: (N, *shape)}`` of one method of the figure, one per example (or group
    of ``group`` examples), or None where the method is not defined for the network.
    ``reference`` is the model torch.func differentiates (train-mode BatchNorm without
    running statistics); the engine runs ``model``."""
    reference = model if reference is None else reference
    if method in ("hesscale", "hesscale_gn", "bl89", "ggn_mc"):
        options = dict(method=method, samples=samples, generator=generator)
        with _settings(model, VARIANTS.get(label, {})):
            if group == 1:
                try:
                    return hesscale.diagonal(model, loss_fn, x, y, individual=True, **options)[1]
                except UnsupportedModuleError:  # parameters outside per-example layers
                    pass
            try:
                parts = [
                    hesscale.diagonal(model, loss_fn, xg, yg, **options)[1]
                    for xg, yg in zip(_groups(x, group), _groups(y, group))
                ]
            except UnsupportedModuleError:  # GGN-MC on parameters outside layers
                return None
        return {k: torch.stack([e[k] for e in parts]) for k in parts[0]}
    if method == "kfac_mc":
        if group != 1:
            return None
        try:
            _, result = kfac_mc(
                model, loss_fn, x, y, samples=samples, generator=generator, individual=True
            )
        except UnsupportedModuleError:
            return None
        return result
    with _math_attention():  # torch.func differentiates attention's math kernel
        if method == "ggn":
            return per_example_ggn(reference, loss_fn, x, y, group)
        if method == "hutchinson":
            return per_example_hutchinson(reference, loss_fn, x, y, samples, generator, group)
        if method == "grad_sq":
            return per_example_grad_sq(reference, loss_fn, x, y, group)
    raise ValueError(f"unknown method {method!r} of label {label!r}")


def teach(model: nn.Module, spec: Architecture, seed: int, steps: int, dtype) -> Callable:
    """Train ``model`` for ``steps`` full-batch Adam steps (lr 1e-2) on 256 examples labelled by
    a teacher of the same architecture; return ``labels(x)``, the teacher's labels."""
    torch.manual_seed(100_000 + seed)
    teacher = spec.make().to(dtype).eval()

    @torch.no_grad()
    def labels(x):
        return teacher(x).argmax(1)

    x, _ = spec.data(torch.Generator().manual_seed(30_000 + seed), 256, dtype)
    y = labels(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return labels


def methods_of(architecture: str) -> list[tuple[str, str, int]]:
    """The rows of the figure for a network: :data:`METHODS` and its rule variants."""
    variants = [(label, "hesscale", 1) for label in ARCHITECTURES[architecture].variants]
    return METHODS[:1] + variants + METHODS[1:]


def run_seed(
    seed: int,
    examples: int,
    dtype=torch.float64,
    architecture: str = "mlp",
    trained: int = 0,
) -> dict:
    """One initialisation: per method, the mean (over examples, or groups of examples) L1
    error, total and per layer (None for a method not defined for the network); after
    ``trained`` steps of training on a teacher's labels when ``trained > 0``."""
    spec = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = spec.make().to(dtype)
    data = torch.Generator().manual_seed(10_000 + seed)
    x, y = spec.data(data, examples * spec.group, dtype)
    if trained:
        y = teach(model, spec, seed, trained, dtype)(x)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    layers = _layers(model)
    reference = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(reference)  # the same train-mode forward
    with _math_attention():
        exact = per_example_exact(reference, loss_fn, x, y, spec.group)

    def errors(est: dict[str, Tensor]) -> dict[str, float]:
        per_layer = {
            layer: float(sum((est[n] - exact[n]).abs().flatten(1).sum(1) for n in names).mean())
            for layer, names in layers
        }
        return {"total": sum(per_layer.values()), "per_layer": per_layer}

    result = {REFERENCE: errors({n: torch.zeros_like(v) for n, v in exact.items()})}
    noise = torch.Generator().manual_seed(20_000 + seed)
    for label, method, samples in methods_of(architecture):
        model.zero_grad(set_to_none=True)
        est = estimate(label, method, samples, model, loss_fn, x, y, noise, spec.group, reference)
        result[label] = None if est is None else errors(est)
    base = result["HesScale"]["total"]
    for entry in result.values():
        if entry is not None:
            entry["normalized"] = entry["total"] / base
    return result


def run(
    out: str | Path = "results/fig1",
    seeds: int = 40,
    examples: int = 1000,
    architecture: str = "mlp",
    trained: int = 0,
) -> dict:
    """Run (or resume) the whole protocol; write ``fig1.json`` and the plots; return the summary.

    On the ResNet each example is a batch of 8 (see the module docstring); ``trained`` steps of
    training come first when positive."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    out = Path(out)
    seed_dir = out / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "seeds": seeds,
        "examples": examples,
        "dtype": "float64",
        "architecture": architecture,
        "trained": trained,
        "group": ARCHITECTURES[architecture].group,
    }
    tag = ("" if architecture == "mlp" else f"{architecture}_") + (
        f"trained{trained}_" if trained else ""
    )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    paths = [seed_dir / f"{tag}seed_{seed:04d}_n{examples}.json" for seed in range(seeds)]
    with progress(total=seeds, desc=f"fig1 ({architecture}) initialisations", unit="init") as bar:
        for seed, path in enumerate(paths):
            if not path.exists():
                errors = run_seed(seed, examples, architecture=architecture, trained=trained)
                atomic_write_json(path, {"seed": seed, "examples": examples, "errors": errors})
            bar.update(1)
    per_seed = [read_json(path, "Fig. 1 seed result")["errors"] for path in paths]
    rows = methods_of(architecture)
    labels = [REFERENCE] + [label for label, _, _ in rows if per_seed[0][label] is not None]
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
    summary["not_defined"] = [label for label, _, _ in rows if per_seed[0][label] is None]
    atomic_write_json(out / "fig1.json", summary)
    plot(summary, out)
    return summary


def table(summary: dict) -> str:
    """Mean normalised error per method, best first, as printed at the end of a run."""
    rows = sorted(summary["methods"].items(), key=lambda kv: kv[1]["mean_normalized"])
    width = max(len(label) for label in [*summary["methods"], *summary.get("not_defined", [])])
    width += 2
    lines = [f"{'method':<{width}}{'mean error / HesScale':>24}{'min':>10}{'max':>10}"]
    for label, entry in rows:
        values = entry["normalized"]
        lines.append(
            f"{label:<{width}}{entry['mean_normalized']:>24.3f}"
            f"{min(values):>10.3f}{max(values):>10.3f}"
        )
    for label in summary.get("not_defined", []):
        lines.append(f"{label:<{width}}{'not defined for this network':>44}")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``fig1a.png`` (a dot per initialisation per method, log scale) and ``fig1b.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    architecture = summary["config"].get("architecture", "mlp")
    labels = [label for label, _, _ in methods_of(architecture) if label in methods] + [REFERENCE]
    trained = summary["config"].get("trained", 0)
    regime = f"after {trained} steps of Adam" if trained else "at initialization"
    unit = "batch of 8" if summary["config"].get("group", 1) > 1 else "example"
    seeds = len(methods["HesScale"]["normalized"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, label in enumerate(labels):
        values = methods[label]["normalized"]
        jitter = [(k - seeds / 2) / (seeds * 3) for k in range(seeds)]
        dots = ax.scatter(
            [i + j for j in jitter],
            values,
            c=list(range(seeds)),
            cmap="viridis",
            vmin=0,
            vmax=max(seeds - 1, 1),
            s=12,
            zorder=3,
        )
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("normalized L1 error (HesScale = 1)")
    missing = summary.get("not_defined", [])
    ax.set_title(
        f"Hessian-diagonal approximation error, {architecture} network {regime}, "
        f"{seeds} initializations, error per {unit}"
        + (f"\n(not defined here: {', '.join(missing)})" if missing else "")
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    bar = fig.colorbar(dots, ax=ax, pad=0.01)
    bar.set_label("initialization (seed); one dot per method and seed")
    fig.tight_layout()
    fig.savefig(out / "fig1a.png", dpi=130)
    plt.close(fig)

    layer_names = list(methods["HesScale"]["per_layer"])
    floor = 1e-8  # errors at machine precision (exact last layers) are drawn at this floor
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / len(labels)
    # distinct hues; the 1- and 50-sample versions of a stochastic method share a hue and differ
    # by hatching, so that no two neighbours are a light/dark pair of one colour
    hues = [c for i, c in enumerate(plt.cm.tab10.colors) if i != 7]  # grey: the reference
    family = {}
    for label in labels:
        base = label.split("-MC")[0]
        family.setdefault(base, len(family))
    exact_drawn = False
    for i, label in enumerate(labels):
        base = label.split("-MC")[0]
        means = [sum(methods[label]["per_layer"][layer]) / seeds for layer in layer_names]
        xs = [k + (i - len(labels) / 2 + 0.5) * width for k in range(len(layer_names))]
        ax.bar(
            xs,
            [max(m, floor) for m in means],
            width,
            label=label,
            color=hues[family[base] % len(hues)] if label != REFERENCE else "0.85",
            hatch="//" if label.endswith("MC1") else (".." if label == REFERENCE else None),
            edgecolor="white" if label.endswith("MC1") else ("0.5" if label == REFERENCE else None),
        )
        for x, m in zip(xs, means):
            if m < 10 * floor:  # exact up to rounding: say so instead of an invisible bar
                ax.text(x, floor * 1.6, "0", ha="center", va="bottom", fontsize=8, weight="bold")
                exact_drawn = True
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    if architecture == "mlp":
        ticks = [
            f"layer {k + 1}" + (" (output)" if k == len(layer_names) - 1 else "")
            for k in range(len(layer_names))
        ]
    else:
        ticks = layer_names
    ax.set_xticks(range(len(layer_names)), ticks)
    ax.set_ylabel("mean L1 error per example")
    notes = []
    if exact_drawn:
        notes.append("'0': exact up to rounding, drawn at the axis floor")
    if any("MC1" in lb for lb in labels):
        notes.append("hatched: 1 Monte-Carlo sample, plain: 50")
    ax.set_title(
        f"Layer-wise error, {architecture} network {regime}, mean over initializations"
        + ("\n(" + "; ".join(notes) + ")" if notes else ""),
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "fig1b.png", dpi=130)
    plt.close(fig)


__all__ = [
    "ARCHITECTURES",
    "METHODS",
    "REFERENCE",
    "VARIANTS",
    "methods_of",
    "plot",
    "run",
    "run_seed",
    "table",
]
