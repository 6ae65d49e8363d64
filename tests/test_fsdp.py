"""FSDP2 (``fully_shard``): sharded estimates and optimizer steps against one process.

Each test spawns 2 or 3 CPU processes (gloo; 3 makes FSDP's padding real) that run several
scenarios and save what they measured; the assertions run here. Every comparison is with one
process on the concatenated batch, in float64.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hesscale
from hesscale._errors import UnsupportedModuleError
from hesscale.experiments.networks import GPT
from hesscale.optim import (
    AdaBL89,
    AdaGGNMC,
    AdaHesScale,
    AdaHesScaleGN,
    AdaHessian,
    Sophia,
    UpdateError,
)

from .test_scale_out import _as_torchrun, _exit_worker, _free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


# --- models -------------------------------------------------------------------------------
class Block(nn.Module):
    """``x + conv(tanh(GroupNorm(x)))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.tanh(self.norm(x)))


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = nn.ModuleList(Block(4) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean((2, 3)))


def _mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = _mlp()
    elif kind == "cnn":
        model = ResidualCNN()
    else:  # a GPT whose output layer is its token embedding (a tied weight)
        model = GPT(vocab=7, width=8, context=4, heads=2, layers=2)
    return model.double()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one before the root."""
    if isinstance(model, nn.Sequential):
        return [m for m in model if isinstance(m, nn.Linear)]
    if isinstance(model, ResidualCNN):
        return [model.stem, *model.blocks]
    return list(model.blocks)


def _shard(model: nn.Module, mesh, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _data(kind: str, world: int, steps: int = 1, per_rank: int = 2, seed: int = 1):
    """``steps`` batches of ``per_rank`` examples for each of ``world`` ranks."""
    g = torch.Generator().manual_seed(seed)
    n = per_rank * world
    if kind == "mlp":
        x = torch.randn(steps, n, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (steps, n), generator=g)
    elif kind == "cnn":
        x = torch.randn(steps, n, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (steps, n), generator=g)
    else:
        x = torch.randint(0, 7, (steps, n, 4), generator=g)
        y = torch.randint(0, 7, (steps, n, 4), generator=g)
    return x, y


def _loss(output, y):
    return nn.functional.cross_entropy(output, y)


def _columns(world: int):
    """FSDP's ``shard_placement_fn``: shard matrices on their columns where they divide."""
    from torch.distributed.tensor import Shard

    return lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else None


def _max_error(sharded: dict, single: dict) -> float:
    """The largest deviation relative to the largest magnitude, over all parameters."""
    scale = max(float(t.abs().max()) for t in single.values())
    return max(float((sharded[k] - single[k]).abs().max()) for k in single) / scale


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --- scenarios (each rank runs them in the same order) ---------------------------------------
def _diagonal(rank, world, mesh, kind, method, before=False, **sharding):
    x, y = _data(kind, world)
    single = _model(kind)
    _, expected = hesscale.diagonal(single, _loss, x[0], y[0], method=method)
    model = _model(kind)
    if before:  # extended before it is sharded
        hesscale.extend(model)
    _shard(model, mesh, **sharding)
    part = slice(rank * len(x[0]) // world, (rank + 1) * len(x[0]) // world)
    _, estimates = hesscale.diagonal(model, _loss, x[0][part], y[0][part], method=method)
    sharded = {k: _full(v) for k, v in estimates.items()}
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    shards_like_grads = all(
        estimates[n].placements == p.grad.placements
        and estimates[n].to_local().shape == p.grad.to_local().shape
        for n, p in model.named_parameters()
    )
    return {
        "placements": sorted({str(v.placements) for v in estimates.values()}),
        "estimate": _max_error(sharded, expected),
        "gradient": _max_error(grads, {n: p.grad for n, p in single.named_parameters()}),
        "shards_like_grads": shards_like_grads,
    }


def _optimizer(name, params):
    if name == "adahesscale":  # clipping, scaling and the guard on
        return AdaHesScale(params, lr=0.05, clip=2.0, delta=1e-3, max_scale=2.0)
    if name == "adahesscalegn":
        return AdaHesScaleGN(params, lr=0.05)
    if name == "adabl89":
        return AdaBL89(params, lr=0.05, clip=1.0)
    if name == "adaggnmc":
        return AdaGGNMC(params, lr=0.05)
    if name == "sophia":
        return Sophia(params, lr=0.05, update_every=2)
    raise ValueError(name)


def _single_run(kind, name, x, y, world, steps, accumulate=1):
    """One process: every step over the ranks' micro-batches in order (each of the mean loss
    divided by their number), so that GGN-MC draws the same labels as the ranks."""
    model = hesscale.extend(_model(kind))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt = _optimizer(name, model.parameters())
    parts = world * accumulate
    for step in range(steps):
        opt.zero_grad()
        xs, ys = x[step].chunk(parts), y[step].chunk(parts)
        if name == "adaggnmc" or accumulate > 1:
            for index in range(parts):
                rank, micro = divmod(index, accumulate)
                torch.manual_seed(1000 * step + 10 * micro + rank)
                (loss_fn(model(xs[index]), ys[index]) / parts).backward()
        else:
            loss_fn(model(x[step]), y[step]).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _sharded_run(rank, world, mesh, kind, name, x, y, steps, accumulate=1, sync_each=False):
    model = _shard(_model(kind), mesh)
    hesscale.extend(model)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt = _optimizer(name, model.parameters())
    for step in range(steps):
        opt.zero_grad()
        xs, ys = x[step].chunk(world * accumulate), y[step].chunk(world * accumulate)
        for micro in range(accumulate):
            last = micro == accumulate - 1
            model.set_requires_gradient_sync(last or sync_each)
            torch.manual_seed(1000 * step + 10 * micro + rank)
            index = rank * accumulate + micro
            (loss_fn(model(xs[index]), ys[index]) / accumulate).backward()
        opt.step()
    launches = model._hesscale_state.sharding.launches
    return {n: _full(p.detach()) for n, p in model.named_parameters()}, launches


def _steps(rank, world, mesh, kind, name, steps=3, accumulate=1, sync_each=False):
    x, y = _data(kind, world, steps, per_rank=2 * accumulate)
    single = _single_run(kind, name, x, y, world, steps, accumulate)
    sharded, launches = _sharded_run(
        rank, world, mesh, kind, name, x, y, steps, accumulate, sync_each
    )
    return {"parameters": _max_error(sharded, single), "launches": launches}


def _guard(rank, world, mesh):
    model = hesscale.extend(_shard(_model("mlp"), mesh))
    opt = AdaHesScale(model.parameters(), lr=1e6)
    x, y = _data("mlp", world)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    _loss(model(x[0].chunk(world)[rank]), y[0].chunk(world)[rank]).backward()
    try:
        opt.step()
        refused = False
    except UpdateError:
        refused = True
    unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    return {"refused": refused, "unchanged": unchanged}


def _mixed_precision(rank, world, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    x, y = _data("mlp", world)
    single = _model("mlp").float()
    _, expected = hesscale.diagonal(single, _loss, x[0].float(), y[0], method="hesscale_gn")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = _shard(_model("mlp").float(), mesh, mp_policy=policy)
    part = x[0].float().chunk(world)[rank]
    _, estimates = hesscale.diagonal(
        model, _loss, part, y[0].chunk(world)[rank], method="hesscale_gn"
    )
    dtypes = {str(v.dtype) for v in estimates.values()}
    error = max(
        float((_full(estimates[k]) - v).abs().sum() / v.abs().sum()) for k, v in expected.items()
    )
    return {"dtypes": sorted(dtypes), "relative_l1": error}


def _resume(rank, world, mesh, path):
    """A run saved with torch.distributed.checkpoint after 2 steps, loaded into a fresh model
    and optimizer, continues like the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    x, y = _data("mlp", world, steps=4)

    def fresh():
        model = hesscale.extend(_shard(_model("mlp"), mesh))
        return model, _optimizer("adahesscale", model.parameters())

    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(model(x[step].chunk(world)[rank]), y[step].chunk(world)[rank]).backward()
            opt.step()

    model, opt = fresh()
    train(model, opt, range(4))
    uninterrupted = {n: _full(p.detach()) for n, p in model.named_parameters()}
    model, opt = fresh()
    train(model, opt, range(2))
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    sharded_state = all(
        not hasattr(v, "placements") or v.placements == model.get_parameter(k).placements
        for k, v in state["model"].items()
    )
    dcp.save(state, checkpoint_id=path)
    model, opt = fresh()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, range(2, 4))
    resumed = {n: _full(p.detach()) for n, p in model.named_parameters()}
    return {"parameters": _max_error(resumed, uninterrupted), "sharded_state": sharded_state}


def _refusals(rank, world, mesh):
    from torch.distributed.device_mesh import init_device_mesh

    refused = {}
    x, y = _data("mlp", world)
    part = (x[0].chunk(world)[rank], y[0].chunk(world)[rank])
    model = _shard(_model("mlp"), mesh)
    try:
        hesscale.diagonal(model, _loss, *part, individual=True)
        refused["individual"] = ""
    except UnsupportedModuleError as error:
        refused["individual"] = str(error)
    model = hesscale.extend(_shard(_model("mlp"), mesh))
    opt = AdaHessian(model.parameters())
    _loss(model(part[0]), part[1]).backward()
    try:
        opt.step()
        refused["adahessian"] = ""
    except RuntimeError as error:
        refused["adahessian"] = str(error)
    hybrid = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = _shard(_model("mlp"), hybrid)
    try:
        hesscale.extend(model)
        refused["hsdp"] = ""
    except UnsupportedModuleError as error:
        refused["hsdp"] = str(error)
    return refused


SCENARIOS = {
    "diagonal": lambda r, w, m, path: (
        {
            f"{kind}-{method}": _diagonal(r, w, m, kind, method)
            for kind in ("mlp", "cnn", "gpt")
            for method in ("hesscale", "hesscale_gn")
        }
        | {
            "mlp-before": _diagonal(r, w, m, "mlp", "hesscale", before=True),
            "mlp-unsharded-between": _diagonal(
                r, w, m, "mlp", "hesscale", reshard_after_forward=False
            ),
            "gpt-columns": _diagonal(r, w, m, "gpt", "hesscale", shard_placement_fn=_columns(w)),
        }
    ),
    "optimizers": lambda r, w, m, path: (
        {
            name: _steps(r, w, m, "mlp", name)
            for name in ("adahesscale", "adahesscalegn", "adabl89", "adaggnmc", "sophia")
        }
        | {"gpt-adahesscale": _steps(r, w, m, "gpt", "adahesscale", steps=2)}
    ),
    "accumulation": lambda r, w, m, path: {
        "no_sync": _steps(r, w, m, "mlp", "adahesscale", steps=2, accumulate=2),
        "sync_each": _steps(r, w, m, "cnn", "adahesscale", 2, accumulate=2, sync_each=True),
    },
    "update_every": lambda r, w, m, path: {"sophia": _steps(r, w, m, "mlp", "sophia", steps=4)},
    "guard": lambda r, w, m, path: _guard(r, w, m),
    "mixed_precision": lambda r, w, m, path: _mixed_precision(r, w, m),
    "resume": lambda r, w, m, path: _resume(r, w, m, f"{path}.dcp"),
    "refusals": lambda r, w, m, path: _refusals(r, w, m),
}


def _worker(rank, world, port, scenarios, path):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name in scenarios:
        try:
            results[name] = SCENARIOS[name](rank, world, mesh, path)
        except Exception:  # reported by the test; the other ranks fail alike or time out
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, f"{path}.{rank}")
    dist.barrier()
    _exit_worker()


def _run(tmp_path, world, scenarios):
    path = tmp_path / "results"
    mp.spawn(_worker, args=(world, _free_port(), scenarios, str(path)), nprocs=world, join=True)
    results = [torch.load(f"{path}.{rank}", weights_only=False) for rank in range(world)]
    for rank_results in results:
        for name, result in rank_results.items():
            assert "error" not in result, f"{name}:\n{result.get('error')}"
    return results


def _groups(kind: str) -> int:
    """FSDP parameter groups of ``_shard(_model(kind))``: the blocks and the root's own (the
    MLP's root has no parameters of its own)."""
    return {"mlp": 3, "cnn": 4, "gpt": 3}[kind]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_estimates_and_steps_equal_one_process(tmp_path, world):
    scenarios = ["diagonal", "optimizers", "accumulation"]
    results = _run(tmp_path, world, scenarios)
    for rank_results in results:
        for case, r in rank_results["diagonal"].items():
            assert r["estimate"] < 1e-10, (case, r)
            assert r["gradient"] < 1e-10, (case, r)
            assert r["shards_like_grads"], case
        placements = rank_results["diagonal"]["gpt-columns"]["placements"]
        assert ("(Shard(dim=1),)" in placements) == (world == 2)  # 8 columns: 2 divides
        for name, r in rank_results["optimizers"].items():
            assert r["parameters"] < 1e-10, (name, r)
        no_sync, sync_each = (
            rank_results["accumulation"]["no_sync"],
            rank_results["accumulation"]["sync_each"],
        )
        assert no_sync["parameters"] < 1e-10 and sync_each["parameters"] < 1e-10
        # one reduce-scatter per group and step without sync, one per pass with it
        assert no_sync["launches"] == 2 * _groups("mlp")
        assert sync_each["launches"] == 2 * 2 * _groups("cnn")
        # an estimate every step: one reduce-scatter per FSDP group and step
        assert rank_results["optimizers"]["adahesscale"]["launches"] == 3 * _groups("mlp")


def test_sharded_training_guard_precision_resume_and_refusals(tmp_path):
    world = 2
    scenarios = ["update_every", "guard", "mixed_precision", "resume", "refusals"]
    results = _run(tmp_path, world, scenarios)
    for r in results:
        sophia = r["update_every"]["sophia"]
        assert sophia["parameters"] < 1e-10
        assert sophia["launches"] == 2 * _groups("mlp")  # steps 0 and 2 of 4 estimate
        assert r["guard"] == {"refused": True, "unchanged": True}  # on every rank together
        assert r["mixed_precision"]["dtypes"] == ["torch.float32"]
        assert r["mixed_precision"]["relative_l1"] < 0.05  # bf16 forward and backward
        assert r["resume"]["sharded_state"]
        assert r["resume"]["parameters"] < 1e-10
        refused = r["refusals"]
        assert "individual=True" in refused["individual"]
        assert "fully_shard" in refused["adahessian"]
        assert "HSDP" in refused["hsdp"]


def _train_worker(rank, world, port, out, splits):
    """``torchrun --nproc-per-node 2 hesscale train --fsdp``, killed on every rank after the
    second epoch (before its checkpoint), then run again: it resumes from the first's."""
    import json

    from hesscale.experiments import train as train_module

    _as_torchrun(rank, world, port)
    config = train_module.RunConfig(
        problem="fmnist_mlp", optimizer="adahesscalegn", lr=1e-3, epochs=3, batch_size=16
    )
    original, calls = train_module._state_dicts, []

    def dying(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    train_module._state_dicts = dying
    try:
        train_module.train(config, out, splits, show_progress=False, fsdp=True)
    except KeyboardInterrupt:
        pass
    train_module._state_dicts = original
    resumed_from = torch.load(out / f"{config.name()}.ckpt", weights_only=True)["epoch"]
    record = train_module.train(config, out, splits, show_progress=False, fsdp=True)
    (out / f"summary.{rank}.json").write_text(
        json.dumps({"resumed_from": resumed_from, "sharded": record["sharded"]})
    )
    _exit_worker()


def test_train_fsdp_resumes_and_follows_one_process(tmp_path):
    """What `torchrun --nproc-per-node 2 hesscale train --fsdp ...` does, with gloo on CPU."""
    import json

    from hesscale.experiments.train import RunConfig, train

    from .test_training import _splits

    splits = _splits()
    out = tmp_path / "fsdp"
    mp.spawn(_train_worker, args=(2, _free_port(), out, splits), nprocs=2, join=True)
    config = RunConfig(
        problem="fmnist_mlp", optimizer="adahesscalegn", lr=1e-3, epochs=3, batch_size=16
    )
    single = train(config, tmp_path / "single", splits, show_progress=False)
    sharded = json.loads((out / f"{config.name()}.json").read_text())
    for rank in range(2):
        summary = json.loads((out / f"summary.{rank}.json").read_text())
        assert summary == {"resumed_from": 1, "sharded": True}
    assert sharded["processes"] == 2 and sharded["status"] == "finished"
    for key in ("train_eval_loss", "valid_loss", "test_loss"):  # float32: rounding differs
        torch.testing.assert_close(
            torch.tensor(sharded["curves"][key]),
            torch.tensor(single["curves"][key]),
            rtol=1e-3,
            atol=1e-4,
        )
