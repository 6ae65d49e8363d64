"""Hugging Face ``transformers`` models, unmodified: tiny configurations with random weights
(no download) and the quality of every estimator on them against exact Hessian diagonals.

The models are used as their authors wrote them; hesscale only sees their autograd graph.
:class:`Logits` returns a model's logits as one tensor (flattened over positions for language
models) so that the estimators that take ``loss_fn(model(x), y)`` — the exact references,
GGN, Hutchinson, g² — and the engine see the same function. :func:`quality` is Fig. 1's
question for these models: the L1 error of each method over all parameters, relative to
``Σ|diag(H)|``, with the exact diagonals from ``torch.func`` in float64 (PyTorch's math
attention kernel, which can be differentiated twice).

Needs the optional extra ``pip install hesscale[hf]``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

VOCAB = 11
MODELS = ("gpt2", "llama", "bert", "vit")
ATTENTION = ("sdpa", "eager")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "the Hugging Face models need transformers: pip install 'hesscale[hf]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


def tiny_model(
    name: str,
    attention: str = "sdpa",
    layers: int = 2,
    tied: bool = False,
    width: int = 8,
    vocabulary: int = VOCAB,
    context: int = 16,
):
    """A model of family ``name`` (:data:`MODELS`) with random weights, dropout 0, in train
    mode: by default 1–2k parameters (``layers`` blocks of width 8, ``max(2, width // 16)``
    heads, MLPs of width ``2·width``).

    ``tied``: GPT-2 with its input and output embeddings tied (GPT-2's default); Llama has
    grouped-query attention (half as many key/value heads as query heads).
    """
    t = _transformers()
    heads = max(2, width // 16)
    common = {"attn_implementation": attention}
    if name == "gpt2":
        config = t.GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_inner=2 * width,
            vocab_size=vocabulary,
            n_positions=context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tied,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
        model = t.GPT2LMHeadModel(config)
    elif name == "llama":
        config = t.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            vocab_size=vocabulary,
            max_position_embeddings=context,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **common,
        )
        model = t.LlamaForCausalLM(config)
    elif name == "bert":
        config = t.BertConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=heads,
            vocab_size=vocabulary,
            max_position_embeddings=context,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
            pad_token_id=0,
            **common,
        )
        model = t.BertForSequenceClassification(config)
    elif name == "vit":
        config = t.ViTConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=heads,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
        model = t.ViTForImageClassification(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return model.train()


def checkpointing_argument(transformers, enabled: bool = True) -> dict:
    """``TrainingArguments``' switch of activation checkpointing under this version's name
    (``activation_checkpointing`` since transformers 5, ``gradient_checkpointing`` before)."""
    fields = transformers.TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else None
    return {name or "gradient_checkpointing": enabled}


def batch(name: str, generator: torch.Generator, size: int = 2, length: int = 6):
    """Inputs and targets of ``name``: token ids (targets the ids themselves for language
    models, 3 classes for BERT) or 8×8 RGB images (ViT, 3 classes)."""
    if name == "vit":
        x = torch.randn(size, 3, 8, 8, generator=generator, dtype=torch.float64)
    else:
        x = torch.randint(0, VOCAB, (size, length), generator=generator)
    if name in ("gpt2", "llama"):
        return x, x.flatten()
    return x, torch.randint(0, 3, (size,), generator=generator)


class Logits(nn.Module):
    """``model(x).logits`` as one tensor, ``(N·T, V)`` for language models."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x, **self.kwargs).logits
        return logits.flatten(0, 1) if logits.dim() == 3 else logits


# (label, method, samples), in the order of Fig. 1
METHODS: list[tuple[str, str, int]] = [
    ("HesScale", "hesscale", 1),
    ("HesScaleGN", "hesscale_gn", 1),
    ("GGN-MC1", "ggn_mc", 1),
    ("AdaHessian-MC1", "hutchinson", 1),
    ("AdaHessian-MC50", "hutchinson", 50),
    ("g²", "grad_sq", 1),
]


def _error(estimate: dict, truth: dict) -> float:
    total = sum(t.abs().sum() for t in truth.values())
    return float(sum((estimate[n] - truth[n]).abs().sum() for n in truth) / total)


def quality(
    name: str, attention: str = "sdpa", seed: int = 0, layers: int = 2, device: str = "cpu"
) -> dict:
    """Each method's L1 error over all parameters relative to ``Σ|diag(H)|`` (and, for the
    Gauss-Newton methods, to ``Σ|diag(G)|``); ``None`` where the engine refuses the method,
    with the reason. Also ``head_exact``: HesScale's largest relative error on the output
    layer, which the paper's rule makes exact when that layer is the model's last."""
    torch.manual_seed(seed)
    model = Logits(tiny_model(name, attention, layers)).double().to(device)
    x, y = (t.to(device) for t in batch(name, torch.Generator().manual_seed(seed)))
    loss_fn = nn.CrossEntropyLoss()
    with sdpa_kernel(SDPBackend.MATH):
        exact = exact_hessian_diagonal(model, loss_fn, x, y)
        ggn = ggn_diagonal(model, loss_fn, x, y)
    result: dict = {"parameters": sum(p.numel() for p in model.parameters()), "refused": {}}
    for label, method, samples in METHODS:
        gen = torch.Generator(device).manual_seed(seed)
        reference = (
            sdpa_kernel(SDPBackend.MATH) if method == "hutchinson" else contextlib.nullcontext()
        )
        try:
            with reference:
                _, estimate = hesscale.diagonal(
                    model, loss_fn, x, y, method, samples=samples, generator=gen
                )
        except hesscale.UnsupportedModuleError as error:
            result[label] = None
            result["refused"][label] = str(error).splitlines()[0]
            continue
        result[label] = _error(estimate, exact)
        if method in ("hesscale_gn", "ggn_mc"):
            result[f"{label} vs diag(G)"] = _error(estimate, ggn)
        if method == "hesscale":
            heads = [n for n in exact if n.startswith(("model.lm_head", "model.classifier"))]
            result["head_exact"] = max(
                float((estimate[n] - exact[n]).abs().max() / exact[n].abs().max()) for n in heads
            )
    result["diag(G)"] = _error(ggn, exact)
    return result


def table(results: dict[str, dict]) -> str:
    """One row per model, one column per method: error relative to Σ|diag(H)|."""
    labels = [label for label, _, _ in METHODS] + ["diag(G)"]
    lines = [f"{'model':<14}{'params':>7}" + "".join(f"{label:>17}" for label in labels)]
    for model, row in results.items():
        cells = "".join(
            f"{'refused':>17}" if row.get(label) is None else f"{row[label]:>17.3f}"
            for label in labels
        )
        lines.append(f"{model:<14}{row['parameters']:>7}{cells}")
    return "\n".join(lines)
