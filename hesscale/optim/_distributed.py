"""Averaging curvature estimates across data-parallel ranks, overlapped with the backward pass.

``DistributedDataParallel`` averages gradients in buckets whose all-reduce starts as soon as the
backward pass has produced them. :class:`EstimateReducer` does the same for the estimates,

.. math:: \\hat{s}(p) \\leftarrow \\frac{1}{R} \\sum_{r=1}^{R} \\hat{s}_r(p),

so every rank applies the update one process would compute on the concatenated batch (the
estimate of a mean loss is the mean of the ranks' estimates, as for gradients). The engine
announces each fresh ``p.hess_diag`` (:func:`hesscale.register_estimate_hook`) while the backward
pass goes on through the earlier layers; the reducer copies it into its bucket's flat buffer and,
once the bucket is complete, starts an asynchronous all-reduce of the whole bucket. ``step()``
waits for them (:meth:`EstimateReducer.reduce`); what was not started by then (estimates that
``step()`` computes, such as AdaHessian's, or a bucket with a late estimate) is reduced there.

Every rank runs the same backward pass, so every rank starts the same collectives in the same
order. Under gradient accumulation the estimates accumulate over the backward passes before
``step()`` (:mod:`hesscale.engine._store`); inside ``DistributedDataParallel.no_sync()``, where
DDP does not synchronise gradients, the reducer sends nothing either, and the pass that
synchronises sends the accumulated estimates: one all-reduce per bucket and step, as for the
gradients. (Without ``no_sync`` every pass is sent, and a bucket in flight is waited for and
sent again by the next pass.) Which passes synchronise is read from the DDP wrapper of the
parameters, found by a forward pre-hook on every module that is installed once a reducer
exists; without a DDP wrapper every pass is sent.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import ESTIMATE_ATTRIBUTE, estimate_id, register_estimate_hook


class _GradientSync:
    """Whether the DistributedDataParallel wrapper of some parameters synchronises gradients in
    its current backward pass: DDP's ``no_sync()`` clears ``require_backward_grad_sync``, which
    its forward pass reads; so does this forward pre-hook (on every module, installed once)."""

    def __init__(self):
        self.syncing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DDP -> bool
        self.handle = None

    def install(self) -> None:
        if self.handle is None:
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            self.syncing[module] = module.require_backward_grad_sync and torch.is_grad_enabled()

    def wrapper_of(self, param: Tensor):
        """The DDP wrapper whose module holds ``param`` (None: none has run a forward pass)."""
        for ddp in list(self.syncing.keys()):
            if any(p is param for p in ddp.module.parameters()):
                return ddp
        return None


_gradient_sync = _GradientSync()


@dataclass
class _Bucket:
    """Parameters whose estimates travel in one flat buffer (one all-reduce)."""

    params: list[Tensor]
    offsets: list[int]
    flat: Tensor
    arrived: set = field(default_factory=set)  # ids of params copied since the last launch
    sent: dict = field(default_factory=dict)  # id(param) -> estimate id in the launched buffer
    work: object = None  # the all-reduce in flight
    launched: bool = False  # flat holds a launched (or finished) all-reduce's data

    def slot(self, index: int) -> Tensor:
        p = self.params[index]
        return self.flat[self.offsets[index] : self.offsets[index] + p.numel()]


def _buckets(params: list[Tensor], cap_bytes: int) -> list[_Bucket]:
    """Parameters in backward order (last layer first), cut into buckets of at most
    ``cap_bytes`` (a larger parameter gets a bucket of its own) of one dtype and device each."""
    buckets, current, size = [], [], 0

    def close():
        if current:
            offsets, total = [], 0
            for p in current:
                offsets.append(total)
                total += p.numel()
            flat = torch.zeros(total, dtype=current[0].dtype, device=current[0].device)
            buckets.append(_Bucket(list(current), offsets, flat))

    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        compatible = not current or (current[0].dtype == p.dtype and current[0].device == p.device)
        if current and (not compatible or size + nbytes > cap_bytes):
            close()
            current, size = [], 0
        current.append(p)
        size += nbytes
    close()
    return buckets


class EstimateReducer:
    """Bucketed, overlapped averaging of one parameter group's estimates across ranks.

    Args:
        params: the parameters whose estimates are averaged.
        bucket_cap_mb: the largest bucket (as DDP's ``bucket_cap_mb``).
        process_group: the ranks to average over (default: the default group).
    """

    def __init__(self, params, bucket_cap_mb: float = 25.0, process_group=None):
        self.params = [p for p in params if p.requires_grad]
        self.process_group = process_group
        self.buckets = _buckets(self.params, int(bucket_cap_mb * 2**20))
        self._where = {
            id(p): (bucket, i) for bucket in self.buckets for i, p in enumerate(bucket.params)
        }
        self._wrapper = None  # a weak reference to the parameters' DDP wrapper, once found
        _gradient_sync.install()
        self.launches = 0  # all-reduces started, for tests and benchmarks
        self.launches_in_backward = 0  # ... of which during a backward pass (overlapped)
        reducer = weakref.ref(self)  # a parameter's hook must not keep an old optimizer alive

        def on_estimate(param: Tensor) -> None:
            alive = reducer()
            if alive is not None:
                alive._on_estimate(param)

        self._handles = [register_estimate_hook(p, on_estimate) for p in self.params]

    def __del__(self):
        for handle in getattr(self, "_handles", ()):
            handle.remove()

    def _locate(self, param: Tensor):
        bucket, index = self._where.get(id(param), (None, None))
        if bucket is None or bucket.params[index] is not param:
            return None, None
        return bucket, index

    def _synchronising(self) -> bool:
        """Whether this backward pass synchronises the gradients (outside DDP's no_sync)."""
        wrapper = self._wrapper() if self._wrapper is not None else None
        if wrapper is None and self.params:
            wrapper = _gradient_sync.wrapper_of(self.params[0])
            self._wrapper = weakref.ref(wrapper) if wrapper is not None else None
        return wrapper is None or _gradient_sync.syncing.get(wrapper, True)

    def _on_estimate(self, param: Tensor) -> None:
        bucket, index = self._locate(param)
        if bucket is None or not self._synchronising():
            return
        self._settle(bucket)
        bucket.slot(index).copy_(getattr(param, ESTIMATE_ATTRIBUTE).reshape(-1))
        bucket.arrived.add(id(param))
        if len(bucket.arrived) == len(bucket.params):
            self._launch(bucket, in_backward=True)

    def _settle(self, bucket: _Bucket) -> None:
        """Before the buffer is written again: finish what is in flight, forget what was sent."""
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        if bucket.launched:
            bucket.launched = False
            bucket.sent.clear()

    def _launch(self, bucket: _Bucket, in_backward: bool) -> None:
        bucket.sent = {id(p): estimate_id(p) if in_backward else None for p in bucket.params}
        bucket.arrived.clear()
        bucket.work = dist.all_reduce(bucket.flat, group=self.process_group, async_op=True)
        bucket.launched = True
        self.launches += 1
        self.launches_in_backward += in_backward

    def reduce(self, params: list[Tensor], estimates: list[Tensor]) -> list[Tensor]:
        """The rank-mean of ``estimates`` (those of ``params``, fresh for this step).

        A bucket whose all-reduce started in the backward pass with these very estimates is
        only waited for; any other bucket holding one of ``params`` is filled and reduced now.
        Parameters outside the reducer's group are averaged in one extra all-reduce.
        """
        wanted = {id(p): e for p, e in zip(params, estimates)}
        world = dist.get_world_size(self.process_group)
        for bucket in self.buckets:
            ids = [id(p) for p in bucket.params]
            if not any(i in wanted for i in ids):
                continue
            current = bucket.launched and all(
                bucket.sent.get(id(p)) is not None
                and bucket.sent[id(p)] == estimate_id(p)
                and wanted.get(id(p)) is getattr(p, ESTIMATE_ATTRIBUTE, None)
                for p in bucket.params
                if id(p) in wanted
            )
            if not current:
                self._settle(bucket)
                for index, p in enumerate(bucket.params):
                    if id(p) in wanted:
                        bucket.slot(index).copy_(wanted[id(p)].reshape(-1))
                    else:  # no estimate on this rank's step: a zero, on every rank alike
                        bucket.slot(index).zero_()
                self._launch(bucket, in_backward=False)
        result = {}
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            bucket.work.wait()
            bucket.work = None
            bucket.flat /= world
            for index, p in enumerate(bucket.params):
                result[id(p)] = bucket.slot(index).view_as(p)
        strays = [(p, e) for p, e in zip(params, estimates) if id(p) not in self._where]
        if strays:
            flat = torch.cat([e.reshape(-1) for _, e in strays])
            dist.all_reduce(flat, group=self.process_group)
            flat /= world
            offset = 0
            for p, e in strays:
                result[id(p)] = flat[offset : offset + e.numel()].view_as(e)
                offset += e.numel()
        for bucket in self.buckets:  # consumed: the next estimates start afresh
            bucket.launched = False
            bucket.sent.clear()
            bucket.arrived.clear()
        return [result[id(p)] for p in params]
