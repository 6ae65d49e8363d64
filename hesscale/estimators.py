"""``hesscale.diagonal``: every Hessian-diagonal estimator behind one function, chosen by name.

The backpropagated methods (``hesscale``, ``hesscale_gn``, ``bl89``) run the engine; the
reference and baseline estimators of the paper's comparison live in :mod:`hesscale.baselines`.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import baselines
from ._errors import UnsupportedModuleError
from ._methods import METHODS
from .engine import backpropagated_diagonal

ESTIMATORS = tuple(METHODS) + tuple(baselines.BASELINES)


def diagonal(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    target: Tensor,
    method: str = "hesscale",
    *,
    samples: int = 1,
    generator=None,
    individual: bool = False,
    **loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Estimate the diagonal of the Hessian of ``loss_fn(model(inputs), target)``.

    Args:
        model: any model whose forward uses operations with a rule (extended if it was not).
        loss_fn: a loss module or function of the output and target; its reduction decides
            what the estimate is of (GGN-MC and KFAC-MC need a supported loss module).
        inputs, target: one batch.
        method: one of :data:`ESTIMATORS`: ``hesscale``, ``hesscale_gn``, ``bl89`` (the engine),
            ``exact``, ``ggn``, ``ggn_mc``, ``hutchinson``, ``kfac_mc``, ``grad_sq``.
        samples: Monte-Carlo samples of the stochastic estimators.
        generator: a ``torch.Generator`` that makes the stochastic estimators repeatable.
        individual: per-example estimates ``(N, *param.shape)`` instead of the batch's (the
            engine's methods ``hesscale``, ``hesscale_gn``, ``bl89``, ``ggn_mc``, and
            ``kfac_mc``; the HesScale rules of Linear and convolutions support it).
        **loss_kwargs: further loss arguments (e.g. ``var=`` of GaussianNLLLoss).

    Returns:
        ``(loss, {name: estimate})``, names as in ``model.named_parameters()``, estimates shaped
        like the parameters. The parameters' ``.grad`` accumulate the gradient of ``loss`` as
        after ``loss.backward()``.
    """
    if method in METHODS:
        return backpropagated_diagonal(
            model,
            loss_fn,
            inputs,
            target,
            method,
            individual=individual,
            samples=samples,
            generator=generator,
            **loss_kwargs,
        )
    if method in baselines.BASELINES:
        return baselines.BASELINES[method](
            model,
            loss_fn,
            inputs,
            target,
            samples=samples,
            generator=generator,
            individual=individual,
            **loss_kwargs,
        )
    raise UnsupportedModuleError(f"unknown method {method!r}; choose one of {list(ESTIMATORS)}")
