"""The registry that maps a module type to its HesScale rule.

A rule is a pure function of what a module saw in the forward pass and what reaches it in the
backward pass (:class:`LayerContext`). It returns the curvature estimate with respect to the
module's input and the estimates of the module's own parameters (:class:`Backprop`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .._errors import UnsupportedModuleError
from .._methods import Method


@dataclass(frozen=True)
class LayerContext:
    """What a rule sees of one module call.

    Attributes:
        module: the module.
        input: its input tensor ``x``, shape ``(N, ...)``.
        output: its output tensor ``y = module(x)``.
        grad_output: ``∂L/∂y``, shaped like ``output``.
        curvature_output: the estimate ``ŝ_y`` of the diagonal of ``∂²L/∂y²``, shaped like
            ``output`` (per example, before summing over the batch).
        method: the switches of the shared rule.
        need_input_curvature: whether ``ŝ_x`` is needed (False for the first layer).
        individual: return parameter estimates per example, shaped ``(N, *param.shape)``,
            instead of their sum over the batch.
        saved: what the rule's ``capture`` function kept in the forward pass (or None).
        workspace: a dict that persists across calls for this module, for buffers that a rule
            may overwrite in place (see :func:`buffer`), or None when results must be fresh
            tensors (``hesscale.diagonal``). On CPU, reusing parameter-sized buffers avoids
            page-faulting fresh memory every step, which costs more than the arithmetic.
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


@dataclass(frozen=True)
class Backprop:
    """What a rule returns: ``ŝ_x`` (or None when not needed) and parameter estimates by name."""

    curvature_input: Tensor | None
    parameters: dict[str, Tensor] = field(default_factory=dict)


RuleFn = Callable[[LayerContext], Backprop]
CheckFn = Callable[[nn.Module], str | None]
CaptureFn = Callable[[nn.Module, Tensor, Tensor], object]


@dataclass(frozen=True)
class Rule:
    """A registered rule: the backpropagation function and a setup-time configuration check.

    ``check(module)`` returns None when the configuration is supported, else a sentence that
    says what is not supported. ``capture(module, input, output)``, if given, runs in the
    forward pass (only when an estimate was requested) and its result reaches the rule as
    ``ctx.saved``: for what the forward pass knows and the backward pass cannot recover.
    """

    backprop: RuleFn
    check: CheckFn | None = None
    capture: CaptureFn | None = None


_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(
    module_type: type[nn.Module],
    backprop: RuleFn,
    check: CheckFn | None = None,
    capture: CaptureFn | None = None,
):
    """Register the HesScale rule of a layer type (the one documented way to add a layer).

    Args:
        module_type: the ``nn.Module`` subclass; exact type match, subclasses need their own.
        backprop: ``backprop(ctx: LayerContext) -> Backprop``. It must return the estimate
            ``ŝ_x`` of the diagonal of ``∂²L/∂x²`` (per example, shaped like ``ctx.input``;
            None is allowed when ``ctx.need_input_curvature`` is False) and, for each parameter
            name of the module, the estimate of ``∂²L/∂θ²`` summed over the batch.
        check: optional ``check(module) -> str | None`` run by ``extend``: a returned sentence
            makes ``extend`` raise :class:`UnsupportedModuleError` with it.
        capture: optional ``capture(module, input, output) -> object`` run in the forward pass;
            its result is ``ctx.saved``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _RULES[module_type] = Rule(backprop, check, capture)


def supported_types() -> list[str]:
    """Names of the module types that have a rule."""
    return sorted(t.__name__ for t in _RULES)


def rule_for(module: nn.Module, path: str) -> Rule:
    """The rule of ``module``; raises :class:`UnsupportedModuleError` naming ``path``."""
    rule = _RULES.get(type(module))
    where = f"module '{path}' ({type(module).__name__})" if path else type(module).__name__
    if rule is None:
        raise UnsupportedModuleError(
            f"{where} has no HesScale rule. Supported layers: {', '.join(supported_types())}. "
            "Register a rule for your own layer with hesscale.register_rule(LayerType, rule)."
        )
    if rule.check is not None:
        problem = rule.check(module)
        if problem is not None:
            raise UnsupportedModuleError(f"{where}: {problem}")
    return rule


def no_inplace(module: nn.Module) -> str | None:
    """Shared check: in-place modules overwrite tensors that the rules read in the backward."""
    if getattr(module, "inplace", False):
        return (
            "inplace=True is not supported (it overwrites what the backward rule needs); "
            "use inplace=False"
        )
    return None


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


def squared(t: Tensor) -> Tensor:
    """Element-wise square, kept in one place so that dtype handling stays consistent."""
    return t * t


__all__ = [
    "Backprop",
    "LayerContext",
    "Rule",
    "register_rule",
    "rule_for",
    "supported_types",
    "no_inplace",
    "squared",
    "buffer",
]
