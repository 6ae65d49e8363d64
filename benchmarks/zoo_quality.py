"""Fig. 1's question on four zoo architectures at reduced width: how far is each method from the
exact Hessian diagonal? torchvision's own ConvNeXt, EfficientNet (train-mode BatchNorm, each
example a batch of 8) and Swin Transformer classes, and an LSTM classifier, a few thousand
parameters each (``hesscale reproduce fig1 --architecture convnext|efficientnet|swin|lstm``);
the mean L1 error over all layers relative to HesScale's, and relative to ``Σ|diag(H)|``,
one row per method and a column per network (``results/zoo_quality.md``). Runs resume.

    python benchmarks/zoo_quality.py [--seeds 3] [--examples 100] [--out results]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ARCHITECTURES = ("convnext", "efficientnet", "swin", "lstm")


def _make_torchvision_importable() -> None:
    """benchmarks/zoo.py's workaround for this machine's CUDA-built torchvision wheel."""
    path = Path(__file__).resolve().parent / "zoo.py"
    spec = importlib.util.spec_from_file_location("benchmark_zoo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.import_zoos()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--out", default="results")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args(argv)
    _make_torchvision_importable()
    from hesscale.experiments import fig1

    summaries = {}
    for name in args.architectures:
        summaries[name] = fig1.run(
            Path(args.out) / f"fig1-{name}",
            seeds=args.seeds,
            examples=args.examples,
            architecture=name,
        )
    labels = []
    for summary in summaries.values():
        labels += [label for label in summary["methods"] if label not in labels]
    lines = [
        f"Mean L1 error over all layers relative to HesScale's ({args.seeds} initialisations × "
        f"{args.examples} examples, float64; in brackets relative to Σ|diag(H)|)",
        "",
        "| method | " + " | ".join(summaries) + " |",
        "|---|" + "---|" * len(summaries),
    ]
    for label in labels:
        cells = []
        for summary in summaries.values():
            entry = summary["methods"].get(label)
            if entry is None:
                cells.append("refused" if label in summary.get("not_defined", []) else "–")
                continue
            reference = sum(summary["methods"][fig1.REFERENCE]["total"])
            relative = sum(entry["total"]) / reference
            cells.append(f"{entry['mean_normalized']:.3f} ({relative:.3f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) / "zoo_quality.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
