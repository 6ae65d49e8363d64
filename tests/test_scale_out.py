"""Scale-out: loss scaling (GradScaler) and data-parallel training across processes."""

import copy
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hesscale
from hesscale.optim import AdaHesScale, AdaHesScaleGN


def _problem(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    return model.to(dtype), x.to(dtype), y


def _run(model, x, y, steps, scaler=None, opt_class=AdaHesScale, clip=False):
    model = hesscale.extend(model)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt = opt_class(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    return model, opt


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("opt_class", [AdaHesScale, AdaHesScaleGN])
def test_grad_scaler_gives_the_updates_of_unscaled_training(opt_class, clip):
    model, x, y = _problem()
    plain, _ = _run(copy.deepcopy(model), x, y, 4, opt_class=opt_class)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    scaled, _ = _run(copy.deepcopy(model), x, y, 4, scaler, opt_class=opt_class, clip=clip)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_overflow_skips_the_step_and_the_curvature():
    model, x, y = _problem()
    model, opt = _run(model, x, y, 2)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**8
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)
    after = opt.state_dict()
    for k, state in before["state"].items():
        assert state["curvature_step"] == after["state"][k]["curvature_step"]
        assert torch.equal(state["exp_avg_sq"], after["state"][k]["exp_avg_sq"])


def _exit_worker() -> None:
    """Leave without tearing down gloo: its threads occasionally abort the interpreter's
    shutdown ("terminate called without an active exception"), which is not under test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, steps, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # float64: Adam-style steps turn rounding differences of near-zero gradients into sign
    # flips, so the comparison with one process needs more precision than float32 gives
    model, x, y = _problem(dtype=torch.float64)
    model = hesscale.extend(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt = AdaHesScale(ddp.parameters(), lr=0.05)
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(ddp(x[shard]), y[shard]).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], f"{result_path}.{rank}")
    dist.barrier()  # every rank has written its parameters
    _exit_worker()


def test_data_parallel_ranks_agree_with_a_single_process_on_the_full_batch(tmp_path):
    steps = 3
    result = tmp_path / "params.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), steps, result), nprocs=2, join=True)
    ranks = [torch.load(f"{result}.{rank}") for rank in range(2)]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # every rank applied the same update
    model, x, y = _problem(dtype=torch.float64)
    single, _ = _run(model, x, y, steps)
    for a, b in zip(ranks[0], single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _train_worker(rank, world, port, out, splits):
    from hesscale.experiments.train import RunConfig, train

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    config = RunConfig(
        problem="fmnist_mlp", optimizer="adahesscalegn", lr=1e-3, epochs=2, batch_size=16
    )
    train(config, out, splits, show_progress=False)
    _exit_worker()


def test_train_runs_data_parallel_like_one_process(tmp_path):
    """What `torchrun --nproc-per-node 2 hesscale train ...` does, with gloo on CPU."""
    from hesscale.experiments.train import RunConfig, train

    from .test_training import _splits

    splits = _splits()
    mp.spawn(_train_worker, args=(2, _free_port(), tmp_path / "ddp", splits), nprocs=2, join=True)
    config = RunConfig(
        problem="fmnist_mlp", optimizer="adahesscalegn", lr=1e-3, epochs=2, batch_size=16
    )
    single = train(config, tmp_path / "single", splits, show_progress=False)
    ddp = json.loads((tmp_path / "ddp" / f"{config.name()}.json").read_text())
    assert ddp["processes"] == 2 and single["processes"] == 1
    # float32 rounding differs between the two (averaged shard gradients); the exact agreement
    # of the update rule is proven in float64 above, here the pipeline: sharding, curves, files
    for key in ("train_eval_loss", "valid_loss", "test_loss"):
        torch.testing.assert_close(
            torch.tensor(ddp["curves"][key]),
            torch.tensor(single["curves"][key]),
            rtol=1e-3,
            atol=1e-4,
        )
