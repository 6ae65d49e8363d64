"""The benchmark scripts run end to end on the smallest settings (their figures are not
checked here: speed is reported by running them, never asserted in tests)."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import hesscale
from hesscale.experiments.networks import GPT, ResidualTanhMLP, tanh_mlp

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_engine_cost_runs_and_reports_every_method(tmp_path):
    out = tmp_path / "engine.json"
    _load("engine_cost").main(
        ["--networks", "1 hidden, 16", "--batch-sizes", "2", "--rounds", "1", "--json", str(out)]
    )
    (row,) = json.loads(out.read_text())
    for name in ("mechanism", "hesscale", "hesscale_gn", "bl89", "ggn_mc", "by hand"):
        assert row[name]["time_ratio"] > 0
    assert row["hesscale"]["memory_ratio"] > 0
    assert row["hesscale_over_floor"] > 0


def test_model_cost_runs_on_a_small_batch(tmp_path):
    out = tmp_path / "model.json"
    _load("model_cost").main(
        ["--models", "resnet18", "--batch", "2", "--rounds", "1", "--json", str(out)]
    )
    (row,) = json.loads(out.read_text())["models"]
    assert row["runs"]["estimate HesScale"]["time_ratio"] > 0


def test_model_cost_runs_the_gpu_checks_settings_on_a_small_batch(tmp_path):
    """What benchmarks/gpu_check.sh asks for, on a CPU: autocast, a kernel choice, steps at
    update_every 1 and 2 with clipping and scaling, curvlinops' products (when installed) and
    the precision of the estimate under autocast."""
    out = tmp_path / "model.json"
    curvlinops = importlib.util.find_spec("curvlinops") is not None
    bench = _load("model_cost")
    bench.build = _tiny_gpt(bench)
    bench.main(
        ["--models", "gpt2", "--batch", "1", "--context", "8", "--rounds", "1"]
        + ["--autocast", "bf16", "--attention", "flash", "--update-every", "1", "2"]
        + ["--clip-scale", "--precision", "--json", str(out)]
        + (["--curvlinops"] if curvlinops else [])
    )
    (row,) = json.loads(out.read_text())["models"]
    expected = ["step AdaHesScale, every 2", "step AdaHessian", "forward+backward, math kernel"]
    if curvlinops:
        expected.append("curvlinops GGN-vector product")
    for label in expected:
        assert row["runs"][label]["time_ratio"] > 0
    assert 0 <= row["precision"]["hesscale"]["relative_l1"] < 0.05


def test_checkpoint_cost_counts_the_recomputations(tmp_path):
    """Checkpointing recomputes each block once; the non-reentrant mode's estimate once more."""
    out = tmp_path / "checkpoint.json"
    _load("checkpoint_cost").main(
        ["--layers", "2", "--width", "16", "--heads", "2", "--context", "8", "--batch", "2"]
        + ["--vocab", "20", "--rounds", "1", "--json", str(out)]
    )
    runs = {(r["checkpointing"], r["method"]): r for r in json.loads(out.read_text())["runs"]}
    forwards = {key: r["block_forwards"] for key, r in runs.items()}
    assert forwards == {
        ("none", None): 2,
        ("none", "hesscale"): 2,
        ("non-reentrant", None): 4,
        ("non-reentrant", "hesscale"): 6,
        ("reentrant", None): 4,
        ("reentrant", "hesscale"): 4,
    }


def _tiny_gpt(bench):
    """``build`` of model_cost with a GPT of width 16 in place of GPT-2's shape."""
    language_problem = _load("model_cost").language_problem
    return lambda name, context: language_problem(
        GPT(vocab=50, width=16, context=context, heads=2, layers=2), 50, context
    )


def test_profile_estimate_reports_the_rules(tmp_path):
    out = tmp_path / "profile.json"
    bench = _load("profile_estimate")
    bench.build = _tiny_gpt(bench)
    bench.main(
        ["--model", "gpt2", "--batch", "1", "--context", "8", "--warmup", "0"]
        + ["--json", str(out), "--table", str(tmp_path / "profile.txt")]
    )
    steps = json.loads(out.read_text())["steps"]
    assert steps["forward+backward"]["rule_calls"] == 0
    assert steps["estimate hesscale"]["rule_calls"] > 12  # every hooked node is named


@pytest.mark.parametrize("network", ["chain", "residual"])
def test_the_hand_written_floor_computes_the_engines_numbers(network):
    """The floor engine_cost reports is the engine's arithmetic only if it computes the same
    gradients and HesScale estimates."""
    bench = _load("engine_cost")
    torch.manual_seed(0)
    model = (
        tanh_mlp(5, [7, 6, 7], 4) if network == "chain" else ResidualTanhMLP(5, 7, 2, 4)
    ).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (9,))
    engine = hesscale.extend(copy.deepcopy(model))
    _, estimates = hesscale.diagonal(engine, torch.nn.CrossEntropyLoss(), x, y)
    by_hand = bench._ByHand()
    bench.hand_written(model, x, y, by_hand)()
    engine.zero_grad()
    torch.nn.functional.cross_entropy(engine(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), engine.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name}")
        torch.testing.assert_close(by_hand.estimates[p], estimates[name], msg=f"estimate of {name}")


def test_fsdp_cost_runs_two_processes_and_shards_the_state(tmp_path):
    import subprocess

    out = tmp_path / "fsdp.json"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "fsdp_cost.py"), "--layers", "1", "--width", "16"]
        + ["--context", "8", "--vocab", "20", "--batch", "4", "--rounds", "1", "--json", str(out)],
        check=True,
        timeout=300,
    )
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "FSDP AdamW",
        "FSDP AdaHesScale",
        "FSDP AdaHesScale, update_every=10",
        "DDP AdamW",
        "DDP AdaHesScale",
    }
    # each of 2 ranks holds about half of what a DDP rank holds (padding aside)
    ratio = rows["FSDP AdaHesScale"]["state_mb"] / rows["DDP AdaHesScale"]["state_mb"]
    assert 0.45 < ratio < 0.6
