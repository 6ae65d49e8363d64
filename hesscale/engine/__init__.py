"""The HesScale engine: curvature backpropagated along autograd's own graph of the backward pass.

How it works
------------
``extend(model)`` installs forward hooks. They do nothing unless an estimate was requested for
the model's parameters (by an optimizer through :func:`request`, or by :func:`diagonal`), so an
extended model trained with plain Adam pays a few Python calls per forward.

When an estimate is requested, a forward pass of the model is recorded as a :class:`_Forward`:
each output is returned as a :class:`_Traced` tensor through :class:`_Mark`, an identity
autograd Function whose node marks the network output in the graph. Its output shares the
storage and version counter of the network's output without being a view, so in-place changes
of it (``transformers.Trainer``'s ``loss *= k``) keep the mark. Each call of a module with a
*layer rule* (Linear, convolutions, a user's registered layer) is tagged on the autograd node
that produced its output. Nothing else is recorded: whatever the forward computes, with any
Python control flow, is in autograd's graph.

Operations on a ``_Traced`` tensor return ``_Traced`` tensors, so the value that the user
backpropagates (a loss, a sum of losses of several forward passes, a loss plus a penalty on the
parameters, a loss scaled by a GradScaler) is one, and its ``.backward()`` reaches
``_Traced.__torch_function__`` with the root of the backward pass in hand. Before autograd
runs, :class:`_Pass` walks the graph from the root over ``next_functions`` and

1. finds which nodes lead to a parameter whose estimate is wanted, and refuses by name every such
   node without a rule (``UnsupportedModuleError``: no number is produced);
2. marks the nodes below the network outputs as the network side: there HesScaleGN drops the
   second-order terms; above them (the loss, penalties) every term is kept;
3. registers a prehook on each node that needs one.

Autograd then runs the backward pass. A node runs only after every consumer of its outputs, so
when its prehook receives the gradients ``g`` at its outputs, the curvature ``ŝ`` at its outputs
is complete: the sum of what each consumer's rule delivered (a tensor consumed several times
gets the sum of the contributions; the cross terms between consumers are dropped, as the paper
drops off-diagonal terms). The prehook applies the node's rule and adds ``ŝ`` at the node's
inputs to the producers' accumulators. The root starts with ``ŝ = 0`` (the Hessian of the loss
with respect to itself) and whatever gradient the backward starts with, so the estimate is of
exactly what is backpropagated. At a layer call the layer rule replaces the operations inside
the module and hands ``ŝ_x`` to the producer of the module's input. Parameters are the graph's
leaves (``AccumulateGrad``): one used in several places (a module called twice, tied weights)
gets the sum over its uses, written to ``p.hess_diag`` when the backward pass ends (as soon as
the last use is in for a parameter with estimate hooks, :func:`register_estimate_hook`).

GGN-MC does not propagate ``ŝ``: at the network output's node it samples factors of the loss
Hessian and backpropagates them to the layer calls with one batched ``autograd.grad``.

``torch.autograd.backward(loss)`` and ``torch.autograd.grad`` bypass ``Tensor.backward``: they
compute gradients and no estimate, which the optimizers report as a missing estimate.

Measured (this project's 2-core x86 CPU, an AMD EPYC host, one thread, float32,
``benchmarks/engine_cost.py --rounds 40``, interleaved medians; the VM's timings vary by ±8 %
between runs): on the Fig. 2b chains (4 and 16 layers of 512 tanh units) and a residual MLP of
the same size the estimate costs 1.82–1.89× (L=4), 1.83–1.93× (L=16) and 1.77–1.90×
(residual) a plain forward+backward at batch 128 (2.2–2.4× at batch 1). The engine's own
arithmetic written out by hand (no autograd, no engine, the same kernels) costs 1.63–1.72×:
two extra matrix products per layer, the squares of weights and inputs and the element-wise
rules. The engine adds 10–15 % to it at batch 128 (24–34 % at batch 1); the mechanism alone
(forward recording, planning, prehooks with rules that do nothing) costs 1.05–1.13× at batch
128 and 1.15–1.25× at batch 1, 10–17 µs per node of autograd's graph at batch 1.

Python that runs between the backward pass's large operations runs on cold caches, several
times slower than the same code in a loop (a ``with`` statement: 0.6 µs idle, 4.3 µs right
after a 128×512×512 matrix product on this host; a layer call's forward hook about 50 µs).
Hence the design: everything that does not depend on the gradients (rule contexts, parameter
targets, checks) is prepared in the planning loop before autograd runs; each prehook only
fills in gradients and curvatures and runs the rule; estimates are written when the pass
ends; parameter-free activation modules are not recorded; nothing a pass records forms a
reference cycle (each would wait for Python's cyclic collector, whose full collections stall a
process that has imported torch for about 0.1 s). The squares of weights and inputs
go to a pool of reused buffers (:func:`hesscale.rules._registry.scratch_buffer`): fresh
parameter-sized memory is page-faulted on every use on this VM, which made the hand-written
recursion 2.0× instead of 1.8×.
"""

from ._apply import autocast_dtype
from ._diagonal import backpropagated_diagonal
from ._record import extend, is_extended
from ._store import (
    ESTIMATE_ATTRIBUTE,
    consume,
    estimate_id,
    loss_scale,
    register_estimate_hook,
    request,
)

__all__ = [
    "ESTIMATE_ATTRIBUTE",
    "autocast_dtype",
    "backpropagated_diagonal",
    "estimate_id",
    "extend",
    "is_extended",
    "consume",
    "loss_scale",
    "register_estimate_hook",
    "request",
]
