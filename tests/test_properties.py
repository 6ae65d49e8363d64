"""Properties that follow from the theory, checked against exact float64 ground truth."""

import pytest
import torch
from torch import nn

import hesscale
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .cases import CASES, LOSSES, build
from .conftest import assert_close_dicts

LOSS_CASES = {k: v for k, v in CASES.items() if k.startswith("loss-")}


def _last_linear_names(model):
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ids = {id(p) for p in last.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_last_layer_is_exact(case, method, device):
    """The loss rule is the exact output diagonal, so the last layer's estimates are exact."""
    model, loss_fn, x, y = build(case, device)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    names = _last_linear_names(model)
    assert_close_dicts({n: estimate[n] for n in names}, {n: exact[n] for n in names})


@pytest.mark.parametrize("loss", LOSSES, ids=list(LOSSES))
def test_loss_rule_is_exact_output_diagonal(loss):
    """A single weight layer: the estimate of every parameter is the exact diagonal."""
    make_loss, target_fn = LOSSES[loss]
    torch.manual_seed(0)
    layers = [nn.Linear(4, 3)] + ([nn.LogSoftmax(1)] if loss.startswith("nll") else [])
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), target_fn()
    y = y.double() if y.is_floating_point() else y
    loss_fn = make_loss().double()
    for method in ("hesscale", "hesscale_gn"):
        _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
        assert_close_dicts(estimate, exact_hessian_diagonal(model, loss_fn, x, y))


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.Softplus])
def test_width_one_networks_are_exact(activation):
    """No off-diagonal term exists when every layer has width one: HesScale is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 1), activation(), nn.Linear(1, 1), activation(), nn.Linear(1, 1)
    ).double()
    x, y = torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method="hesscale")
    assert_close_dicts(estimate, exact_hessian_diagonal(model, loss_fn, x, y))
    _, gn = hesscale.diagonal(model, loss_fn, x, y, method="hesscale_gn")
    assert_close_dicts(gn, ggn_diagonal(model, loss_fn, x, y))


PIECEWISE = ["mlp-relu", "mlp-leakyrelu", "mlp-relu6", "mlp-hardtanh", "conv2d-relu-maxpool"]


@pytest.mark.parametrize("name", PIECEWISE)
def test_piecewise_linear_hessian_equals_gauss_newton(name):
    model, loss_fn, x, y = build(CASES[name])
    _, h = hesscale.diagonal(model, loss_fn, x, y, method="hesscale")
    _, gn = hesscale.diagonal(model, loss_fn, x, y, method="hesscale_gn")
    assert_close_dicts(h, gn, rtol=1e-12, atol=1e-15)


def test_gauss_newton_equals_ggn_where_nothing_is_dropped():
    """Width-one hidden layers and an MSE loss (diagonal output Hessian): no off-diagonal term
    of the GGN or the Hessian is dropped, so HesScaleGN is the exact GGN diagonal and HesScale
    the exact Hessian diagonal."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 1), nn.ReLU(), nn.Linear(1, 1), nn.LeakyReLU(0.3), nn.Linear(1, 4)
    ).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    _, gn = hesscale.diagonal(model, loss_fn, x, y, method="hesscale_gn")
    assert_close_dicts(gn, ggn_diagonal(model, loss_fn, x, y))
    _, h = hesscale.diagonal(model, loss_fn, x, y, method="hesscale")
    assert_close_dicts(h, exact_hessian_diagonal(model, loss_fn, x, y))


def test_off_diagonal_terms_are_really_dropped():
    """A guard against a vacuous reference: wider networks differ from the exact diagonal."""
    model, loss_fn, x, y = build(CASES["mlp-tanh"])
    _, h = hesscale.diagonal(model, loss_fn, x, y)
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    assert not torch.allclose(h["0.weight"], exact["0.weight"], rtol=1e-3)


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
@pytest.mark.parametrize(
    "name", ["mlp-tanh", "conv2d-groups2", "loss-mse-mean", "loss-bce-logits-multilabel"]
)
def test_mean_is_sum_over_batch_size(name, method):
    model, loss_fn, x, y = build(CASES[name])
    loss_fn.reduction = "mean"
    _, mean = hesscale.diagonal(model, loss_fn, x, y, method=method)
    loss_fn.reduction = "sum"
    _, total = hesscale.diagonal(model, loss_fn, x, y, method=method)
    out = model(x)
    per_example = out.numel() // len(x) if not isinstance(loss_fn, nn.CrossEntropyLoss) else 1
    assert_close_dicts(mean, {k: v / (len(x) * per_example) for k, v in total.items()})


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
@pytest.mark.parametrize(
    "name", ["mlp-elu", "conv1d-stride2-pad1-dil2", "avgpool2d-ceil-nopadcount"]
)
def test_batch_is_sum_of_single_examples(name, method):
    model, loss_fn, x, y = build(CASES[name])
    loss_fn.reduction = "sum"
    _, batch = hesscale.diagonal(model, loss_fn, x, y, method=method)
    singles = [
        hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1], method=method)[1]
        for i in range(len(x))
    ]
    assert_close_dicts(batch, {k: sum(s[k] for s in singles) for k in batch})


@pytest.mark.parametrize(
    "name", ["mlp-elu", "conv1d-stride2-pad1-dil2", "linear-on-sequence", "convtranspose2d-outpad"]
)
def test_individual_estimates_are_the_single_example_estimates(name):
    model, loss_fn, x, y = build(CASES[name])
    loss_fn.reduction = "sum"
    _, each = hesscale.diagonal(model, loss_fn, x, y, individual=True)
    for i in range(len(x)):
        _, single = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1])
        assert_close_dicts({k: v[i] for k, v in each.items()}, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_are_kept(dtype, device):
    model, loss_fn, x, y = build(CASES["conv2d-groups2"], device, dtype)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y)
    for name, p in model.named_parameters():
        assert estimate[name].dtype == dtype and estimate[name].device == p.device
        assert estimate[name].shape == p.shape


def test_float32_agrees_with_float64():
    model, loss_fn, x, y = build(CASES["maxpool2d-overlap"], dtype=torch.float64)
    _, ref = hesscale.diagonal(model, loss_fn, x, y)
    model32, loss32, x32, y32 = build(CASES["maxpool2d-overlap"], dtype=torch.float32)
    _, est = hesscale.diagonal(model32, loss32, x32, y32)
    for k in ref:
        torch.testing.assert_close(est[k].double(), ref[k], rtol=1e-4, atol=1e-6)


def test_gaussian_nll_with_a_variance_network():
    """Appendix A.2: both the mean network and the variance network get exact last layers."""
    torch.manual_seed(0)
    mean_net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    var_net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Softplus()).double()
    loss_fn = hesscale.extend(nn.GaussianNLLLoss())
    hesscale.extend(mean_net), hesscale.extend(var_net)
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = list(mean_net.parameters()) + list(var_net.parameters())
    hesscale.request(params, "hesscale")
    loss_fn(mean_net(x), t, var_net(x)).backward()
    hesscale.request(params, None)

    def loss_of(mean_params, var_params):
        from torch.func import functional_call

        return loss_fn(
            functional_call(mean_net, mean_params, (x,)),
            t,
            functional_call(var_net, var_params, (x,)),
        )

    mp = {k: v.detach() for k, v in mean_net.named_parameters()}
    vp = {k: v.detach() for k, v in var_net.named_parameters()}
    for name in ("2.weight", "2.bias"):
        h = torch.func.hessian(lambda w: loss_of({**mp, name: w}, vp))(mp[name])
        exact = h.reshape(mp[name].numel(), -1).diagonal().reshape(mp[name].shape)
        torch.testing.assert_close(mean_net.get_parameter(name).hess_diag, exact)
        # the variance network's last Linear feeds Softplus: exact up to Softplus' σ'' term,
        # which HesScale keeps, so the whole last layer is exact as well.
        h = torch.func.hessian(lambda w: loss_of(mp, {**vp, name: w}))(vp[name])
        exact = h.reshape(vp[name].numel(), -1).diagonal().reshape(vp[name].shape)
        torch.testing.assert_close(var_net.get_parameter(name).hess_diag, exact)


def test_non_finite_inputs_give_non_finite_estimates():
    model, loss_fn, x, y = build(CASES["maxpool2d-overlap"])
    x[0, 0, 0, 0] = float("nan")
    _, estimate = hesscale.diagonal(model, loss_fn, x, y)
    assert any(not torch.isfinite(v).all() for v in estimate.values())


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89", "ggn_mc"])
def test_a_scaled_loss_scales_the_estimate(method):
    """(c·L).backward(): gradients and curvature are both of c·L (e.g. under a GradScaler)."""
    model, loss_fn, x, y = build(CASES["mlp-tanh"])
    model, loss_fn = hesscale.extend(model), hesscale.extend(loss_fn)
    params = list(model.parameters())
    estimates = []
    for scale in (1.0, -0.25, 1024.0):
        model.zero_grad()
        hesscale.request(params, method)
        torch.manual_seed(0)
        (scale * loss_fn(model(x), y)).backward()
        estimates.append({n: p.hess_diag / scale for n, p in model.named_parameters()})
    hesscale.request(params, None)
    assert_close_dicts(estimates[1], estimates[0])
    assert_close_dicts(estimates[2], estimates[0])
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    if method == "hesscale":  # and c = 1 is the loss itself: the last layer is exact
        torch.testing.assert_close(estimates[0]["4.weight"], exact["4.weight"])
