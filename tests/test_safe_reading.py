"""Reading data, checkpoints and results never runs code from the files (hostile files are
refused with an error naming them, and what they would have done does not happen)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from hesscale.experiments import data
from hesscale.experiments import train as train_module
from hesscale.experiments.data import DataError
from hesscale.experiments.io import ResultFileError, atomic_write_json, read_json
from hesscale.experiments.train import train

from .test_training import _config, _splits


class _CreatesFile:
    """Unpickling this creates ``path`` (``builtins.open(path, 'w')``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _hostile_batch(marker):
    rng = np.random.default_rng(0)
    return {
        b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
        b"labels": [0, 1, 2, 3],
        b"payload": _CreatesFile(marker),
    }


def test_the_restricted_unpickler_reads_official_style_batches():
    rng = np.random.default_rng(0)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": rng.integers(0, 10, 5).tolist(),
        b"data": rng.integers(0, 256, (5, 3072)).astype(np.uint8),
        b"filenames": [b"a.png"] * 5,
    }
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        got = data._unpickle_cifar(io.BytesIO(pickle.dumps(batch, protocol=protocol)))
        assert np.array_equal(got[b"data"], batch[b"data"]) and got[b"labels"] == batch[b"labels"]


def test_a_hostile_cifar_folder_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(pickle.dumps(_hostile_batch(marker)))
    with pytest.raises(DataError, match=r"data_batch_1.*names io\.open"):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


def test_a_hostile_cifar_archive_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created-by-the-pickle"
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        raw = pickle.dumps(_hostile_batch(marker))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*refused"):
        data.load("cifar10", tmp_path)
    assert not marker.exists()


def test_an_idx_header_announcing_a_huge_array_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3 + b"\0" * 10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*announces"):
        data.read_idx(path)


def _checkpoint_path(out):
    return out / f"{_config().name()}.ckpt"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile file's own
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "created-by-the-checkpoint"
    tmp_path.joinpath("run").mkdir()
    ckpt = _checkpoint_path(tmp_path / "run")
    payload = {"model": _CreatesFile(marker), "epoch": 1}
    if writer == "torch.save":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    with pytest.raises(ResultFileError, match=r"\.ckpt: refused.*delete it to restart"):
        train(_config(), tmp_path / "run", _splits(), show_progress=False)
    assert not marker.exists()
    assert ckpt.exists()  # nothing is deleted behind the user's back


def test_a_foreign_checkpoint_is_not_silently_restarted(tmp_path):
    tmp_path.joinpath("run").mkdir()
    torch.save({"weights": torch.zeros(3)}, _checkpoint_path(tmp_path / "run"))
    with pytest.raises(ResultFileError, match=r"not a hesscale checkpoint.*'curves'"):
        train(_config(), tmp_path / "run", _splits(), show_progress=False)


def test_a_malformed_run_record_names_the_file(tmp_path):
    record = tmp_path / f"{_config().name()}.json"
    record.write_text('{"curves": [1, 2')
    with pytest.raises(ResultFileError, match=f"{record.name}.*delete it"):
        train(_config(), tmp_path, _splits(), show_progress=False)


def test_read_json_round_trips_and_refuses_binary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1.5, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1.5, 2]}
    (tmp_path / "b.json").write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(ResultFileError, match="b.json"):
        read_json(tmp_path / "b.json")


@pytest.mark.parametrize("optimizer", ["adahesscale", "adaggnmc", "adahessian", "sgd"])
def test_every_checkpoint_written_loads_with_weights_only(tmp_path, monkeypatch, optimizer):
    loaded = []
    original = train_module._atomic_torch_save

    def save_and_reload(obj, path):
        original(obj, path)
        loaded.append(train_module._load_checkpoint(path)["epoch"])

    monkeypatch.setattr(train_module, "_atomic_torch_save", save_and_reload)
    record = train(_config(optimizer=optimizer), tmp_path, _splits(), show_progress=False)
    assert record["status"] == "finished" and loaded == [1, 2, 3]
