"""Problems, training runs (with kill-and-resume) and tuning, on small synthetic data."""

import dataclasses
import json
import math

import pytest
import torch

import hesscale
from hesscale.experiments import train as train_module
from hesscale.experiments import tune as tune_module
from hesscale.experiments.data import Splits
from hesscale.experiments.plots import sensitivity_points
from hesscale.experiments.problems import PROBLEMS, build_network
from hesscale.experiments.train import RunConfig, train

PARAMETERS = {  # DeepOBS' counts for the 'same' variants
    ("fmnist_mlp", "valid"): 1_336_610,
    ("fmnist_2c2d", "valid"): 1_111_946,
    ("fmnist_2c2d", "same"): 3_274_634,
    ("cifar10_3c3d", "valid"): 370_922,
    ("cifar10_3c3d", "same"): 895_210,
    ("cifar100_3c3d", "same"): 895_210 + 90 * 257,
    ("cifar100_allcnnc", "valid"): 1_387_108,
    ("cifar100_allcnnc", "same"): 1_387_108,
}


@pytest.mark.parametrize("name, padding", PARAMETERS, ids=[f"{a}-{b}" for a, b in PARAMETERS])
def test_network_shapes_and_parameter_counts(name, padding):
    problem = PROBLEMS[name]
    net = build_network(problem, padding)
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS[(name, padding)]
    shape = (2, 1, 28, 28) if "mnist" in problem.dataset else (2, 3, 32, 32)
    x = torch.randn(shape)
    assert net(x).shape == (2, problem.classes)
    # the engine supports every problem's network
    hesscale.extend(net)
    _, est = hesscale.diagonal(net, torch.nn.CrossEntropyLoss(), x, torch.tensor([0, 1]))
    assert all(torch.isfinite(v).all() for v in est.values())


def _splits(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def part(k):
        return (
            torch.randint(0, 256, (k, 1, 28, 28), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (k,), generator=gen),
        )

    return Splits(train=part(n), train_eval=part(16), valid=part(16), test=part(16), augment=False)


def _config(**kw):
    base = dict(problem="fmnist_mlp", optimizer="adahesscale", lr=1e-3, epochs=3, batch_size=16)
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["adahesscalegn", "adam", "sgd"])
def test_accumulated_micro_batches_train_like_whole_batches(tmp_path, optimizer):
    """``hesscale train --accumulate 3``: the same curves as whole batches, and the run's name
    of a configuration without accumulation is unchanged. (Exactness is proven in float64 in
    test_accumulation. In float32 the summation order differs; AdaHesScale on this tanh MLP
    divides by Hessian estimates near zero, which turns that rounding into visibly different
    steps within one epoch, 0.3 %, even in float64 it reaches 1e-6 in three: not here.)"""
    whole = train(
        _config(optimizer=optimizer, epochs=1), tmp_path / "a", _splits(), show_progress=False
    )
    parts = _config(optimizer=optimizer, epochs=1, accumulate=3)
    accumulated = train(parts, tmp_path / "b", _splits(), show_progress=False)
    for key in ("train_eval_loss", "valid_loss", "test_loss"):
        torch.testing.assert_close(
            torch.tensor(accumulated["curves"][key]),
            torch.tensor(whole["curves"][key]),
            rtol=1e-4,
            atol=1e-5,
        )
    assert _config(epochs=1).name() == _config(epochs=1, accumulate=1).name() != parts.name()


@pytest.mark.parametrize("optimizer", ["adahesscale", "adahessian", "sgd"])
def test_train_writes_curves_and_is_reused(tmp_path, optimizer):
    record = train(_config(optimizer=optimizer), tmp_path, _splits(), show_progress=False)
    curves = record["curves"]
    assert record["status"] == "finished" and curves["epoch"] == [0, 1, 2, 3]
    for key in ("train_eval_loss", "valid_acc", "test_loss", "time"):
        assert len(curves[key]) == 4
    assert record["padding"] == "valid"
    again = train(_config(optimizer=optimizer), tmp_path, None, show_progress=False)
    assert again == json.loads(json.dumps(record))  # reused from disk, data not even loaded


@pytest.mark.parametrize("legacy", [False, True], ids=["checkpoint", "checkpoint-cpu-rng-only"])
def test_kill_and_resume_gives_the_same_curves(tmp_path, monkeypatch, legacy):
    """GGN-MC samples: the random state travels with the checkpoint (also in the older format
    that kept the CPU generator's state as a bare tensor)."""
    config = _config(optimizer="adaggnmc")
    straight = train(config, tmp_path / "straight", _splits(), show_progress=False)

    saves = {"n": 0}
    original = train_module._atomic_torch_save

    def dying_save(obj, path):
        if legacy:
            obj = {**obj, "rng": [r["cpu"] for r in obj["rng"]]}
        original(obj, path)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt  # killed after the second epoch's checkpoint

    monkeypatch.setattr(train_module, "_atomic_torch_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", _splits(), show_progress=False)
    monkeypatch.setattr(train_module, "_atomic_torch_save", original)
    assert (tmp_path / "resumed" / f"{config.name()}.ckpt").exists()
    resumed = train(config, tmp_path / "resumed", _splits(), show_progress=False)
    for key in straight["curves"]:
        if key != "time":
            assert resumed["curves"][key] == straight["curves"][key], key


def test_divergence_is_recorded(tmp_path):
    record = train(_config(optimizer="sgd", lr=1e12), tmp_path, _splits(), show_progress=False)
    assert record["status"] == "diverged"
    assert len(record["curves"]["epoch"]) < 4


def test_an_update_the_guard_refuses_is_recorded_as_divergence(tmp_path, monkeypatch):
    from hesscale.optim import AdaHesScale, UpdateError

    def refuse(self, closure=None):
        raise UpdateError("refused")

    monkeypatch.setattr(AdaHesScale, "step", refuse)
    record = train(_config(optimizer="adahesscale"), tmp_path, _splits(), show_progress=False)
    assert record["status"] == "diverged" and record["curves"]["epoch"] == [0]


def _record(losses, status="finished"):
    return {"status": status, "curves": {"valid_loss": losses}}


def test_area_under_validation_loss_selects_the_best():
    records = {
        "fast": _record([2.0, 0.5, 0.4]),
        "slow": _record([2.0, 1.5, 0.3]),
        "diverged": _record([2.0, 0.1], status="diverged"),
        "nan": _record([2.0, math.nan, 0.1]),
    }
    areas = {k: tune_module.area_under_validation_loss(r) for k, r in records.items()}
    assert min(areas, key=areas.get) == "fast"
    assert math.isinf(areas["diverged"]) and math.isinf(areas["nan"])


def test_tune_round_trip_resumes_after_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "splits_for", lambda *a, **k: _splits())
    calls = {"trained": 0}
    original = tune_module.train

    def counting_train(config, out, splits, device="cpu"):
        path = out / f"{config.name()}.json"
        if not path.exists():
            calls["trained"] += 1
            if calls["trained"] == 3 and not calls.get("killed"):
                calls["killed"] = True
                raise KeyboardInterrupt
        return original(config, out, splits, device=device, show_progress=False)

    monkeypatch.setattr(tune_module, "train", counting_train)
    args = dict(
        problem="fmnist_mlp", optimizers=["adam", "adahesscalegn"], budget="tiny", out=tmp_path
    )
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(**args)
    done_before = calls["trained"] - 1
    summary = tune_module.tune(**args)
    # tiny budget: 2 step sizes, then 2 seeds of the best (seed 0 reused) per optimizer
    assert calls["trained"] - 1 == 2 * (2 + 1) and done_before == 2
    assert set(summary["optimizers"]) == {"adam", "adahesscalegn"}
    for entry in summary["optimizers"].values():
        assert len(entry["seeds"]) == 2 and entry["best"]["lr"] in [
            r["lr"] for r in entry["search"]
        ]
    for name in ("curves_epochs.png", "curves_time.png", "sensitivity.png", "summary.json"):
        assert (tmp_path / "fmnist_mlp" / name).exists()
    assert "adahesscalegn" in tune_module.report(summary)


def test_range_grows_on_the_edge_the_best_lies_on():
    def runs(*pairs):
        return [{"lr": 10.0**e, "auc": auc} for e, auc in pairs]

    exponents = [-5.0, -4.0, -3.0]
    next_exponent = tune_module.next_exponent
    assert next_exponent(runs((-5, 0.2), (-4, 0.3), (-3, 0.4)), exponents, 1.0) == -6.0
    assert next_exponent(runs((-5, 0.4), (-4, 0.3), (-3, 0.2)), exponents, 1.0) == -2.0
    assert next_exponent(runs((-5, 0.4), (-4, 0.2), (-3, 0.3)), exponents, 1.0) is None
    # every run diverged: smaller steps; the largest finite at the top edge: larger ones
    assert next_exponent(runs((-5, math.inf), (-4, math.inf)), exponents, 1.0) == -6.0
    assert next_exponent(runs((-5, 0.9), (-4, 0.5), (-3, math.inf)), exponents, 1.0) is None


def test_tune_extends_the_step_sizes_until_the_best_is_inside(tmp_path, monkeypatch):
    """A method that wants steps 100x smaller than its range: two extensions find the optimum
    at 1e-7, a third one step beyond it confirms it, then the search stops."""
    monkeypatch.setattr(tune_module, "splits_for", lambda *a, **k: None)
    budget = tune_module.Budget(epochs=1, lr_points=4, seeds=2, betas=((0.9, 0.999),), extend=5)
    monkeypatch.setitem(tune_module.BUDGETS, "extending", budget)
    tried = []

    def fake_train(config, out, splits, device="cpu"):
        tried.append(round(math.log10(config.lr), 6))
        return _fake_record(0.3 + (math.log10(config.lr) + 7.0) ** 2)  # best step size: 1e-7

    monkeypatch.setattr(tune_module, "train", fake_train)
    summary = tune_module.tune(
        problem="fmnist_mlp", optimizers=["adam"], budget="extending", out=tmp_path
    )
    # the range (-5 … -2), then -6, -7, -8; -7 is inside: stop. Then the reruns at 1e-7.
    assert tried == [-5.0, -4.0, -3.0, -2.0, -6.0, -7.0, -8.0, -7.0, -7.0]
    assert summary["optimizers"]["adam"]["best"]["lr"] == pytest.approx(1e-7)


def test_sensitivity_keeps_the_best_beta_and_marks_diverged_step_sizes():
    def run(lr, status, loss=None):
        return {"lr": lr, "status": status, "final_test_loss": loss}

    search = [
        run(1e-3, "finished", 0.5),
        run(1e-3, "finished", 0.4),
        run(1e-2, "diverged"),
        run(1e-2, "diverged"),
        run(1e-4, "diverged"),
        run(1e-4, "finished", 0.9),
    ]
    finite, diverged = sensitivity_points(search)
    assert finite == [(1e-4, 0.9), (1e-3, 0.4)]
    assert diverged == [1e-2]


def _fake_record(loss: float) -> dict:
    curves = {"epoch": [0, 1], "time": [0.0, 1.0]}
    for split in ("train_eval", "valid", "test"):
        curves[f"{split}_loss"], curves[f"{split}_acc"] = [2.3, loss], [0.1, 0.8]
    return {"status": "finished", "curves": curves, "seconds_per_epoch": 1.0}


def test_tune_with_another_eps_is_kept_apart(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the bad ε must be refused before any data is read")

    monkeypatch.setattr(tune_module, "splits_for", no_data)
    with pytest.raises(ValueError, match="eps"):
        tune_module.tune(problem="fmnist_mlp", optimizers=["adam"], eps=-1.0, out=tmp_path)

    monkeypatch.setattr(tune_module, "splits_for", lambda *a, **k: None)
    seen = []

    def fake_train(config, out, splits, device="cpu"):
        seen.append((config.optimizer, config.eps, out.parent.name))
        return _fake_record(0.3 + abs(math.log10(config.lr) + 2))

    monkeypatch.setattr(tune_module, "train", fake_train)
    summary = tune_module.tune(
        problem="fmnist_mlp", optimizers=["sgd", "adam"], budget="tiny", out=tmp_path, eps=1e-6
    )
    assert {(name, eps) for name, eps, _ in seen} == {("sgd", 1e-8), ("adam", 1e-6)}
    assert {folder for *_, folder in seen} == {"fmnist_mlp_eps1e-06"}
    assert summary["eps"] == 1e-6 and (tmp_path / "fmnist_mlp_eps1e-06" / "summary.json").exists()
    assert not (tmp_path / "fmnist_mlp").exists()
    assert "ε = 1e-06" in tune_module.report(summary)


@pytest.mark.parametrize("optimizer", ["adahesscale-scaled", "adahessian"])
def test_a_character_gpt_trains_on_a_text_file_of_ones_own(tmp_path, optimizer):
    """The text problem: byte windows of a user's file, per-token cross-entropy and accuracy;
    AdaHessian differentiates attention twice on its math kernel."""
    text = tmp_path / "poem.txt"
    text.write_text("Shall I compare thee to a summer's day?\n" * 300)
    config = _config(
        problem="shakespeare_gpt",
        optimizer=optimizer,
        epochs=1,
        batch_size=4,
        max_batches=2,
        text_file=str(text),
    )
    record = train(config, tmp_path / "runs", show_progress=False)
    assert record["status"] == "finished"
    assert 0.0 <= record["curves"]["test_acc"][-1] <= 1.0
    assert record["curves"]["train_eval_loss"][0] > 0
    other = dataclasses.replace(config, text_file=None)
    assert other.name() != config.name()  # another corpus, another record


def test_resnet_problem_builds_for_its_images():
    from hesscale.experiments.problems import build_network, get_problem

    problem = get_problem("fmnist_resnet")
    model = build_network(problem)
    assert model(torch.zeros(2, *problem.input_shape)).shape == (2, 10)
