"""``hesscale.ImportancePenalty``: an importance-weighted pull towards earlier tasks' weights.

After task ``t`` the penalty is consolidated at the weights ``θ*`` reached and the importances
``ω_t`` measured there (e.g. ``hesscale.importance(..., criterion="curvature")``: a Hessian or
Fisher diagonal). Training on the next task adds

    P(θ) = λ · Σ_i ω_i · (θ_i − θ*_i)²,   ω ← γ·ω + ω_t at each consolidation,

to the loss: EWC (Kirkpatrick et al. 2017) with its ``λ/2`` written as ``λ``, and, with ``γ < 1``,
online EWC's decaying sum (Schwarz et al. 2018); ``θ*`` is always the latest consolidation's.
``P`` is ordinary autograd code over the parameters, so it works in any training loop, and the
engine sees it: its exact curvature ``2λω`` is part of ``p.hess_diag`` (for the methods
``hesscale``, ``hesscale_gn``, ``bl89``; GGN-MC refuses penalty terms).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class ImportancePenalty:
    """``λ Σ ω (θ − θ*)²`` over the model's trainable parameters (see the module docstring).

    Args:
        model: the network whose parameters are pulled back.
        strength: ``λ ≥ 0``.
        decay: ``γ ∈ [0, 1]``: how much of the earlier importances each consolidation keeps
            (1: EWC's sum over tasks; 0: the latest task only).

    Example::

        penalty = hesscale.ImportancePenalty(model, strength=100.0)
        for task in tasks:
            for x, y in task.batches:
                loss = loss_fn(model(x), y) + penalty()
                ...
            penalty.consolidate(hesscale.importance(
                model, loss_fn, task.batches, method="hesscale_gn", criterion="curvature"))
    """

    def __init__(self, model: nn.Module, strength: float, decay: float = 1.0):
        if not strength >= 0.0:
            raise ValueError(f"Invalid strength value: {strength}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"Invalid decay value: {decay}")
        self.model, self.strength, self.decay = model, float(strength), float(decay)
        self.tasks = 0
        self.anchors: dict[str, Tensor] = {}
        self.importances: dict[str, Tensor] = {}

    def _parameters(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def consolidate(self, importances: Mapping[str, Tensor]) -> None:
        """Anchor at the current weights and add ``importances`` (``{name: ω_t ≥ 0}``, for
        every trainable parameter) to the decayed earlier ones."""
        params = self._parameters()
        missing = sorted(set(params) - set(importances))
        if missing:
            raise ValueError(f"importances lack the parameters {missing}")
        for name, p in params.items():
            omega = importances[name].detach()
            if omega.shape != p.shape:
                raise ValueError(
                    f"importances[{name!r}] has shape {tuple(omega.shape)}, the parameter "
                    f"{tuple(p.shape)}"
                )
            if not bool(torch.isfinite(omega).all()) or bool((omega < 0).any()):
                raise ValueError(f"importances[{name!r}] must be finite and non-negative")
            before = self.importances.get(name)
            omega = omega.to(p.device, p.dtype)
            self.importances[name] = (
                omega.clone() if before is None else self.decay * before + omega
            )
            self.anchors[name] = p.detach().clone()
        self.tasks += 1

    def __call__(self) -> Tensor:
        """``P(θ)`` at the model's current weights (zero before the first consolidation)."""
        params = self._parameters()
        total = None
        for name, anchor in self.anchors.items():
            term = (self.importances[name] * (params[name] - anchor) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            p = next(iter(params.values()), None)
            return torch.zeros((), device=None if p is None else p.device)
        return self.strength * total

    def state_dict(self) -> dict:
        """Everything needed to resume: strength, decay, tasks, anchors and importances."""
        return {
            "strength": self.strength,
            "decay": self.decay,
            "tasks": self.tasks,
            "anchors": {n: t.clone() for n, t in self.anchors.items()},
            "importances": {n: t.clone() for n, t in self.importances.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s output; names and shapes must match the model's."""
        params = self._parameters()
        for key in ("anchors", "importances"):
            for name, t in state[key].items():
                if name not in params or t.shape != params[name].shape:
                    raise ValueError(f"state_dict {key}[{name!r}] does not match the model")
        self.strength, self.decay = float(state["strength"]), float(state["decay"])
        self.tasks = int(state["tasks"])
        self.anchors = {n: t.to(params[n].device) for n, t in state["anchors"].items()}
        self.importances = {n: t.to(params[n].device) for n, t in state["importances"].items()}
