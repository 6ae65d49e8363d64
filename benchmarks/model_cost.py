"""What HesScale costs on the models people train, measured side by side in one run.

For ResNet-18 at CIFAR size (32×32×3 images, train-mode BatchNorm) and a GPT-2-small-shaped
language model (124M parameters: 12 layers, width 768, 12 heads, 50,257 tokens, tied output
layer), or GPT-2 small itself from Hugging Face ``transformers`` (``--model hf-gpt2``):

* the estimate (forward + backward with HesScale or HesScaleGN requested) over a plain forward +
  backward of the same model;
* a training step (zero_grad, forward, backward, update) of AdaHesScale, AdaHesScaleGN and
  AdaHessian over an AdamW step;
* the peak memory of each, over the plain forward + backward's (the model's parameters, what
  the optimizer and the engine keep between steps, and the peak allocated during a warm step).

Rounds are interleaved (a fresh random order each round) and medians reported. The optimizers
run with a tiny step size (1e-6) and without the guard: the update's arithmetic does not depend
on the step size, and random data must not end a timing run. AdaHessian differentiates twice,
which PyTorch's fused CPU attention kernel does not support: its steps run attention's math
kernel. ``--settings`` times the rule variants too (the per-layer BatchNorm rule, exact
attention queries).

    python benchmarks/model_cost.py [--models resnet18 gpt2] [--batch 128 --context 256]
                                    [--rounds 3] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.experiments.networks import GPT, ResNet18
from hesscale.experiments.timing import interleaved_times, peak_memory
from hesscale.optim import AdaHesScale, AdaHesScaleGN, AdaHessian
from hesscale.rules import Settings
from hesscale.rules._registry import scratch_buffers

MODELS = ("resnet18", "gpt2", "hf-gpt2")
DEFAULT_BATCH = {"resnet18": 128, "gpt2": 2, "hf-gpt2": 2}


def build(name: str, context: int):
    """``(model, inputs, targets, loss_fn)`` of one benchmark model."""
    if name == "resnet18":
        model = ResNet18()
        return model, (lambda b: torch.randn(b, 3, 32, 32)), 10, nn.CrossEntropyLoss()
    if name == "gpt2":
        model = GPT(vocab=50257, width=768, context=context, heads=12, layers=12, gpt2_init=True)
        return model, (lambda b: torch.randint(0, 50257, (b, context))), 50257, None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_positions=max(context, 1024))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(config)
    return model, (lambda b: torch.randint(0, 50257, (b, context))), 50257, None


def kept(model: nn.Module, opt=None, engine: bool = True) -> int:
    """Bytes that live between steps: the parameters, the optimizer's state and, where the
    engine ran, the estimates and its buffers (distinct storages)."""
    tensors = list(model.parameters())
    state = model._hesscale_state
    if engine:
        tensors += [p.hess_diag for p in model.parameters() if hasattr(p, "hess_diag")]
        tensors += [t for ws in state.workspaces.values() for t in ws.values()]
        tensors += scratch_buffers(state.scratch)
    if opt is not None:
        tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "gpt2"], choices=MODELS)
    parser.add_argument("--batch", type=int, default=None, help="default: 128 images, 2 sequences")
    parser.add_argument("--context", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after a warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", action="store_true", help="also time the rule variants")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    rows = []
    for name in args.models:
        rows.append(measure(name, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    base, make_inputs, classes, loss_fn = build(name, args.context)
    base = base.to(args.device)
    batch = args.batch or DEFAULT_BATCH[name]
    x = make_inputs(batch).to(args.device)
    if name == "resnet18":
        y = torch.randint(0, classes, (batch,), device=args.device)
    else:
        y = torch.randint(0, classes, x.shape, device=args.device)

    # on GPUs PyTorch runs attention kernels that have no rule yet: every run of the language
    # models uses attention's math kernel there (whose products and softmax have rules)
    math_attention = args.device.startswith("cuda") and name != "resnet18"
    if math_attention:
        print(f"{name}: attention's math kernel on {args.device} (no rule for its GPU kernels)")

    def loss_of(model):
        with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            if name == "hf-gpt2":
                return model(x, labels=x).loss
            out = model(x)
            return loss_fn(out, y) if loss_fn is not None else nn.functional.cross_entropy(out, y)

    variants = {"": {}}
    if args.settings:
        variants[", per-layer BN" if name == "resnet18" else ", exact attention"] = (
            {"batch_norm": "per-layer"} if name == "resnet18" else {"attention": "exact"}
        )
    # one model for every run (a GPT-2-sized model and four optimizers' states fill 24 GB when
    # copied); a run chooses the rule variant and the estimate it asks for
    model = hesscale.extend(base)
    defaults = dataclasses.asdict(Settings())

    def forward_backward(method=None, settings=None):
        def run():
            hesscale.extend(model, **{**defaults, **(settings or {})})
            hesscale.request(model.parameters(), method)
            model.zero_grad(set_to_none=True)
            loss_of(model).backward()
            hesscale.request(model.parameters(), None)

        return run

    def training_step(cls, settings=None, create_graph=False):
        options = {} if cls is torch.optim.AdamW else {"guard": False}
        opt = cls(model.parameters(), lr=1e-6, **options)
        method = getattr(opt, "method", None)
        hesscale.request(model.parameters(), None)

        def run():
            hesscale.extend(model, **{**defaults, **(settings or {})})
            hesscale.request(model.parameters(), method)
            opt.zero_grad(set_to_none=True)
            # AdaHessian differentiates twice: PyTorch's fused CPU attention kernel has no
            # second derivative, its math kernel has
            with sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext():
                loss_of(model).backward(create_graph=create_graph)
                opt.step()
            hesscale.request(model.parameters(), None)

        return run, opt

    fns = {"forward+backward": forward_backward()}
    owners = {"forward+backward": None}
    for label, settings in variants.items():
        for method, title in (("hesscale", "HesScale"), ("hesscale_gn", "HesScaleGN")):
            fns[f"estimate {title}{label}"] = forward_backward(method, settings)
            owners[f"estimate {title}{label}"] = None
    steps = {"AdamW": (torch.optim.AdamW, None, False)}
    for label, settings in variants.items():
        steps[f"AdaHesScale{label}"] = (AdaHesScale, settings, False)
        steps[f"AdaHesScaleGN{label}"] = (AdaHesScaleGN, settings, False)
    steps["AdaHessian"] = (AdaHessian, None, True)
    for label, (cls, settings, create_graph) in steps.items():
        fns[f"step {label}"], owners[f"step {label}"] = training_step(cls, settings, create_graph)
    times = interleaved_times(fns, rounds=args.rounds, warmup=1, device=args.device)
    memory = {}
    for label, fn in fns.items():
        engine = label.startswith("estimate") or label.startswith("step AdaHesScale")
        memory[label] = peak_memory(fn, args.device) + kept(model, owners[label], engine)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name}: {n / 1e6:.1f}M parameters, batch {batch}"
        + ("" if name == "resnet18" else f" × {args.context} tokens")
        + f", {args.device}"
    )
    print(f"{'':34}{'median':>11}{'ratio':>8}{'peak memory':>14}{'ratio':>8}")
    row = {"model": name, "params": n, "batch": batch, "context": args.context, "runs": {}}
    for label, stat in times.items():
        reference = "step AdamW" if label.startswith("step ") else "forward+backward"
        ratio = stat["median"] / times[reference]["median"]
        total, total_ref = memory[label], memory[reference]
        print(
            f"{label:<34}{1000 * stat['median']:>9.0f}ms{ratio:>7.2f}x"
            f"{total / 2**20:>12.0f}MB{total / total_ref:>7.2f}x"
        )
        row["runs"][label] = {
            "seconds": stat["median"],
            "time_ratio": ratio,
            "peak_bytes": total,
            "memory_ratio": total / total_ref,
        }
    return row


if __name__ == "__main__":
    main()
