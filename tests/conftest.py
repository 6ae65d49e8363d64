"""Shared test helpers: ground-truth comparison and the available devices."""

from __future__ import annotations

import sys
import types

import pytest
import torch


def _torchvision_importable() -> None:
    """The torchvision wheel that keeps this project's CPU torch (0.28.0, pinned to torch
    2.13.0) ships operators compiled for CUDA, and importing it on the CPU build fails while
    registering them ("operator torchvision::nms does not exist"). transformers and timm import
    torchvision when it is installed, so the tests replace that one module by an empty one first:
    the models need none of the operators. A test-fixture workaround (benchmarks/zoo.py has its
    own), never the library's."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        import torchvision  # noqa: F401
    except ImportError:
        pass


_torchvision_importable()

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
