"""Recording the forward pass: what ``extend`` installs, the layer calls it tags on autograd's
graph, and the network outputs it marks (see :mod:`hesscale.engine`)."""

from __future__ import annotations

import dataclasses
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from .._errors import UnsupportedModuleError
from .._methods import METHODS, Method
from ..baselines import sample_hessian_factor
from ..rules import layer_rule_for
from ..rules._registry import LayerContext, Rule, Settings, module_class
from ..rules.losses import bind_loss_arguments, check_loss, is_loss
from ._apply import autocast_dtype
from ._store import _REQUEST

_STATE = "_hesscale_state"
_LOSS_STATE = "_hesscale_loss"
_OUTPUT_TAG = "hesscale.output"  # node metadata: the _Forward whose output this _Mark marks
_LAYER_TAG = "hesscale.layer"  # node metadata: {output_nr: _LayerCall} of layer calls


@dataclass(frozen=True)
class _Options:
    """Per-call options of :func:`diagonal` (defaults for optimizer requests)."""

    individual: bool = False
    samples: int = 1
    generator: torch.Generator | None = None
    reuse_buffers: bool = True  # estimates overwrite last step's in place (optimizer requests)
    announce: bool = True  # run the parameters' estimate hooks (optimizer requests)
    collect: dict | None = None  # id(p) -> this pass's own estimate (diagonal's result)


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
    input: Tensor | None  # None with input_path: read from the graph in the backward pass
    output: Tensor | None  # kept only for rules that read its values (Rule.needs_output)
    output_like: tuple  # (shape, dtype, device) of the output
    first: int  # autograd's sequence number when the module started: its nodes are numbered on
    leaf_input: weakref.ref | None  # the input, when it is a leaf that requires grad
    version: int
    workspaces: dict  # the model's per-module buffers (_ModelState.workspaces)
    saved: object = None
    live_output: Tensor | None = None
    normalized: object = None  # the BatchStatistics of a train-mode BatchNorm fused into it
    input_path: tuple | None = None  # (levels, name) of Rule.saved_input; (shape of input)
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
    recompute: object = None  # the Recompute of a reentrant checkpoint that recorded it

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
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            from ._plan import run_backward  # the planner imports this module

            if func is torch.autograd.backward:
                return _autograd_backward(run_backward, *args, **(kwargs or {}))
            return _tensor_backward(run_backward, *args, **(kwargs or {}))
        if func is torch.autograd.grad:
            _refuse_grad_of_requested(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs or {})


def _tensor_backward(
    run_backward, tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None
):
    """``Tensor.backward``'s arguments, for :func:`hesscale.engine._plan.run_backward`."""
    return run_backward(tensor, gradient, retain_graph, create_graph, inputs)


def _autograd_backward(
    run_backward,
    tensors,
    grad_tensors=None,
    retain_graph=None,
    create_graph=False,
    grad_variables=None,
    inputs=None,
):
    """``torch.autograd.backward``'s arguments, for :func:`hesscale.engine._plan.run_backward`."""
    gradients = grad_tensors if grad_tensors is not None else grad_variables
    return run_backward(tensors, gradients, retain_graph, create_graph, inputs)


def _refuse_grad_of_requested(outputs, inputs, *args, **kwargs) -> None:
    """``torch.autograd.grad`` writes no ``.grad`` and so cannot keep estimates beside them:
    refused for parameters whose estimate is requested (for other tensors, such as the inputs
    of a gradient penalty, it runs as usual)."""
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if any(getattr(t, _REQUEST, None) is not None for t in inputs):
        raise UnsupportedModuleError(
            "torch.autograd.grad of parameters whose estimate is requested: estimates accumulate "
            "beside .grad, which autograd.grad does not write. Use loss.backward() (or "
            "torch.autograd.backward(loss, inputs=params)), or withdraw the request for these "
            "parameters with hesscale.request(params, None)."
        )


def _plain(t: Tensor) -> Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor) if isinstance(t, _Traced) else t


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks decide what this forward pass keeps (``torch.utils.checkpoint``
    with ``use_reentrant=False``, ``torch.autograd.graph.save_on_cpu``)."""
    return _top_hooks is not None and _top_hooks(False) is not None


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
        self.model = weakref.ref(model)  # for names in messages (a model refers to its state)
        self._collect_parameters(model)
        self.workspaces: dict[nn.Module, dict] = {}
        self.settings = Settings()
        self.scratch: dict = {}  # temporaries of the rules (rules._registry.scratch_buffer)
        self.forced: Method | None = None
        self.options = _Options()
        self.current: _Forward | None = None
        self.last_monte_carlo: weakref.ref | None = None

    def _collect_parameters(self, model: nn.Module) -> None:
        """The model's parameters, and the adapter of those sharded by FSDP2 (None if none).
        ``fully_shard`` replaces the parameters and the root's class, so a model extended
        before it is sharded collects them again in its first forward pass after."""
        self.root_class = type(model)
        self.params = [p for p in model.parameters()]
        self.param_set = set(self.params)
        self.sharding = None
        if "torch.distributed.fsdp" in sys.modules:  # no FSDP unless its module was imported
            from ..fsdp import sharding_of

            self.sharding = sharding_of(model)

    def compute_dtype(self, first: Tensor | None) -> torch.dtype | None:
        """The dtype of the curvature pass: the parameters' (``first``'s), or the dtype FSDP's
        mixed precision all-gathers them in (the forward's, as under autocast)."""
        if first is None:
            return None
        sharded = self.sharding.compute_dtype if self.sharding is not None else None
        return sharded or first.dtype

    def parameter_names(self) -> dict[int, str]:
        """``{id(p): name}`` of the model's parameters."""
        model = self.model()
        return {} if model is None else {id(p): n for n, p in model.named_parameters()}

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
        if type(model) is not self.root_class:  # fully_shard after extend
            self._collect_parameters(model)
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
            dtype=self.compute_dtype(first),
            device=device,
            autocast=autocast_dtype(device),
        )
        self.current.open_spans.append(torch._C._autograd._get_sequence_nr())
        if method.monte_carlo:
            self.last_monte_carlo = weakref.ref(self.current)

    def on_in_place_activation(self, module, args):
        """Refuse an in-place activation with a second derivative on a view (HesScale)."""
        forward = self.current
        x = args[0] if args else None
        if (
            forward is not None
            and forward.method.second_order_term
            and isinstance(x, Tensor)
            and x._base is not None
            and x.requires_grad
        ):
            raise UnsupportedModuleError(
                f"module '{self.paths.get(module, '?')}' ({type(module).__name__}) applies its "
                "activation in place to a view: autograd hides the operation inside a "
                "CopySlices node, whose second-order term HesScale cannot see. Use "
                "inplace=False, or method='hesscale_gn' (which drops that term anyway)."
            )

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
        input_path = None
        if (
            rule.saved_input is not None
            and _saved_tensor_hooks()
            and not forward.method.monte_carlo
        ):
            # checkpointing (or offloading) decides what the forward keeps: the input is read
            # from the graph in the backward pass, recomputed (or reloaded) with the rest
            where = rule.saved_input(module, output.grad_fn)
            input_path = None if where is None else (*where, x.shape)
        call = _LayerCall(
            module=module,
            path=path,
            rule=rule,
            input=x.detach() if input_path is None else None,
            input_path=input_path,
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
        if isinstance(sub, _CURVED_IN_PLACE) and getattr(sub, "inplace", False):
            sub.register_forward_pre_hook(state.on_in_place_activation)
        if sub is module or module_class(sub) in _UNRECORDED:
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


# activations with a second derivative whose inplace=True version, applied to a view, hides it
# from the engine (autograd wraps it in a CopySlices node)
_CURVED_IN_PLACE = (nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU)


def is_extended(module: nn.Module) -> bool:
    """Whether ``extend`` was called on ``module`` (a model or a loss)."""
    return hasattr(module, _STATE) or hasattr(module, _LOSS_STATE)


@contextmanager
def _forced(model: nn.Module, method: Method, options: _Options):
    state: _ModelState = getattr(model, _STATE)
    previous = state.forced, state.options
    state.forced, state.options = method, options
    try:
        yield
    finally:
        state.forced, state.options = previous
