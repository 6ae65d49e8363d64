"""Optimizers on curvature estimates, drop-in replacements for ``torch.optim.Adam``."""

from ._base import CurvatureAdam
from ._functional import UpdateError, curvature_adam
from .optimizers import (
    OPTIMIZERS,
    AdaBL89,
    AdaGGNMC,
    AdaHesScale,
    AdaHesScaleGN,
    AdaHessian,
    Adam,
    OptimizerSpec,
    Sophia,
)

__all__ = [
    "OPTIMIZERS",
    "AdaBL89",
    "AdaGGNMC",
    "AdaHesScale",
    "AdaHesScaleGN",
    "AdaHessian",
    "Adam",
    "CurvatureAdam",
    "OptimizerSpec",
    "Sophia",
    "UpdateError",
    "curvature_adam",
]
