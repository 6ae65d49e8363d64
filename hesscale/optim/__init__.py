"""Optimizers on curvature estimates, drop-in replacements for ``torch.optim.Adam``."""

from ._base import CurvatureAdam
from ._functional import curvature_adam
from .optimizers import OPTIMIZERS, AdaBL89, AdaGGNMC, AdaHesScale, AdaHesScaleGN, AdaHessian

__all__ = [
    "OPTIMIZERS",
    "AdaBL89",
    "AdaGGNMC",
    "AdaHesScale",
    "AdaHesScaleGN",
    "AdaHessian",
    "CurvatureAdam",
    "curvature_adam",
]
