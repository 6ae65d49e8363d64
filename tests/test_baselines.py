"""The baseline estimators: exact ones against torch.func, stochastic ones converge to their
expectations as the number of samples grows (fixed seeds, tolerance from the sample count)."""

import pytest
import torch
from torch import nn

import hesscale
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .cases import CASES, build
from .conftest import assert_close_dicts


def _relative_error(estimate: dict, expected: dict) -> float:
    num = sum((estimate[k] - expected[k]).abs().sum() for k in expected)
    den = sum(expected[k].abs().sum() for k in expected)
    return float(num / den)


@pytest.mark.parametrize("name", ["mlp-tanh", "conv2d-groups2", "loss-mse-mean"])
def test_exact_and_ggn_equal_torch_func(name):
    model, loss_fn, x, y = build(CASES[name])
    loss, est = hesscale.diagonal(model, loss_fn, x, y, method="exact")
    assert_close_dicts(est, exact_hessian_diagonal(model, loss_fn, x, y))
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach())
    _, est = hesscale.diagonal(model, loss_fn, x, y, method="ggn")
    assert_close_dicts(est, ggn_diagonal(model, loss_fn, x, y))


@pytest.mark.parametrize(
    "method, truth, name",
    [
        ("ggn_mc", ggn_diagonal, "mlp-tanh"),
        ("ggn_mc", ggn_diagonal, "loss-bce-logits-multilabel"),
        ("ggn_mc", ggn_diagonal, "loss-ce-weight-smoothing-ignore"),
        ("ggn_mc", ggn_diagonal, "loss-mse-sum"),
        ("ggn_mc", ggn_diagonal, "conv2d-groups2"),
        ("ggn_mc", ggn_diagonal, "linear-on-sequence"),
    ],
)
def test_stochastic_estimators_converge(method, truth, name):
    model, loss_fn, x, y = build(CASES[name])
    expected = truth(model, loss_fn, x, y)
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for k in (4, 4096):
        _, est = hesscale.diagonal(model, loss_fn, x, y, method=method, samples=k, generator=gen)
        errors[k] = _relative_error(est, expected)
    # Monte-Carlo error shrinks like 1/√k: 4 → 4096 samples is a factor 32
    assert errors[4096] < 0.1, errors
    assert errors[4096] < errors[4] / 8, errors


@pytest.mark.parametrize("name", ["mlp-tanh", "conv2d-groups2"])
def test_hutchinson_is_within_its_standard_error(name):
    """Var[z_i (Hz)_i] = Σ_{j≠i} H_ij²: every element lies within 5 standard errors."""
    model, loss_fn, x, y = build(CASES[name])
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of_flat(v):
        params, i = {}, 0
        for n, shape in zip(names, shapes):
            params[n] = v[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    h = torch.func.hessian(loss_of_flat)(flat)
    std = ((h**2).sum(1) - h.diagonal() ** 2).sqrt()
    k = 2000
    _, est = hesscale.diagonal(
        model,
        loss_fn,
        x,
        y,
        method="hutchinson",
        samples=k,
        generator=torch.Generator().manual_seed(0),
    )
    est = torch.cat([est[n].reshape(-1) for n in names])
    assert ((est - h.diagonal()).abs() <= 5 * std / k**0.5 + 1e-12).all()
    assert not torch.allclose(est, h.diagonal())  # really stochastic


def test_kfac_mc_converges_to_ggn_for_one_example():
    """With one example, E[B] = J_aᵀ H J_a and A = x xᵀ: the KFAC diagonal is the GGN's."""
    model, loss_fn, x, y = build(CASES["mlp-sigmoid"])
    x, y = x[:1], y[:1]
    gen = torch.Generator().manual_seed(0)
    _, est = hesscale.diagonal(model, loss_fn, x, y, method="kfac_mc", samples=20000, generator=gen)
    assert _relative_error(est, ggn_diagonal(model, loss_fn, x, y)) < 0.05


def test_kfac_mc_is_a_kronecker_product_on_batches():
    """On a batch the KFAC diagonal differs from the GGN's (A and B are averaged separately)."""
    model, loss_fn, x, y = build(CASES["mlp-sigmoid"])
    gen = torch.Generator().manual_seed(0)
    _, est = hesscale.diagonal(model, loss_fn, x, y, method="kfac_mc", samples=20000, generator=gen)
    assert torch.linalg.matrix_rank(est["0.weight"]) == 1
    assert torch.linalg.matrix_rank(ggn_diagonal(model, loss_fn, x, y)["0.weight"]) > 1


def test_stochastic_estimators_repeat_with_a_seeded_generator():
    model, loss_fn, x, y = build(CASES["mlp-tanh"])
    for method in ("ggn_mc", "hutchinson", "kfac_mc"):
        runs = [
            hesscale.diagonal(
                model,
                loss_fn,
                x,
                y,
                method=method,
                samples=3,
                generator=torch.Generator().manual_seed(7),
            )[1]
            for _ in range(2)
        ]
        assert_close_dicts(runs[0], runs[1], rtol=0, atol=0)


def test_grad_sq_is_squared_gradient():
    model, loss_fn, x, y = build(CASES["mlp-tanh"])
    _, est = hesscale.diagonal(model, loss_fn, x, y, method="grad_sq")
    assert_close_dicts(est, {n: p.grad**2 for n, p in model.named_parameters()})


def test_kfac_refuses_convolutions():
    model, loss_fn, x, y = build(CASES["conv2d-groups2"])
    with pytest.raises(hesscale.UnsupportedModuleError, match="Linear layers only"):
        hesscale.diagonal(model, loss_fn, x, y, method="kfac_mc")


def test_ggn_refuses_nll_after_logsoftmax():
    model, loss_fn, x, y = build(CASES["logsoftmax-nll"])
    with pytest.raises(hesscale.UnsupportedModuleError, match="CrossEntropyLoss"):
        hesscale.diagonal(model, loss_fn, x, y, method="ggn_mc")
    assert isinstance(loss_fn, nn.NLLLoss)


@pytest.mark.parametrize("name", ["conv1d", "mlp-tanh", "linear-on-sequence"])
def test_ggn_mc_individual_sums_to_the_batch_estimate(name):
    model, loss_fn, x, y = build(CASES[name])
    _, each = hesscale.diagonal(
        model,
        loss_fn,
        x,
        y,
        method="ggn_mc",
        samples=3,
        individual=True,
        generator=torch.Generator().manual_seed(1),
    )
    _, batch = hesscale.diagonal(
        model, loss_fn, x, y, method="ggn_mc", samples=3, generator=torch.Generator().manual_seed(1)
    )
    assert_close_dicts({k: v.sum(0) for k, v in each.items()}, batch)
