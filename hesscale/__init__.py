"""hesscale: Hessian-diagonal estimates for every parameter at about the cost of a gradient.

Public API:
    extend(module)            prepare a model or a loss (returns it; idempotent)
    diagonal(model, loss_fn, x, y, method=...)   one batch's estimate, as {name: tensor}
    request(params, method)   ask following backward passes for estimates (used by optimizers)
    register_rule(type, rule) add a rule for a layer or autograd Function of your own
    register_estimate_hook(param, hook)   run hook(param) when a backward pass writes its estimate
    importance(model, loss_fn, data, method=..., criterion=...)   pruning / EWC scores
    prune(model, scores, sparsity, scope=...)   masks through torch.nn.utils.prune
    ImportancePenalty(model, strength)   EWC-style λ Σ ω (θ − θ*)² for continual learning
    UnsupportedModuleError

Optimizers (``hesscale.optim``): AdaHesScale, AdaHesScaleGN, AdaBL89, AdaGGNMC, AdaHessian,
Sophia and Adam, drop-in replacements for ``torch.optim.Adam`` (step-size scaling, a guard).
Ground truth for small models: ``hesscale.reference``; the paper's experiments:
``hesscale.experiments`` and the ``hesscale`` command.
"""

from ._errors import UnsupportedModuleError
from ._methods import METHODS
from .consolidation import ImportancePenalty
from .criteria import CRITERIA, importance
from .engine import (
    ESTIMATE_ATTRIBUTE,
    estimate_id,
    extend,
    is_extended,
    register_estimate_hook,
    request,
)
from .estimators import ESTIMATORS, diagonal
from .pruning import prune
from .rules import (
    Backprop,
    LayerContext,
    NodeContext,
    register_rule,
    supported_operations,
    supported_types,
)

__version__ = "0.1.0"

__all__ = [
    "Backprop",
    "CRITERIA",
    "ESTIMATE_ATTRIBUTE",
    "ESTIMATORS",
    "ImportancePenalty",
    "LayerContext",
    "METHODS",
    "NodeContext",
    "UnsupportedModuleError",
    "diagonal",
    "estimate_id",
    "extend",
    "importance",
    "is_extended",
    "prune",
    "register_estimate_hook",
    "register_rule",
    "request",
    "supported_operations",
    "supported_types",
]
