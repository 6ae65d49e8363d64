"""``hesscale.importance``: how much each weight matters, from a Hessian-diagonal estimate.

The second-order Taylor model of the loss when one weight ``θ`` is set to zero (all others
kept) predicts the change

    ΔL ≈ −g·θ + ½·h·θ²,

``g`` the gradient and ``h`` the Hessian's diagonal entry of that weight. The criteria are
magnitudes of its terms, so every score is non-negative and a small score means "removing this
weight changes the loss little":

* ``"obd"``: ``½·|h|·θ²`` (Optimal Brain Damage, LeCun et al. 1990: at a minimum ``g = 0``);
* ``"taylor2"``: ``|−g·θ + ½·h·θ²|``, the whole second-order change;
* ``"taylor1"``: ``|g·θ|`` (Molchanov et al. 2019's first-order criterion; needs no ``h``);
* ``"magnitude"``: ``|θ|`` (needs no data);
* ``"curvature"``: ``|h|`` itself, the importance weight ``ω`` of EWC-style penalties
  (:class:`hesscale.ImportancePenalty`).

``h`` comes from any estimator of :func:`hesscale.diagonal` (``hesscale``, ``hesscale_gn``,
``ggn_mc``, ``hutchinson``, ``exact`` for small models, …) or from the Fisher as EWC and pruning
papers use it: ``empirical_fisher`` (per-example squared gradients at the data's labels) and
``fisher`` (at labels sampled from the model). With the Gauss-Newton and Fisher estimators
``h ≥ 0`` and the absolute value changes nothing; HesScale's ``h`` can be negative.

Over several batches, ``g`` and ``h`` are those of the data set's loss: for a loss with
``reduction="mean"`` the batches' estimates are averaged with weights proportional to their
sizes, for ``"sum"`` they are added; the criterion is applied once, to the totals.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._progress import progress as progress_bar
from .estimators import ESTIMATORS, diagonal

CRITERIA = ("obd", "taylor2", "taylor1", "magnitude", "curvature")
_NEEDS_CURVATURE = {"obd", "taylor2", "curvature"}
_NEEDS_GRADIENT = {"taylor2", "taylor1"}


def score(criterion: str, theta: Tensor, g: Tensor | None, h: Tensor | None) -> Tensor:
    """One parameter's scores under ``criterion`` (see the module docstring for the formulas)."""
    if criterion == "obd":
        return 0.5 * h.abs() * theta**2
    if criterion == "taylor2":
        return (-g * theta + 0.5 * h * theta**2).abs()
    if criterion == "taylor1":
        return (g * theta).abs()
    if criterion == "magnitude":
        return theta.abs()
    if criterion == "curvature":
        return h.abs()
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")


def _check(method: str, criterion: str, data) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {list(CRITERIA)}")
    if criterion in _NEEDS_CURVATURE and method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(ESTIMATORS)}")
    if criterion != "magnitude" and data is None:
        raise ValueError(f"criterion {criterion!r} needs data: an iterable of (inputs, target)")


def _batches(data, device) -> Iterable[tuple[Tensor, Tensor]]:
    for i, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"batch {i} of data is a {type(batch).__name__}; importance expects an iterable "
                "of (inputs, target) pairs, such as a DataLoader over a TensorDataset"
            )
        inputs, target = batch
        yield inputs.to(device), target.to(device)


def importance(
    model: nn.Module,
    loss_fn=None,
    data: Iterable[tuple[Tensor, Tensor]] | None = None,
    method: str = "hesscale",
    criterion: str = "obd",
    *,
    samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **loss_kwargs,
) -> dict[str, Tensor]:
    """Non-negative importance scores of every trainable parameter, accumulated over ``data``.

    Args:
        model: the network (it is extended when an engine method is used; its mode, train or
            eval, is left as it is: call ``model.eval()`` first to score without dropout).
        loss_fn: a loss module or function of the output and target.
        data: an iterable of ``(inputs, target)`` batches (a ``DataLoader``, a list); moved to
            the device of the model's parameters. Not needed for ``"magnitude"``.
        method: the estimator of ``h``, any of :data:`hesscale.ESTIMATORS`
            (``empirical_fisher`` and ``fisher`` for EWC's Fisher). Unused by ``"taylor1"``
            and ``"magnitude"``.
        criterion: one of :data:`CRITERIA`.
        samples, generator: the stochastic estimators' Monte-Carlo samples and random source.
        progress: show a progress bar over the batches (tqdm when installed).
        **loss_kwargs: further arguments of the loss.

    Returns:
        ``{name: scores}``, names as in ``model.named_parameters()``, scores shaped like the
        parameters. The parameters' ``.grad`` are left as they were.
    """
    _check(method, criterion, data)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if criterion == "magnitude":
        return {n: score("magnitude", p.detach(), None, None) for n, p in named}
    device = named[0][1].device if named else torch.device("cpu")
    saved_grads = [p.grad for _, p in named]
    grads = {n: torch.zeros_like(p) for n, p in named}
    curvature = {n: torch.zeros_like(p) for n, p in named}
    mean = getattr(loss_fn, "reduction", "mean") != "sum"
    examples = 0
    total = len(data) if hasattr(data, "__len__") else None
    bar = (
        progress_bar(total, f"importance ({criterion}, {method})", unit="batch")
        if progress
        else None
    )
    try:
        for inputs, target in _batches(data, device):
            for _, p in named:
                p.grad = None
            weight = len(inputs) if mean else 1  # a mean loss: weigh batches by their size
            if criterion in _NEEDS_CURVATURE:
                _, diag = diagonal(
                    model,
                    loss_fn,
                    inputs,
                    target,
                    method,
                    samples=samples,
                    generator=generator,
                    **loss_kwargs,
                )
                for n in curvature:
                    curvature[n] += weight * diag[n]
            else:  # gradients only
                loss_fn(model(inputs), target, **loss_kwargs).backward()
            for n, p in named:
                if p.grad is not None:
                    grads[n] += weight * p.grad
            examples += len(inputs)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        for (_, p), g in zip(named, saved_grads):
            p.grad = g
    if examples == 0:
        raise ValueError("data yielded no batch: importance needs at least one (inputs, target)")
    scale = 1.0 / examples if mean else 1.0
    return {
        n: score(criterion, p.detach(), grads[n] * scale, curvature[n] * scale) for n, p in named
    }
