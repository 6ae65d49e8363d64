"""Optimizer steps on parameters sharded by FSDP2 (``fully_shard``), whose estimates
:mod:`hesscale.fsdp` reduce-scatters.

The update is element-wise, so each rank computes it on the local tensors of its shards
(parameter, gradient, estimate, moments; the moments are ``DTensor``s with the parameters'
placements, as ``torch.optim.AdamW`` keeps them under FSDP, so ``torch.distributed.checkpoint``
saves them sharded). Two quantities of a step are sums over all of the model's parameters, so
over all ranks: the step-size scaling's ``T = Σ d ⊙ u²`` and the guard's squared norms
``‖u‖²`` and ``‖θ‖²``. Each rank computes per-parameter partial sums over its shards, and one
all-reduce per quantity adds them up (:class:`RankSums`), so that every rank takes the same
scale and the same guard decision: the guard raises on every rank together.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or estimate sharded by FSDP2)."""
    if t is None or "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """This rank's part of ``t`` (``t`` itself unless sharded); it shares ``t``'s memory."""
    return t.to_local() if is_sharded(t) else t


class RankSums:
    """``values ↦ Σ_ranks values`` for vectors of per-parameter partial sums.

    Entries of parameters that are not sharded (replicated: every rank holds all of them) count
    once, from rank 0.

    Args:
        sharded: per parameter, whether it is sharded.
        group: the process group of the shards (the device mesh's).
        device: where the all-reduce runs (the parameters' device: NCCL reduces on the GPU).
    """

    def __init__(self, sharded: list[bool], group, device: torch.device):
        self.replicated = torch.tensor([not s for s in sharded])
        self.group, self.device = group, device
        self.first = dist.get_rank(group) == 0

    def __call__(self, values: Tensor) -> Tensor:
        values = values.to(self.device, torch.float64)
        if not self.first and bool(self.replicated.any()):
            values = values.masked_fill(self.replicated.to(self.device), 0.0)
        dist.all_reduce(values, group=self.group)
        return values.cpu()


def rank_sums(params: list[Tensor]) -> RankSums | None:
    """The cross-rank sum for a step over ``params``, or None when none is sharded."""
    sharded = [is_sharded(p) for p in params]
    if not any(sharded):
        return None
    meshes = []  # equal meshes (fully_shard without mesh= makes one per call) count once
    for p, s in zip(params, sharded):
        if s and not any(p.device_mesh == mesh for mesh in meshes):
            meshes.append(p.device_mesh)
    if len(meshes) > 1:
        raise ValueError(
            "the optimizer's parameters are sharded over several device meshes; one optimizer "
            "steps the parameters of one FSDP mesh"
        )
    (mesh,) = meshes
    device = next(local(p).device for p, s in zip(params, sharded) if s)
    return RankSums(sharded, mesh.get_group(), device)
