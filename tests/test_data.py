"""Data loaders on small files written in the real formats, including corrupt ones."""

import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from hesscale.experiments import data
from hesscale.experiments.data import DataError


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, n_train=30, n_test=10, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files_load(tmp_path, compress):
    arrays = _write_mnist(tmp_path / "mnist", compress=compress)
    loaded = data.load("mnist", tmp_path)
    assert loaded.train_images.shape == (30, 1, 28, 28)
    assert loaded.train_images.dtype == torch.uint8
    np.testing.assert_array_equal(
        loaded.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(loaded.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_environment_variable_names_the_data_directory(tmp_path, monkeypatch):
    _write_mnist(tmp_path / "elsewhere" / "fashion-mnist")
    monkeypatch.setenv(data.ENVIRONMENT_VARIABLE, str(tmp_path / "elsewhere"))
    assert len(data.load("fmnist").test_images) == 10


def test_truncated_idx_is_an_error_naming_the_file(tmp_path):
    _write_mnist(tmp_path / "mnist", compress=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        data.load("mnist", tmp_path)


def test_corrupt_gzip_is_an_error_naming_the_file(tmp_path):
    _write_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw[:-4]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", tmp_path)


def test_bad_magic_number(tmp_path):
    _write_mnist(tmp_path / "mnist", compress=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataError, match="magic"):
        data.load("mnist", tmp_path)


def test_missing_files_say_which_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        data.load("cifar10", tmp_path)
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message
    assert "--download" in message and "MD5" in message


def _cifar_archive(path, folder, members: dict[str, dict]):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            raw = pickle.dumps(content)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def _batch(n, key, classes, rng):
    return {
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        key: rng.integers(0, classes, n).tolist(),
    }


def test_cifar10_and_cifar100_archives_load(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cifar10").mkdir()
    members = {f"data_batch_{i}": _batch(4, b"labels", 10, rng) for i in range(1, 6)}
    members["test_batch"] = _batch(3, b"labels", 10, rng)
    _cifar_archive(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    c10 = data.load("cifar10", tmp_path)
    assert c10.train_images.shape == (20, 3, 32, 32) and len(c10.test_labels) == 3
    first = members["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(c10.train_images[0].numpy(), first)

    (tmp_path / "cifar100").mkdir()
    _cifar_archive(
        tmp_path / "cifar100" / "cifar-100-python.tar.gz",
        "cifar-100-python",
        {"train": _batch(6, b"fine_labels", 100, rng), "test": _batch(2, b"fine_labels", 100, rng)},
    )
    c100 = data.load("cifar100", tmp_path)
    assert c100.train_images.shape == (6, 3, 32, 32) and c100.train_labels.max() < 100


def test_corrupt_cifar_archive(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8bnot really")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", tmp_path)


def test_download_verifies_checksums(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"some bytes")
    good = data.RemoteFile("file.bin", source.as_uri(), hashlib.md5(b"some bytes").hexdigest())
    path = data.download(good, tmp_path / "dest")
    assert path.read_bytes() == b"some bytes"
    bad = data.RemoteFile("other.bin", source.as_uri(), "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.download(bad, tmp_path / "dest")
    assert not (tmp_path / "dest" / "other.bin").exists()


def test_deepobs_splits_and_preprocessing(tmp_path):
    _write_mnist(tmp_path / "mnist", n_train=50, n_test=10)
    arrays = data.load("mnist", tmp_path)
    splits = data.deepobs_splits(arrays, "mnist", valid_size=20)
    assert len(splits.valid[0]) == 20 and len(splits.train[0]) == 30
    assert len(splits.train_eval[0]) == 10 and not splits.augment
    again = data.deepobs_splits(arrays, "mnist", valid_size=20)
    assert torch.equal(splits.valid[1], again.valid[1])  # seeded
    x = data.prepare(splits.train[0][:4], augment=False)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_cifar_augmentation_is_seeded_and_standardised():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    a = data.prepare(images, True, torch.Generator().manual_seed(1))
    b = data.prepare(images, True, torch.Generator().manual_seed(1))
    c = data.prepare(images, False)
    assert torch.equal(a, b) and a.shape == (5, 3, 32, 32) and not torch.equal(a, c)
    torch.testing.assert_close(c.flatten(1).mean(1), torch.zeros(5), atol=1e-5, rtol=0)
