"""The HesScale engine: hooks that record a chain forward pass and backpropagate curvature.

How it works
------------
``extend(model)`` checks every leaf module against the rule registry and installs forward hooks.
They do nothing unless an estimate was requested for the model's parameters (by an optimizer
through :func:`request`, or by :func:`diagonal`), so an extended model trained with plain Adam pays
one Python call per module and forward.

When an estimate is requested, the forward pass records every leaf call on a :class:`_Tape`,
checking that the calls form a chain (each module consumes the previous module's output), and
registers a gradient hook on each module output. The extended loss records how to compute the
exact diagonal of its Hessian with respect to the network output. During ``loss.backward()``
autograd reaches the module outputs in reverse order; the hook on the output of module ``i``
receives ``g_i = ∂L/∂y_i`` and holds ``ŝ_i`` (from the loss, or from module ``i + 1``), applies
module ``i``'s rule, stores the parameter estimates as ``p.hess_diag`` and leaves ``ŝ`` for
module ``i − 1``. Curvature thus flows alongside the gradient in the same backward pass.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._errors import NonChainForwardError, UnsupportedModuleError
from ._ggn_mc import sampled_ggn_diagonals
from ._methods import METHODS, Method, get_method
from .baselines import sample_hessian_factor
from .rules import loss_rule_for, rule_for
from .rules._registry import Backprop, LayerContext, Rule
from .rules.losses import bind_loss_arguments, is_loss

_STATE = "_hesscale_state"
_LOSS_STATE = "_hesscale_loss_rule"
_REQUEST = "_hesscale_request"
_TAPE_TAG = "_hesscale_tape"
_ESTIMATE_ID = "_hess_diag_id"
_LOSS_FACTOR = "_hess_diag_loss_factor"
_ESTIMATE_HOOKS = "_hess_diag_hooks"
ESTIMATE_ATTRIBUTE = "hess_diag"

_tape_ids = itertools.count(1)


@dataclass
class _Record:
    """One leaf module call of the forward pass.

    Values are kept detached and the output's identity as a weak reference: the output carries
    a hook that refers to the tape, and a tape referring back to it would form a cycle through
    autograd's C++ graph that Python's garbage collector cannot break.
    """

    module: nn.Module
    path: str
    rule: Rule
    input: Tensor | None
    output: Tensor | None
    output_ref: weakref.ref
    version: int
    saved: object = None
    live_output: Tensor | None = None  # the graph-attached output, kept for GGN-MC only

    def produced(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is this module's unmodified output."""
        return self.output_ref() is tensor and tensor._version == self.version


@dataclass
class _Tape:
    """The chain of module calls of one forward pass, and the curvature handed between them."""

    method: Method
    root_input: Tensor | None
    options: _Options
    id: int = field(default_factory=lambda: next(_tape_ids))
    records: list[_Record] = field(default_factory=list)
    called: set = field(default_factory=set)  # modules called so far (reuse is refused)
    first: int = 0
    loss: _LossCall | None = None  # set by the extended loss that consumed the output
    pending: dict[int, Tensor] = field(default_factory=dict)
    busy: bool = False  # inside the engine's own backward pass (GGN-MC): hooks stand aside
    loss_factor: Tensor | None = None  # ∂(what is backpropagated)/∂(loss value), see _on_loss
    dtype: torch.dtype | None = None  # the parameters' dtype: curvature is computed in it
    workspaces: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Options:
    """Per-call options of :func:`diagonal` (defaults for optimizer requests)."""

    individual: bool = False
    samples: int = 1
    generator: torch.Generator | None = None
    reuse_buffers: bool = True  # estimates overwrite last step's in place (optimizer requests)
    announce: bool = True  # run the parameters' estimate hooks (optimizer requests)


@dataclass(frozen=True)
class _LossCall:
    """An extended loss's call on a tape's output: enough to compute ``ŝ`` or sample factors."""

    module: nn.Module
    arguments: dict
    role: str

    def curvature(self, method: Method, dtype: torch.dtype | None = None) -> Tensor:
        arguments = {
            k: _as(v, dtype) if isinstance(v, Tensor) else v for k, v in self.arguments.items()
        }
        rule = getattr(self.module, _LOSS_STATE)
        return rule.curvature(self.module, arguments, method)[self.role]

    def factors(self, samples: int, generator) -> Tensor:
        if self.role != "input":
            raise UnsupportedModuleError("GGN-MC samples factors for a loss's input only")
        args = dict(self.arguments)
        out, target = args.pop("input"), args.pop("target")
        return sample_hessian_factor(self.module, out, target, samples, generator, **args)


class _ModelState:
    """What ``extend`` attaches to a model: its leaves, their rules and the current tape."""

    def __init__(self, model: nn.Module):
        self.root_name = type(model).__name__
        self.paths: dict[nn.Module, str] = {}
        self.rules: dict[nn.Module, Rule] = {}
        for path, module in model.named_modules():
            if module._parameters and any(True for _ in module.children()):
                raise UnsupportedModuleError(
                    f"module '{path or '<root>'}' ({type(module).__name__}) owns parameters "
                    f"{sorted(module._parameters)} and also has submodules: its forward uses them "
                    "outside any supported layer. Move them into a layer with a rule."
                )
            if not any(True for _ in module.children()):
                self.rules[module] = rule_for(module, path)
                self.paths[module] = path or "<root>"
        self.params = [p for p in model.parameters()]
        self.workspaces: dict[nn.Module, dict] = {m: {} for m in self.rules}
        self.forced: Method | None = None
        self.options = _Options()
        self.tape: _Tape | None = None
        self.last_monte_carlo: weakref.ref | None = None

    # --- forward --------------------------------------------------------------------------
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

    def on_root_start(self, model, args):
        previous = self.last_monte_carlo() if self.last_monte_carlo is not None else None
        if previous is not None:  # its graph-attached outputs form a cycle until released
            _release(previous)
            self.last_monte_carlo = None
        method = self.requested_method()
        if method is None or not torch.is_grad_enabled():
            self.tape = None
            return
        if torch.compiler.is_compiling():
            raise UnsupportedModuleError(
                f"{self.root_name} is extended and being compiled by torch.compile: compiled "
                "graphs bypass the hooks that compute the estimates. Train the uncompiled model."
            )
        first = args[0] if args and isinstance(args[0], Tensor) else None
        floating = [p.dtype for p in self.params if p.is_floating_point()]
        self.tape = _Tape(
            method=method,
            root_input=first,
            options=self.options,
            workspaces=self.workspaces,
            dtype=floating[0] if floating else None,
        )
        self.last_monte_carlo = weakref.ref(self.tape) if method.monte_carlo else None

    def on_leaf(self, module, args, output):
        tape = self.tape
        if tape is None:
            return
        path = self.paths[module]
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise NonChainForwardError(
                f"module '{path}' ({type(module).__name__}) was called with {len(args)} "
                "positional inputs or returned a non-tensor; the engine supports chains of "
                "modules that map one tensor to one tensor"
            )
        x = args[0]
        if module in tape.called:
            raise NonChainForwardError(
                f"forward of {self.root_name} is not a chain: module '{path}' is called twice "
                "(reused modules share parameters across positions and are not supported)"
            )
        if tape.records:
            prev = tape.records[-1]
            if not prev.produced(x):
                raise NonChainForwardError(
                    f"forward of {self.root_name} is not a chain: module '{path}' "
                    f"({type(module).__name__}) received a tensor that is not the unmodified "
                    f"output of the module called before it, '{prev.path}'. Branches, residual "
                    "additions and functional calls between modules are not supported; express "
                    "the model as a chain of supported modules (e.g. nn.Flatten instead of "
                    "x.view, nn.ReLU instead of torch.relu)."
                )
        elif x.requires_grad and x is not tape.root_input:
            raise NonChainForwardError(
                f"forward of {self.root_name} is not a chain: its first module '{path}' "
                "receives a tensor computed from trainable values outside any module"
            )
        tape.called.add(module)
        if output is x:  # returned its input unchanged (Identity, eval-mode Dropout): J = I
            return
        index = len(tape.records)
        rule = self.rules[module]
        saved = rule.capture(module, x, output) if rule.capture is not None else None
        tape.records.append(
            _Record(
                module,
                path,
                rule,
                x.detach(),
                output.detach(),
                weakref.ref(output),
                output._version,
                saved,
                live_output=output if tape.method.monte_carlo else None,
            )
        )
        if output.requires_grad:
            output.register_hook(partial(_on_output_grad, tape, index))

    def on_root_end(self, model, args, output):
        tape, self.tape = self.tape, None
        if tape is None:
            return
        if not tape.records:
            return
        last = tape.records[-1]
        if not last.produced(output):
            raise NonChainForwardError(
                f"forward of {self.root_name} is not a chain: what it returns is not the "
                f"unmodified output of its last module '{last.path}' (a computation follows it, "
                "or the model runs under torch.compile, which is not supported)"
            )
        trainable = [
            i
            for i, r in enumerate(tape.records)
            if any(p.requires_grad for p in r.module.parameters(recurse=False))
        ]
        tape.first = trainable[0] if trainable else len(tape.records)
        setattr(output, _TAPE_TAG, weakref.ref(tape))


def _on_output_grad(tape: _Tape, index: int, grad: Tensor) -> None:
    """Backward hook on the output of module ``index``: apply its rule (see module docstring).

    Autocast is switched off: a backward pass started inside an autocast region would otherwise
    run the rules' products in low precision."""
    device = grad.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return _backpropagate(tape, index, grad)
    return _backpropagate(tape, index, grad)


def _backpropagate(tape: _Tape, index: int, grad: Tensor) -> None:
    last = index == len(tape.records) - 1
    if index < tape.first or tape.busy or (tape.method.monte_carlo and not last):
        return
    record = tape.records[index]
    if record.input is None:
        raise RuntimeError(
            "hesscale computes its estimates once per forward pass; run the forward pass again "
            "before another backward through the same graph"
        )
    if last and tape.loss is None:
        raise RuntimeError(
            "an estimate was requested, but no extended loss consumed the model's output: "
            "call loss_fn = hesscale.extend(loss_fn) and apply it directly to the model's output"
        )
    if tape.method.monte_carlo:
        factors = tape.loss.factors(tape.options.samples, tape.options.generator)
        tape.busy = True
        try:
            sampled = sampled_ggn_diagonals(
                tape.records, record.live_output, factors, tape.options.individual, tape.dtype
            )
        finally:
            tape.busy = False
        for layer, estimates in sampled:
            if tape.loss_factor is not None:
                estimates = {k: v * tape.loss_factor for k, v in estimates.items()}
            _store(tape, layer, estimates)
        _release(tape)
        return
    if last:
        s_out = tape.loss.curvature(tape.method, tape.dtype)
        if tape.loss_factor is not None:
            s_out = s_out * tape.loss_factor
    else:
        s_out = tape.pending.pop(index)
    dtype = tape.dtype  # under autocast, the curvature pass runs in the parameters' dtype
    ctx = LayerContext(
        module=record.module,
        input=_as(record.input, dtype),
        output=_as(record.output, dtype),
        grad_output=_as(grad, dtype),
        curvature_output=_as(s_out, dtype),
        saved=record.saved,
        method=tape.method,
        need_input_curvature=index > tape.first,
        individual=tape.options.individual,
        workspace=(
            tape.workspaces.get(record.module)
            if tape.options.reuse_buffers and not tape.options.individual
            else None
        ),
    )
    result: Backprop = record.rule.backprop(ctx)
    if index > tape.first:
        if result.curvature_input is None:
            raise RuntimeError(f"the rule of '{record.path}' returned no input curvature")
        tape.pending[index - 1] = result.curvature_input
    _store(tape, record, result.parameters)
    record.input = record.output = record.saved = None
    if index == tape.first:
        _release(tape)


def _release(tape: _Tape) -> None:
    """The pass is over: drop every tensor the tape kept (and so any reference cycle)."""
    for r in tape.records:
        r.input = r.output = r.saved = r.live_output = None
    tape.loss = None
    tape.pending.clear()


def _as(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype`` when both are floating and differ (mixed precision), else ``t``."""
    if dtype is None or t.dtype == dtype or not t.is_floating_point():
        return t
    return t.to(dtype)


def _store(tape: _Tape, record: _Record, estimates: dict[str, Tensor]) -> None:
    """Write estimates to ``p.hess_diag``, tagged with the tape's id; shapes are checked."""
    individual = tape.options.individual
    for name, estimate in estimates.items():
        param = getattr(record.module, name)
        if param is None or not param.requires_grad:
            continue
        expected = (len(record.input), *param.shape) if individual else param.shape
        if estimate.shape != expected:
            raise RuntimeError(
                f"the rule of '{record.path}' returned an estimate of shape "
                f"{tuple(estimate.shape)} for '{name}', expected {tuple(expected)}"
                + (" (per example: does the rule support individual=True?)" if individual else "")
            )
        setattr(param, ESTIMATE_ATTRIBUTE, estimate.detach())
        setattr(param, _ESTIMATE_ID, tape.id)
        setattr(param, _LOSS_FACTOR, tape.loss_factor)
        hooks = getattr(param, _ESTIMATE_HOOKS, None) if tape.options.announce else None
        if hooks:
            for hook in tuple(hooks.values()):
                hook(param)


def _on_loss(module, args, kwargs, output):
    """Forward hook of an extended loss: tell each producing tape how to get its ``ŝ``.

    The loss value may be scaled before the backward pass (``(c * loss).backward()``, a
    ``GradScaler``, a sum of losses): a hook on it receives ``c = ∂(backpropagated)/∂L``, and the
    curvature is that of ``c · L``, consistent with the gradients the backward pass computes.
    """
    rule = getattr(module, _LOSS_STATE)
    bound = bind_loss_arguments(module, args, kwargs)
    consumers = []
    for role in rule.roles:
        tensor = bound.get(role)
        tag = getattr(tensor, _TAPE_TAG, None) if isinstance(tensor, Tensor) else None
        tape = tag() if tag is not None else None
        if tape is not None and tape.records and tape.records[-1].produced(tensor):
            arguments = {k: v.detach() if isinstance(v, Tensor) else v for k, v in bound.items()}
            tape.loss = _LossCall(module, arguments, role)
            consumers.append(tape)
    if consumers and isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(partial(_set_loss_factor, consumers))


def _set_loss_factor(tapes: list[_Tape], grad: Tensor) -> None:
    for tape in tapes:
        tape.loss_factor = grad.detach()


def extend(module: nn.Module) -> nn.Module:
    """Prepare a model or a loss for HesScale estimates; returns ``module``; idempotent.

    A model must be a chain of supported leaf modules (``nn.Sequential``, nested Sequentials, or
    custom modules whose forward applies their submodules one after another); a loss must be one
    of the supported losses with ``reduction='mean'`` or ``'sum'``.

    Raises:
        UnsupportedModuleError: naming the offending module's path and type and listing what is
            supported.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"extend expects an nn.Module, got {type(module).__name__}")
    if is_loss(module):
        if not hasattr(module, _LOSS_STATE):
            setattr(module, _LOSS_STATE, loss_rule_for(module))
            module.register_forward_hook(_on_loss, with_kwargs=True)
        return module
    if hasattr(module, _STATE):
        return module
    if type(module).__name__ == "OptimizedModule" or hasattr(module, "_orig_mod"):
        raise UnsupportedModuleError(
            "extend() got a torch.compile'd model: compiled graphs bypass the per-module hooks "
            "that record the forward pass. Extend and train the uncompiled model."
        )
    state = _ModelState(module)
    module.register_forward_pre_hook(state.on_root_start)
    for leaf in state.rules:
        leaf.register_forward_hook(state.on_leaf)
    module.register_forward_hook(state.on_root_end)
    setattr(module, _STATE, state)
    return module


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
    """The factor ``c`` of the backpropagated ``c · L`` behind ``param.hess_diag``."""
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
    extend(loss_fn)
    if config.monte_carlo and isinstance(loss_fn, nn.NLLLoss):
        raise UnsupportedModuleError(
            "GGN-MC splits the network at its logits: use CrossEntropyLoss on the logits "
            "instead of LogSoftmax followed by NLLLoss"
        )
    options = _Options(
        individual=individual,
        samples=samples,
        generator=generator,
        reuse_buffers=False,
        announce=False,
    )
    with _forced(model, config, options):
        output = model(inputs)
    tag = getattr(output, _TAPE_TAG, None)
    tape = tag() if tag is not None else None
    loss = loss_fn(output, target, **loss_kwargs)
    loss.backward()
    result = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            fresh = tape is not None and estimate_id(p) == tape.id
            if fresh:
                result[name] = getattr(p, ESTIMATE_ATTRIBUTE)
            else:  # not reached by the loss: a zero diagonal
                shape = (len(inputs), *p.shape) if individual else p.shape
                result[name] = p.new_zeros(shape)
    return loss.detach(), result
