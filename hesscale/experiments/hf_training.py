"""Character-level GPT-2 and Llama on Shakespeare's plays, trained by ``transformers.Trainer``
with AdamW and with AdaHesScale / AdaHesScaleGN passed in as ``optimizers=(opt, schedule)``.

Protocol: the models of :func:`char_model` (``layers`` blocks of width ``width``, random
initialisation, dropout 0) on windows of ``context`` characters, ``steps`` steps of batches of
``batch`` random training windows (the same windows for every optimizer), a constant step
size; the training loss every 10 steps, the validation loss on 64 windows at the end, and
the median wall time of a training step (forward, backward, update) measured by a Trainer
callback. One JSON per (model, optimizer) in ``runs/`` (atomic, reused), ``hf_training.json``
and ``hf_training.png``. Needs ``pip install hesscale[hf]``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

import hesscale
from hesscale.optim import AdaHesScale, AdaHesScaleGN, UpdateError

from .._progress import progress
from .huggingface import _transformers, checkpointing_argument, tiny_model
from .io import atomic_write_json, environment_record, read_json
from .text import CharCorpus, read_plays

# name -> (optimizer class, its keyword arguments)
OPTIMIZERS = {
    "AdamW": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0}),
    "AdaHesScale": (AdaHesScale, {"lr": 1e-3}),
    "AdaHesScaleGN": (AdaHesScaleGN, {"lr": 1e-3}),
}
MODELS = ("gpt2", "llama")


def char_model(name: str, vocabulary: int, width: int, layers: int, context: int):
    """A character-level GPT-2 (tied embeddings, as GPT-2 has them) or Llama (grouped-query
    attention)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return tiny_model(
        name, "sdpa", layers, tied=True, width=width, vocabulary=vocabulary, context=context
    )


def _step_timer(transformers):
    class StepTimer(transformers.TrainerCallback):
        """Wall time of every optimizer step (forward, backward and update)."""

        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def run_one(
    model_name: str,
    optimizer: str,
    corpus: CharCorpus,
    steps: int,
    batch: int,
    context: int,
    width: int,
    layers: int,
    seed: int,
    scratch: Path,
    accumulate: int = 1,
    checkpointing: bool = False,
    device: str | None = None,
) -> dict:
    """One (model, optimizer) run on ``device`` (default: a GPU if there is one). ``accumulate``
    splits each batch into that many micro-batches (``gradient_accumulation_steps``),
    ``checkpointing`` recomputes each block's activations in the backward pass (the Trainer's
    activation checkpointing)."""
    if batch % accumulate:
        raise ValueError(f"the batch ({batch}) must be a multiple of accumulate ({accumulate})")
    t = _transformers()
    torch.manual_seed(seed)
    model = char_model(model_name, len(corpus.vocabulary), width, layers, context)
    cls, kwargs = OPTIMIZERS[optimizer]
    if cls is not torch.optim.AdamW:
        model = hesscale.extend(model)
    opt = cls(model.parameters(), **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    gen = torch.Generator().manual_seed(seed)
    train = [
        {"input_ids": w, "labels": w} for w in corpus.windows("train", steps * batch, context, gen)
    ]
    valid = [{"input_ids": w, "labels": w} for w in corpus.windows("valid", 64, context, gen)]
    args = t.TrainingArguments(
        output_dir=str(scratch),
        max_steps=steps,
        per_device_train_batch_size=batch // accumulate,
        gradient_accumulation_steps=accumulate,
        **checkpointing_argument(t, checkpointing),
        per_device_eval_batch_size=64,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=device == "cpu" if device is not None else not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=seed,
        dataloader_drop_last=True,
    )
    timer = _step_timer(t)
    trainer = t.Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        optimizers=(opt, schedule),
        callbacks=[timer],
    )
    status = "finished"
    try:
        trainer.train()
    except UpdateError:
        status = "diverged"
    log = [e for e in trainer.state.log_history if "loss" in e and "step" in e]
    valid_loss = trainer.evaluate()["eval_loss"] if status == "finished" else math.nan
    return {
        "status": status,
        "steps": [e["step"] for e in log],
        "train_loss": [e["loss"] for e in log],
        "valid_loss": valid_loss,
        "step_seconds": timer.seconds,
        "median_step_seconds": statistics.median(timer.seconds[5:] or timer.seconds or [0.0]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def run(
    out: str | Path = "results/hf_training",
    models=MODELS,
    optimizers=tuple(OPTIMIZERS),
    steps: int = 300,
    batch: int = 16,
    context: int = 64,
    width: int = 64,
    layers: int = 2,
    seed: int = 0,
    data_dir=None,
    download: bool = False,
    accumulate: int = 1,
    checkpointing: bool = False,
    device: str | None = None,
) -> dict:
    """Run (or resume) every (model, optimizer); write the summary and the plot. ``accumulate``
    and ``checkpointing`` are passed to the Trainer (see :func:`run_one`)."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    corpus = CharCorpus.of(read_plays(data_dir, download))
    tag = f"s{steps}_b{batch}_c{context}_w{width}_l{layers}_seed{seed}"
    tag += (f"_acc{accumulate}" if accumulate > 1 else "") + ("_ckpt" if checkpointing else "")
    runs = {}
    plan = [(m, o) for m in models for o in optimizers]
    with progress(total=len(plan), desc="Shakespeare: model × optimizer", unit="run") as bar:
        for model_name, optimizer in plan:
            path = out / "runs" / f"{model_name}_{optimizer}_{tag}.json"
            if not path.exists():
                result = run_one(
                    model_name,
                    optimizer,
                    corpus,
                    steps,
                    batch,
                    context,
                    width,
                    layers,
                    seed,
                    out / "scratch",
                    accumulate,
                    checkpointing,
                    device,
                )
                atomic_write_json(path, result)
            runs[(model_name, optimizer)] = read_json(path, "training run")
            bar.update()
    for (m, _), r in runs.items():
        base = runs.get((m, "AdamW"))
        if base is not None and base["median_step_seconds"] > 0:
            r["step_time_over_adamw"] = r["median_step_seconds"] / base["median_step_seconds"]
    summary = {
        "config": {
            "steps": steps,
            "batch": batch,
            "context": context,
            "width": width,
            "layers": layers,
            "seed": seed,
            "accumulate": accumulate,
            "checkpointing": checkpointing,
            "vocabulary": len(corpus.vocabulary),
            "optimizers": {k: v[1] for k, v in OPTIMIZERS.items() if k in optimizers},
        },
        "environment": environment_record(),
        "runs": {f"{m}/{o}": r for (m, o), r in runs.items()},
    }
    atomic_write_json(out / "hf_training.json", summary)
    plot(summary, out)
    return summary


def table(summary: dict) -> str:
    lines = [
        f"{'model / optimizer':<24}{'train loss':>12}{'valid loss':>12}{'step (ms)':>11}"
        f"{'/ AdamW':>9}"
    ]
    for key, r in summary["runs"].items():
        train = r["train_loss"][-1] if r["train_loss"] else math.nan
        ratio = r.get("step_time_over_adamw", math.nan)
        lines.append(
            f"{key:<24}{train:>12.3f}{r['valid_loss']:>12.3f}"
            f"{1000 * r['median_step_seconds']:>11.1f}{ratio:>9.2f}"
        )
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """``hf_training.png``: training loss against steps (left) and against wall time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"AdamW": "-", "AdaHesScale": "--", "AdaHesScaleGN": "-."}
    colours = {"gpt2": "tab:blue", "llama": "tab:red"}
    for key, r in summary["runs"].items():
        model, optimizer = key.split("/")
        times = [sum(r["step_seconds"][:s]) for s in r["steps"]]
        for ax, xs in zip(axes, (r["steps"], times)):
            ax.plot(
                xs,
                r["train_loss"],
                styles.get(optimizer, ":"),
                color=colours.get(model),
                label=f"{model} · {optimizer}",
            )
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training time (s, forward + backward + update)")
    for ax in axes:
        ax.set_ylabel("training loss (nats per character)")
    axes[0].legend(fontsize=8)
    c = summary["config"]
    fig.suptitle(
        f"Character-level models on Shakespeare's plays through transformers.Trainer: "
        f"{c['layers']} blocks of width {c['width']}, context {c['context']}, batch {c['batch']}, "
        f"constant step size 1e-3",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "hf_training.png", dpi=150)
    plt.close(fig)
