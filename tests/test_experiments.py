"""The reproduction commands on tiny settings: files, structure, resumption."""

import copy
import json

import pytest
import torch

import hesscale
from hesscale.cli import main
from hesscale.experiments import fig1, fig2

D = torch.float64


def test_fig1_writes_results_and_resumes_with_the_same_numbers(tmp_path, capsys):
    main(["reproduce", "fig1", "--out", str(tmp_path), "--seeds", "2", "--examples", "8"])
    summary = json.loads((tmp_path / "fig1.json").read_text())
    assert (tmp_path / "fig1a.png").stat().st_size > 0 and (tmp_path / "fig1b.png").exists()
    methods = summary["methods"]
    expected = {label for label, _, _ in fig1.METHODS} | {fig1.REFERENCE}
    assert set(methods) == expected
    assert methods["HesScale"]["normalized"] == [1.0, 1.0]
    assert set(methods["HesScale"]["per_layer"]) == {"0", "2", "4", "6"}
    assert methods["HesScale"]["per_layer"]["6"][0] < 1e-12  # the output layer is exact
    assert "mean error / HesScale" in capsys.readouterr().out
    # an interrupted run: one seed's file is lost; the rerun recomputes it identically
    seed_file = next((tmp_path / "seeds").glob("seed_0001_*.json"))
    before = json.loads(seed_file.read_text())
    seed_file.unlink()
    main(["reproduce", "fig1", "--out", str(tmp_path), "--seeds", "2", "--examples", "8"])
    assert json.loads(seed_file.read_text()) == before


def test_fig1_is_the_single_example_protocol():
    """Batched per-example estimates equal running the methods one example at a time."""
    import torch

    import hesscale
    from hesscale.experiments.networks import fig1_network

    result = fig1.run_seed(3, examples=4)
    torch.manual_seed(3)
    model = fig1_network().double()
    gen = torch.Generator().manual_seed(10_003)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    total = 0.0
    for i in range(4):
        _, est = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1])
        _, exact = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1], method="exact")
        total += sum((est[k] - exact[k]).abs().sum() for k in est).item()
    assert result["HesScale"]["total"] == pytest.approx(total / 4, rel=1e-9)


def test_fig2_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        fig2,
        "panels",
        lambda full: {
            "a": [(16, lambda: fig2.fig2a_network(16))],
            "b": [(1, lambda: fig2.fig2b_network(1))],
        },
    )
    main(["reproduce", "fig2", "--out", str(tmp_path), "--rounds", "2"])
    summary = json.loads((tmp_path / "fig2.json").read_text())
    point = summary["b_layers"]["1"]
    assert set(fig2.OPTIMIZER_LABELS.values()) <= set(point["ratio_to_adam"])
    assert point["ratio_to_adam"]["Adam"] == 1.0 and all(point["weights_finite"].values())
    assert (tmp_path / "fig2a.png").exists() and (tmp_path / "fig2b.png").exists()
    assert "relative to Adam" in capsys.readouterr().out


def test_step_cost_times_a_problem_network():
    """The step-cost benchmark's DeepOBS rows: image inputs, every optimizer, finite weights."""
    from hesscale.experiments.problems import build_network, get_problem

    problem = get_problem("fmnist_2c2d")
    point = fig2.time_point(
        lambda: build_network(problem),
        batch=4,
        loss="ce",
        include_forward=True,
        rounds=1,
        exact=False,
        input_shape=problem.input_shape,
    )
    assert set(point["ratio_to_adam"]) == set(fig2.OPTIMIZER_LABELS.values())
    assert point["ratio_to_adam"]["Adam"] == 1.0
    assert all(point["weights_finite"].values())
    assert point["params"] == sum(p.numel() for p in build_network(problem).parameters())


@pytest.mark.parametrize("architecture", ["transformer", "gpt"])
def test_fig1_on_attention_networks_runs(tmp_path, architecture):
    summary = fig1.run(tmp_path, seeds=1, examples=2, architecture=architecture)
    assert summary["methods"]["HesScale"]["normalized"] == [1.0]
    assert summary["methods"]["diag(G)"]["mean_normalized"] > 1.0


@pytest.mark.parametrize("architecture", ["convnext", "efficientnet", "swin", "lstm"])
def test_fig1_on_zoo_architectures_runs(tmp_path, architecture):
    """torchvision's ConvNeXt, EfficientNet and Swin classes at reduced width and an LSTM: every
    estimate against the exact diagonal (torch.func, one example at a time where it cannot
    batch the fused recurrent kernel)."""
    if architecture != "lstm":
        pytest.importorskip("torchvision")
    summary = fig1.run(
        tmp_path,
        seeds=1,
        examples=8 if architecture == "efficientnet" else 2,
        architecture=architecture,
    )
    assert summary["methods"]["HesScale"]["normalized"] == [1.0]
    assert all(value == value for entry in summary["methods"].values() for value in entry["total"])


def test_fig1_on_graphs_reports_what_is_not_defined(tmp_path, capsys):
    out = tmp_path / "lm"
    main(
        [
            "reproduce",
            "fig1",
            "--architecture",
            "lm",
            "--out",
            str(out),
            "--seeds",
            "1",
            "--examples",
            "3",
        ]
    )
    summary = json.loads((out / "fig1.json").read_text())
    assert summary["config"]["architecture"] == "lm"
    assert set(summary["not_defined"]) == {"GGN-MC1", "GGN-MC50", "KFAC-MC1", "KFAC-MC50"}
    assert summary["methods"]["HesScale"]["normalized"] == [1.0]
    assert {"tok", "<root>", "fc1", "fc2"} == set(summary["methods"]["HesScale"]["per_layer"])
    assert "not defined for this network" in capsys.readouterr().out
    assert (out / "fig1a.png").stat().st_size > 0


def test_fig1_graph_seed_uses_per_example_estimates_that_match_single_examples():
    """The residual network runs with individual=True; its errors equal the loop's."""
    from hesscale.experiments.networks import ResidualTanhMLP

    torch.manual_seed(0)
    model = ResidualTanhMLP(6, 16, 2, 10).double()
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([1, 4, 7])
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    batch = fig1.estimate("HesScale", "hesscale", 1, model, loss_fn, x, y, None)
    for i in range(3):
        _, single = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1])
        for k in single:
            torch.testing.assert_close(batch[k][i], single[k])


def test_fig1_resnet_measures_batches_and_both_batch_norm_rules():
    """Train-mode BatchNorm couples the examples: each 'example' is a batch of 8, whose error is
    against the exact diagonal of the batch's loss; the per-layer BN rule is a row of its own."""
    from hesscale.experiments.networks import TinyResNet

    result = fig1.run_seed(1, examples=2, architecture="resnet")
    assert result["GGN-MC1"] is None and result["KFAC-MC1"] is None  # BatchNorm weights
    assert result["HesScale, per-layer BN"]["normalized"] > 1.0
    torch.manual_seed(1)
    model = TinyResNet().double()
    x, y = fig1.ARCHITECTURES["resnet"].data(torch.Generator().manual_seed(10_001), 16, D)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    reference = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(reference)
    total = 0.0
    for xb, yb in zip(x.split(8), y.split(8)):
        _, est = hesscale.diagonal(model, loss_fn, xb, yb)
        _, exact = hesscale.diagonal(reference, loss_fn, xb, yb, method="exact")
        total += sum((est[k] - exact[k]).abs().sum() for k in est).item()
    assert result["HesScale"]["total"] == pytest.approx(total / 2, rel=1e-9)


def test_fig1_after_training_is_kept_apart_and_labelled(tmp_path):
    summary = fig1.run(tmp_path, seeds=1, examples=3, architecture="gpt", trained=5)
    assert summary["config"]["trained"] == 5
    assert next((tmp_path / "seeds").glob("gpt_trained5_seed_0000_*.json"))
    assert "HesScale, exact attention" in summary["methods"]
    at_init = fig1.run_seed(0, examples=3, architecture="gpt")
    assert at_init["HesScale"]["total"] != summary["methods"]["HesScale"]["total"][0]


def test_peak_memory_counts_each_allocation_once():
    """Two 4 MB tensors alive at once, then one freed before a third: 8 MB at the peak (an
    operation's total memory includes what the operations it calls allocate)."""
    from hesscale.experiments.timing import peak_memory

    def fn():
        a = torch.randn(1000, 1000)
        b = torch.nn.functional.linear(a, a)
        del a
        return b * 2

    assert peak_memory(fn) == pytest.approx(8e6, rel=0.05)
