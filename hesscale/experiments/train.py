"""``hesscale train``: one training run on a DeepOBS problem, resumable epoch by epoch.

Under ``torchrun --nproc-per-node N`` the run is data-parallel: every rank takes its share of
each batch (the global batch size stays the problem's), DistributedDataParallel averages the
gradients and the optimizers average their curvature estimates; rank 0 evaluates and writes.
With ``fsdp=True`` (``hesscale train --fsdp``) the model is sharded with FSDP2 instead
(``fully_shard`` on every child module with parameters, then the root; :mod:`hesscale.fsdp`):
every rank holds ``1/N`` of the weights, gradients, estimates and optimizer state, every rank
evaluates (a sharded forward pass is collective) and rank 0 writes; checkpoints hold the full
state dicts (``torch.distributed.checkpoint.state_dict``), so a run resumes on any number of
processes.

A run evaluates loss and accuracy on the train-eval, validation and test sets before training
and after every epoch, and records the cumulative training time (evaluation excluded). It stops
as *diverged* when a training loss is NaN or exceeds 1e10. After every epoch it writes a
checkpoint (model, optimizer, random states, curves) atomically; a rerun resumes from it and
gives the same curves as an uninterrupted run, and a finished run is reused as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import hesscale
from hesscale.optim import OPTIMIZERS, UpdateError

from .._progress import progress
from .data import Splits, prepare
from .io import ResultFileError, atomic_write_json, environment_record, read_json
from .problems import build_network, get_problem
from .splits import splits_for

DIVERGENCE_THRESHOLD = 1e10
METRICS = ("train_eval", "valid", "test")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's curves."""

    problem: str
    optimizer: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None  # None: the problem's L2 penalty
    epochs: int = 2
    seed: int = 0
    padding: str = "valid"
    batch_size: int | None = None  # None: the problem's
    max_batches: int | None = None  # cap on batches per epoch (tests, smoke runs)
    extra: dict = field(default_factory=dict)  # further optimizer arguments
    text_file: str | None = None  # text problems: a text file of one's own instead of the data
    accumulate: int = 1  # micro-batches per step (gradient accumulation), each loss weighted

    def label(self) -> str:
        """What a progress bar shows of the run (the name without its problem and digest)."""
        b1, b2 = self.betas
        return f"{self.optimizer} lr{self.lr:.3g} b{b1:g}-{b2:g} s{self.seed}"

    def name(self) -> str:
        """A file name that identifies the configuration."""
        fields = asdict(self)
        for key, default in (("text_file", None), ("accumulate", 1)):
            if fields[key] == default:  # records written before the field existed keep names
                del fields[key]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        b1, b2 = self.betas
        return (
            f"{self.problem}_{self.optimizer}_lr{self.lr:.3g}_b{b1:g}-{b2:g}"
            f"_s{self.seed}_e{self.epochs}_{digest}"
        )


def _accumulated_backward(net, loss_fn, x, y, micro_batches: int, create_graph: bool) -> float:
    """Backpropagate the batch's mean loss in ``micro_batches`` parts, each loss weighted by its
    share of the batch (gradients and estimates then sum to the whole batch's); under
    DistributedDataParallel all but the last part run in ``no_sync()``. Returns the loss."""
    total = 0.0
    parts = torch.arange(len(x)).tensor_split(micro_batches)
    for j, part in enumerate(parts):
        quiet = j < len(parts) - 1 and hasattr(net, "no_sync")
        with net.no_sync() if quiet else contextlib.nullcontext():
            loss = loss_fn(net(x[part]), y[part]) * (len(part) / len(x))
            total += loss.item()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
                loss.backward(create_graph=create_graph)
    return total


def shard(model: nn.Module) -> nn.Module:
    """``fully_shard`` every child module that has parameters, then the root (FSDP2 over all
    ranks of the default process group)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _state_dicts(model: nn.Module, opt, sharded: bool) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts; of a sharded model, the full ones (on rank
    0; every rank must call this)."""
    if not sharded:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt, options=_full_state_options())


def _model_state(model: nn.Module, sharded: bool) -> dict:
    """``model.state_dict()``; of a sharded model, the full one (on rank 0; every rank must
    call this)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def _load_state_dicts(model: nn.Module, opt, state: dict, sharded: bool, path: Path) -> None:
    if bool(state.get("sharded", False)) != sharded:
        raise ResultFileError(
            f"{path} was written by a run {'with' if state.get('sharded') else 'without'} "
            f"--fsdp: resume it the same way, or delete it to restart this run"
        )
    if not sharded:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )


def make_optimizer(config: RunConfig, model: nn.Module, l2: float) -> torch.optim.Optimizer:
    """The optimizer by name, with the L2 penalty on weights (not biases), as DeepOBS does."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {config.optimizer!r}; choose one of {list(OPTIMIZERS)}"
        )
    weights = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": l2}, {"params": others, "weight_decay": 0.0}]
    spec = OPTIMIZERS[config.optimizer]
    if config.extra:
        spec = replace(spec, options={**spec.options, **config.extra})
    return spec.build(groups, config.lr, config.betas, config.eps)


@torch.no_grad()
def evaluate(model, loss_fn, data, augment_flag: bool, device, batch: int = 1000):
    """Mean loss and accuracy over a data set."""
    model.eval()
    images, labels = data
    total, correct = 0.0, 0
    for i in range(0, len(images), batch):
        x = prepare(images[i : i + batch], augment=False).to(device)
        y = labels[i : i + batch].to(device)
        out = model(x)
        total += loss_fn(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
    model.train()
    return total / len(images), correct / labels.numel()  # per label: per token for text


_CHECKPOINT_KEYS = {"model", "optimizer", "rng", "curves", "epoch", "elapsed"}


def _load_checkpoint(path: Path) -> dict:
    """A run's epoch checkpoint, read with ``weights_only=True``: tensors and plain Python
    values only, so a replaced or hostile file cannot run code. A checkpoint that cannot be
    read that way, or lacks what a resumed run needs, raises :class:`ResultFileError` (the run
    is never silently restarted)."""
    advice = "delete it to restart this run from epoch 0 (other runs' results are kept)"
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        raise ResultFileError(
            f"{path}: refused or unreadable checkpoint: it holds more than tensors and plain "
            f"values, or is damaged, or was written by another program ({reason}); {advice}"
        ) from err
    missing = _CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else _CHECKPOINT_KEYS
    if missing:
        raise ResultFileError(
            f"{path}: not a hesscale checkpoint (missing {sorted(missing)}); {advice}"
        )
    return state


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run (a single process by default)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where collectives' tensors live (nccl needs them on the GPU)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (so that all ranks stop together)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def ranks_from_environment(device: str) -> tuple[Ranks, str]:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device), device


def _rng_state(device: str) -> dict:
    """The random state a resumed run needs: CPU's, and the GPU's (sampling estimators)."""
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device: str) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints written before the GPU state was kept
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def _empty_curves() -> dict:
    curves = {"epoch": [], "time": []}
    for split in METRICS:
        curves[f"{split}_loss"], curves[f"{split}_acc"] = [], []
    return curves


def attention_for(create_graph: bool):
    """AdaHessian differentiates twice, which PyTorch's fused CPU attention kernel does not
    support: its steps run attention's math kernel."""
    if not create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def train(
    config: RunConfig,
    out: str | Path,
    splits: Splits | None = None,
    data_dir=None,
    download: bool = False,
    device: str = "cpu",
    show_progress: bool = True,
    save_model: bool = False,
    fsdp: bool = False,
) -> dict:
    """Run (or resume, or reuse) one configuration; returns its record (also in ``out``).

    ``save_model`` keeps the trained weights, ``model.state_dict()``, in ``<name>.model.pt``
    next to the record (:func:`trained_model` reads them back). ``fsdp``: shard the model
    over the ranks with FSDP2 instead of replicating it (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result_path, ckpt_path = out / f"{config.name()}.json", out / f"{config.name()}.ckpt"
    if result_path.exists():
        return read_json(result_path, "run record")
    if not isinstance(config.accumulate, int) or config.accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {config.accumulate!r}")
    ranks, device = ranks_from_environment(device)
    if fsdp and ranks.world < 2:
        raise ValueError(
            "--fsdp shards the model over the processes of torchrun: run it as "
            "torchrun --nproc-per-node N hesscale train --fsdp ... with N >= 2"
        )
    problem = get_problem(config.problem)
    if splits is None:
        splits = splits_for(problem.dataset, data_dir, download, problem.context, config.text_file)
    l2 = problem.l2 if config.weight_decay is None else config.weight_decay
    batch_size = config.batch_size or problem.batch_size

    torch.manual_seed(config.seed)
    model = build_network(problem, config.padding).to(device)
    model = hesscale.extend(shard(model) if fsdp else model)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    replicated = ranks.world > 1 and not fsdp
    net = nn.parallel.DistributedDataParallel(model) if replicated else model
    opt = make_optimizer(config, model, l2)
    curves, start_epoch, status, elapsed = _empty_curves(), 0, "running", 0.0
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path)
        _load_state_dicts(model, opt, state, fsdp, ckpt_path)
        _set_rng_state(state["rng"][ranks.rank], device)
        curves, start_epoch, elapsed = state["curves"], state["epoch"], state["elapsed"]

    def record_evaluation(epoch: int) -> None:
        if not ranks.lead and not fsdp:  # a sharded model's forward needs every rank
            return
        results = {
            split: evaluate(model, loss_fn, getattr(splits, split), splits.augment, device)
            for split in METRICS
        }
        if not ranks.lead:
            return
        curves["epoch"].append(epoch)
        curves["time"].append(elapsed)
        for split, (loss, acc) in results.items():
            curves[f"{split}_loss"].append(loss)
            curves[f"{split}_acc"].append(acc)

    if start_epoch == 0 and not curves["epoch"]:
        record_evaluation(0)
    create_graph = config.optimizer == "adahessian"
    train_x, train_y = splits.train
    bar = (
        progress(total=config.epochs, desc=config.label(), unit="epoch")
        if show_progress and ranks.lead
        else None
    )
    if bar is not None:
        bar.update(start_epoch)
    for epoch in range(start_epoch, config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(train_x), generator=gen)
        batches = range(0, len(order) - batch_size + 1, batch_size)  # full batches only
        if config.max_batches is not None:
            batches = list(batches)[: config.max_batches]
        tic = time.perf_counter()
        for i in batches:
            idx = order[i : i + batch_size].tensor_split(ranks.world)[ranks.rank]
            x = prepare(train_x[idx], splits.augment, gen).to(device)
            y = train_y[idx].to(device)
            with attention_for(create_graph):
                opt.zero_grad(set_to_none=True)
                value = _accumulated_backward(net, loss_fn, x, y, config.accumulate, create_graph)
                if ranks.any(not math.isfinite(value) or value > DIVERGENCE_THRESHOLD):
                    status = "diverged"
                    break
                try:
                    opt.step()
                except UpdateError:  # the guard refused a blow-up: the run diverged
                    status = "diverged"
                    break
        elapsed += time.perf_counter() - tic
        if status == "diverged":
            break
        record_evaluation(epoch + 1)
        rng = ranks.gather(_rng_state(device))
        model_state, optimizer_state = _state_dicts(model, opt, fsdp)
        if ranks.lead:
            _atomic_torch_save(
                {
                    "model": model_state,
                    "optimizer": optimizer_state,
                    "rng": rng,
                    "curves": curves,
                    "epoch": epoch + 1,
                    "elapsed": elapsed,
                    "sharded": fsdp,
                },
                ckpt_path,
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"valid loss {curves['valid_loss'][-1]:.4f}")
    if bar is not None:
        bar.close()
    opt.zero_grad(set_to_none=True)  # AdaHessian's gradients hold their graph: break the cycle
    if status == "running":
        status = "finished"
    epochs_done = max(len(curves["epoch"]) - 1, 1)
    record = {
        "config": asdict(config),
        "status": status,
        "padding": config.padding,
        "l2": l2,
        "batch_size": batch_size,
        "curves": curves,
        "seconds_per_epoch": elapsed / epochs_done,
        "processes": ranks.world,
        "sharded": fsdp,
        "environment": environment_record(),
    }
    weights = _model_state(model, fsdp) if save_model else None
    if ranks.lead:
        if save_model:
            _atomic_torch_save(weights, out / f"{config.name()}.model.pt")
        atomic_write_json(result_path, record)
        ckpt_path.unlink(missing_ok=True)
    ranks.barrier()
    return read_json(result_path, "run record")


def trained_model(config: RunConfig, out: str | Path, splits: Splits | None = None, **kwargs):
    """The network of ``config`` after training (trained now, or read from ``out``), and its
    record. ``kwargs`` go to :func:`train`."""
    out = Path(out)
    record = train(config, out, splits, save_model=True, **kwargs)
    path = out / f"{config.name()}.model.pt"
    if record["status"] != "finished" or not path.exists():
        raise ResultFileError(
            f"{out / config.name()}.json records a {record['status']} run without saved "
            "weights: delete it to train the network again"
        )
    model = build_network(get_problem(config.problem), config.padding)
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except Exception as error:
        raise ResultFileError(f"{path} is not a network of {config.problem}: {error}") from None
    return model, record
