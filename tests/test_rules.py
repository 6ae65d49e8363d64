"""Every layer, activation and loss against an independent dense implementation of the
recursion (``hesscale.reference.recursion_reference``), in float64, for all three methods."""

import pytest
import torch

import hesscale
from hesscale.reference import recursion_reference

from .cases import CASES, build
from .conftest import assert_close_dicts

METHODS = ["hesscale", "hesscale_gn", "bl89"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_engine_matches_dense_recursion(case, method, device):
    model, loss_fn, x, y = build(case, device)
    torch.manual_seed(1)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
    torch.manual_seed(1)
    expected = recursion_reference(model, loss_fn, x, y, method=method)
    assert_close_dicts(estimate, expected)


def test_gradients_are_those_of_loss_backward():
    model, loss_fn, x, y = build(CASES["conv2d-groups2"])
    loss, _ = hesscale.diagonal(model, loss_fn, x, y)
    expected = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
