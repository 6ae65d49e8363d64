"""Which splits a problem trains on: the image data sets' (:mod:`.data`) or windows of a
text (:mod:`.text`). Kept apart from both so that neither imports the other's dispatch."""

from __future__ import annotations

from .data import DataError, Splits, deepobs_splits, load
from .text import read_text, text_splits

TEXT_DATASETS = ("shakespeare",)


def splits_for(
    dataset: str, data_dir=None, download: bool = False, context: int | None = None, text_file=None
) -> Splits:
    """The splits of a problem's data set: DeepOBS' for the image data sets, windows of bytes
    (:func:`hesscale.experiments.text.text_splits`) for the text data sets (a user's own text
    file instead when ``text_file`` is given)."""
    if dataset in TEXT_DATASETS:
        return text_splits(read_text(data_dir, download, text_file), context)
    if text_file is not None:
        raise DataError(f"--text-file applies to the text problems, not to {dataset!r}")
    return deepobs_splits(load(dataset, data_dir, download), dataset)
