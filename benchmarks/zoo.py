"""Every classification model of torchvision and timm that is installed: does HesScale run on it?

Each model at random initialization, in train mode, on a batch of ``--batch`` random images of
``--size`` pixels (or, if the model does not run at that size, of its own default size):
``hesscale.diagonal`` with HesScale and HesScaleGN. Per model: the status (``runs``,
``refused`` with the operation the engine named, or ``skipped`` where the model itself does not
run), the classifier's largest relative error against its exact Hessian diagonal where the
classifier is the model's last layer (for the mean cross-entropy of logits ``z = W h + b``,
``diag ∇²_W = (1/N) Σ_n p_n (1 − p_n) h_n²``, exact for HesScale), whether any estimate is not
finite, and the time of the estimate over a plain forward+backward. torchvision: its 80-odd
classification models up to ``--max-params``; timm: the model with the fewest parameters of each
of its modules (families). One JSON per model (written atomically; a rerun resumes),
``zoo.json`` and the table ``zoo.md``.

    python benchmarks/zoo.py [--zoos torchvision timm] [--size 64] [--batch 2]
        [--out results/zoo] [--models resnet18 convnext_tiny ...] [--max-params 150e6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch
from torch import nn

import hesscale
from hesscale.experiments.io import environment_record

METHODS = ("hesscale", "hesscale_gn")


def import_torchvision():
    """``torchvision``, or None where it is not installed.

    The torchvision wheel that keeps this project's CPU torch (0.28.0, which pins torch 2.13.0)
    ships operators compiled for CUDA; importing it on the CPU build fails while registering
    them in ``torchvision._meta_registrations`` ("operator torchvision::nms does not exist").
    The models are plain Python and need none of those operators, so that one module is
    replaced by an empty one before the import. A workaround for the benchmarks and the tests'
    fixtures only, never for the library. timm and laplace-torch import torchvision, so they
    need the same.
    """
    try:
        import torchvision
    except RuntimeError:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        import torchvision
    except ImportError:
        return None
    return torchvision


def import_zoos():
    """``(torchvision.models, timm)`` (None for what is not installed; see
    :func:`import_torchvision`)."""
    torchvision = import_torchvision()
    try:
        import timm
    except ImportError:
        timm = None
    return (torchvision.models if torchvision is not None else None), timm


def catalogue(zoos, models_of, timm, max_params: float, only=None) -> list[tuple[str, str]]:
    """``[(zoo, model name)]`` to try."""
    entries = []
    if "torchvision" in zoos and models_of is not None:
        for name in sorted(models_of.list_models(module=models_of)):
            entries.append(("torchvision", name))
    if "timm" in zoos and timm is not None:
        for module in sorted(timm.list_modules()):
            names = timm.list_models(module=module)
            if names:
                entries.append(("timm", _smallest(timm, names)))
    if only:
        entries = [e for e in entries if e[1] in only]
    return entries


def _smallest(timm, names: list[str]) -> str:
    """The model of a family with the fewest parameters (counted on the meta device)."""
    sizes = {}
    for name in names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            sizes[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # a model that does not build here
            continue
    return min(sizes, key=sizes.get) if sizes else names[0]


# models whose auxiliary classifiers make their train-mode output a tuple: built without them
_NO_AUX = {"googlenet", "inception_v3"}


def build(zoo: str, name: str, models_of, timm) -> tuple[nn.Module, int]:
    """The model at random initialization and its default image size."""
    if zoo == "torchvision":
        options = {"aux_logits": False, "init_weights": True} if name in _NO_AUX else {}
        model = models_of.get_model(name, weights=None, **options)
        size = 299 if name == "inception_v3" else 224
        return model, size
    model = timm.create_model(name, pretrained=False)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, size


class HeadProbe:
    """Records, during one forward pass, every Linear layer's input and output and the model's
    output; :meth:`head` is the Linear layer whose output the model returns (possibly through
    a view), with its 2-D input, or None (a model whose last operation is something else)."""

    def __init__(self, model: nn.Module):
        self.model, self.calls, self.output, self.handles = model, [], None, []

    def __enter__(self):
        def on_linear(module, args, output):
            self.calls.append((module, args[0].detach(), output.detach()))

        def on_model(module, args, output):
            self.output = output.detach() if isinstance(output, torch.Tensor) else None

        self.handles = [
            m.register_forward_hook(on_linear)
            for m in self.model.modules()
            if isinstance(m, nn.Linear)
        ]
        self.handles.append(self.model.register_forward_hook(on_model))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False

    def head(self):
        out = self.output
        if out is None:
            return None
        for module, h, z in self.calls:
            if z.data_ptr() == out.data_ptr() and z.numel() == out.numel() and h.dim() == 2:
                return module, h, out
        return None


def exact_head_diagonal(h: torch.Tensor, logits: torch.Tensor, bias: bool) -> dict:
    """The mean cross-entropy's exact Hessian diagonal for ``z = W h + b`` (any targets)."""
    p = logits.double().softmax(-1)
    curvature = p * (1 - p) / len(h)  # (N, C)
    diagonal = {"weight": curvature.T @ h.double().square()}
    if bias:
        diagonal["bias"] = curvature.sum(0)
    return diagonal


def _time(fn, repeats: int = 2) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(zoo: str, name: str, args, models_of, timm) -> dict:
    record = {"zoo": zoo, "model": name}
    torch.manual_seed(0)
    try:
        model, native = build(zoo, name, models_of, timm)
    except Exception as error:  # the model does not build here
        return {**record, "status": "skipped", "reason": f"build: {error}"[:300]}
    params = sum(p.numel() for p in model.parameters())
    record["params"] = params
    if params > args.max_params:
        return {**record, "status": "skipped", "reason": f"{params / 1e6:.0f}M parameters"}
    model.train()
    x = None
    for size in dict.fromkeys((args.size, native)):
        candidate = torch.randn(args.batch, 3, size, size)
        try:
            with torch.no_grad():
                out = model(candidate)
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                x, record["size"] = candidate, size
                break
        except Exception as error:  # the model does not run at this size
            record["reason"] = f"forward at {size}: {error}"[:300]
    if x is None:
        return {**record, "status": "skipped"}
    record.pop("reason", None)
    y = torch.randint(0, out.shape[1], (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    plain = _time(lambda: loss_fn(model(x), y).backward())
    record["status"] = "runs"
    for method in METHODS:
        try:
            model.zero_grad(set_to_none=True)
            with HeadProbe(model) as probe:  # the head's input of this very forward pass
                _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
            seconds = _time(lambda: hesscale.diagonal(model, loss_fn, x, y, method=method), 1)
        except hesscale.UnsupportedModuleError as error:
            text = str(error)
            record["status"] = "refused"
            record["operation"] = text.split(" ")[0].strip("'")
            record["message"] = text[:400]
            return record
        except Exception as error:
            record["status"] = "error"
            record["message"] = "".join(traceback.format_exception_only(error))[:400]
            return record
        record[f"{method}_finite"] = all(torch.isfinite(v).all().item() for v in estimate.values())
        record[f"{method}_time_ratio"] = seconds / plain
        if method == "hesscale":
            head = probe.head()
            if head is not None:
                module, h, logits = head
                exact = exact_head_diagonal(h, logits, module.bias is not None)
                names = {id(p): n for n, p in model.named_parameters()}
                errors = []
                for key, value in exact.items():
                    got = estimate[names[id(getattr(module, key))]].double()
                    errors.append(float((got - value).abs().max() / value.abs().max()))
                record["head_error"] = max(errors)
    return record


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(records: list[dict]) -> str:
    lines = [
        "| zoo | model | params | status | refused operation / reason | head error | "
        "HesScale time | HesScaleGN time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        why = r.get("operation") or r.get("reason") or ""
        head = f"{r['head_error']:.1e}" if r.get("head_error") is not None else ""
        times = [r.get(f"{m}_time_ratio") for m in ("hesscale", "hesscale_gn")]
        times = [f"{t:.2f}x" if t is not None else "" for t in times]
        lines.append(
            f"| {r['zoo']} | {r['model']} | {r.get('params', 0) / 1e6:.1f}M | {r['status']} | "
            f"{why[:60]} | {head} | {times[0]} | {times[1]} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoos", nargs="+", default=["torchvision", "timm"])
    parser.add_argument("--models", nargs="*", default=None, help="only these models")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--out", default="results/zoo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    models_of, timm = import_zoos()
    entries = catalogue(args.zoos, models_of, timm, args.max_params, args.models)
    records = []
    for i, (zoo, name) in enumerate(entries):
        path = out / "models" / f"{zoo}__{name}.json"
        if path.exists():
            record = json.loads(path.read_text())
        else:
            print(f"[{i + 1}/{len(entries)}] {zoo} {name} ...", flush=True)
            record = measure(zoo, name, args, models_of, timm)
            _atomic(path, json.dumps(record, indent=1))
        records.append(record)
    counts = {}
    for r in records:
        key = f"{r['zoo']} {r['status']}"
        counts[key] = counts.get(key, 0) + 1
    refused = {}
    for r in records:
        if r["status"] == "refused":
            refused.setdefault(r["operation"], []).append(f"{r['zoo']}:{r['model']}")
    summary = {
        "environment": environment_record(),
        "arguments": vars(args),
        "counts": counts,
        "refused_operations": refused,
        "models": records,
    }
    _atomic(out / "zoo.json", json.dumps(summary, indent=1))
    _atomic(out / "zoo.md", table(records) + "\n")
    print(json.dumps(counts, indent=1))
    for operation, models in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        more = " …" if len(models) > 6 else ""
        print(f"  {operation}: {len(models)} ({', '.join(models[:6])}{more})")
    return summary


if __name__ == "__main__":
    main()
