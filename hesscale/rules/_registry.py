"""The registries of HesScale rules: one for autograd operations, one for layers.

The engine follows autograd's graph of the backward pass (see :mod:`hesscale.engine`). At every
node it applies an **operation rule**, a pure function of what the node saved in the forward
pass and of what reaches its outputs in the backward pass (:class:`NodeContext`): the gradient
``g`` and the curvature estimate ``ŝ`` at each output. The rule returns ``ŝ`` at each input,

    ŝ_x = (J∘J)ᵀ ŝ_y + [second_order] Σ_k g_k diag(∇²_x f_k),

which is exact for the operation given a diagonal Hessian at its outputs. Operation rules are
keyed by the autograd node's class name (``"TanhBackward0"``) or, for a custom
``torch.autograd.Function``, by the Function class.

A **layer rule** (:class:`LayerContext`) replaces the operations inside a module by one rule that
sees the module's input, output, gradient and curvature: for a user's own layer whose operations
have no rule, and for the layers whose parameters need per-example estimates
(``individual=True``) or GGN-MC (Linear, convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._errors import UnsupportedModuleError
from .._methods import Method


@dataclass(slots=True)
class LayerContext:
    """What a layer rule sees of one module call.

    Attributes:
        module: the module.
        input: its input tensor ``x``, shape ``(N, ...)``.
        output: its output tensor ``y = module(x)``.
        grad_output: ``∂L/∂y``, shaped like ``output``.
        curvature_output: the estimate ``ŝ_y`` of the diagonal of ``∂²L/∂y²``, shaped like
            ``output`` (per example, before summing over the batch).
        method: the switches of the shared rule.
        need_input_curvature: whether ``ŝ_x`` is needed (False when no trainable parameter
            lies before the module).
        individual: return parameter estimates per example, shaped ``(N, *param.shape)``,
            instead of their sum over the batch.
        saved: what the rule's ``capture`` function kept in the forward pass (or None).
        workspace: a dict that persists across calls for this module, for buffers that a rule
            may overwrite in place (see :func:`buffer`), or None when results must be fresh
            tensors (``hesscale.diagonal``, or a module called several times in one pass). On
            CPU, reusing parameter-sized buffers avoids page-faulting fresh memory every step,
            which costs more than the arithmetic.
        second_order: keep the second-order terms ``Σ_k g_k ∇²f_k`` of the layer (False for
            HesScaleGN inside the network).
        scratch: the model's pool of temporaries (see :func:`squared`), or None.
        normalized: the train-mode batch normalisation that alone reads this call's output,
            when the rule was registered with ``batch_norm=True`` and the model's setting is
            ``batch_norm="fused"`` (a :class:`hesscale.rules.normalization.BatchStatistics`):
            the rule differentiates its weights through it, and the bias's estimate is 0.
    """

    module: nn.Module
    input: Tensor
    output: Tensor
    grad_output: Tensor
    curvature_output: Tensor
    method: Method
    need_input_curvature: bool
    individual: bool = False
    workspace: dict | None = None
    saved: object = None
    second_order: bool = True
    scratch: dict | None = None
    normalized: object = None


@dataclass(frozen=True)
class Backprop:
    """What a layer rule returns: ``ŝ_x`` (or None when not needed) and parameter estimates."""

    curvature_input: Tensor | None
    parameters: dict[str, Tensor] = field(default_factory=dict)


ATTENTION_QUERY_RULES = ("centred", "exact")
BATCH_NORM_RULES = ("fused", "per-layer")


@dataclass(frozen=True)
class Settings:
    """Per-model choices between variants of a rule, set by ``hesscale.extend(model, ...)``.

    Attributes:
        attention: the query rule of attention (:mod:`hesscale.rules.attention`). ``"centred"``
            (default): the Hessian with respect to each query's logits is taken as diagonal
            after centring the keys, ``T_q·T_k·d`` per head, the cost of attention itself.
            ``"exact"``: exact given a diagonal Hessian at the output, ``T_q·T_k·d_v·d`` per
            head (``d_v/2`` times attention's cost), for short contexts and quality studies.
        batch_norm: the weights of a Linear layer or convolution whose output only a train-mode
            BatchNorm reads (:mod:`hesscale.rules.normalization`). ``"fused"`` (default):
            differentiated through the batch statistics, exact given a diagonal Hessian at the
            BatchNorm's output, five weight-gradient products with the input and two with its
            square instead of one. ``"per-layer"``: the layer rule alone.
    """

    attention: str = "centred"
    batch_norm: str = "fused"

    def __post_init__(self):
        for name, value, allowed in (
            ("attention", self.attention, ATTENTION_QUERY_RULES),
            ("batch_norm", self.batch_norm, BATCH_NORM_RULES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} rule {value!r}; choose one of {list(allowed)}")


@dataclass(slots=True)
class NodeContext:
    """What an operation rule sees of one autograd node.

    Attributes:
        node: the autograd node; what the forward saved is ``node._saved_<name>`` (read it
            through :meth:`saved`, which keeps the curvature pass in the parameters' dtype),
            for a custom Function ``node.saved_tensors`` and whatever its forward set on ``ctx``.
        grad_outputs: ``g`` at each output of the operation (None: no gradient reached it).
        curvature_outputs: ``ŝ`` at each output (None: exactly zero, e.g. right below the
            loss value, whose Hessian with respect to itself is zero).
        needs: for each input (``node.next_functions``), whether its ``ŝ`` is needed.
        second_order: keep the term ``Σ_k g_k ∇²f_k``. False inside the network under
            HesScaleGN; always True on the loss side of the network output.
        method: the estimation method (BL89 changes the softmax rules).
        dtype: the parameters' dtype, in which the curvature pass runs (mixed precision).
        settings: the model's choices between rule variants (:class:`Settings`).
        scratch: the model's pool of temporaries (see :func:`squared`), or None.
        through: the engine's :func:`hesscale.engine._nested.backpropagate_through`, for
            :meth:`backpropagate`; given to rules whose function has
            ``backpropagates_through = True`` (fused kernels the operation rules know in
            pieces).
    """

    node: object
    grad_outputs: tuple
    curvature_outputs: tuple
    needs: tuple
    second_order: bool
    method: Method
    dtype: torch.dtype | None = None
    settings: Settings = Settings()
    scratch: dict | None = None
    unpacked: dict = field(default_factory=dict)
    through: Callable | None = None  # for rules marked backpropagates_through (see below)

    def saved(self, name: str):
        """``node._saved_<name>``, floating tensors cast to the pass's dtype. Each is unpacked
        once per node (reading a saved tensor again would unpack it again, which
        ``torch.utils.checkpoint(use_reentrant=False)`` allows once per graph task)."""
        value = self.unpacked.get(name, self)
        if value is self:
            value = self.unpacked[name] = getattr(self.node, f"_saved_{name}")
        if isinstance(value, Tensor) and value.is_floating_point() and self.dtype is not None:
            return value.to(self.dtype) if value.dtype != self.dtype else value
        return value

    def backpropagate(self, fn, inputs) -> list:
        """The curvature at ``inputs`` of a recomputation ``fn(*inputs)`` of the node's
        outputs, given the gradient and curvature at them, by a nested pass over ``fn``'s
        operations (None for an input that needs none)."""
        if self.through is None:
            raise NotImplementedError(
                "this rule recomputes its node with other operations, which needs the engine "
                "(mark the rule function with backpropagates_through = True)"
            )
        return self.through(self, fn, inputs)

    @property
    def g(self) -> Tensor | None:
        """The gradient at the (first) output."""
        return self.grad_outputs[0]

    @property
    def s(self) -> Tensor | None:
        """The curvature at the (first) output."""
        return self.curvature_outputs[0]


RuleFn = Callable[[LayerContext], Backprop]
NodeRuleFn = Callable[[NodeContext], tuple]
CheckFn = Callable[[nn.Module], str | None]
CaptureFn = Callable[[nn.Module, Tensor, Tensor], object]


@dataclass(frozen=True)
class Rule:
    """A registered layer rule: the backpropagation function and a setup-time check.

    ``check(module)`` returns None when the configuration is supported, else a sentence that
    says what is not supported. ``capture(module, input, output)``, if given, runs in the
    forward pass (only when an estimate was requested) and its result reaches the rule as
    ``ctx.saved``: for what the forward pass knows and the backward pass cannot recover.
    ``needs_output=False`` says that the rule reads only the output's shape and dtype: the
    engine then does not keep the module's output alive until the backward pass (autograd
    itself does not keep the output of a Linear layer or a convolution), and ``ctx.output``
    is a tensor on the ``meta`` device. ``batch_norm=True`` says that the rule handles
    ``ctx.normalized`` (a train-mode BatchNorm right after the layer). ``saved_input(module,
    node)``, if given, says where autograd's nodes keep the layer's input: ``(levels, name)``,
    the saved tensor ``name`` of the node ``levels`` steps below the output's node ``node``
    along first edges (None: not there). Under saved-tensor hooks (``torch.utils.checkpoint``,
    CPU offloading) the engine then reads the input from there in the backward pass instead of
    keeping it, so that it is recomputed or offloaded like the layer's other activations.
    """

    backprop: RuleFn
    check: CheckFn | None = None
    capture: CaptureFn | None = None
    needs_output: bool = True
    batch_norm: bool = False
    saved_input: Callable | None = None


_LAYER_RULES: dict[type[nn.Module], Rule] = {}
_NODE_RULES: dict[object, NodeRuleFn] = {}
_RECOGNIZERS: list[Callable[[nn.Module], Rule | None]] = []


def register_recognizer(recognize: Callable[[nn.Module], Rule | None]) -> None:
    """Add a function that gives the layer rule of a module of a type without one (a layer of
    another library that computes a known function), or None; it must confirm what the module
    computes rather than trust its name."""
    _RECOGNIZERS.append(recognize)


def register_rule(
    target,
    backprop,
    check: CheckFn | None = None,
    capture: CaptureFn | None = None,
    needs_output: bool = True,
    batch_norm: bool = False,
    saved_input: Callable | None = None,
):
    """Register the HesScale rule of a layer type or of a custom autograd Function.

    Args:
        target: an ``nn.Module`` subclass (exact type match: subclasses need their own) or a
            ``torch.autograd.Function`` subclass.
        backprop: for a layer, ``backprop(ctx: LayerContext) -> Backprop``: the estimate
            ``ŝ_x`` of the diagonal of ``∂²L/∂x²`` (per example, shaped like ``ctx.input``;
            None is allowed when ``ctx.need_input_curvature`` is False) and, for each parameter
            name of the module, the estimate of ``∂²L/∂θ²`` summed over the batch. The rule
            replaces everything the module computes, so its operations need no rules. For a
            Function, ``backprop(ctx: NodeContext) -> tuple``: one ``ŝ`` (or None) per input
            of ``forward``, in order, as its ``backward`` returns gradients.
        check: layers only: ``check(module) -> str | None`` run by ``extend``; a returned
            sentence makes ``extend`` raise :class:`UnsupportedModuleError` with it.
        capture: layers only: ``capture(module, input, output) -> object`` run in the forward
            pass; its result is ``ctx.saved``.
        needs_output: layers only: False when the rule reads only the shape and dtype of
            ``ctx.output`` (then a ``meta`` tensor), which saves keeping the output alive.
        batch_norm: layers only: the rule differentiates its weights through a train-mode
            BatchNorm that follows it, given in ``ctx.normalized``.
        saved_input: layers only: where autograd's nodes keep the layer's input (see
            :class:`Rule`), so that checkpointing frees it.
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        _LAYER_RULES[target] = Rule(backprop, check, capture, needs_output, batch_norm, saved_input)
    elif isinstance(target, type) and issubclass(target, torch.autograd.Function):
        layer_only = (check, capture, saved_input)
        if any(o is not None for o in layer_only) or not needs_output or batch_norm:
            raise TypeError(
                "check, capture, needs_output, batch_norm and saved_input apply to layer rules, "
                "not to Function rules"
            )
        _NODE_RULES[target] = backprop
    else:
        raise TypeError(
            "register_rule expects an nn.Module or torch.autograd.Function subclass, "
            f"got {target!r}"
        )


def operation_rule(*names: str):
    """Decorator: register a built-in operation rule under autograd node class names."""

    def register(fn: NodeRuleFn) -> NodeRuleFn:
        for name in names:
            _NODE_RULES[name] = fn
        return fn

    return register


def node_rule_for(node) -> NodeRuleFn | None:
    """The rule of an autograd node, or None (custom Functions by class, others by name)."""
    forward_cls = getattr(type(node), "_forward_cls", None)
    if forward_cls is not None:
        return _NODE_RULES.get(forward_cls)
    return _NODE_RULES.get(type(node).__name__)


def supported_types() -> list[str]:
    """Names of the layer types with a layer rule."""
    return sorted(t.__name__ for t in _LAYER_RULES)


def supported_operations() -> list[str]:
    """Names of the autograd operations with a rule (custom Functions by class name)."""
    names = (k if isinstance(k, str) else k.__name__ for k in _NODE_RULES)
    return sorted(n for n in names if not n.startswith("_"))  # not the engine's own marker


def module_class(module: nn.Module) -> type:
    """The class whose ``forward`` the module runs: its own, except that FSDP2's
    ``fully_shard`` replaces a module's class by a subclass ``FSDP<Name>(FSDPModule, Name)``
    that only adds sharding, for which this is ``Name``."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule":
        if bases[0].__module__.startswith("torch.distributed.fsdp"):
            return bases[1]
    return cls


def layer_rule_for(module: nn.Module, path: str) -> Rule | None:
    """The layer rule of ``module`` (None if it has none); raises on a refused configuration."""
    rule = _LAYER_RULES.get(module_class(module))
    for recognize in _RECOGNIZERS if rule is None else ():
        rule = recognize(module)
        if rule is not None:
            break
    if rule is not None and rule.check is not None:
        problem = rule.check(module)
        if problem is not None:
            where = f"module '{path}' ({type(module).__name__})" if path else type(module).__name__
            raise UnsupportedModuleError(f"{where}: {problem}")
    return rule


def buffer(workspace: dict | None, key: str, like: Tensor, shape=None) -> Tensor | None:
    """A reusable buffer shaped ``shape`` (default: ``like``'s) from ``workspace``, or None
    when there is no workspace (then pass ``out=None`` and let torch allocate)."""
    if workspace is None:
        return None
    shape = tuple(like.shape if shape is None else shape)
    buf = workspace.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[key] = like.new_empty(shape)
    return buf


def scratch_buffer(scratch: dict, tag: str, shape, dtype, device) -> Tensor:
    """An uninitialised temporary shaped ``shape`` from the pool ``scratch``: one flat buffer
    per ``(tag, dtype, device)``, grown to the largest size asked for, so that a backward pass
    re-uses memory that is already mapped instead of page-faulting fresh memory for every
    layer (on CPU that costs more than the arithmetic). Distinct tags never share memory. The
    view of each shape is made once per buffer and handed out again (a slice and a view cost
    more than a small layer's arithmetic)."""
    key = (tag, dtype, device)
    entry = scratch.get(key)  # (flat buffer, {shape: view of it})
    if entry is not None:
        view = entry[1].get(shape)
        if view is not None:
            return view
    numel = math.prod(shape)
    if entry is None or entry[0].numel() < numel:
        entry = scratch[key] = (torch.empty(numel, dtype=dtype, device=device), {})
    view = entry[1][tuple(shape)] = entry[0][:numel].view(shape)
    return view


def scratch_buffers(scratch: dict) -> list[Tensor]:
    """The flat buffers of the pool ``scratch`` (what it keeps alive between steps)."""
    return [buffer for buffer, _ in scratch.values()]


def squared(t: Tensor, scratch: dict | None = None, tag: str = "square") -> Tensor:
    """Element-wise square ``t ⊙ t``. With a ``scratch`` pool it is written into the pool's
    buffer for ``tag``: a temporary that the caller consumes before it squares another tensor
    with the same tag (the next rule reuses the memory)."""
    if scratch is None:
        return t * t
    return torch.mul(t, t, out=scratch_buffer(scratch, tag, t.shape, t.dtype, t.device))


def input_shape(ctx: NodeContext, index: int) -> tuple[int, ...]:
    """The shape of the node's input ``index``: what its gradient is summed down to."""
    child, nr = ctx.node.next_functions[index]
    return tuple(child._input_metadata[nr].shape)


def sum_to(t: Tensor | None, shape) -> Tensor | None:
    """``t`` summed over broadcast dimensions down to ``shape`` (the transpose of broadcasting,
    whose Jacobian entries are 0 or 1, so it maps curvature as it maps gradients)."""
    if t is None or tuple(t.shape) == tuple(shape):
        return t
    return t.sum_to_size(shape)


__all__ = [
    "Backprop",
    "LayerContext",
    "NodeContext",
    "Rule",
    "Settings",
    "buffer",
    "input_shape",
    "layer_rule_for",
    "node_rule_for",
    "operation_rule",
    "register_recognizer",
    "register_rule",
    "scratch_buffer",
    "scratch_buffers",
    "squared",
    "sum_to",
    "supported_operations",
    "supported_types",
]
