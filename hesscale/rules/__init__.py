"""HesScale rules, one module per layer family; importing this package registers them all."""

from . import conv, elementwise, linear, pooling, reshape, softmax  # noqa: F401  (registration)
from ._registry import Backprop, LayerContext, Rule, register_rule, rule_for, supported_types
from .losses import LOSSES, LossRule, loss_rule_for

__all__ = [
    "Backprop",
    "LayerContext",
    "LOSSES",
    "LossRule",
    "Rule",
    "loss_rule_for",
    "register_rule",
    "rule_for",
    "supported_types",
]
