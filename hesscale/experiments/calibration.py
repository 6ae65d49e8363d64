"""How well a classifier's predictive probabilities are calibrated, and the rotated-image shift of
the Laplace-Redux benchmark (Daxberger et al. 2021, after Ovadia et al. 2019).

For predictive probabilities ``p_n`` over ``C`` classes and labels ``y_n``, ``n = 1..N``:

.. math::
    \\text{accuracy} &= \\tfrac1N \\textstyle\\sum_n [\\arg\\max_c p_{nc} = y_n] \\\\
    \\text{NLL} &= -\\tfrac1N \\textstyle\\sum_n \\log p_{n y_n} \\\\
    \\text{Brier} &= \\tfrac1N \\textstyle\\sum_n \\sum_c (p_{nc} - [c = y_n])^2 \\\\
    \\text{ECE} &= \\textstyle\\sum_b \\tfrac{|B_b|}{N}\\,
        \\bigl|\\text{acc}(B_b) - \\text{conf}(B_b)\\bigr|

with ``B_b`` the examples whose confidence ``max_c p_nc`` falls in the ``b``-th of ``bins``
equal-width bins of ``[0, 1]``, ``conf`` their mean confidence and ``acc`` their accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: mean confidence, accuracy (NaN where empty) and count."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    index = (confidence.double() * bins).long().clamp(max=bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, confidence.double(), minlength=bins)
    correct_sum = torch.bincount(index, correct, minlength=bins)
    safe = count.clamp(min=1)
    empty = count == 0
    return (
        (conf_sum / safe).masked_fill(empty, math.nan),
        (correct_sum / safe).masked_fill(empty, math.nan),
        count,
    )


def calibration_metrics(probs: Tensor, labels: Tensor, bins: int = 15) -> dict[str, float]:
    """``{"accuracy", "nll", "brier", "ece"}`` of predictive probabilities ``probs (N, C)``."""
    if probs.dim() != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs must be (N, C) and labels (N,), got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    probs = probs.double()
    n = len(labels)
    picked = probs[torch.arange(n), labels]
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    confidence, accuracy, count = reliability(probs, labels, bins)
    filled = count > 0
    ece = (count[filled] / n * (accuracy[filled] - confidence[filled]).abs()).sum()
    return {
        "accuracy": float((probs.argmax(-1) == labels).double().mean()),
        "nll": float(-picked.clamp(min=1e-12).log().mean()),
        "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
        "ece": float(ece),
    }


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Images ``(N, C, H, W)`` rotated counter-clockwise by ``degrees`` about their centre
    (bilinear interpolation, zeros outside), as the rotated-MNIST shift of Ovadia et al."""
    if degrees % 360 == 0:
        return images
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype)
    grid = torch.nn.functional.affine_grid(
        matrix.expand(len(images), 2, 3), list(images.shape), align_corners=False
    )
    return torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
