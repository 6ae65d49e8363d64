"""Errors raised by hesscale."""


class UnsupportedModuleError(ValueError):
    """A module, loss or configuration that the HesScale engine cannot handle.

    Raised at setup (``extend``, ``diagonal``) or at the latest during the forward pass, never
    deep inside a backward pass. The message names the module's path in the model, its type, and
    what is supported instead.
    """


class NonChainForwardError(UnsupportedModuleError):
    """A forward pass that is not a chain of supported modules (a branch, a residual addition,
    a reused module, or a functional call between modules)."""
