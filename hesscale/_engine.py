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

from __future__ import annotations

import dataclasses
import functools
import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._errors import UnsupportedModuleError
from ._floating import flush_denormals, flushing_denormals
from ._ggn_mc import sampled_ggn_diagonals
from ._methods import METHODS, Method, get_method
from .baselines import sample_hessian_factor
from .rules import NodeContext, layer_rule_for, node_rule_for
from .rules._registry import (
    Backprop,
    LayerContext,
    Rule,
    Settings,
    supported_operations,
)
from .rules.losses import bind_loss_arguments, check_loss, is_loss
from .rules.normalization import batch_statistics

_STATE = "_hesscale_state"
_LOSS_STATE = "_hesscale_loss"
_REQUEST = "_hesscale_request"
_ESTIMATE_ID = "_hess_diag_id"
_LOSS_FACTOR = "_hess_diag_loss_factor"
_ESTIMATE_HOOKS = "_hess_diag_hooks"
_OUTPUT_TAG = "hesscale.output"  # node metadata: the _Forward whose output this _Mark marks
_LAYER_TAG = "hesscale.layer"  # node metadata: {output_nr: _LayerCall} of layer calls
ESTIMATE_ATTRIBUTE = "hess_diag"

_pass_ids = itertools.count(1)
_last_pass_id = 0


@dataclass(frozen=True)
class _Options:
    """Per-call options of :func:`diagonal` (defaults for optimizer requests)."""

    individual: bool = False
    samples: int = 1
    generator: torch.Generator | None = None
    reuse_buffers: bool = True  # estimates overwrite last step's in place (optimizer requests)
    announce: bool = True  # run the parameters' estimate hooks (optimizer requests)


@dataclass(slots=True)
class _LayerCall:
    """One call of a module with a layer rule, tagged on its output's autograd node.

    Values are kept detached and no autograd node is referenced: the call hangs in its output
    node's metadata, and a reference back into the graph would form a cycle through autograd's
    C++ graph that Python's garbage collector cannot break. The producer of the module's input
    is found when the graph is walked, as the node below the output that was created before
    the module started. The graph-attached output is kept for GGN-MC only, and released after
    the pass. Nor does a call refer back to its :class:`_Forward`, which lists it: the pair
    would be a reference cycle every step, left to Python's cyclic garbage collector, whose
    full collections stall training for ~0.1 s on a process that has imported torch.
    """

    module: nn.Module
    path: str
    rule: Rule
    input: Tensor | None
    output: Tensor | None  # kept only for rules that read its values (Rule.needs_output)
    output_like: tuple  # (shape, dtype, device) of the output
    first: int  # autograd's sequence number when the module started: its nodes are numbered on
    leaf_input: weakref.ref | None  # the input, when it is a leaf that requires grad
    version: int
    workspaces: dict  # the model's per-module buffers (_ModelState.workspaces)
    saved: object = None
    live_output: Tensor | None = None
    normalized: object = None  # the BatchStatistics of a train-mode BatchNorm fused into it
    ctx: LayerContext | None = None  # prepared by the pass that hooks its node
    targets: dict | None = None  # parameter name -> the parameter if estimated, else None
    params: list | None = None  # the estimated ones (both set by _Pass._layer_params)


@dataclass(frozen=True)
class _LossCall:
    """An extended loss's call on a network output: what GGN-MC needs to sample factors."""

    module: nn.Module
    arguments: dict
    role: str

    def factors(self, samples: int, generator) -> Tensor:
        if self.role != "input":
            raise UnsupportedModuleError("GGN-MC samples factors for a loss's input only")
        args = dict(self.arguments)
        out, target = args.pop("input"), args.pop("target")
        return sample_hessian_factor(self.module, out, target, samples, generator, **args)


@dataclass
class _Forward:
    """One forward pass of an extended model with an estimate requested."""

    state: _ModelState
    method: Method
    options: _Options
    forced: bool
    dtype: torch.dtype | None
    device: str = "cpu"  # the parameters' device type
    autocast: torch.dtype | None = None  # the forward ran under autocast to this dtype
    calls: list[_LayerCall] = field(default_factory=list)
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # (first, end, path)
    open_spans: list[int] = field(default_factory=list)
    live_output: Tensor | None = None  # GGN-MC only
    loss: _LossCall | None = None
    loss_factor: Tensor | None = None

    def module_of(self, node) -> str | None:
        """The innermost module whose forward created ``node`` (by sequence numbers)."""
        seq = node._sequence_nr()
        inside = [
            (end - first, -path.count("."), path)
            for first, end, path in self.spans
            if first <= seq < end
        ]
        return min(inside)[2] if inside else None

    def release(self) -> None:
        for call in self.calls:
            call.input = call.output = call.saved = call.live_output = call.normalized = None
            call.ctx = None
        self.live_output = None
        self.loss = None


class _Traced(torch.Tensor):
    """A network output while an estimate is requested: its ``.backward()`` (and that of every
    tensor computed from it) runs the curvature pass alongside autograd's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.backward:
            return _backward(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs or {})


def _plain(t: Tensor) -> Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor) if isinstance(t, _Traced) else t


def _backward(root: Tensor, *args, **kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        curvature_pass = _Pass.plan(root)
        try:
            torch.Tensor.backward(root, *args, **kwargs)
        finally:
            if curvature_pass is not None:
                curvature_pass.finish()


@dataclass(slots=True)
class _NodeInfo:
    edges: tuple  # ((child, output_nr), ...) followed: next_functions, or a layer call's input
    leaf: bool = False  # an AccumulateGrad node: a parameter (or input) end of the graph
    needs: tuple = ()  # per edge: whether its curvature is needed
    params: tuple = ()  # per edge: the estimated parameter it ends in, or None
    network: bool = False
    rule: object = None
    calls: dict | None = None  # output_nr -> _LayerCall for a layer call's output node
    fuses: _LayerCall | None = None  # a train-mode BatchNorm: the layer whose weights it fuses
    ctx: NodeContext | None = None  # prepared when the node is hooked; the rule's outputs vary


_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad
_ALIAS = torch._C._functions.AliasBackward0


def _is_leaf(node) -> bool:
    return type(node) is _ACCUMULATE_GRAD


def _below_identities(edge: tuple, markers: dict) -> tuple:
    """``edge``, or the edge below the identity nodes on it, which need no hook (their input
    gets what their output got): the ``AliasBackward0`` nodes that every operation on a
    ``_Traced`` tensor adds, and the marks of network outputs (:class:`_Mark`), which are
    recorded in ``markers`` (node -> its ``_Forward``)."""
    node, nr = edge
    while True:
        kind = type(node)
        if kind is _MARK_NODE:
            markers[node] = node.metadata[_OUTPUT_TAG]
        elif kind is not _ALIAS:
            return node, nr
        node, nr = node.next_functions[0]


def _layer_inputs(output_node, calls: dict) -> tuple:
    """The edges into a layer call's input: walking down from its output node, the first nodes
    created before the module started (and the input itself if it is a leaf)."""
    (call,) = calls.values() if len(calls) == 1 else (None,)
    if call is None:
        raise UnsupportedModuleError("a node carries the outputs of several layer calls")
    leaf = call.leaf_input() if call.leaf_input is not None else None
    found, seen, stack = [], set(), [output_node]
    while stack:
        node = stack.pop()
        for child, nr in node.next_functions:
            if child is None or (child, nr) in seen:
                continue
            seen.add((child, nr))
            if _is_leaf(child):
                if leaf is not None and child.variable is leaf:
                    found.append((child, nr))
            elif child._sequence_nr() < call.first:
                if not _cached_cast(child, call.module):
                    found.append((child, nr))
            else:
                stack.append(child)
    if len({(id(n), nr) for n, nr in found}) > 1:
        raise UnsupportedModuleError(
            f"module '{call.path}' ({type(call.module).__name__}) uses tensors computed outside "
            "it besides its input; its layer rule sees only the input"
        )
    return tuple(found[:1])


def _cached_cast(node, module: nn.Module) -> bool:
    """Whether ``node`` is autocast's cast of one of ``module``'s own parameters made before
    the module started: autocast caches the casts of leaves for its whole region, so a second
    forward pass in one region reuses the first's (the layer rule estimates the parameter
    itself)."""
    if type(node).__name__ != "ToCopyBackward0":
        return False
    child = node.next_functions[0][0]
    return _is_leaf(child) and any(child.variable is p for p in module.parameters())


class _Pass:
    """The curvature pass of one ``backward()`` (see the module docstring)."""

    def __init__(self, forwards: list[_Forward]):
        self.id = next(_pass_ids)
        self.forwards = forwards
        first = forwards[0]
        self.method, self.options, self.dtype = first.method, first.options, first.dtype
        self.settings = first.state.settings
        self.device, self.autocast = first.device, first.autocast
        # reused buffers avoid page-faulting fresh memory on the CPU (on a GPU the caching
        # allocator does that); they are written with out=, which autocast does not apply to
        reuse = self.device == "cpu" and self.autocast is None
        self.scratch = first.state.scratch if reuse else None
        self.reuse_buffers = reuse and self.options.reuse_buffers
        self.info: dict[object, _NodeInfo] = {}
        self.curvature: dict[tuple, Tensor] = {}  # (node, output_nr) -> ŝ received so far
        # per parameter, keyed by id(p) (a tensor's __hash__ is a Python function):
        self.announced: set[int] = set()  # those with estimate hooks: written at once
        self.uses: dict[int, int] = {}  # how many uses send an estimate
        self.received: dict[int, int] = {}
        self.estimates: dict[int, tuple[Tensor, Tensor]] = {}  # (p, sum of its uses so far)
        self.handles: list[RemovableHandle] = []
        self.consumers: dict[tuple, int] | None = None  # edge -> its number of consumers (lazy)
        # autocast of the backward's thread (autograd hands it to its device threads)
        self.backward_autocast = (
            torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        ) and self.autocast is None

    @property
    def loss_factor(self) -> Tensor | None:
        """The factor by which the backward pass scaled an extended loss (set by a hook on the
        loss value during this backward), when all forward passes agree on one."""
        forwards = self.forwards
        first = forwards[0].loss_factor
        if len(forwards) > 1 and any(f.loss_factor is not first for f in forwards):
            return None
        return first

    # --- planning -------------------------------------------------------------------------
    @classmethod
    def plan(cls, root: Tensor) -> _Pass | None:
        markers: dict = {}  # the marks of network outputs -> their _Forward
        start = _below_identities((root.grad_fn, 0), markers)[0]
        if start is None:
            return None
        order, info = [], {}
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in info:
                continue
            if type(node) is _ACCUMULATE_GRAD:
                info[node] = _NodeInfo((), leaf=True)
                order.append(node)
                continue
            meta = node.metadata
            calls = meta.get(_LAYER_TAG) if meta else None
            edges = _layer_inputs(node, calls) if calls is not None else node.next_functions
            for child, _ in edges:
                if type(child) is _ALIAS or type(child) is _MARK_NODE:
                    edges = tuple(_below_identities(e, markers) for e in edges)
                    break
            info[node] = _NodeInfo(edges, calls=calls)
            stack.append((node, True))
            for child, _ in edges:
                if child is not None and child not in info:
                    stack.append((child, False))
        forwards = {id(f): f for f in markers.values()}
        if not forwards:
            return None
        methods = {f.method.name for f in forwards.values()}
        if len(methods) > 1:
            raise ValueError(
                f"one backward pass computes one estimate, but its forward passes request "
                f"{sorted(methods)}"
            )
        settings = {f.state.settings for f in forwards.values()}
        if len(settings) > 1:
            raise ValueError(
                "one backward pass runs one variant of each rule, but the models of its "
                f"forward passes were extended with different settings {sorted(map(str, settings))}"
            )
        pass_ = cls(list(forwards.values()))
        pass_.info = info
        pass_._mark_network(markers)
        try:
            pass_._prepare(order)
            if pass_.method.monte_carlo:
                pass_._plan_monte_carlo()
        except BaseException:
            pass_.finish()
            raise
        global _last_pass_id
        _last_pass_id = pass_.id
        return pass_

    def _estimated(self, p: Tensor) -> bool:
        if getattr(p, _REQUEST, None) == self.method.name:
            return True
        return any(f.forced and p in f.state.param_set for f in self.forwards)

    def _mark_network(self, markers: dict) -> None:
        """Mark the nodes below the network outputs: there HesScaleGN drops the second-order
        terms."""
        self.markers = markers
        stack = [_below_identities(node.next_functions[0], {})[0] for node in markers]
        stack = [node for node in stack if node is not None]
        while stack:
            node = stack.pop()
            info = self.info[node]
            if info.network:
                continue
            info.network = True
            stack.extend(child for child, _ in info.edges if child is not None)

    def _prepare(self, order) -> None:
        """Post-order over the graph: a node is useful if a wanted estimate lies below it;
        count each parameter's uses; give each useful node its rule and prehook (GGN-MC hooks
        the network output only, see :meth:`_plan_monte_carlo`)."""
        useful: dict[object, bool] = {}
        uses = self.uses
        used: dict[int, Tensor] = {}
        hooked = []
        for node in order:
            info = self.info[node]
            if info.leaf:
                useful[node] = self._estimated(node.variable)
                continue
            edges = info.edges
            needs = info.needs = tuple(child is not None and useful[child] for child, _ in edges)
            own = False
            if info.calls is not None:
                for call in info.calls.values():
                    for p in self._layer_params(call):
                        own = True
                        uses[id(p)] = uses.get(id(p), 0) + 1
                        used[id(p)] = p
            if True in needs:
                info.params = params = tuple(
                    child.variable if need and type(child) is _ACCUMULATE_GRAD else None
                    for (child, _), need in zip(edges, needs)
                )
                for p in params:
                    if p is not None:
                        uses[id(p)] = uses.get(id(p), 0) + 1
                        used[id(p)] = p
            elif not own:
                useful[node] = False
                continue
            else:
                info.params = (None,) * len(edges)
            useful[node] = True
            hooked.append((node, info))
        if self.options.announce:
            self.announced = {key for key, p in used.items() if getattr(p, _ESTIMATE_HOOKS, None)}
        if not self.method.monte_carlo:
            for node, info in hooked:
                self._hook(node, info)

    def _hook(self, node, info: _NodeInfo) -> None:
        """Check that ``node`` can be computed, prepare what its rule will see, and register
        the prehook that applies the rule. Everything that does not depend on the gradients is
        done here, in one loop before autograd runs: Python between the backward pass's large
        operations runs on cold caches, several times slower."""
        if info.calls is not None:
            for call in info.calls.values():
                self._prepare_layer(info, call)
        else:
            info.rule = node_rule_for(node)
            if info.rule is None:
                attention = "Attention" in type(node).__name__
                self._refuse(
                    node,
                    "has no HesScale rule",
                    "PyTorch chose an attention kernel hesscale has no rule for (it has "
                    "rules for the CPU kernel and the GPU's flash, memory-efficient and "
                    "cuDNN kernels of F.scaled_dot_product_attention on dense inputs): run "
                    "the model under torch.nn.attention.sdpa_kernel with one of those kernels "
                    "or SDPBackend.MATH, whose matrix products and softmax have rules."
                    if attention
                    else "Register one with hesscale.register_rule (for your own layer or "
                    "torch.autograd.Function), or compute it with supported operations "
                    f"({len(supported_operations())} are, e.g. "
                    "AddmmBackward0, ConvolutionBackward0, TanhBackward0, MulBackward0).",
                )
            info.fuses = self._fused_layer(node, info)
            if self.options.individual and any(p is not None for p in info.params):
                self._refuse(
                    node,
                    "uses a parameter outside a layer with a per-example rule",
                    "Per-example estimates (individual=True) are computed by layer rules "
                    "(nn.Linear, convolutions, nn.Embedding): put the parameter in such a "
                    "module, or use individual=False.",
                )
            info.ctx = NodeContext(
                node=node,
                grad_outputs=(),
                curvature_outputs=(),
                needs=info.needs,
                second_order=self.method.second_order_term or not info.network,
                method=self.method,
                dtype=self.dtype,
                settings=self.settings,
                scratch=self.scratch,
            )
        self.handles.append(node.register_prehook(partial(_on_node, self, node)))

    def _prepare_layer(self, info: _NodeInfo, call: _LayerCall) -> None:
        """The layer call's context, complete but for the gradient and curvature at its output."""
        if call.input is None:
            raise RuntimeError(
                "hesscale computes its estimates once per forward pass; run the forward "
                "pass again before another backward through the same graph"
            )
        if call.output is not None and call.output._version != call.version:
            raise RuntimeError(
                f"the output of module '{call.path}' was modified in place after the module ran; "
                "its rule needs it as the module returned it"
            )
        dtype, options = self.dtype, self.options
        shape, out_dtype, _ = call.output_like
        out_dtype = dtype if dtype is not None and out_dtype.is_floating_point else out_dtype
        if call.output is not None:
            output = _as(call.output, dtype)
        else:  # the rule reads only its shape and dtype
            output = _meta_tensor(shape, out_dtype)
        params = self._layer_params(call)
        single_use = all(self.uses.get(id(p), 1) == 1 for p in params)
        call.ctx = LayerContext(
            module=call.module,
            input=_as(call.input, dtype),
            output=output,
            grad_output=None,
            curvature_output=None,
            saved=call.saved,
            method=self.method,
            need_input_curvature=bool(info.needs) and info.needs[0],
            individual=options.individual,
            workspace=(
                call.workspaces.setdefault(call.module, {})
                if self.reuse_buffers and not options.individual and single_use
                else None
            ),
            second_order=self.method.second_order_term or not info.network,
            scratch=self.scratch,
        )

    def _layer_params(self, call: _LayerCall) -> list[Tensor]:
        """The module's parameters whose estimate is wanted; with ``call.targets``, ``{name:
        parameter if wanted, else None}``, the names a layer rule returns estimates under.
        Kept on the call: a forward pass is backpropagated once."""
        if call.targets is None:
            module = call.module
            named = module._parameters.items() if not module._modules else module.named_parameters()
            call.targets = {
                name: p if p.requires_grad and self._estimated(p) else None
                for name, p in named
                if p is not None
            }
            call.params = [p for p in call.targets.values() if p is not None]
        return call.params

    def _where(self, node) -> str:
        for f in self.forwards:
            path = f.module_of(node)
            if path is not None:
                return f" (in module '{path}' of {f.state.root_name})"
        return " (outside the model's forward: in the loss or a term added to it)"

    def _refuse(self, node, problem: str, advice: str):
        name = type(node).__name__
        raise UnsupportedModuleError(
            f"{name}{self._where(node)} {problem}. {advice} Estimators that work on any model: "
            "method='hutchinson' (AdaHessian), 'exact' on small models."
        )

    def _fused_layer(self, node, info: _NodeInfo) -> _LayerCall | None:
        """The layer call whose weights a train-mode BatchNorm node differentiates through its
        batch statistics (``Settings.batch_norm``): its output's only consumer is the node."""
        if (
            self.settings.batch_norm != "fused"
            or self.options.individual
            or type(node).__name__ != "NativeBatchNormBackward0"
            or not node._saved_training
        ):
            return None
        child, nr = info.edges[0]
        producer = self.info.get(child) if child is not None else None
        call = producer.calls.get(nr) if producer is not None and producer.calls else None
        if call is None or not call.rule.batch_norm:
            return None
        if self.consumers is None:
            self.consumers = {}
            for other in self.info.values():
                for edge in other.edges:
                    self.consumers[edge] = self.consumers.get(edge, 0) + 1
        return call if self.consumers[(child, nr)] == 1 else None

    def _plan_monte_carlo(self) -> None:
        if len(self.forwards) != 1:
            raise UnsupportedModuleError(
                "GGN-MC samples the loss Hessian at one network output: backpropagate one "
                "forward pass's loss at a time (method='hesscale' sums several)"
            )
        forward = self.forwards[0]
        for node, info in self.info.items():
            if info.leaf or info.calls is not None:
                continue
            if any(p is not None for p in info.params):
                self._refuse(
                    node,
                    "uses a parameter outside a layer with a per-example rule",
                    "GGN-MC squares per-example gradients of layers (nn.Linear, "
                    "convolutions, nn.Embedding) and samples only the loss Hessian, so "
                    "penalties and functional uses of parameters are not included: use "
                    "method='hesscale'.",
                )
        if forward.loss is None or forward.live_output is None:
            raise UnsupportedModuleError(
                "GGN-MC needs the loss's Hessian at the network output: extend the loss "
                "(loss_fn = hesscale.extend(loss_fn)) and apply it directly to the output"
            )
        counted = {}
        for call in forward.calls:
            for p in self._layer_params(call):
                counted[p] = counted.get(p, 0) + 1
                if counted[p] > 1:
                    raise UnsupportedModuleError(
                        f"GGN-MC: a parameter of module '{call.path}' is used by several "
                        "calls; its per-example gradients would have to be summed before "
                        "squaring, which is not supported: use method='hesscale'"
                    )
        output_alias = next(node for node, f in self.markers.items() if f is forward)
        self.handles.append(output_alias.register_prehook(partial(_on_monte_carlo, self, forward)))

    # --- running --------------------------------------------------------------------------
    def add(self, node, output_nr: int, s: Tensor) -> None:
        if s.dtype != self.dtype:  # autograd's own backward (selections) keeps the ops' dtype
            s = _as(s, self.dtype)
        key = (node, output_nr)
        current = self.curvature.get(key)
        self.curvature[key] = s if current is None else current + s

    def add_estimate(self, p: Tensor, estimate: Tensor) -> None:
        """Add one use's estimate of ``p``. It is written to ``p.hess_diag`` when the backward
        pass ends, or as soon as all uses are in when ``p`` has estimate hooks to run."""
        if estimate.dtype != self.dtype:
            estimate = _as(estimate, self.dtype)
        key = id(p)
        current = self.estimates.get(key)
        self.estimates[key] = (p, estimate if current is None else current[1] + estimate)
        if key in self.announced:
            received = self.received[key] = self.received.get(key, 0) + 1
            if received == self.uses.get(key, 1):
                self._write(*self.estimates.pop(key))

    def _write(self, p: Tensor, estimate: Tensor) -> None:
        if self.options.individual is False and estimate.shape != p.shape:
            raise RuntimeError(
                f"a rule returned an estimate of shape {tuple(estimate.shape)} for a parameter "
                f"of shape {tuple(p.shape)}"
            )
        factor = self.loss_factor
        if factor is not None and self.method.monte_carlo:  # factors sample the unscaled loss
            estimate = estimate * factor
        setattr(p, ESTIMATE_ATTRIBUTE, estimate.detach() if estimate.requires_grad else estimate)
        setattr(p, _ESTIMATE_ID, self.id)
        setattr(p, _LOSS_FACTOR, factor)
        hooks = getattr(p, _ESTIMATE_HOOKS, None) if self.options.announce else None
        if hooks:
            for hook in tuple(hooks.values()):
                hook(p)

    def finish(self) -> None:
        for handle in self.handles:
            handle.remove()
        estimates, self.estimates = self.estimates, {}
        for p, estimate in estimates.values():  # all but announced ones, and uses never reached
            self._write(p, estimate)
        for f in self.forwards:
            f.release()
        self.curvature.clear()
        self.info.clear()


def _on_node(pass_: _Pass, node, grads):
    """Prehook of a node: apply its rule (see the module docstring), with subnormal floats
    flushed to zero on the thread that runs it (:mod:`hesscale._floating`), under the autocast
    the forward pass ran in (or none) and with grad mode off (autograd turns it on under
    ``backward(create_graph=True)``; the estimates are not differentiated, and the rules write
    into reused buffers). Written without context managers where it can be: it runs once per
    node."""
    flush = not flushing_denormals() and torch.set_flush_denormal(True)
    graph = torch.is_grad_enabled()
    if graph:
        torch._C._set_grad_enabled(False)
    try:
        if _profiler_enabled():  # the rule's time (and its kernels') named in the profile
            with torch.profiler.record_function(f"hesscale {type(node).__name__}"):
                _apply_in_precision(pass_, node, grads)
        else:
            _apply_in_precision(pass_, node, grads)
    finally:
        if graph:
            torch._C._set_grad_enabled(True)
        if flush:
            torch.set_flush_denormal(False)


_profiler_enabled = torch._C._autograd._profiler_enabled


def _apply_in_precision(pass_: _Pass, node, grads) -> None:
    if pass_.autocast is not None:  # the products in the forward's precision
        with torch.autocast(pass_.device, dtype=pass_.autocast):
            _apply(pass_, node, grads)
    elif pass_.backward_autocast:
        with torch.autocast(pass_.device, enabled=False):
            _apply(pass_, node, grads)
    else:
        _apply(pass_, node, grads)


def autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast runs ``device``'s products in on this thread, or None when off."""
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _as(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``t`` in ``dtype`` when both are floating and differ (mixed precision), else ``t``."""
    if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point():
        return t
    return t.to(dtype)


def _apply(pass_: _Pass, node, grads) -> None:
    info = pass_.info[node]
    dtype = pass_.dtype
    for g in grads:
        if g is not None and g.dtype != dtype and dtype is not None:
            grads = tuple(_as(g, dtype) for g in grads)
            break
    curvature = pass_.curvature
    if len(grads) == 1:
        outputs = (curvature.pop((node, 0), None),)
    else:
        outputs = tuple(curvature.pop((node, nr), None) for nr in range(len(grads)))
    if info.calls is not None:
        for output_nr, call in info.calls.items():
            _apply_layer(pass_, info, call, grads[output_nr], outputs[output_nr])
        return
    ctx = info.ctx
    ctx.grad_outputs, ctx.curvature_outputs = grads, outputs
    try:
        results = info.rule(ctx)
    except NotImplementedError as error:
        pass_._refuse(node, f"is used in a way its rule does not support: {error}", "")
    if info.fuses is not None:
        info.fuses.normalized = batch_statistics(ctx)
    if len(results) < len(info.edges) and any(info.needs[len(results) :]):
        raise RuntimeError(
            f"the rule of {type(node).__name__} returned {len(results)} curvatures for "
            f"{len(info.edges)} inputs; return one (or None) per input"
        )
    for (child, output_nr), need, param, s in zip(info.edges, info.needs, info.params, results):
        if not need or s is None:
            continue
        if param is not None:
            pass_.add_estimate(param, s)
        else:
            pass_.add(child, output_nr, s)
    info.ctx = None


def _apply_layer(pass_: _Pass, info: _NodeInfo, call: _LayerCall, grad, s) -> None:
    ctx = call.ctx
    if grad is None or s is None:
        shape, _, device = call.output_like
        dtype = ctx.output.dtype
        grad = torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
        s = torch.zeros(shape, dtype=dtype, device=device) if s is None else s
    ctx.grad_output, ctx.curvature_output, ctx.normalized = grad, s, call.normalized
    result: Backprop = call.rule.backprop(ctx)
    _store_layer(pass_, call, result.parameters)
    if ctx.need_input_curvature:
        if result.curvature_input is None:
            raise RuntimeError(f"the rule of '{call.path}' returned no input curvature")
        if info.params[0] is not None:
            pass_.add_estimate(info.params[0], result.curvature_input)
        else:
            child, nr = info.edges[0]
            pass_.add(child, nr, result.curvature_input)
    call.input = call.output = call.saved = call.normalized = call.ctx = None


@functools.lru_cache(maxsize=1024)
def _meta_tensor(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A tensor of this shape and dtype on the ``meta`` device (no memory), for rules that read
    only the shape and dtype of a layer's output; shared, as making one costs more than a small
    layer's rule."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _store_layer(pass_: _Pass, call: _LayerCall, estimates: dict) -> None:
    """Hand a layer rule's parameter estimates to the pass; names and shapes are checked."""
    individual = pass_.options.individual
    pass_._layer_params(call)
    targets = call.targets
    for name, estimate in estimates.items():
        param = targets.get(name, targets)
        if param is None:  # not estimated in this pass
            continue
        if param is targets:
            raise RuntimeError(
                f"the rule of '{call.path}' returned an estimate for '{name}', which is not a "
                f"parameter of {type(call.module).__name__} (it has {sorted(targets)})"
            )
        expected = (len(call.input), *param.shape) if individual else param.shape
        if estimate.shape != expected:
            raise RuntimeError(
                f"the rule of '{call.path}' returned an estimate of shape "
                f"{tuple(estimate.shape)} for '{name}', expected {tuple(expected)}"
                + (" (per example: does the rule support individual=True?)" if individual else "")
            )
        pass_.add_estimate(param, estimate)


def _on_monte_carlo(pass_: _Pass, forward: _Forward, grads) -> None:
    """Prehook at the network output under GGN-MC: sample, backpropagate, square."""
    with flush_denormals():
        _monte_carlo(pass_, forward)


def _monte_carlo(pass_: _Pass, forward: _Forward) -> None:
    options = pass_.options
    factors = forward.loss.factors(options.samples, options.generator)
    sampled = sampled_ggn_diagonals(
        forward.calls, forward.live_output, factors, options.individual, pass_.dtype
    )
    for call, estimates in sampled:
        _store_layer(pass_, call, estimates)


def _computed_weights(module: nn.Module) -> bool:
    """Whether the module's ``weight`` or ``bias`` is computed in its forward rather than a
    parameter: ``torch.nn.utils.prune`` (``weight_orig * weight_mask``), parametrizations,
    weight normalisation. Such a call is seen through its operations, so the estimate
    reaches the parameter the weight is computed from."""
    parameters = module._parameters
    return any(
        name not in parameters and isinstance(getattr(module, name, None), Tensor)
        for name in ("weight", "bias")
    )


class _ModelState:
    """What ``extend`` attaches to a model: its layer rules and the forward being recorded."""

    def __init__(self, model: nn.Module):
        self.root_name = type(model).__name__
        self.paths: dict[nn.Module, str] = {}
        self.layers: dict[nn.Module, Rule] = {}
        inside_layer: list[str] = []
        for path, module in model.named_modules():
            if any(not prefix or path.startswith(prefix + ".") for prefix in inside_layer):
                continue
            self.paths[module] = path or "<root>"
            rule = layer_rule_for(module, path)
            if rule is not None:
                self.layers[module] = rule
                inside_layer.append(path)
        self.params = [p for p in model.parameters()]
        self.param_set = set(self.params)
        self.workspaces: dict[nn.Module, dict] = {}
        self.settings = Settings()
        self.scratch: dict = {}  # temporaries of the rules (rules._registry.scratch_buffer)
        self.forced: Method | None = None
        self.options = _Options()
        self.current: _Forward | None = None
        self.last_monte_carlo: weakref.ref | None = None

    def requested_method(self) -> Method | None:
        """The method asked for by :func:`diagonal` or by the parameters' requests."""
        if self.forced is not None:
            return self.forced
        names = {getattr(p, _REQUEST, None) for p in self.params} - {None}
        if not names:
            return None
        if len(names) > 1:
            raise ValueError(
                f"parameters of {self.root_name} request different estimates {sorted(names)}; "
                "one backward pass computes one method"
            )
        return METHODS[names.pop()]

    # --- forward hooks --------------------------------------------------------------------
    def _refuse_compiling(self) -> None:
        if torch.compiler.is_compiling():
            raise UnsupportedModuleError(
                f"{self.root_name} is extended and being compiled by torch.compile: compiled "
                "graphs bypass the hooks that compute the estimates. Train the uncompiled model."
            )

    def on_root_start(self, model, args):
        previous = self.last_monte_carlo() if self.last_monte_carlo is not None else None
        if previous is not None:  # its graph-attached outputs form a cycle until released
            previous.release()
            self.last_monte_carlo = None
        method = self.requested_method()
        if method is None or not torch.is_grad_enabled():
            self.current = None
            return
        self._refuse_compiling()
        first = next((p for p in self.params if p.is_floating_point()), None)
        device = first.device.type if first is not None else "cpu"
        self.current = _Forward(
            state=self,
            method=method,
            options=self.options,
            forced=self.forced is not None,
            dtype=first.dtype if first is not None else None,
            device=device,
            autocast=autocast_dtype(device),
        )
        self.current.open_spans.append(torch._C._autograd._get_sequence_nr())
        if method.monte_carlo:
            self.last_monte_carlo = weakref.ref(self.current)

    def on_enter(self, module, args):
        if self.current is not None:
            self._refuse_compiling()
            self.current.open_spans.append(torch._C._autograd._get_sequence_nr())

    def on_exit(self, module, args, output):
        forward = self.current
        if forward is not None and forward.open_spans:
            first = forward.open_spans.pop()
            end = torch._C._autograd._get_sequence_nr()
            forward.spans.append((first, end, self.paths[module]))

    def on_layer(self, module, args, output):
        forward = self.current
        if forward is None:
            return
        first = forward.open_spans.pop()
        path = self.paths[module]
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise UnsupportedModuleError(
                f"module '{path}' ({type(module).__name__}) was called with {len(args)} "
                "positional inputs or returned a non-tensor; its layer rule maps one tensor to "
                "one tensor"
            )
        x = args[0]
        if output is x or not output.requires_grad or output.grad_fn is None:
            return  # J = I (Identity, eval-mode Dropout), or nothing to backpropagate
        if _computed_weights(module):  # its operations run through their node rules
            forward.open_spans.append(first)
            self.on_exit(module, args, output)
            return
        rule = self.layers[module]
        saved = rule.capture(module, x, output) if rule.capture is not None else None
        call = _LayerCall(
            module=module,
            path=path,
            rule=rule,
            input=x.detach(),
            output=output.detach() if rule.needs_output else None,
            output_like=(output.shape, output.dtype, output.device),
            first=first,
            leaf_input=weakref.ref(x) if x.requires_grad and x.grad_fn is None else None,
            version=output._version,
            workspaces=self.workspaces,
            saved=saved,
            live_output=output if forward.method.monte_carlo else None,
        )
        forward.calls.append(call)
        meta = output.grad_fn.metadata
        meta.setdefault(_LAYER_TAG, {})[output.output_nr] = call

    def on_root_end(self, model, args, output):
        forward, self.current = self.current, None
        if forward is None:
            return None
        self.on_exit_root(forward)
        if forward.method.monte_carlo:
            if not isinstance(output, Tensor):
                raise UnsupportedModuleError(
                    f"GGN-MC needs {self.root_name} to return one tensor (the network output), "
                    f"got a {type(output).__name__}: wrap the model in a module that returns "
                    "the logits and give the loss module to hesscale.extend, or use "
                    "method='hesscale_gn' (deterministic Gauss-Newton, any output)"
                )
            forward.live_output = output
        return _trace(output, forward)

    def on_exit_root(self, forward: _Forward) -> None:
        if forward.open_spans:
            first = forward.open_spans.pop()
            forward.spans.append((first, torch._C._autograd._get_sequence_nr(), "<root>"))


class _Mark(torch.autograd.Function):
    """``y = x`` as a ``_Traced`` tensor that shares ``x``'s storage and version counter but is
    not a view of it (``as_subclass`` would make one, and an in-place change of a view
    replaces its node: the mark would be lost). Its node is the network-output marker."""

    @staticmethod
    def forward(ctx, x):
        return torch.Tensor._make_subclass(_Traced, x, x.requires_grad)

    @staticmethod
    def backward(ctx, grad):
        return grad


_MARK_NODE = _Mark._backward_cls  # never hooked: the planner passes through it


def _trace(output, forward: _Forward):
    """The forward's output(s) as ``_Traced`` tensors marked in the graph; containers (tuples,
    lists, dicts and Hugging Face ``ModelOutput``s) are traced element by element."""
    if isinstance(output, Tensor):
        if not output.requires_grad or isinstance(output, _Traced):
            return output
        with torch._C.DisableTorchFunctionSubclass():  # a _Traced's attributes dispatch
            traced = _Mark.apply(output)
            traced.grad_fn.metadata[_OUTPUT_TAG] = forward
        return traced
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        return type(output)(*(_trace(o, forward) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_trace(o, forward) for o in output)
    if isinstance(output, dict):
        for key in list(output.keys()):
            output[key] = _trace(output[key], forward)
        return output
    return output


def _on_loss(module, args, kwargs, output):
    """Forward hook of an extended loss on a network output: record the call under GGN-MC
    (which samples factors of its Hessian) and, on its value, the factor
    ``c = ∂(backpropagated)/∂L`` by which the backward pass scales it (``(c * loss).backward()``,
    a GradScaler)."""
    with torch._C.DisableTorchFunctionSubclass():  # a _Traced's attributes dispatch
        _record_loss(module, bind_loss_arguments(module, args, kwargs), output)


def _record_loss(module, bound: dict, output) -> None:
    consumers = []
    for role in ("input", "var"):
        tensor = bound.get(role)
        if not isinstance(tensor, _Traced) or tensor.grad_fn is None:
            continue
        forward = tensor.grad_fn.metadata.get(_OUTPUT_TAG)
        if forward is None:
            continue
        if forward.method.monte_carlo:
            arguments = {
                k: _plain(v.detach()) if isinstance(v, Tensor) else v for k, v in bound.items()
            }
            forward.loss = _LossCall(module, arguments, role)
        consumers.append(forward)
    if consumers and isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(partial(_set_loss_factor, consumers))


def _set_loss_factor(forwards: list[_Forward], grad: Tensor) -> None:
    for forward in forwards:
        forward.loss_factor = _plain(grad.detach())


def extend(
    module: nn.Module, *, attention: str | None = None, batch_norm: str | None = None
) -> nn.Module:
    """Prepare a model (or a loss, for GGN-MC) for HesScale estimates; returns it; idempotent.

    A model's ``forward`` may be any Python code over operations with a rule; the operations are
    checked when the first estimate is computed. A loss needs ``extend`` only for GGN-MC (and
    the GradScaler path that unscales estimates after ``scaler.unscale_``); it must be one of
    the supported losses with ``reduction='mean'`` or ``'sum'``.

    Args:
        module: the model or the loss.
        attention: the query rule of attention, ``"centred"`` (the default: the cost of
            attention itself) or ``"exact"`` (exact given a diagonal Hessian at the attention
            output, ``d_v/2`` times attention's cost); see :mod:`hesscale.rules.attention`.
        batch_norm: the weights of a Linear layer or convolution whose output only a train-mode
            BatchNorm reads: ``"fused"`` (the default: differentiated through the batch
            statistics, exact given a diagonal Hessian at the BatchNorm's output, about five
            weight-gradient products instead of one) or ``"per-layer"`` (the layer rule alone);
            see :mod:`hesscale.rules.normalization`.

        None keeps the model's current setting; extending again with another value changes it.

    Raises:
        UnsupportedModuleError: naming the offending module's path and type and saying what is
            supported.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"extend expects an nn.Module, got {type(module).__name__}")
    chosen = {k: v for k, v in (("attention", attention), ("batch_norm", batch_norm)) if v}
    if is_loss(module):
        if chosen:
            raise TypeError(f"{sorted(chosen)} are settings of a model's rules, not of a loss")
        check_loss(module)
        if not hasattr(module, _LOSS_STATE):
            setattr(module, _LOSS_STATE, True)
            module.register_forward_hook(_on_loss, with_kwargs=True)
        return module
    if hasattr(module, _STATE):
        state = getattr(module, _STATE)
        state.settings = dataclasses.replace(state.settings, **chosen)
        return module
    if type(module).__name__ == "OptimizedModule" or hasattr(module, "_orig_mod"):
        raise UnsupportedModuleError(
            "extend() got a torch.compile'd model: compiled graphs bypass the hooks that "
            "record the forward pass. Extend and train the uncompiled model."
        )
    state = _ModelState(module)
    state.settings = Settings(**chosen)
    module.register_forward_pre_hook(state.on_root_start)
    for sub in state.paths:
        if sub is module or type(sub) in _UNRECORDED:
            continue
        sub.register_forward_pre_hook(state.on_enter)
        sub.register_forward_hook(state.on_layer if sub in state.layers else state.on_exit)
    if module in state.layers:
        module.register_forward_pre_hook(state.on_enter)
        module.register_forward_hook(state.on_layer)
    module.register_forward_hook(state.on_root_end)
    setattr(module, _STATE, state)
    return module


# torch.nn modules whose operations all have rules that never refuse: no refusal can name
# them, so their calls are not recorded (two hook calls less per call, on the forward's
# critical path)
_UNRECORDED = frozenset(
    {
        nn.Tanh,
        nn.Sigmoid,
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.GELU,
        nn.SiLU,
        nn.Identity,
        nn.Dropout,
        nn.Flatten,
    }
)


def is_extended(module: nn.Module) -> bool:
    """Whether ``extend`` was called on ``module`` (a model or a loss)."""
    return hasattr(module, _STATE) or hasattr(module, _LOSS_STATE)


def request(params, method: str | None) -> None:
    """Ask that every following backward pass computes ``method``'s estimate for ``params``.

    ``method=None`` withdraws the request (the backward then computes gradients alone). This is
    what the optimizers call; estimates are written to ``p.hess_diag`` in each backward pass.
    """
    if method is not None:
        get_method(method)
    for p in params:
        setattr(p, _REQUEST, method)


class _EstimateHooks(dict):
    """A parameter's estimate hooks; copies and pickles of the parameter do not inherit them."""

    def __deepcopy__(self, memo):
        return _EstimateHooks()

    def __reduce__(self):
        return (_EstimateHooks, ())


def register_estimate_hook(param: Tensor, hook) -> RemovableHandle:
    """Call ``hook(param)`` in every backward pass right after ``param.hess_diag`` is written.

    Like ``Tensor.register_post_accumulate_grad_hook`` for gradients: the hook sees the fresh
    estimate while the backward pass goes on through the earlier layers (the data-parallel
    optimizers start the estimate's all-reduce there). Hooks run for requested estimates
    (:func:`request`), not for :func:`hesscale.diagonal`. Returns a handle whose ``remove()``
    unregisters the hook.
    """
    hooks = getattr(param, _ESTIMATE_HOOKS, None)
    if hooks is None:
        hooks = _EstimateHooks()
        setattr(param, _ESTIMATE_HOOKS, hooks)
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle


def loss_factor(param: Tensor) -> Tensor | None:
    """The factor ``c`` of the backpropagated ``c · L`` behind ``param.hess_diag`` (recorded
    when an extended loss was applied to the network output)."""
    return getattr(param, _LOSS_FACTOR, None)


def estimate_id(param: Tensor) -> int | None:
    """An id of the backward pass that wrote ``param.hess_diag`` (None if none did)."""
    return getattr(param, _ESTIMATE_ID, None)


@contextmanager
def _forced(model: nn.Module, method: Method, options: _Options):
    state: _ModelState = getattr(model, _STATE)
    previous = state.forced, state.options
    state.forced, state.options = method, options
    try:
        yield
    finally:
        state.forced, state.options = previous


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
    options = _Options(
        individual=individual,
        samples=samples,
        generator=generator,
        reuse_buffers=False,
        announce=False,
    )
    with _forced(model, config, options):
        output = model(inputs)
    loss = loss_fn(output, target, **loss_kwargs)
    before = _last_pass_id
    loss.backward()
    pass_id = _last_pass_id if _last_pass_id != before else None
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if pass_id is not None and estimate_id(p) == pass_id:
                result[name] = getattr(p, ESTIMATE_ATTRIBUTE)
            else:  # not reached by the loss: a zero diagonal
                shape = (len(inputs), *p.shape) if individual else p.shape
                result[name] = p.new_zeros(shape)
    return _plain(loss.detach()), result
