"""Shared test helpers: ground-truth comparison and the available devices."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def assert_close_dicts(actual: dict, expected: dict, rtol=1e-9, atol=1e-12):
    """Every entry of ``expected`` equals ``actual``'s, relative to the entry's scale."""
    assert set(actual) == set(expected), (set(actual), set(expected))
    for name in expected:
        a, e = actual[name], expected[name].to(actual[name].dtype)
        scale = e.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(a / scale, e / scale, rtol=rtol, atol=atol, msg=name)
