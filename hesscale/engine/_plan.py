"""Planning the curvature pass of one ``backward()``: which nodes of autograd's graph need a
rule, their prepared contexts and prehooks (see :mod:`hesscale.engine`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._errors import UnsupportedModuleError
from ..rules import NodeContext, node_rule_for
from ..rules._registry import LayerContext, supported_operations
from ..rules.normalization import batch_statistics  # noqa: F401
from ._apply import _as, _meta_tensor, _on_monte_carlo, _on_node, new_exec_group
from ._nested import Recompute, backpropagate_through, is_reentrant_checkpoint
from ._record import _LAYER_TAG, _MARK_NODE, _OUTPUT_TAG, _Forward, _LayerCall, _plain
from ._store import _REQUEST, PassEstimates, leaf_of, owner_of, refuse_missing

_pass_ids = itertools.count(1)
last_pass_id = 0


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
        self.store = PassEstimates(self.id, self.dtype, self.options, self.method, forwards)
        self.only: set[int] | None = None  # backward(inputs=...): the tensors it reaches
        self.retain = False  # backward(retain_graph=True): keep the records for another pass
        self.exec_group = new_exec_group()
        self.recomputes: list[Recompute] = []  # of the reentrant checkpoints it hooked
        # a nested pass (over a recomputation, hesscale.engine._nested): the outer pass, whose
        # estimates it adds to, and the leaves whose curvature it hands back
        self.nested = first.recompute
        self.outer = self.nested.outer if self.nested is not None else None
        self.captured: dict[int, object] = self.nested.captured() if self.nested else {}
        if self.outer is not None:
            self.store = self.outer.store
        self.handles: list[RemovableHandle] = []
        self.consumers: dict[tuple, int] | None = None  # edge -> its number of consumers (lazy)
        # autocast of the backward's thread (autograd hands it to its device threads)
        self.backward_autocast = (
            torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        ) and self.autocast is None

    # --- planning -------------------------------------------------------------------------
    @classmethod
    def plan(cls, roots, inputs=None, retain: bool = False) -> _Pass | None:
        """The pass of a backward from ``roots`` (restricted to ``inputs`` if given), or None
        when no network output of an extended model with a requested estimate lies below."""
        markers: dict = {}  # the marks of network outputs -> their _Forward
        starts = [_below_identities((r.grad_fn, 0), markers)[0] for r in roots]
        order, info = [], {}
        stack = [(start, False) for start in starts if start is not None]
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
        for state in {id(f.state): f.state for f in forwards.values()}.values():
            if state.sharding is not None:  # stand-ins made by this forward get their records
                state.sharding.refresh()
        pass_ = cls(list(forwards.values()))
        pass_.retain = retain
        if inputs is not None:
            pass_.only = {id(t) for t in inputs}
        pass_.info = info
        if pass_.nested is None or pass_.nested.network:
            pass_._mark_network(markers)
        try:
            pass_._prepare(order)
            if pass_.method.monte_carlo:
                pass_._plan_monte_carlo()
        except BaseException:
            pass_.finish(failed=True)
            raise
        global last_pass_id
        last_pass_id = pass_.id
        return pass_

    def _estimated(self, p: Tensor) -> bool:
        p = owner_of(p)  # a sharded parameter's stand-in is estimated as the parameter is
        if self.only is not None and id(p) not in self.only:
            return False
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
        uses = self.store.uses
        used: dict[int, Tensor] = {}
        hooked = []
        for node in order:
            info = self.info[node]
            if info.leaf:
                variable = node.variable
                useful[node] = self._estimated(variable) or id(variable) in self.captured
                continue
            edges = info.edges
            needs = info.needs = tuple(child is not None and useful[child] for child, _ in edges)
            own = False
            if info.calls is not None:
                for call in info.calls.values():
                    call.targets = None  # chosen anew by each pass (a retained graph's too)
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
            elif not own and not is_reentrant_checkpoint(node):
                useful[node] = False
                continue
            else:
                info.params = (None,) * len(edges)
            useful[node] = True
            hooked.append((node, info))
        self.store.plan(used, self._requested())
        if not self.method.monte_carlo:
            for node, info in hooked:
                self._hook(node, info)

    def seed(self, roots) -> None:
        """A nested pass starts from the curvature the outer pass delivered at its
        checkpoint node's outputs."""
        for root, s in self.nested.seeds(roots):
            if s is not None:
                child, nr = _below_identities((root.grad_fn, 0), {})
                if child is not None:
                    self.add(child, nr, s)

    def add_to_leaf(self, p: Tensor, s: Tensor) -> None:
        """``ŝ`` at a leaf: a parameter's estimate, or, in a nested pass, the curvature at a
        checkpoint's argument, handed to the outer pass."""
        key = self.captured.get(id(p)) if self.captured else None
        if key is None:
            self.store.add(p, s)
        else:
            self.nested.deliver(key, s)

    def _requested(self) -> list[Tensor]:
        """The parameters of the pass's models whose estimate is asked for."""
        states = {id(f.state): f.state for f in self.forwards}
        return [
            p
            for state in states.values()
            for p in state.params
            if p.requires_grad and self._estimated(p)
        ]

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
            if info.rule is None and is_reentrant_checkpoint(node):
                recompute = Recompute(self, node, info)
                self.recomputes.append(recompute)
                info.rule = recompute.stash
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
            if getattr(info.rule, "backpropagates_through", False):
                info.ctx.through = partial(backpropagate_through, self, info.network)
        self.handles.append(node.register_prehook(partial(_on_node, self, node)))

    def _prepare_layer(self, info: _NodeInfo, call: _LayerCall) -> None:
        """The layer call's context, complete but for the gradient and curvature at its output."""
        if call.input is None and call.input_path is None:
            raise RuntimeError(
                "a second backward pass through this graph: the first one released what the "
                "forward pass recorded (as autograd releases its saved tensors). Backpropagate "
                "with retain_graph=True to go through it again, or run the forward pass again"
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
        store = self.store
        # a rule may write into a reused buffer only for a parameter used once whose estimate
        # replaces the last one (an accumulating one adds to p.hess_diag, which is the buffer)
        single_use = all(store.uses.get(id(p), 1) == 1 and not store.carries(p) for p in params)
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
            # the graph's leaves: a sharded module holds its sharded parameters between
            # forward and backward, the graph their unsharded stand-ins
            named = ((name, leaf_of(p)) for name, p in named if p is not None)
            call.targets = {
                name: p if p.requires_grad and self._estimated(p) else None for name, p in named
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
            if is_reentrant_checkpoint(node):
                self._refuse(
                    node,
                    "(torch.utils.checkpoint with use_reentrant=True) hides the layers inside "
                    "it from GGN-MC's sampling",
                    "Use use_reentrant=False, or method='hesscale_gn'.",
                )
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

    def finish(self, failed: bool = False) -> None:
        """Remove the prehooks, write the pending estimates (none after a failure) and release
        what the forward passes recorded."""
        for handle in self.handles:
            handle.remove()
        for recompute in self.recomputes:
            recompute.restore()
        missing = self.store.finish(failed) if self.outer is None else []
        if not self.retain:
            for f in self.forwards:
                f.release()
        self.curvature.clear()
        self.info.clear()
        if missing and self.options.collect is not None:  # diagonal(): say so now
            names = {}
            for f in self.forwards:
                names.update(f.state.parameter_names())
            refuse_missing(missing, names)


def run_backward(roots, gradients=None, retain_graph=None, create_graph=False, inputs=None):
    """``torch.autograd.backward(roots, gradients, ...)`` with the curvature pass of the
    extended models whose outputs lie below (``Tensor.backward`` on one root is the same)."""
    roots = (roots,) if isinstance(roots, Tensor) else tuple(roots)
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    with torch._C.DisableTorchFunctionSubclass():
        retain = create_graph if retain_graph is None else retain_graph
        curvature_pass = _Pass.plan(roots, inputs, bool(retain))
        if curvature_pass is not None and curvature_pass.outer is None:
            curvature_pass.store.scale = _loss_scale(roots)
        elif curvature_pass is not None:  # inside a reentrant checkpoint: start from ŝ
            curvature_pass.seed(roots)
        with torch.enable_grad():  # an alias in the graph (inside a backward grad mode is off)
            roots = tuple(_plain(r) for r in roots)  # autograd's backward, not ours again
        if gradients is not None:
            gradients = _plain(gradients) if isinstance(gradients, Tensor) else gradients
    failed = True
    try:  # torch functions dispatch inside: a reentrant checkpoint's backward reaches us
        torch.autograd.backward(roots, gradients, retain_graph, create_graph, inputs=inputs)
        failed = False
    except torch.utils.checkpoint.CheckpointError as error:
        if curvature_pass is None or curvature_pass.exec_group is not None:
            raise
        raise UnsupportedModuleError(
            "torch.utils.checkpoint(use_reentrant=False): the rules read tensors the checkpoint "
            "recomputes, which needs a graph-execution group of their own "
            "(torch.utils.checkpoint.GraphExecGroup, PyTorch 2.10 and later) and none could be "
            "used here (an older PyTorch, or a backward pass already inside such a group). Use "
            "use_reentrant=True, which hesscale supports on any PyTorch, or PyTorch 2.10."
        ) from error
    finally:
        if curvature_pass is not None:
            curvature_pass.finish(failed)


_SCALAR_SCALINGS = ("MulBackward1", "DivBackward1", "AliasBackward0", "NegBackward0")


def _loss_scale(roots) -> Tensor | None:
    """``S`` when the one root is ``S · L`` with a one-element tensor ``S`` (``scaler.scale(L)``
    of a GradScaler), possibly times numbers: the scale the optimizers divide the estimates by
    after ``scaler.unscale_``. None otherwise."""
    if len(roots) != 1:
        return None
    node = roots[0].grad_fn
    while node is not None and type(node).__name__ in _SCALAR_SCALINGS:
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "MulBackward0":
        return None
    for name in ("other", "self"):
        factor = getattr(node, f"_saved_{name}", None)
        if isinstance(factor, Tensor) and factor.numel() == 1 and not factor.requires_grad:
            return factor
    return None
