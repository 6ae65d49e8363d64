"""One batch's estimate, ``hesscale.diagonal`` for the engine's methods."""

from __future__ import annotations

from torch import nn

from .._errors import UnsupportedModuleError
from .._methods import get_method
from ..rules.losses import check_loss, is_loss
from ._record import _forced, _Options, _plain, extend


def backpropagated_diagonal(
    model,
    loss_fn,
    inputs,
    target,
    method: str,
    individual: bool = False,
    samples: int = 1,
    generator=None,
    **loss_kwargs,
):
    """The engine's estimate for one batch: ``(loss, {name: estimate})``; see :func:`diagonal`."""
    config = get_method(method)
    extend(model)
    if config.monte_carlo:
        if not isinstance(loss_fn, nn.Module):
            raise UnsupportedModuleError("GGN-MC needs a loss module (e.g. nn.CrossEntropyLoss)")
        extend(loss_fn)
        if isinstance(loss_fn, nn.NLLLoss):
            raise UnsupportedModuleError(
                "GGN-MC splits the network at its logits: use CrossEntropyLoss on the logits "
                "instead of LogSoftmax followed by NLLLoss"
            )
    elif isinstance(loss_fn, nn.Module) and is_loss(loss_fn):
        check_loss(loss_fn)
    collected: dict = {}
    options = _Options(
        individual=individual,
        samples=samples,
        generator=generator,
        reuse_buffers=False,
        announce=False,
        collect=collected,
    )
    with _forced(model, config, options):
        output = model(inputs)
    loss = loss_fn(output, target, **loss_kwargs)
    loss.backward()
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            estimate = collected.get(id(p))
            if estimate is None:  # not reached by the loss (its gradient did not change either)
                shape = (len(inputs), *p.shape) if individual else p.shape
                estimate = p.new_zeros(shape)
            result[name] = estimate
    return _plain(loss.detach()), result
