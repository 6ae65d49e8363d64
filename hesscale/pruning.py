"""``hesscale.prune``: remove the least important weights through ``torch.nn.utils.prune``.

Masks are applied with ``torch.nn.utils.prune.custom_from_mask``, so a pruned model behaves as
PyTorch's own pruning does: ``module.weight`` becomes ``weight_orig * weight_mask`` (recomputed
before every forward), fine-tuning keeps pruned weights at zero, ``prune.remove`` makes it
permanent, and ``state_dict`` carries ``weight_orig`` and ``weight_mask``. Pruning a pruned
model again combines the masks; weights pruned before count towards the new sparsity.

Exactly ``round(sparsity · n)`` weights are removed, ``n`` counted over all pruned tensors
(``scope="global"``) or in each tensor (``scope="layer"``): the lowest scores, ties broken by
position, so the sparsity asked for is the sparsity obtained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

SCOPES = ("global", "layer")
PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def default_targets(model: nn.Module) -> list[str]:
    """The ``weight`` of every Linear, convolution and transposed convolution: biases,
    normalization, embeddings and other parameters are left alone unless named."""
    return [
        f"{path}.weight" if path else "weight"
        for path, module in model.named_modules()
        if isinstance(module, PRUNABLE)
    ]


def _locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    attr = attr.removesuffix("_orig")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{name!r} is not a parameter of the model") from None
    if not isinstance(getattr(module, attr, None), Tensor):
        raise ValueError(f"{name!r} is not a parameter of the model")
    return module, attr


def _scores_for(scores: Mapping[str, Tensor], name: str, like: Tensor) -> Tensor:
    path, _, attr = name.rpartition(".")
    for key in (name, f"{path}.{attr}_orig" if path else f"{attr}_orig"):
        if key in scores:
            value = scores[key]
            if value.shape != like.shape:
                raise ValueError(
                    f"scores[{key!r}] has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(like.shape)}"
                )
            return value.detach().to(like.device, torch.float64)
    raise ValueError(
        f"no score for {name!r}: scores must hold every parameter to prune (give the "
        "dictionary of hesscale.importance, or choose the parameters with names=)"
    )


def _lowest(flat: Tensor, k: int) -> Tensor:
    """A boolean mask of the ``k`` lowest entries, ties broken by position (stable sort)."""
    drop = torch.zeros_like(flat, dtype=torch.bool)
    drop[torch.sort(flat, stable=True).indices[:k]] = True
    return drop


def prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    sparsity: float,
    scope: str = "global",
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Zero the fraction ``sparsity`` of the weights with the lowest scores.

    Args:
        model: the model to prune in place.
        scores: ``{parameter name: scores}`` shaped like the parameters, e.g. from
            :func:`hesscale.importance`; a larger score means more important.
        sparsity: the fraction in ``[0, 1]`` of the weights to remove (counting those pruned
            before).
        scope: ``"global"`` ranks all pruned tensors together; ``"layer"`` removes the same
            fraction from each tensor.
        names: the parameters to prune; default :func:`default_targets` (the weights of
            Linear layers and convolutions).

    Returns:
        ``{name: mask}`` of the pruned tensors, 1 where a weight is kept.
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    names = list(default_targets(model) if names is None else names)
    if not names:
        raise ValueError("nothing to prune: the model has no Linear or convolution weight")
    targets = []
    for name in names:
        module, attr = _locate(model, name)
        weight = getattr(module, attr)
        s = _scores_for(scores, name, weight)
        old_mask = getattr(module, f"{attr}_mask", None)
        if old_mask is not None:  # pruned before: those weights stay pruned and count
            s = s.masked_fill(old_mask == 0, -torch.inf)
        targets.append((name, module, attr, s))
    if scope == "global":
        flat = torch.cat([s.flatten() for *_, s in targets])
        drop = _lowest(flat, round(sparsity * flat.numel())).split([s.numel() for *_, s in targets])
    else:
        drop = [_lowest(s.flatten(), round(sparsity * s.numel())) for *_, s in targets]
    masks = {}
    for (name, module, attr, s), d in zip(targets, drop):
        mask = (~d).view(s.shape).to(getattr(module, attr).dtype)
        torch_prune.custom_from_mask(module, attr, mask)
        masks[name] = getattr(module, f"{attr}_mask")
    return masks


def sparsity_of(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """The fraction of zeros among the named weights (default :func:`default_targets`)."""
    zeros = total = 0
    for name in default_targets(model) if names is None else names:
        module, attr = _locate(model, name)
        weight = getattr(module, attr)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)
