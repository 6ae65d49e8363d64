"""What the Section 7 studies (oracle agreement, pruning, continual learning) share: the
trained Fashion-MNIST networks, the scorers compared, rank correlation and batching."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .data import Splits, deepobs_splits, load, prepare
from .train import RunConfig, trained_model

NETWORKS = ("fmnist_mlp", "fmnist_2c2d")
# (label, criterion, estimator of h); the order is the figures'
SCORERS: list[tuple[str, str, str | None]] = [
    ("OBD · HesScale", "obd", "hesscale"),
    ("OBD · HesScaleGN", "obd", "hesscale_gn"),
    ("OBD · GGN-MC", "obd", "ggn_mc"),
    ("OBD · Fisher", "obd", "fisher"),
    ("OBD · empirical Fisher", "obd", "empirical_fisher"),
    ("OBD · Hutchinson", "obd", "hutchinson"),
    ("Taylor2 · HesScale", "taylor2", "hesscale"),
    ("Taylor1 |gθ|", "taylor1", None),
    ("magnitude |θ|", "magnitude", None),
]


def fmnist(splits: Splits | None = None, data_dir=None, download: bool = False) -> Splits:
    """DeepOBS' Fashion-MNIST splits (the ones given, for tests)."""
    if splits is not None:
        return splits
    return deepobs_splits(load("fmnist", data_dir, download), "fmnist")


def trained_network(problem: str, seed: int, folder: Path, splits: Splits, epochs: int = 1):
    """``problem``'s network after ``epochs`` of Adam (lr 1e-3, the problem's batch size and L2),
    trained once and kept in ``folder`` (shared by the studies); a fresh module in eval mode."""
    config = RunConfig(problem=problem, optimizer="adam", lr=1e-3, epochs=epochs, seed=seed)
    model, _ = trained_model(config, folder, splits, show_progress=True)
    return model.eval()


def networks_folder(out: Path, networks_dir) -> Path:
    """Where the trained networks live: ``networks_dir``, else ``networks/`` beside ``out``."""
    return Path(networks_dir) if networks_dir is not None else Path(out).parent / "networks"


def prepared(data: tuple[Tensor, Tensor], count: int | None = None, dtype=torch.float32):
    """The first ``count`` examples as network inputs and labels."""
    x, y = data
    if count is not None:
        x, y = x[:count], y[:count]
    return prepare(x, augment=False).to(dtype), y


def batches(data, batch: int, count: int, seed: int, permutation: Tensor | None = None):
    """``count`` random batches of ``batch`` examples (inputs pixel-permuted if asked)."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        inputs = prepare(x[idx], augment=False)
        if permutation is not None:
            inputs = permute_pixels(inputs, permutation)
        result.append((inputs, y[idx]))
    return result


def permute_pixels(images: Tensor, permutation: Tensor) -> Tensor:
    """Images ``(N, C, H, W)`` with their pixels reordered by ``permutation`` (of ``C·H·W``)."""
    return images.flatten(1)[:, permutation].view_as(images)


@torch.no_grad()
def accuracy(model, inputs: Tensor, labels: Tensor, batch: int = 2000) -> float:
    """Fraction of ``inputs`` classified as ``labels``."""
    correct = 0
    for i in range(0, len(inputs), batch):
        correct += int((model(inputs[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(inputs)


def ranks(values: Tensor) -> Tensor:
    """Ranks 0…n−1 of ``values``, ties given their average rank."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    rank = torch.empty(len(values), dtype=torch.float64)
    start = 0
    n = len(values)
    while start < n:  # runs of equal values share the mean of their positions
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        rank[order[start:stop]] = (start + stop - 1) / 2
        start = stop
    return rank


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two vectors (Pearson's of their tie-averaged ranks)."""
    ra, rb = ranks(a.double().flatten()), ranks(b.double().flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))
