"""Every layer, activation and loss against an independent dense implementation of the
recursion (``hesscale.reference.recursion_reference``), in float64, for all three methods."""

import pytest
import torch

import hesscale
from hesscale.reference import recursion_reference
from hesscale.rules._registry import LayerContext
from hesscale.rules.pooling import MAX_POOLS, max_pool_indices, max_pool_rule

from .cases import CASES, POOLS, build
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


MAX_POOL_CASES = {k: v for k, v in POOLS.items() if k.startswith("maxpool")}


@pytest.mark.parametrize("name", MAX_POOL_CASES)
def test_max_pool_reads_the_indices_autograd_saved(name):
    """The rule's arg-max indices come from the forward pass (no second pooling), equal to
    recomputed ones; without them (an input that needs no gradient) the rule recomputes."""
    make, dims = MAX_POOL_CASES[name]
    m = make()
    x = torch.randn(2, 3, *([6] * dims), dtype=torch.float64, requires_grad=True)
    y = m(x)
    saved = max_pool_indices(m, x, y)
    _, expected = MAX_POOLS[type(m)](
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
    )
    assert saved is not None and torch.equal(saved, expected)
    assert max_pool_indices(m, x.detach(), m(x.detach())) is None

    s_out = torch.rand_like(y)
    results = [
        max_pool_rule(
            LayerContext(
                module=m,
                input=x.detach(),
                output=y.detach(),
                grad_output=torch.zeros_like(y),
                curvature_output=s_out,
                method=hesscale.METHODS["hesscale"],
                need_input_curvature=True,
                saved=indices,
            )
        ).curvature_input
        for indices in (saved, None)
    ]
    assert torch.equal(results[0], results[1])
    # J has 0/1 entries, so (J∘J)ᵀ s = Jᵀ s: max pooling's own backward applied to s
    (transposed,) = torch.autograd.grad(y, x, s_out)
    torch.testing.assert_close(results[0], transposed)
