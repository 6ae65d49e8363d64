"""HesScale rules, one module per operation family; importing this package registers them all."""

from . import (  # noqa: F401  (registration)
    arithmetic,
    attention,
    conv,
    elementwise,
    embedding,
    interpolation,
    linear,
    losses,
    normalization,
    norms,
    pooling,
    recurrent,
    shape,
    softmax,
)
from ._registry import (
    Backprop,
    LayerContext,
    NodeContext,
    Rule,
    Settings,
    layer_rule_for,
    node_rule_for,
    register_rule,
    supported_operations,
    supported_types,
)

__all__ = [
    "Backprop",
    "LayerContext",
    "NodeContext",
    "Rule",
    "Settings",
    "layer_rule_for",
    "node_rule_for",
    "register_rule",
    "supported_operations",
    "supported_types",
]
