"""The benchmark scripts run end to end on the smallest settings (their figures are not
checked here: speed is reported by running them, never asserted in tests)."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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


def test_model_cost_runs_on_a_small_batch(tmp_path):
    out = tmp_path / "model.json"
    _load("model_cost").main(
        ["--models", "resnet18", "--batch", "2", "--rounds", "1", "--json", str(out)]
    )
    (row,) = json.loads(out.read_text())
    assert row
