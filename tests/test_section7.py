"""The Section 7 studies on tiny synthetic Fashion-MNIST-shaped data: they write their results
and plots, reuse finished work, and their building blocks (ranks, oracles) are right."""

import json

import pytest
import torch
from torch import nn

import hesscale
from hesscale.experiments import continual, oracle, pruning_study, section7
from hesscale.experiments.io import ResultFileError
from hesscale.experiments.train import RunConfig, trained_model
from hesscale.pruning import sparsity_of
from hesscale.reference import exact_hessian_diagonal

from .test_training import _splits as training_splits


def _splits(n=256):
    return training_splits(n)


def test_spearman_with_ties_and_ranks():
    assert section7.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert section7.spearman(a, a**3) == pytest.approx(1.0)
    assert section7.spearman(a, -a) == pytest.approx(-1.0)
    # ties: Pearson's correlation of the average ranks, computed by hand
    b = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0])  # ranks 0.5 0.5 2 3.5 3.5
    ra, rb = torch.arange(5.0) - 2, torch.tensor([0.5, 0.5, 2, 3.5, 3.5]) - 2
    expected = float((ra * rb).sum() / (ra.square().sum() * rb.square().sum()).sqrt())
    assert section7.spearman(a, b) == pytest.approx(expected)


def test_permuted_pixels_are_a_permutation_of_each_image():
    images = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    perm = torch.tensor([3, 0, 2, 1])
    out = section7.permute_pixels(images, perm)
    assert out.shape == images.shape
    assert out[0].flatten().tolist() == [3.0, 0.0, 2.0, 1.0]


def test_true_changes_and_the_true_diagonal_at_picks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    picks = [("0.weight", 5), ("2.weight", 0), ("2.weight", 7)]
    removed, even, curvature = oracle.true_changes(model, loss_fn, x, y, picks)
    base = loss_fn(model(x), y).item()
    for k, (name, index) in enumerate(picks):
        with torch.no_grad():
            p = model.get_parameter(name).view(-1)
            value = p[index].item()
            p[index] = 0
            zero = loss_fn(model(x), y).item()
            p[index] = 2 * value
            double = loss_fn(model(x), y).item()
            p[index] = value
        assert removed[k].item() == pytest.approx(zero - base)
        assert even[k].item() == pytest.approx((zero + double) / 2 - base)
    h = exact_hessian_diagonal(model, loss_fn, x, y)
    expected = [h[name].view(-1)[index].item() for name, index in picks]
    assert curvature.tolist() == pytest.approx(expected, rel=1e-5)
    # and the weights are back where they were
    assert loss_fn(model(x), y).item() == base


def test_draws_are_distinct_weights_of_linear_and_conv_layers():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    picks = oracle._draw(model, 40, seed=0)
    assert len(set(picks)) == 40
    assert {name for name, _ in picks} <= {"0.weight", "2.weight"}
    assert all(0 <= i < model.get_parameter(name).numel() for name, i in picks)


def test_trained_model_refuses_a_record_without_weights(tmp_path):
    config = RunConfig(problem="fmnist_mlp", optimizer="adam", lr=1e-3, epochs=1, batch_size=64)
    splits = _splits(128)
    model, record = trained_model(config, tmp_path, splits, show_progress=False)
    assert record["status"] == "finished"
    again, _ = trained_model(config, tmp_path, splits, show_progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    (tmp_path / f"{config.name()}.model.pt").unlink()
    with pytest.raises(ResultFileError, match="delete it to train the network again"):
        trained_model(config, tmp_path, splits, show_progress=False)


def test_oracle_study_writes_results_and_reuses_them(tmp_path, monkeypatch):
    splits = _splits()
    kwargs = dict(seeds=1, weights=12, examples=16, networks=("fmnist_2c2d",), splits=splits)
    summary = oracle.run(tmp_path / "oracle", **kwargs)
    assert (tmp_path / "oracle" / "oracle.png").exists()
    assert (tmp_path / "networks").is_dir()  # the trained networks, shared by the studies
    rho = summary["results"]["fmnist_2c2d"]
    assert set(rho) == set(oracle.ORACLES)
    labels = [label for label, _, _ in section7.SCORERS] + [label for label, _ in oracle.EXACT]
    assert list(rho["even part"]) == labels
    assert all(-1 <= e["mean"] <= 1 for o in rho.values() for e in o.values())
    assert "OBD · HesScale" in oracle.table(summary)
    monkeypatch.setattr(oracle, "run_seed", lambda *a, **k: pytest.fail("recomputed"))
    assert oracle.run(tmp_path / "oracle", **kwargs)["results"] == summary["results"]


def test_pruning_study_writes_results_and_resumes(tmp_path, monkeypatch):
    scorers = [section7.SCORERS[i] for i in (0, 3, -1)]  # HesScale, Fisher, magnitude
    monkeypatch.setattr(pruning_study, "SCORERS", scorers)
    splits = _splits()
    kwargs = dict(
        sparsities=(0.5, 0.9),
        score_batches=1,
        finetune_steps=2,
        networks=("fmnist_mlp",),
        splits=splits,
    )
    summary = pruning_study.run(tmp_path / "pruning", **kwargs)
    entry = summary["results"]["fmnist_mlp"]
    assert list(entry["scorers"]) == [label for label, _, _ in scorers]
    for done in entry["scorers"].values():
        assert set(done["runs"]) == {"0.5", "0.9"}
        assert all(
            0 <= r["pruned"] <= 1 and 0 <= r["fine_tuned"] <= 1 for r in done["runs"].values()
        )
    assert (tmp_path / "pruning" / "pruning.png").exists()
    # a killed run continues: drop one result, and only that one is computed again
    path = tmp_path / "pruning" / "pruning.json"
    data = json.loads(path.read_text())
    del data["results"]["fmnist_mlp"]["scorers"]["magnitude |θ|"]["runs"]["0.9"]
    path.write_text(json.dumps(data))
    calls = []
    original = pruning_study.fine_tune
    monkeypatch.setattr(
        pruning_study, "fine_tune", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    pruning_study.run(tmp_path / "pruning", **kwargs)
    assert len(calls) == 1
    assert "magnitude" in pruning_study.table(summary)


def test_pruning_removes_the_fraction_asked_for_in_the_study(tmp_path):
    splits = _splits()
    model = section7.trained_network("fmnist_mlp", 0, tmp_path, splits)
    hesscale.prune(model, hesscale.importance(model, criterion="magnitude"), 0.9)
    assert sparsity_of(model) == pytest.approx(0.9, abs=1e-6)


def test_continual_study_writes_results_and_reuses_them(tmp_path, monkeypatch):
    splits = _splits()
    kwargs = dict(
        tasks=2,
        steps_per_task=3,
        importance_batches=1,
        strengths=(1e3, 1e5),
        methods=("fine-tuning", "EWC · HesScaleGN", "EWC · Fisher"),
        splits=splits,
    )
    summary = continual.run(tmp_path / "continual", **kwargs)
    assert (tmp_path / "continual" / "continual.png").exists()
    entry = summary["methods"]["EWC · HesScaleGN"]
    assert entry["strength"] in (1e3, 1e5)
    assert len(entry["seen_tasks_test"]) == 2 and len(entry["first_task_test"]) == 2
    assert summary["methods"]["fine-tuning"]["strength"] == 0.0
    assert "EWC · Fisher" in continual.table(summary)
    monkeypatch.setattr(continual, "run_one", lambda *a, **k: pytest.fail("recomputed"))
    assert continual.run(tmp_path / "continual", **kwargs)["methods"] == summary["methods"]
    with pytest.raises(ValueError, match="unknown methods"):
        continual.run(tmp_path / "continual", **{**kwargs, "methods": ("SI",)})
