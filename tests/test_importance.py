"""Importance scores, the Fisher estimators, pruning and the EWC-style penalty, against
hand-computed values and exact Hessians in float64."""

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad
from torch.nn.utils import prune as torch_prune

import hesscale
from hesscale.criteria import score
from hesscale.optim import AdaHesScale
from hesscale.pruning import default_targets, sparsity_of
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .conftest import assert_close_dicts


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).double()


def _batches(sizes, shape=(4,), classes=3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, dtype=torch.float64, generator=gen),
            torch.randint(0, classes, (n,), generator=gen),
        )
        for n in sizes
    ]


def _gradient(model, loss_fn, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params)


# --- criteria -------------------------------------------------------------------------------
def test_score_formulas_on_hand_computed_values():
    theta = torch.tensor([2.0, -1.0, 0.5, 0.0])
    g = torch.tensor([1.0, 3.0, -2.0, 5.0])
    h = torch.tensor([4.0, -2.0, 8.0, 1.0])
    expected = {
        "obd": [8.0, 1.0, 1.0, 0.0],  # ½|h|θ²
        "taylor2": [6.0, 2.0, 2.0, 0.0],  # |−gθ + ½hθ²|: −2+8, 3−1, 1+1, 0
        "taylor1": [2.0, 3.0, 1.0, 0.0],
        "magnitude": [2.0, 1.0, 0.5, 0.0],
        "curvature": [4.0, 2.0, 8.0, 1.0],
    }
    assert set(expected) == set(hesscale.CRITERIA)
    for criterion, values in expected.items():
        torch.testing.assert_close(score(criterion, theta, g, h), torch.tensor(values))


@pytest.mark.parametrize("criterion", hesscale.CRITERIA)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_importance_with_exact_is_the_criterion_of_the_data_sets_loss(criterion, reduction):
    """Over batches of sizes 3 and 5, g and h are those of the loss of all 8 examples."""
    model, loss_fn = _mlp(), nn.CrossEntropyLoss(reduction=reduction)
    data = _batches([3, 5])
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    h = exact_hessian_diagonal(model, loss_fn, x, y)
    g = _gradient(model, loss_fn, x, y)
    got = hesscale.importance(model, loss_fn, data, "exact", criterion, progress=False)
    theta = dict(model.named_parameters())
    expected = {
        n: {
            "obd": 0.5 * h[n].abs() * theta[n] ** 2,
            "taylor2": (-g[n] * theta[n] + 0.5 * h[n] * theta[n] ** 2).abs(),
            "taylor1": (g[n] * theta[n]).abs(),
            "magnitude": theta[n].abs(),
            "curvature": h[n].abs(),
        }[criterion].detach()
        for n in h
    }
    assert_close_dicts(got, expected)
    assert all((v >= 0).all() for v in got.values())


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "ggn_mc", "empirical_fisher"])
def test_importance_uses_the_estimator_asked_for(method):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    ((x, y),) = _batches([7])
    gen = torch.Generator().manual_seed(3)
    got = hesscale.importance(
        model, loss_fn, [(x, y)], method, "curvature", progress=False, generator=gen
    )
    gen = torch.Generator().manual_seed(3)
    _, h = hesscale.diagonal(model, loss_fn, x, y, method, generator=gen)
    assert_close_dicts(got, {n: v.abs() for n, v in h.items()})


def test_importance_leaves_grad_and_its_scores_follow_the_device_of_the_model():
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker):
        p.grad = m
    hesscale.importance(model, loss_fn, _batches([4, 4]), "hesscale", "taylor2", progress=False)
    assert all(p.grad is m for p, m in zip(model.parameters(), marker))


def test_importance_shows_progress(capsys):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    hesscale.importance(model, loss_fn, _batches([2, 2, 2]), "hesscale_gn", progress=True)
    assert "importance (obd, hesscale_gn)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"criterion": "saliency"}, "unknown criterion 'saliency'"),
        ({"method": "newton"}, "unknown method 'newton'"),
        ({"data": None}, "criterion 'obd' needs data"),
        ({"data": [torch.zeros(2, 4)]}, "batch 0 of data is a Tensor"),
        ({"data": []}, "data yielded no batch"),
    ],
)
def test_importance_refuses_bad_arguments(kwargs, message):
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    args = {"data": _batches([2]), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        hesscale.importance(model, loss_fn, **args)


def test_magnitude_needs_no_data():
    model = _mlp()
    got = hesscale.importance(model, criterion="magnitude")
    assert_close_dicts(got, {n: p.detach().abs() for n, p in model.named_parameters()})


# --- Fisher estimators ------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_empirical_fisher_is_the_sum_of_per_example_squared_gradients(reduction, build):
    model, loss_fn = build(), nn.CrossEntropyLoss(reduction=reduction)
    shape, classes = ((4,), 3) if build is _mlp else ((1, 6, 6), 4)
    ((x, y),) = _batches([5], shape, classes)
    _, got = hesscale.diagonal(model, loss_fn, x, y, "empirical_fisher")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    scale = 1 / len(x) if reduction == "mean" else 1.0
    for i in range(len(x)):
        for n, g in _gradient(model, loss_fn, x[i : i + 1], y[i : i + 1]).items():
            expected[n] += scale * g**2
    assert_close_dicts(got, expected)
    # and the batch gradient is in .grad, as after loss.backward()
    g = _gradient(model, loss_fn, x, y)
    assert_close_dicts({n: p.grad for n, p in model.named_parameters()}, g)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_fisher_converges_to_the_ggn(loss_fn):
    """The Fisher at labels sampled from the model is, in expectation, the GGN diagonal."""
    model = _mlp()
    ((x, y),) = _batches([4])
    if isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(4, 3, dtype=torch.float64)
    expected = ggn_diagonal(model, loss_fn, x, y)
    errors = []
    for k in (4, 4096):
        gen = torch.Generator().manual_seed(0)
        _, got = hesscale.diagonal(model, loss_fn, x, y, "fisher", samples=k, generator=gen)
        num = sum((got[n] - expected[n]).abs().sum() for n in expected)
        errors.append(float(num / sum(e.abs().sum() for e in expected.values())))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 8, errors


@pytest.mark.parametrize("method", ["fisher", "empirical_fisher"])
def test_fisher_refuses_batch_norm_in_train_mode(method):
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    ((x, y),) = _batches([6])
    with pytest.raises(hesscale.UnsupportedModuleError, match="BatchNorm1d '1' in train mode"):
        hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method)
    model.eval()
    _, got = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method)
    assert all(torch.isfinite(v).all() for v in got.values())


# --- pruning ----------------------------------------------------------------------------------
def _scores(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=gen, dtype=torch.float64)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97, 1.0])
def test_global_pruning_removes_exactly_the_lowest_scores(sparsity):
    model = _cnn()
    scores = _scores(model)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if "bias" in n}
    masks = hesscale.prune(model, scores, sparsity)
    assert set(masks) == {"0.weight", "3.weight"} == set(default_targets(model))
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(sparsity * total)
    pruned = torch.cat([scores[n][masks[n] == 0] for n in masks])
    kept = torch.cat([scores[n][masks[n] == 1] for n in masks])
    if len(pruned) and len(kept):
        assert pruned.max() < kept.min()
    for n, b in biases.items():  # biases are left alone by default
        torch.testing.assert_close(dict(model.named_parameters())[n], b)
    assert abs(sparsity_of(model) - round(sparsity * total) / total) < 1e-12


def test_layer_pruning_removes_the_same_fraction_from_every_tensor():
    model = _cnn()
    masks = hesscale.prune(model, _scores(model), 0.4, scope="layer")
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.4 * mask.numel()), name


def test_pruned_models_behave_as_torch_prunes_them():
    model = _mlp()
    hesscale.prune(model, _scores(model), 0.5)
    state = model.state_dict()
    assert {"0.weight_orig", "0.weight_mask", "2.weight_orig", "2.weight_mask"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = _mlp()
    hesscale.prune(fresh, _scores(fresh, seed=9), 0.5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh(torch.zeros(1, 4, dtype=torch.float64))  # torch recomputes weight in the forward
    torch.testing.assert_close(fresh[0].weight, model[0].weight)
    torch_prune.remove(model[0], "weight")
    assert isinstance(model[0].weight, nn.Parameter)
    assert int((model[0].weight == 0).sum()) == int((fresh[0].weight == 0).sum())


def test_pruning_again_keeps_earlier_zeros_and_counts_them():
    model = _mlp()
    first = {n: m.clone() for n, m in hesscale.prune(model, _scores(model, 1), 0.3).items()}
    scores = hesscale.importance(model, criterion="magnitude")  # keys 'i.weight_orig'
    second = hesscale.prune(model, scores, 0.6)
    for n in first:
        assert (second[n][first[n] == 0] == 0).all()
    total = sum(m.numel() for m in second.values())
    assert sum(int((m == 0).sum()) for m in second.values()) == round(0.6 * total)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.5}, r"sparsity must be a number in \[0, 1\]"),
        ({"scope": "channel"}, "unknown scope 'channel'"),
        ({"names": ["0.gain"]}, "'0.gain' is not a parameter"),
        ({"scores": {}}, "no score for '0.weight'"),
        ({"scores": {"0.weight": torch.ones(2), "2.weight": torch.ones(3, 6)}}, "has shape"),
    ],
)
def test_prune_refuses_bad_arguments(kwargs, message):
    model = _mlp()
    args = {"scores": _scores(model), "sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        hesscale.prune(model, **args)


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("build", [_mlp, _cnn])
def test_estimates_of_a_pruned_model_are_masked_estimates_of_the_zeroed_one(method, build):
    """weight = weight_orig ⊙ mask: the engine sees the product, so weight_orig's estimate is
    mask² ⊙ (the estimate of the same model with those weights set to zero)."""
    shape, classes = ((4,), 3) if build is _mlp else ((1, 6, 6), 4)
    ((x, y),) = _batches([5], shape, classes)
    loss_fn = nn.CrossEntropyLoss()
    pruned, zeroed = build(), build()
    masks = hesscale.prune(pruned, _scores(pruned), 0.5)
    with torch.no_grad():
        for name, mask in masks.items():
            zeroed.get_parameter(name).mul_(mask)
    _, got = hesscale.diagonal(pruned, loss_fn, x, y, method)
    _, expected = hesscale.diagonal(zeroed, loss_fn, x, y, method)
    for name, mask in masks.items():
        expected[name.replace("weight", "weight_orig")] = expected.pop(name) * mask
    assert_close_dicts(got, expected)
    last = [n for n in got if n.startswith(str(len(pruned) - 1))]
    exact = exact_hessian_diagonal(pruned, loss_fn, x, y)
    assert_close_dicts({n: got[n] for n in last}, {n: exact[n] for n in last})


def test_fine_tuning_a_pruned_model_with_adahesscale_keeps_it_sparse():
    model = _cnn()
    ((x, y),) = _batches([16], (1, 6, 6), 4)
    loss_fn = nn.CrossEntropyLoss()
    hesscale.prune(model, hesscale.importance(model, criterion="magnitude"), 0.7)
    model = hesscale.extend(model)
    opt = AdaHesScale(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    assert abs(sparsity_of(model) - 0.7) < 0.01


# --- the penalty ------------------------------------------------------------------------------
def _omega(model, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=gen, dtype=torch.float64)
        for n, p in model.named_parameters()
    }


def test_penalty_value_gradient_and_decayed_sum():
    model = _mlp()
    penalty = hesscale.ImportancePenalty(model, strength=3.0, decay=0.5)
    assert penalty().item() == 0.0
    first, second = _omega(model, 1), _omega(model, 2)
    penalty.consolidate(first)
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    penalty.consolidate(second)  # anchors move to the current weights
    omega = {n: 0.5 * first[n] + second[n] for n in first}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = dict(model.named_parameters())
    anchors = {n: a for n, a in penalty.anchors.items()}
    expected = 3.0 * sum((omega[n] * (params[n] - anchors[n]) ** 2).sum() for n in params)
    value = penalty()
    torch.testing.assert_close(value, expected)
    value.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 6.0 * omega[n] * (p - anchors[n]).detach())
    assert penalty.tasks == 2


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
def test_penalty_adds_its_exact_curvature_to_the_estimates(method):
    model = _mlp()
    ((x, y),) = _batches([5])
    loss_fn = nn.CrossEntropyLoss()
    _, plain = hesscale.diagonal(model, loss_fn, x, y, method)
    penalty = hesscale.ImportancePenalty(model, strength=2.5)
    omega = _omega(model)
    penalty.consolidate(omega)
    _, with_penalty = hesscale.diagonal(
        model, lambda out, t: loss_fn(out, t) + penalty(), x, y, method
    )
    assert_close_dicts(with_penalty, {n: plain[n] + 5.0 * omega[n] for n in plain})


def test_a_strong_penalty_holds_the_weights_where_they_were_consolidated():
    """EWC's mechanism in a training loop: Adam on a new task moves the weights far less."""
    loss_fn = nn.CrossEntropyLoss()
    ((x, y),) = _batches([32], seed=7)
    drift = {}
    for strength in (0.0, 1e4):
        model = _mlp()
        penalty = hesscale.ImportancePenalty(model, strength)
        penalty.consolidate(
            hesscale.importance(
                model, loss_fn, [(x, y)], "hesscale_gn", "curvature", progress=False
            )
        )
        anchors = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            (loss_fn(model(x), (y + 1) % 3) + penalty()).backward()  # a new task
            opt.step()
        drift[strength] = sum(
            float((p.detach() - a).norm()) for p, a in zip(model.parameters(), anchors)
        )
    assert drift[1e4] < drift[0.0] / 5, drift


def test_penalty_state_dict_round_trips_through_torch_save():
    model = _mlp()
    penalty = hesscale.ImportancePenalty(model, strength=2.0, decay=0.9)
    penalty.consolidate(_omega(model))
    buffer = io.BytesIO()
    torch.save(penalty.state_dict(), buffer)
    buffer.seek(0)
    restored = hesscale.ImportancePenalty(model, strength=0.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(restored(), penalty())
    assert (restored.strength, restored.decay, restored.tasks) == (2.0, 0.9, 1)
    with pytest.raises(ValueError, match="does not match the model"):
        hesscale.ImportancePenalty(_cnn(), 1.0).load_state_dict(penalty.state_dict())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: hesscale.ImportancePenalty(m, strength=-1.0), "Invalid strength value: -1.0"),
        (lambda m: hesscale.ImportancePenalty(m, 1.0, decay=2.0), "Invalid decay value: 2.0"),
        (lambda m: hesscale.ImportancePenalty(m, 1.0).consolidate({}), "lack the parameters"),
        (
            lambda m: hesscale.ImportancePenalty(m, 1.0).consolidate(
                {n: -torch.ones_like(p) for n, p in m.named_parameters()}
            ),
            "finite and non-negative",
        ),
    ],
)
def test_penalty_refuses_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build(_mlp())
