"""What HesScale costs on a GPT-2-small (124M parameters, Hugging Face ``transformers``), measured
side by side in one run, rounds interleaved:

* the estimate (forward + backward with HesScale requested) over a plain forward + backward;
* an AdaHesScale / AdaHesScaleGN training step (with the step-size scaling ``delta=0.5``) over
  an AdamW step (zero_grad, forward of the model's own loss, backward, update).

    python benchmarks/hf_cost.py [--context 128] [--batch 2] [--rounds 5] [--device cuda]
    python benchmarks/hf_cost.py --config tiny     # a 2-layer width-64 model, a quick check

Needs ``pip install -e ".[hf]"``. Prints medians and their ratios; on a noisy machine, run it
twice before believing a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import hesscale
from hesscale.optim import AdaHesScale, AdaHesScaleGN


def build(config: str, context: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if config == "small":  # GPT-2 small: 12 layers, width 768, 12 heads, 50257 tokens, tied
        cfg = transformers.GPT2Config(n_positions=max(context, 1024))
    else:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=context)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return transformers.GPT2LMHeadModel(cfg)


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["small", "tiny"], default="small")
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (after one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = hesscale.extend(build(args.config, args.context).to(args.device))
    params = list(model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=args.device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    def estimate():
        hesscale.request(params, "hesscale")
        forward_backward()
        hesscale.request(params, None)

    optimizers = {
        "AdamW": torch.optim.AdamW(params, lr=1e-4),
        # with the step-size scaling: plain AdaHesScale at lr 1e-4 steps rare tokens' embeddings
        # by lr·g/eps (their curvature is ~1e-9) and blows the weights up within a few steps
        "AdaHesScale": AdaHesScale(params, lr=1e-4, delta=0.5),
        "AdaHesScaleGN": AdaHesScaleGN(params, lr=1e-4, delta=0.5),
    }

    def step(name):
        opt = optimizers[name]
        if name != "AdamW":
            hesscale.request(params, opt.method)

        def run():
            opt.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
            opt.step()

        seconds = _timed(run, args.device)
        hesscale.request(params, None)
        return seconds

    n = sum(p.numel() for p in params)
    print(
        f"GPT-2 {args.config}: {n / 1e6:.1f}M parameters, batch {args.batch} × {args.context} "
        f"tokens, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    times = {k: [] for k in ("forward+backward", "estimate", *optimizers)}
    for r in range(args.rounds + 1):  # the first round warms up and is not counted
        measured = {
            "forward+backward": _timed(forward_backward, args.device),
            "estimate": _timed(estimate, args.device),
        }
        for name in optimizers:
            measured[name] = step(name)
        if r > 0:
            for k, v in measured.items():
                times[k].append(v)
    median = {k: statistics.median(v) for k, v in times.items()}
    for k, v in median.items():
        print(f"  {k:<18}{1000 * v:>10.1f} ms (median of {args.rounds})")
    print(
        f"estimate / plain forward+backward: {median['estimate'] / median['forward+backward']:.2f}"
    )
    for name in ("AdaHesScale", "AdaHesScaleGN"):
        print(f"{name} step / AdamW step: {median[name] / median['AdamW']:.2f}")


if __name__ == "__main__":
    main()
