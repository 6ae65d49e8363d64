"""Errors raised by hesscale."""


class UnsupportedModuleError(ValueError):
    """A module, loss or configuration that the HesScale engine cannot handle.

    Raised at setup (``extend``, ``diagonal``), in the forward pass, or when ``backward()``
    starts, before autograd runs: never after a number was produced. The message names the
    operation or module, where in the model it ran, and what is supported instead.
    """
