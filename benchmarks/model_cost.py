"""What HesScale costs on the models people train, measured side by side in one run.

Models: ResNet-18 at CIFAR size (32×32×3, train-mode BatchNorm), a GPT-2-small-shaped language
model (124M parameters: 12 layers, width 768, 12 heads, 50,257 tokens, tied output layer) or
GPT-2 small itself from Hugging Face ``transformers`` (``hf-gpt2``), and torchvision's ResNet-50
and ViT-B/16 at ImageNet size (224×224×3, 1000 classes). For each:

* the estimate (forward + backward with HesScale or HesScaleGN requested) over a plain forward +
  backward of the same model;
* a training step (zero_grad, forward, backward, update) of AdaHesScale and AdaHesScaleGN (at
  each ``--update-every``: the mean step over that many steps, one of which computes the
  estimate) and of AdaHessian, over an AdamW step (``fused=True`` on a GPU);
* with ``--curvlinops``, one GGN-vector and one Hessian-vector product of curvlinops (the
  curvature library whose products are the usual yardstick), on the same model and batch;
* the peak memory of each, over the plain forward + backward's (the model's parameters, what
  the optimizer and the engine keep between steps, and the peak allocated during a warm step).

Rounds are interleaved (a fresh random order each round) and medians reported. The optimizers
run with a tiny step size (1e-6): the update's arithmetic does not depend on the step size, and
random data must not end a timing run (the guard stays on only in the out-of-the-box
configuration, ``--clip-scale``: clipping, the step-size scaling and the guard). AdaHessian and
curvlinops differentiate twice, which PyTorch's fused attention kernels do not support: their
runs use attention's math kernel (so does a second plain forward+backward, their reference).
``--settings`` times the rule variants too (the per-layer BatchNorm rule, exact attention
queries). ``--autocast bf16`` runs every forward pass under ``torch.autocast`` (the backward
outside it, as PyTorch recommends); ``--precision`` then also reports how far the estimate
under autocast is from the float32 model's.

    python benchmarks/model_cost.py [--models resnet18 gpt2] [--batch 128 --context 256]
        [--rounds 3] [--device cuda] [--autocast bf16] [--attention flash] [--channels-last]
        [--update-every 1 10] [--clip-scale] [--curvlinops] [--precision] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.experiments.io import environment_record
from hesscale.experiments.networks import GPT, ResNet18
from hesscale.experiments.timing import interleaved_times, peak_memory
from hesscale.optim import AdaHesScale, AdaHesScaleGN, AdaHessian
from hesscale.optim.optimizers import SCALED_DELTA
from hesscale.rules import Settings
from hesscale.rules._registry import scratch_buffers

MODELS = ("resnet18", "resnet50", "vit_b_16", "gpt2", "hf-gpt2")
DEFAULT_BATCH = {"resnet18": 128, "resnet50": 128, "vit_b_16": 128, "gpt2": 2, "hf-gpt2": 2}
BACKENDS = {
    "auto": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
LANGUAGE = ("gpt2", "hf-gpt2")


def _torchvision_models():
    """``torchvision.models``; where torchvision's compiled operators were built for another
    torch (a CPU torch beside PyPI's CUDA torchvision), they are skipped: the models need none."""
    try:
        import torchvision
    except RuntimeError:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        import torchvision
    return torchvision.models


@dataclasses.dataclass
class Problem:
    """A model, how to make a batch, and its loss (``loss(model, x, y)``)."""

    model: nn.Module
    inputs: Callable[[int], torch.Tensor]
    targets: Callable[[torch.Tensor], torch.Tensor]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (examples, classes)
    flat_targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # matching logits'


def _classifier(model, size: int, classes: int) -> Problem:
    cross_entropy = nn.CrossEntropyLoss()
    return Problem(
        model,
        lambda b: torch.randn(b, 3, size, size),
        lambda x: torch.randint(0, classes, (len(x),)),
        lambda m, x, y: cross_entropy(m(x), y),
        lambda m, x: m(x),
        lambda x, y: y,
    )


def language_problem(model: GPT, vocab: int, context: int) -> Problem:
    """Next-token prediction with one of :class:`GPT`'s models on random tokens."""
    return Problem(
        model,
        lambda b: torch.randint(0, vocab, (b, context)),
        lambda x: torch.randint(0, vocab, x.shape),
        lambda m, x, y: nn.functional.cross_entropy(m(x), y),
        lambda m, x: m(x).transpose(1, 2).reshape(-1, vocab),
        lambda x, y: y.reshape(-1),
    )


def build(name: str, context: int) -> Problem:
    if name == "resnet18":
        return _classifier(ResNet18(), 32, 10)
    if name in ("resnet50", "vit_b_16"):
        return _classifier(getattr(_torchvision_models(), name)(), 224, 1000)

    if name == "gpt2":
        model = GPT(vocab=50257, width=768, context=context, heads=12, layers=12, gpt2_init=True)
        return language_problem(model, 50257, context)

    def tokens(b):
        return torch.randint(0, 50257, (b, context))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_positions=max(context, 1024))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(config)
    return Problem(  # the model's own loss: next-token cross-entropy
        model,
        tokens,
        lambda x: x,
        lambda m, x, y: m(x, labels=y).loss,
        lambda m, x: m(x).logits[:, :-1].reshape(-1, config.vocab_size),
        lambda x, y: y[:, 1:].reshape(-1),
    )


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
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--attention", choices=list(BACKENDS), default="auto")
    parser.add_argument("--channels-last", action="store_true", help="image models' layout")
    parser.add_argument("--update-every", type=int, nargs="+", default=[1])
    parser.add_argument("--clip-scale", action="store_true", help="clipping, scaling, guard on")
    parser.add_argument("--no-adahessian", action="store_true")
    parser.add_argument("--curvlinops", action="store_true", help="time curvlinops' products")
    parser.add_argument("--precision", action="store_true", help="autocast's estimate vs fp32")
    parser.add_argument("--settings", action="store_true", help="also time the rule variants")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device != "cpu" else "")
    )
    rows = []
    for name in args.models:
        rows.append(measure(name, args))
        if args.json:  # after each model: a run cut short keeps what it finished
            _write_json(args.json, rows, args)


def _write_json(path: str, rows: list, args) -> None:
    record = {"environment": environment_record(), "arguments": vars(args), "models": rows}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def measure(name: str, args) -> dict:
    torch.manual_seed(0)
    problem = build(name, args.context)
    device = args.device
    channels_last = args.channels_last and name not in LANGUAGE
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    base = problem.model.to(device, memory_format=memory_format)
    batch = args.batch or DEFAULT_BATCH[name]
    x = problem.inputs(batch).to(device, memory_format=memory_format)
    y = problem.targets(x).to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    device_type = torch.device(device).type

    def kernel(math=False):
        backend = SDPBackend.MATH if math else BACKENDS[args.attention]
        return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

    def forward_loss(model, math=False, low_precision=True):
        enabled = bool(amp) and low_precision
        with kernel(math), torch.autocast(device_type, amp or torch.bfloat16, enabled=enabled):
            return problem.loss(model, x, y)

    variants = {"": {}}
    if args.settings:
        variants[", per-layer BN" if name.startswith("resnet") else ", exact attention"] = (
            {"batch_norm": "per-layer"} if name.startswith("resnet") else {"attention": "exact"}
        )
    # one model for every run (a GPT-2-sized model and four optimizers' states fill 24 GB when
    # copied); a run chooses the rule variant and the estimate it asks for
    model = hesscale.extend(base)
    defaults = dataclasses.asdict(Settings())

    def forward_backward(method=None, settings=None, math=False):
        def run():
            hesscale.extend(model, **{**defaults, **(settings or {})})
            hesscale.request(model.parameters(), method)
            model.zero_grad(set_to_none=True)
            forward_loss(model, math).backward()
            hesscale.request(model.parameters(), None)

        return run

    def training_step(cls, settings=None, create_graph=False, every=1):
        if cls is torch.optim.AdamW:
            opt = cls(model.parameters(), lr=1e-6, fused=device_type == "cuda")
        elif cls is AdaHessian:
            opt = cls(model.parameters(), lr=1e-6, guard=False)
        else:
            options = {"clip": 1.0, "delta": SCALED_DELTA} if args.clip_scale else {"guard": False}
            opt = cls(model.parameters(), lr=1e-6, update_every=every, **options)
        method = getattr(opt, "method", None)
        hesscale.request(model.parameters(), None)

        def run():
            hesscale.extend(model, **{**defaults, **(settings or {})})
            for group in opt.param_groups if method is not None else ():  # its own request
                opt._request(group, opt._wants_estimate(group))
            for _ in range(every):  # the mean step over a cycle of update_every steps
                opt.zero_grad(set_to_none=True)
                forward_loss(model, math=create_graph).backward(create_graph=create_graph)
                opt.step()
            hesscale.request(model.parameters(), None)

        return run, opt, every

    fns = {"forward+backward": forward_backward()}
    owners: dict = {"forward+backward": None}
    per_call = {}
    language = name in LANGUAGE
    if language and (args.curvlinops or not args.no_adahessian):
        fns["forward+backward, math kernel"] = forward_backward(math=True)
    for label, settings in variants.items():
        for method, title in (("hesscale", "HesScale"), ("hesscale_gn", "HesScaleGN")):
            fns[f"estimate {title}{label}"] = forward_backward(method, settings)
    steps = {"AdamW": (torch.optim.AdamW, None, False, 1)}
    for label, settings in variants.items():
        for every in args.update_every:
            suffix = f"{label}, every {every}" if every > 1 else label
            steps[f"AdaHesScale{suffix}"] = (AdaHesScale, settings, False, every)
            steps[f"AdaHesScaleGN{suffix}"] = (AdaHesScaleGN, settings, False, every)
    if not args.no_adahessian:
        steps["AdaHessian"] = (AdaHessian, None, True, 1)
    for label, (cls, settings, create_graph, every) in steps.items():
        run, owner, per_call[f"step {label}"] = training_step(cls, settings, create_graph, every)
        fns[f"step {label}"], owners[f"step {label}"] = run, owner
    notes = {}
    if args.curvlinops:
        products, notes["curvlinops"] = curvlinops_products(problem, model, x, y, amp, device_type)
        fns.update(products)
    times = interleaved_times(fns, rounds=args.rounds, warmup=1, device=device)
    memory = {}
    for label, fn in fns.items():
        engine = label.startswith("estimate") or label.startswith("step AdaHesScale")
        memory[label] = peak_memory(fn, device) + kept(model, owners.get(label), engine)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name}: {n / 1e6:.1f}M parameters, batch {batch}"
        + (f" × {args.context} tokens" if language else "")
        + f", {device}"
        + (f", {args.autocast} autocast" if amp else "")
        + (f", {args.attention} attention" if language else "")
        + (", channels_last" if channels_last else "")
    )
    for key, note in notes.items():
        print(f"({key}: {note})")
    print(f"{'':40}{'median':>11}{'ratio':>8}{'peak memory':>14}{'ratio':>8}")
    row = {
        "model": name,
        "params": n,
        "batch": batch,
        "context": args.context if language else None,
        "autocast": args.autocast,
        "attention": args.attention if language else None,
        "channels_last": channels_last,
        "notes": notes,
        "runs": {},
    }
    for label, stat in times.items():
        reference = "step AdamW" if label.startswith("step ") else "forward+backward"
        seconds = stat["median"] / per_call.get(label, 1)
        ratio = seconds / times[reference]["median"]
        total, total_ref = memory[label], memory[reference]
        print(
            f"{label:<40}{1000 * seconds:>9.1f}ms{ratio:>7.2f}x"
            f"{total / 2**20:>12.0f}MB{total / total_ref:>7.2f}x"
        )
        row["runs"][label] = {
            "seconds": seconds,
            "time_ratio": ratio,
            "reference": reference,
            "peak_bytes": total,
            "memory_ratio": total / total_ref,
        }
    if args.precision and amp:
        row["precision"] = autocast_precision(model, forward_loss)
        print(
            "estimate under autocast vs float32: relative L1 error "
            + ", ".join(f"{k} {v['relative_l1']:.3g}" for k, v in row["precision"].items())
        )
    return row


def curvlinops_products(problem: Problem, model, x, y, amp, device_type):
    """curvlinops' GGN- and Hessian-vector products on the same batch (attention's math
    kernel: they differentiate through it twice); under the run's autocast if it runs there."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs):
            return problem.logits(self.model, inputs)

    logits = Logits()
    params = [p for p in model.parameters() if p.requires_grad]
    targets = problem.flat_targets(x, y)
    vector = [torch.randn_like(p) for p in params]
    products, note = {}, f"math kernel, {'autocast' if amp else 'float32'}"
    for label, cls in (("GGN", GGNLinearOperator), ("Hessian", HessianLinearOperator)):
        operator = cls(
            logits,
            nn.CrossEntropyLoss(),
            params,
            [(x, targets)],
            check_deterministic=False,
            num_data=len(x),
            batch_size_fn=len,
        )

        def product(operator=operator):
            hesscale.request(model.parameters(), None)
            with (
                sdpa_kernel(SDPBackend.MATH),
                torch.autocast(device_type, amp or torch.bfloat16, enabled=bool(amp)),
            ):
                return operator @ vector

        products[f"curvlinops {label}-vector product"] = product
    return products, note


def autocast_precision(model, forward_loss) -> dict:
    """How far the estimate under autocast is from the float32 model's (the same attention
    kernel where it runs in float32, else PyTorch's choice), for HesScale and HesScaleGN:
    ``Σ|ŝ_amp − ŝ_32| / Σ|ŝ_32|`` over all parameters."""
    result = {}
    for method in ("hesscale", "hesscale_gn"):
        estimates = []
        for low_precision in (False, True):
            hesscale.request(model.parameters(), method)
            model.zero_grad(set_to_none=True)
            try:
                loss = forward_loss(model, low_precision=low_precision)
            except RuntimeError:  # a kernel without float32 (flash): one that has it
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                    loss = forward_loss(model, low_precision=low_precision)
            loss.backward()
            hesscale.request(model.parameters(), None)
            estimates.append([p.hess_diag.double() for p in model.parameters()])
        error = sum(float((a - b).abs().sum()) for b, a in zip(*estimates))
        total = sum(float(b.abs().sum()) for b in estimates[0])
        result[method] = {"relative_l1": error / total}
    return result


if __name__ == "__main__":
    main()
