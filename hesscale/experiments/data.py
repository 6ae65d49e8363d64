"""Real data sets for the training benchmarks: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100.

Files are read in their standard formats (IDX, gzipped or not; the CIFAR python archives,
packed or extracted) from a data directory: ``--data-dir``, else ``$HESSCALE_DATA``, else
``~/.cache/hesscale/data``; Fashion-MNIST is also found where Debian's
``dataset-fashion-mnist`` installs it. ``download=True`` fetches missing files from the data
sets' canonical sources and verifies their MD5 checksums. A corrupt or truncated file raises
:class:`DataError` naming it; missing files raise :class:`DataError` saying which, where they
were looked for and how to get them. Reading never runs code from a file: the CIFAR pickles
are read by an unpickler that accepts only what the official batches contain.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ENVIRONMENT_VARIABLE = "HESSCALE_DATA"
DEFAULT_ROOT = Path("~/.cache/hesscale/data")


class DataError(RuntimeError):
    """A data set that is missing, corrupt or truncated."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set's files live and how they are read."""

    name: str
    folder: str
    files: tuple[RemoteFile, ...]
    classes: int
    system_dirs: tuple[str, ...] = ()
    extracted: str | None = None  # the folder a CIFAR archive unpacks to


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_files(base_url: str, md5s: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(f"{name}.gz", f"{base_url}{name}.gz", md5) for name, md5 in zip(_IDX_NAMES, md5s)
    )


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist",
        "mnist",
        _idx_files(
            _MNIST_URL,
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ),
        classes=10,
    ),
    "fmnist": DatasetInfo(
        "fmnist",
        "fashion-mnist",
        _idx_files(
            _FMNIST_URL,
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),
        classes=10,
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        "cifar10",
        (
            RemoteFile(
                "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
            ),
        ),
        classes=10,
        extracted="cifar-10-batches-py",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        "cifar100",
        (
            RemoteFile(
                "cifar-100-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
            ),
        ),
        classes=100,
        extracted="cifar-100-python",
    ),
}


@dataclass
class Arrays:
    """A data set in memory: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else ``$HESSCALE_DATA``, else the default."""
    chosen = data_dir or os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_ROOT
    return Path(chosen).expanduser()


# --- IDX ------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: (torch.uint8, 1)}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (gzipped or not); DataError names the file if it is corrupt."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: not a readable file ({err}); delete it and fetch it again"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 1
    for d in dims:
        expected *= d
    payload = len(raw) - header
    if payload != expected:
        raise DataError(
            f"{path}: truncated or corrupt IDX file: its header announces {dims} "
            f"({expected} bytes of data) but it holds {payload}"
        )
    dtype, _ = _IDX_TYPES[raw[2]]
    return torch.frombuffer(bytearray(raw[header:]), dtype=dtype).reshape(dims)


def _find(info: DatasetInfo, root: Path, name: str) -> Path | None:
    """A file by name (or its uncompressed twin) in the data folder or the system folders."""
    folders = [root / info.folder, root] + [Path(d) for d in info.system_dirs]
    for folder in folders:
        for candidate in (name, name.removesuffix(".gz")):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(remote: RemoteFile, folder: Path, timeout: float = 60.0) -> Path:
    """Fetch one file to ``folder`` atomically, verifying its MD5."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{remote.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as r:
            for block in iter(lambda: r.read(1 << 20), b""):
                out.write(block)
        got = _md5(Path(tmp))
        if got != remote.md5:
            raise DataError(
                f"{remote.url}: checksum mismatch (MD5 {got}, expected {remote.md5}); "
                "the download was not kept"
            )
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(f"could not download {remote.url}: {err}") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _locate(info: DatasetInfo, root: Path, download_missing: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing = []
    for remote in info.files:
        path = _find(info, root, remote.name)
        if path is None and info.extracted and (root / info.folder / info.extracted).is_dir():
            path = root / info.folder / info.extracted
        if path is None and download_missing:
            path = download(remote, root / info.folder)
        if path is None:
            missing.append(remote)
        else:
            found[remote.name] = path
    if missing:
        places = [root / info.folder, root] + [Path(d) for d in info.system_dirs]
        lines = "\n".join(f"  {m.name}  ({m.url}, MD5 {m.md5})" for m in missing)
        hint = (
            "\nOn Debian, 'apt-get install dataset-fashion-mnist' provides them."
            if info.name == "fmnist"
            else ""
        )
        raise DataError(
            f"{info.name}: missing files\n{lines}\nlooked in: "
            + ", ".join(str(p) for p in places)
            + f"\nPut them in {root / info.folder} (gzipped or not), set --data-dir or "
            f"${ENVIRONMENT_VARIABLE}, or pass --download on a machine that is online.{hint}"
        )
    return found


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles exactly what the official CIFAR batches contain: dicts, lists, bytes and
    strings, numbers, and numpy arrays with their dtypes. Any other global (a function or class
    that a hostile file names, for instance ``os.system`` or ``builtins.open``) is refused
    before it is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),  # numpy arrays at pickle protocol 5
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a CIFAR batch never contains (only numpy arrays, "
            "dtypes, dicts, lists, bytes and numbers are read)"
        )


def _unpickle_cifar(stream) -> dict:
    batch = _CifarUnpickler(stream, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise pickle.UnpicklingError(f"a CIFAR batch is a dict, this is a {type(batch).__name__}")
    return batch


def _read_cifar_member(source: Path, member: str) -> dict:
    """One pickled CIFAR batch, from the packed archive or the extracted folder, read with
    :class:`_CifarUnpickler` (never running code from the file)."""
    try:
        if source.is_dir():
            with (source / member).open("rb") as f:
                return _unpickle_cifar(f)
        with tarfile.open(source, "r:gz") as tar:
            names = [n for n in tar.getnames() if n.endswith("/" + member)]
            if not names:
                raise DataError(f"{source}: the archive has no member '{member}'")
            return _unpickle_cifar(tar.extractfile(names[0]))
    except DataError:
        raise
    except pickle.UnpicklingError as err:
        raise DataError(f"{source}: refused CIFAR batch '{member}': {err}") from err
    except (OSError, EOFError, tarfile.TarError, zlib.error, ValueError, TypeError) as err:
        raise DataError(f"{source}: corrupt or truncated CIFAR data ({member}: {err})") from err


def _cifar_arrays(source: Path, members: list[str], label_key: bytes) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for member in members:
        batch = _read_cifar_member(source, member)
        try:
            data = torch.as_tensor(batch[b"data"])
            target = torch.tensor(batch[label_key], dtype=torch.int64)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{source}: CIFAR batch '{member}' is malformed ({err})") from err
        if data.dim() != 2 or data.shape[1] != 3072 or len(target) != len(data):
            raise DataError(f"{source}: CIFAR batch '{member}' has shape {tuple(data.shape)}")
        images.append(data.to(torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(target)
    return torch.cat(images), torch.cat(labels)


def load(name: str, data_dir=None, download_missing: bool = False) -> Arrays:
    """Read a data set into memory (see module docstring)."""
    try:
        info = DATASETS[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; known: {sorted(DATASETS)}") from None
    root = data_root(data_dir)
    paths = _locate(info, root, download_missing)
    if info.extracted is None:
        tensors = [read_idx(paths[f.name]) for f in info.files]
        train_x, train_y, test_x, test_y = tensors
        for images, labels, label in ((train_x, train_y, "train"), (test_x, test_y, "test")):
            if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
                raise DataError(
                    f"{info.name}: {label} images {tuple(images.shape)} and labels "
                    f"{tuple(labels.shape)} do not match"
                )
        return Arrays(train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long())
    source = paths[info.files[0].name]
    if info.name == "cifar10":
        train = _cifar_arrays(source, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
        test = _cifar_arrays(source, ["test_batch"], b"labels")
    else:
        train = _cifar_arrays(source, ["train"], b"fine_labels")
        test = _cifar_arrays(source, ["test"], b"fine_labels")
    return Arrays(train[0], train[1], test[0], test[1])


# --- splits and preprocessing (DeepOBS) -----------------------------------------------------
@dataclass
class Splits:
    """Training data, and the three evaluation sets of DeepOBS."""

    train: tuple[Tensor, Tensor]
    train_eval: tuple[Tensor, Tensor]
    valid: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    augment: bool  # CIFAR: random crops, flips and colour jitter on training batches


def deepobs_splits(
    arrays: Arrays, dataset: str, valid_size: int = 10_000, split_seed: int = 42
) -> Splits:
    """Hold out ``valid_size`` training examples for validation (seeded); the train-eval set is a
    fixed random subset of the remaining training data, as large as the test set."""
    n = len(arrays.train_images)
    if not 0 < valid_size < n:
        raise DataError(f"cannot hold out {valid_size} of {n} training examples")
    gen = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(n, generator=gen)
    valid_idx, train_idx = order[:valid_size], order[valid_size:]
    eval_size = min(len(arrays.test_images), len(train_idx))
    eval_idx = train_idx[torch.randperm(len(train_idx), generator=gen)[:eval_size]]
    x, y = arrays.train_images, arrays.train_labels
    return Splits(
        train=(x[train_idx], y[train_idx]),
        train_eval=(x[eval_idx], y[eval_idx]),
        valid=(x[valid_idx], y[valid_idx]),
        test=(arrays.test_images, arrays.test_labels),
        augment=dataset.startswith("cifar"),
    )


def _standardize(x: Tensor) -> Tensor:
    """Per-image standardisation: zero mean, unit variance (floored at 1/√pixels)."""
    flat = x.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True).clamp(min=1.0 / flat.shape[1] ** 0.5)
    return ((flat - mean) / std).view_as(x)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """DeepOBS' CIFAR augmentation on a float batch in [0, 1]: pad to 36×36 and crop 32×32 at
    random, flip left-right, random brightness (±63/255), saturation (×[0.5, 1.5]) and contrast
    (×[0.2, 1.8])."""
    n = len(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    rows = torch.randint(0, 5, (n,), generator=gen)
    cols = torch.randint(0, 5, (n,), generator=gen)
    idx = torch.arange(32)
    r = (rows[:, None] + idx)[:, None, :, None].expand(n, 3, 32, 32)
    c = (cols[:, None] + idx)[:, None, None, :].expand(n, 3, 32, 32)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], r, c]
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    out = out + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * (63 / 255)
    gray = out.mean(1, keepdim=True)
    out = gray + (out - gray) * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
    mean = out.mean((1, 2, 3), keepdim=True)
    return mean + (out - mean) * (0.2 + 1.6 * torch.rand(n, 1, 1, 1, generator=gen))


def prepare(images: Tensor, augment: bool, gen: torch.Generator | None = None) -> Tensor:
    """uint8 images to network inputs: MNIST-like scaled to [0, 1]; CIFAR standardised per image,
    after augmentation when ``augment``. Token ids (int64, text data sets) pass unchanged."""
    if images.dtype == torch.long:
        return images
    x = images.float() / 255.0
    if images.shape[1] != 3:
        return x
    if augment:
        x = _augment(x, gen)
    return _standardize(x)
