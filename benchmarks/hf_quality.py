"""Every estimator against exact Hessian diagonals on tiny Hugging Face models (GPT-2, Llama,
BERT, ViT; random weights, no download), as Fig. 1 asks it: L1 error over all parameters
relative to Σ|diag(H)|. Needs ``pip install -e ".[hf]"``.

    python benchmarks/hf_quality.py [--attention sdpa|eager] [--seeds 3] [--device cuda]
"""

from __future__ import annotations

import argparse

from hesscale.experiments import huggingface as hf


def _short(refused: dict) -> str:
    return "; ".join(f"{k}: {v.split('. ')[0]}" for k, v in refused.items()) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=hf.ATTENTION, default="sdpa")
    parser.add_argument("--seeds", type=int, default=1, help="initialisations, averaged")
    parser.add_argument("--device", default="cpu", help="where the estimates and truths run")
    args = parser.parse_args()
    results = {}
    for name in hf.MODELS:
        rows = [
            hf.quality(name, args.attention, seed, device=args.device) for seed in range(args.seeds)
        ]
        mean = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, float):
                mean[key] = sum(r[key] for r in rows) / len(rows)
        results[name] = mean
        print(
            f"{name}: output layer exact to {mean['head_exact']:.1e}; HesScaleGN vs diag(G) "
            f"{mean['HesScaleGN vs diag(G)']:.3f}; refused: {mean['refused'] or 'none'}"
        )
    print(f"\nerror relative to Σ|diag(H)| (attention {args.attention}, {args.seeds} seed(s))")
    print(hf.table(results))


if __name__ == "__main__":
    main()
