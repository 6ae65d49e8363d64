"""Estimates of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A thin adapter over the engine: the engine estimates what autograd's graph holds, this module
moves each estimate to where FSDP keeps the parameter. Nothing here needs a call from the user:
``hesscale.extend`` finds the sharded modules (before or after ``fully_shard``, see below).

**What FSDP2 does, seen from autograd** (torch 2.13, checked on CPU processes with gloo):

- Between a module's forward and backward passes it holds *sharded* parameters: ``DTensor``
  parameters with placement ``Shard(0)``, rank ``r`` holding the ``r``-th block of rows in
  ``torch.chunk`` order. For the module's forward and backward passes it all-gathers them into
  *unsharded* ``nn.Parameter``s (one object per parameter, reused every iteration); these are
  the leaves of autograd's graph, so the engine estimates them as any parameter: each carries
  a record (:data:`hesscale.engine._store.SHARDED`) that names the sharded parameter it stands
  for. The only FSDP node in the graph, ``RegisterPostBackwardFunctionBackward``, is the
  identity on its inputs (``ŝ_x = ŝ_y``); its backward starts the group's gradient reduction.
- After the backward pass of a module's parameters (its *parameter group*), FSDP packs the
  group's gradients into one flat buffer, each padded on dimension 0 to a multiple of the
  world size ``R``, reduce-scatters it, averages, sets or adds each shard to the sharded
  parameter's ``.grad`` and calls that parameter's post-accumulate-grad hooks.

**What this adapter does** with rank ``r``'s estimate ``ŝ_r`` of its own batch:

1. It keeps it (full shape, in the sharded parameter's dtype) until FSDP reduce-scatters the
   gradients. Backward passes without gradient synchronisation
   (``module.set_requires_gradient_sync(False)``, gradient accumulation) add to it, as FSDP
   keeps their gradients unsharded.
2. In the group's first post-accumulate-grad hook it packs the group's estimates in FSDP's
   layout and starts one asynchronous reduce-scatter (per group, not per tensor), which
   overlaps the rest of the backward pass: rank ``r`` receives its shard of ``Σ_r ŝ_r``.
3. When the backward pass ends it waits, divides by FSDP's gradient divide factor (``R``
   unless ``set_gradient_divide_factor`` changed it),

   .. math:: \\hat{s}(p)_{[r]} = \\frac{1}{R} \\sum_{q=1}^{R} \\hat{s}_q(p)_{[r]}

   (``[r]`` rank ``r``'s shard),

   and writes each shard as ``p.hess_diag``: a ``DTensor`` with ``p.grad``'s placements,
   added or written by the engine's accumulation rule applied to the sharded gradient.

So ``p.hess_diag`` is the shard of the estimate of the mean loss over the ranks' batches, as
``p.grad`` is the shard of its gradient, and curvature state costs ``1/R`` of the memory per
rank. Every collective starts from FSDP's own hook, so in FSDP's order on every rank, with the
same layout on every rank (a requested parameter that got no estimate on a rank sends zeros),
and only in backward passes that compute estimates (none on the steps between curvature
updates, ``update_every > 1``).

Supported: ``fully_shard`` on a 1-D device mesh, per module and at the root, any
``reshard_after_forward``, ``MixedPrecisionPolicy`` (estimates in the sharded parameters'
dtype, float32 where they are float32), sharding on another dimension
(``shard_placement_fn``). Refused by name: a 2-D mesh (HSDP), per-example estimates. The
adapter reads FSDP2's parameter groups (``FSDPParamGroup.fsdp_params``, each
``FSDPParam.sharded_param`` and ``_unsharded_param``); a torch whose FSDP2 lacks them is
refused with the attribute it lacks.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from ._errors import UnsupportedModuleError
from .engine._store import SHARDED, invalidate
from .rules._registry import NodeContext, register_rule

# torch 2.13 renamed reduce_scatter_tensor (deprecated there) to reduce_scatter_single
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Sharded:
    """One parameter sharded by FSDP2: its sharded parameter (``owner``, the model's) and its
    unsharded stand-in (``leaf``, autograd's; None before the first all-gather)."""

    __slots__ = ("fsdp_param", "group", "sharding")

    def __init__(self, fsdp_param, group: _Group, sharding: FSDPSharding):
        self.fsdp_param, self.group, self.sharding = fsdp_param, group, sharding

    @property
    def owner(self) -> nn.Parameter:
        return self.fsdp_param.sharded_param

    @property
    def leaf(self) -> nn.Parameter | None:
        return getattr(self.fsdp_param, "_unsharded_param", None)


class _Group:
    """One FSDP parameter group: its parameters travel in one reduce-scatter."""

    def __init__(self, param_group, sharding: FSDPSharding):
        self.param_group = param_group
        self.records = [_Sharded(fp, self, sharding) for fp in param_group.fsdp_params]
        owner = self.records[0].owner
        mesh = owner.device_mesh
        sharded = all(isinstance(r.owner.placements[0], Shard) for r in self.records)
        if mesh.ndim != 1 or not sharded:
            raise UnsupportedModuleError(
                f"a module sharded with fully_shard on a {mesh.ndim}-D device mesh "
                f"(placements {owner.placements}): hesscale supports FSDP2 on a 1-D mesh "
                "(each parameter Shard(dim) over one process group), not HSDP"
            )
        self.mesh = mesh
        self.process_group = mesh.get_group()
        self.world = mesh.size()

    @property
    def divide_factor(self) -> float:
        """What FSDP divides the summed gradients by: ``set_gradient_divide_factor``'s factor,
        else the world size."""
        factor = getattr(self.param_group, "gradient_divide_factor", None)
        return float(self.world if factor is None else factor)


def _launch_stream(device: torch.device):
    """FSDP calls the hooks inside its reduce-scatter stream; the estimates were computed on
    the default stream, and are packed and kept there (the caching allocator then never hands
    their memory to another stream while they are in use)."""
    if device.type == "cuda":
        return torch.cuda.stream(torch.cuda.default_stream(device))
    return contextlib.nullcontext()


class FSDPSharding:
    """The estimates of one model's FSDP-sharded parameters (see the module docstring)."""

    def __init__(self, param_groups):
        self.groups = [_Group(g, self) for g in param_groups]
        self.pending: dict[_Sharded, Tensor] = {}  # full-shape estimates not yet sent
        self.pass_ = None  # the backward pass in progress that estimates (its PassEstimates)
        self.wanted: dict[int, list[_Sharded]] = {}  # per group: what this pass sends
        self.launched: dict[int, tuple | None] = {}  # per group: its collective in flight
        self.launches = 0  # reduce-scatters started, for tests and benchmarks

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the stand-ins are all-gathered in under a ``MixedPrecisionPolicy``
        (None: the sharded parameters' own)."""
        dtypes = {r.fsdp_param.param_dtype for g in self.groups for r in g.records} - {None}
        return dtypes.pop() if len(dtypes) == 1 else None

    def refresh(self) -> None:
        """Give every sharded parameter and existing stand-in its record (FSDP makes the
        stand-ins at the first all-gather and may replace a sharded parameter)."""
        alive = weakref.ref(self)

        def on_reduced(owner: Tensor) -> None:  # FSDP's post-accumulate-grad hook
            sharding = alive()
            if sharding is not None:
                sharding.on_reduced(getattr(owner, SHARDED).group)

        for group in self.groups:
            for record in group.records:
                owner = record.owner
                if getattr(owner, SHARDED, None) is not record:
                    setattr(owner, SHARDED, record)
                    owner.register_post_accumulate_grad_hook(on_reduced)
                leaf = record.leaf
                if leaf is not None and getattr(leaf, SHARDED, None) is not record:
                    setattr(leaf, SHARDED, record)

    # --- one backward pass ----------------------------------------------------------------
    def begin(self, pass_, requested: list[Tensor]) -> None:
        """A backward pass that estimates ``requested`` (sharded parameters among them)."""
        if pass_.options.individual:
            raise UnsupportedModuleError(
                "per-example estimates (individual=True) of a model sharded with fully_shard: "
                "FSDP keeps one sharded gradient per parameter; compute per-example estimates "
                "on an unsharded copy of the model"
            )
        if self.pass_ is not pass_:
            self.pass_, self.launched = pass_, {}
        ids = {id(p) for p in requested}
        self.wanted = {
            id(group): [r for r in group.records if id(r.owner) in ids] for group in self.groups
        }

    def deliver(self, record: _Sharded, estimate: Tensor) -> None:
        """A stand-in's complete estimate of this pass (kept in the sharded parameter's
        dtype: float32 under a bfloat16 ``MixedPrecisionPolicy``)."""
        estimate = estimate.to(record.owner.dtype)
        pending = self.pending.get(record)
        self.pending[record] = estimate if pending is None else pending + estimate

    def on_reduced(self, group: _Group) -> None:
        """FSDP reduced the group's gradients: start the estimates' reduce-scatter (once per
        group and pass)."""
        pass_ = self.pass_
        if pass_ is None or id(group) in self.launched:
            return
        records = self.wanted.get(id(group), [])
        self.launched[id(group)] = None
        if records:
            pass_.flush([r.leaf for r in records if r.leaf is not None])
            self.launched[id(group)] = self._launch(group, records)

    def _launch(self, group: _Group, records: list[_Sharded]) -> tuple:
        """Pack ``records``' estimates in FSDP's layout and start their reduce-scatter: each
        estimate (its sharded dimension moved to the front) padded to a multiple of ``R``
        rows, cut into ``R`` blocks; rank ``r``'s part of the buffer is the concatenation of
        the ``r``-th blocks."""
        world, first = group.world, records[0].owner
        pieces, layout, offset = [], [], 0
        with _launch_stream(first.device):
            for record in records:
                owner = record.owner
                estimate = self.pending.pop(record, None)
                if estimate is None:  # no estimate on this rank: zeros, as every rank sends
                    estimate = torch.zeros(owner.shape, dtype=first.dtype, device=owner.device)
                dim = owner.placements[0].dim
                if dim != 0:  # FSDP requires even sharding there
                    estimate = torch.cat(torch.chunk(estimate, world, dim), 0)
                rows = -(-estimate.shape[0] // world) * world
                if rows != estimate.shape[0]:
                    padding = estimate.new_zeros((rows - estimate.shape[0], *estimate.shape[1:]))
                    estimate = torch.cat([estimate, padding])
                piece = estimate.to(first.dtype).reshape(world, -1)
                pieces.append(piece)
                layout.append((record, offset, owner.to_local().shape))
                offset += piece.shape[1]
            flat = torch.cat(pieces, 1).reshape(-1)
            out = flat.new_empty(offset)
            work = _reduce_scatter(
                out, flat, op=dist.ReduceOp.SUM, group=group.process_group, async_op=True
            )
        self.launches += 1
        return work, out, layout, group, flat

    def end(self, pass_, failed: bool) -> None:
        """The backward pass ended: wait for its reduce-scatters and write the sharded
        estimates (nothing after a failure; then every sharded estimate is made invalid)."""
        if self.pass_ is not pass_:
            return
        launched, self.launched, self.pass_ = self.launched, {}, None
        for entry in launched.values():
            if entry is None:
                continue
            work, out, layout, group, _ = entry
            work.wait()
            if failed:
                continue
            out.div_(group.divide_factor)
            for record, offset, shape in layout:
                owner = record.owner
                local = out.narrow(0, offset, shape.numel()).view(shape)
                estimate = DTensor.from_local(
                    local,
                    owner.device_mesh,
                    owner.placements,
                    run_check=False,
                    shape=owner.shape,
                    stride=owner.stride(),
                )
                pass_.write_sharded(owner, estimate)
        if failed:
            self.pending.clear()
            for group in self.groups:
                for record in group.records:
                    invalidate(record.owner)
        elif pass_.options.collect is not None and self.pending:
            self.pending.clear()
            raise UnsupportedModuleError(
                "hesscale.diagonal of a model sharded with fully_shard needs its gradients "
                "synchronised in that backward pass, but set_requires_gradient_sync(False) is "
                "in effect: FSDP reduced nothing, so there is no sharded estimate to return"
            )


def _passes_through(ctx: NodeContext) -> tuple:
    """FSDP's ``RegisterPostBackwardFunction``: ``y_i = x_i``, so ``ŝ_{x_i} = ŝ_{y_i}``. (The
    node itself must not run on the curvature: its backward runs FSDP's post-backward.)"""
    outputs = ctx.curvature_outputs
    offset = len(ctx.needs) - len(outputs)  # the parameter group, an input without a gradient
    return tuple(
        outputs[i - offset] if need and i >= offset else None for i, need in enumerate(ctx.needs)
    )


def _fsdp_param_groups(model: nn.Module) -> list:
    """The FSDP parameter groups of ``model``'s sharded modules, each once."""
    groups, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group.fsdp_params  # noqa: B018 - what the adapter reads
        except AttributeError as error:
            raise UnsupportedModuleError(
                f"hesscale's FSDP adapter reads FSDP2's parameter groups, which this torch "
                f"({torch.__version__}) has changed ({error}); it was written against torch "
                "2.11-2.13"
            ) from error
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    return groups


def sharding_of(model: nn.Module) -> FSDPSharding | None:
    """The adapter of ``model``'s FSDP-sharded parameters, or None when none is sharded."""
    groups = _fsdp_param_groups(model)
    if not groups:
        return None
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import (
        RegisterPostBackwardFunction,
    )

    register_rule(RegisterPostBackwardFunction, _passes_through)
    sharding = FSDPSharding(groups)
    sharding.refresh()
    return sharding
