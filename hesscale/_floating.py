"""Subnormal floats flushed to zero inside hesscale's own arithmetic, and only there.

Curvature estimates and their moving averages decay towards zero in training (a loss driven
towards zero on a reused batch, saturated units): below 1.2e-38 float32 values are subnormal,
and x86 processors compute with them about 100 times slower. The curvature rules and the
optimizer update run with flush-to-zero on; the caller's setting is restored afterwards. PyTorch
offers no getter: the setting is probed with one multiplication of Python floats, which are
doubles computed by the same SSE unit whose control flags ``torch.set_flush_denormal`` sets
(about 0.1 µs, against 5 µs for a tensor). The setting is per thread: it covers the thread that
runs the rules and the update, not PyTorch's intra-op worker threads.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_SUBNORMAL = 5e-324  # the smallest subnormal double; a module global, so never constant-folded


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero now."""
    return _SUBNORMAL * 1.0 == 0.0


@contextmanager
def flush_denormals(already: bool | None = None):
    """Flush subnormal floats to zero inside; restore the caller's setting after. ``already``
    is the caller's setting if known (saves the probe)."""
    if already is None:
        already = flushing_denormals()
    if already or not torch.set_flush_denormal(True):  # on, or not supported by this CPU
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
