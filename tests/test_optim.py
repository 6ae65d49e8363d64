"""Optimizer tests in the style of torch's own."""

import copy
import math

import pytest
import torch
from torch import nn

import hesscale
from hesscale.engine._record import _Traced
from hesscale.optim import (
    OPTIMIZERS,
    AdaBL89,
    AdaGGNMC,
    AdaHesScale,
    AdaHesScaleGN,
    AdaHessian,
    Adam,
    CurvatureAdam,
    Sophia,
    UpdateError,
)

CURVATURE_OPTIMIZERS = [AdaHesScale, AdaHesScaleGN, AdaBL89, AdaGGNMC]


def _problem(seed=0, width=6):
    torch.manual_seed(seed)
    model = hesscale.extend(nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, loss_fn, x, y


def _train(model, loss_fn, x, y, opt, steps, create_graph=False):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=create_graph)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("opt_class", CURVATURE_OPTIMIZERS + [AdaHessian])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(update_every=0), "Invalid update_every value: 0"),
        (dict(bucket_cap_mb=0), "Invalid bucket_cap_mb value: 0"),
        (dict(distributed=True), "but none is initialized: call torch.distributed"),
        (dict(delta=0.0), "Invalid delta value: 0.0"),
        (dict(max_scale=-1.0), "Invalid max_scale value: -1.0"),
    ],
)
def test_invalid_hyperparameters(opt_class, kwargs, message):
    model, *_ = _problem()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        opt_class(model.parameters(), **kwargs)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_squared_gradient_as_curvature_is_adam(weight_decay, decoupled):
    model, loss_fn, x, y = _problem()
    twin = copy.deepcopy(model)
    ours = Adam(
        model.parameters(),
        lr=0.01,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        guard=False,  # the guard's update is Adam's rounded once more
    )
    theirs = (torch.optim.AdamW if decoupled else torch.optim.Adam)(
        twin.parameters(), lr=0.01, weight_decay=weight_decay
    )
    _train(model, loss_fn, x, y, ours, 10)
    _train(twin, loss_fn, x, y, theirs, 10)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scaling",
    [{}, {"delta": 1e-4, "max_scale": 2.0}, {"clip": 0.5}],
    ids=["", "scaled", "clipped"],
)
@pytest.mark.parametrize("opt_class", CURVATURE_OPTIMIZERS)
def test_state_dict_round_trip_continues_bit_for_bit(opt_class, scaling):
    model, loss_fn, x, y = _problem()
    opt = opt_class(model.parameters(), lr=0.01, update_every=2, **scaling)
    torch.manual_seed(5)
    _train(model, loss_fn, x, y, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    _train(model, loss_fn, x, y, opt, 4)

    fresh, *_ = _problem(seed=1)
    fresh.load_state_dict(saved_model)
    fresh_opt = opt_class(
        fresh.parameters(), lr=0.5, update_every=2
    )  # settings come from the state
    fresh_opt.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    _train(fresh, loss_fn, x, y, fresh_opt, 4)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_parameter_groups_apply_their_own_settings():
    model, loss_fn, x, y = _problem()
    first = [p.detach().clone() for p in model[0].parameters()]
    opt = AdaHesScale(
        [
            {"params": model[0].parameters(), "lr": 0.0},
            {"params": model[2].parameters()},
        ],
        lr=0.05,
    )
    assert opt.param_groups[1]["lr"] == 0.05
    _train(model, loss_fn, x, y, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, model[0].parameters()))
    assert opt.state[model[2].weight]["step"] == 3


def test_parameter_without_gradient_is_left_alone():
    model, loss_fn, x, y = _problem()
    extra = nn.Parameter(torch.ones(3))
    opt = AdaHesScale(list(model.parameters()) + [extra], lr=0.05)
    _train(model, loss_fn, x, y, opt, 2)
    assert torch.equal(extra, torch.ones(3))
    # its state exists from the start (torch.distributed.checkpoint loads into it), untouched
    assert opt.state[extra]["step"] == 0 and not opt.state[extra]["exp_avg"].any()


@pytest.mark.parametrize("opt_class", CURVATURE_OPTIMIZERS)
def test_converges_where_hesscale_is_exact(opt_class):
    """A single linear layer with cross-entropy: HesScale is the exact Hessian diagonal."""
    torch.manual_seed(0)
    model = hesscale.extend(nn.Sequential(nn.Linear(5, 3)))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    w_true = torch.randn(3, 5) * 3
    x = torch.randn(256, 5)
    y = (x @ w_true.T).argmax(1)
    lr = 0.05 if opt_class is AdaGGNMC else 0.1
    losses = _train(model, loss_fn, x, y, opt_class(model.parameters(), lr=lr), 150)
    assert losses[-1] < 0.25 * losses[0], losses[::30]


def test_adahessian_converges_and_needs_create_graph():
    model, loss_fn, x, y = _problem()
    opt = AdaHessian(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(0))
    losses = _train(model, loss_fn, x, y, opt, 60, create_graph=True)
    assert losses[-1] < 0.5 * losses[0]
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


def test_missing_estimate_says_how_to_fix_the_loop():
    model = nn.Sequential(nn.Linear(4, 3))  # not extended
    opt = AdaHesScale(model.parameters())
    nn.CrossEntropyLoss()(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match=r"hesscale\.extend\(model\)"):
        opt.step()
    # a second step without a new backward pass would reuse a stale estimate: refused too
    model, loss_fn, x, y = _problem()
    opt = AdaHesScale(model.parameters())
    loss_fn(model(x), y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="no hesscale estimate"):
        opt.step()


def test_update_every_computes_estimates_only_when_needed():
    model, loss_fn, x, y = _problem()
    opt = AdaHesScale(model.parameters(), lr=0.01, update_every=3)
    computed = []
    for _ in range(7):
        opt.zero_grad()
        out = model(x)
        computed.append(isinstance(out, _Traced))
        loss_fn(out, y).backward()
        opt.step()
    assert computed == [True, False, False, True, False, False, True]
    assert opt.state[model[0].weight]["curvature_step"] == 3


def test_closure_scheduler_and_zero_grad():
    model, loss_fn, x, y = _problem()
    opt = AdaHesScaleGN(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.step(closure) < first
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_registry_lists_every_optimizer():
    assert set(OPTIMIZERS) == {
        "sgd",
        "adam",
        "adahessian",
        "adaggnmc",
        "adabl89",
        "adahesscale",
        "adahesscalegn",
        "adam-scaled",
        "adahesscale-scaled",
        "adahesscalegn-scaled",
        "adahesscale-clipped",
        "adahesscalegn-clipped",
        "adahesscale-clipped-scaled",
        "sophia",
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_registry_builds_each_configuration(name):
    """The run's β and ε reach the optimizers that take them; SGD and Sophia keep their own;
    the scaled configurations turn the scaling on."""
    spec = OPTIMIZERS[name]
    opt = spec.build([nn.Parameter(torch.zeros(2))], lr=0.1, betas=(0.5, 0.6), eps=1e-3)
    group = opt.param_groups[0]
    assert isinstance(opt, spec.cls) and group["lr"] == 0.1
    if name in ("sgd", "sophia"):
        assert group.get("betas") in (None, (0.965, 0.99)) and group.get("eps") in (None, 1e-12)
    else:
        assert group["betas"] == (0.5, 0.6) and group["eps"] == 1e-3
    assert group.get("delta") == (1e-4 if name.endswith("-scaled") else None)
    clipped = "-clipped" in name or name == "sophia"
    assert group.get("clip") == (1.0 if clipped else None)


def test_plain_adam_on_an_extended_model_computes_no_estimate():
    model, loss_fn, x, y = _problem()
    opt = torch.optim.Adam(model.parameters())
    _train(model, loss_fn, x, y, opt, 2)
    assert all(not hasattr(p, "hess_diag") for p in model.parameters())


def _by_hand(theta, grads, estimates, lr, b1, b2, eps, squared, power):
    """Algorithm 2's update written out step by step, in float64."""
    m = v = torch.zeros_like(theta)
    for t, (g, s) in enumerate(zip(grads, estimates), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (s * s if squared else s)
        theta = theta - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)) ** power + eps)
    return theta


class Given(CurvatureAdam):
    """Curvature from a list fixed in advance."""

    def __init__(self, params, estimates, **kwargs):
        super().__init__(params, **kwargs)
        self.given = list(estimates)

    def _estimates(self, group, params):
        return [self.given.pop(0)]


@pytest.mark.parametrize("squared, power", [(False, 1.0), (False, 0.5), (True, 0.5), (True, 0.35)])
def test_update_matches_algorithm_2_written_out(squared, power):
    """Newton-style (AdaGGNMC), its square-root option, Adam-style and AdaHessian's power."""
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, dtype=torch.float64, generator=gen)
    grads = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(4)]
    estimates = [torch.rand(5, dtype=torch.float64, generator=gen) + 0.1 for _ in range(4)]
    p = nn.Parameter(theta0.clone())
    opt = Given([p], estimates, lr=0.1, betas=(0.8, 0.9), eps=1e-3)
    opt.squared, opt.power = squared, power
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _by_hand(theta0, grads, estimates, 0.1, 0.8, 0.9, 1e-3, squared, power)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_adahessian_averages_kernels_spatially_and_is_hutchinson():
    """z ⊙ Hz of the exact Hessian (one probe), |·| averaged over a conv kernel's positions."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 2).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def loss_of(w):
        return torch.tanh(torch.nn.functional.conv2d(x, w, conv.bias)).pow(2).sum()

    opt = AdaHessian([conv.weight], generator=torch.Generator().manual_seed(3))
    loss_of(conv.weight).backward(create_graph=True)
    opt._prepare_estimates()
    estimate = opt._products[conv.weight]
    z = torch.randint(0, 2, conv.weight.shape, generator=torch.Generator().manual_seed(3))
    z = z.to(torch.float64) * 2 - 1
    w = conv.weight.detach()
    h = torch.func.hessian(loss_of)(w).reshape(w.numel(), w.numel())
    d = (z.reshape(-1) * (h @ z.reshape(-1))).reshape(w.shape)
    expected = d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d)
    torch.testing.assert_close(estimate, expected)


@pytest.mark.parametrize("squared, power", [(False, 1.0), (True, 0.5)])
@pytest.mark.parametrize(
    "delta, max_scale, clip",
    [(1e-3, 1.0, None), (1e-9, 1.0, None), (10.0, 3.0, None), (None, 1.0, 0.7), (1e-3, 1.0, 0.7)],
)
def test_scaled_update_is_the_formula_written_out(squared, power, delta, max_scale, clip):
    """``u · min(max_scale, √(2δ/T))``, ``T = Σ_params Σ d ⊙ u²``, over two parameter groups;
    with ``clip``, ``u = α · clip(m̂ / (d + ε), clip)`` (clipped on some coordinates only)."""
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(2)]
    grads = [
        [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(2)] for _ in range(3)
    ]
    estimates = [
        [torch.rand(5, dtype=torch.float64, generator=gen) + 0.1 for _ in range(2)]
        for _ in range(3)
    ]
    ps = [nn.Parameter(t.clone()) for t in thetas]
    flat = [e for step in estimates for e in step]
    opt = Given(
        [ps[0]],
        flat[0::2],
        lr=0.1,
        betas=(0.8, 0.9),
        eps=1e-3,
        delta=delta,
        max_scale=max_scale,
        clip=clip,
    )
    opt.add_param_group({"params": [ps[1]]})
    given = iter(flat)
    opt._estimates = lambda group, params: [next(given) for _ in params]
    opt.squared, opt.power = squared, power
    m = [torch.zeros(5, dtype=torch.float64) for _ in ps]
    v = [torch.zeros(5, dtype=torch.float64) for _ in ps]
    expected, clipped = [t.clone() for t in thetas], []
    for t, (g_step, e_step) in enumerate(zip(grads, estimates), start=1):
        for p, g in zip(ps, g_step):
            p.grad = g.clone()
        opt.step()
        updates, curvatures = [], []
        for i in range(2):
            m[i] = 0.8 * m[i] + 0.2 * g_step[i]
            v[i] = 0.9 * v[i] + 0.1 * (e_step[i] ** 2 if squared else e_step[i])
            d = (v[i] / (1 - 0.9**t)) ** power
            ratio = m[i] / (1 - 0.8**t) / (d + 1e-3)
            if clip is not None:
                clipped.append(bool((ratio.abs() > clip).any() and (ratio.abs() < clip).any()))
                ratio = ratio.clamp(-clip, clip)
            updates.append(0.1 * ratio)
            curvatures.append(d)
        total = sum((d * u**2).sum() for d, u in zip(curvatures, updates))
        scale = 1.0 if delta is None else min(max_scale, float((2 * delta / total) ** 0.5))
        expected = [e - scale * u for e, u in zip(expected, updates)]
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert clip is None or any(clipped)  # the case clips some coordinates and not others


def test_the_scaling_tames_a_step_size_that_diverges():
    """A ReLU network where AdaHesScale at lr=1 blows up (the guard says so); with the scaling
    the same step size trains."""
    torch.manual_seed(0)
    make = lambda: hesscale.extend(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)))
    model = make()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.raises(UpdateError, match="parameter .* of parameter group 0.*smaller lr"):
        _train(model, loss_fn, x, y, AdaHesScale(model.parameters(), lr=1.0, eps=1e-12), 5)
    torch.manual_seed(0)
    model = make()
    losses = _train(
        model, loss_fn, x, y, AdaHesScale(model.parameters(), lr=1.0, eps=1e-12, delta=1e-2), 30
    )
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_the_guard_writes_nothing_when_it_refuses():
    model, loss_fn, x, y = _problem()
    opt = Adam(model.parameters(), lr=0.01)
    _train(model, loss_fn, x, y, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("inf")
    with pytest.raises(
        UpdateError, match=r"parameter 2 of parameter group 0 \(shape \(3, 6\)\).*not finite"
    ):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    off = Adam(model.parameters(), lr=0.01, guard=False)
    off.step()  # guard=False writes whatever the update is
    assert not torch.isfinite(model[2].weight).all()


def _sophia_by_hand(theta, grads, estimates, lr, b1, b2, gamma, eps, wd, k):
    """Sophia's algorithm in float64: ``h`` refreshed on steps 0, k, 2k, ...; no bias
    corrections; decoupled weight decay; the ratio clipped to [-1, 1]."""
    theta, m, h = theta.clone(), torch.zeros_like(theta), torch.zeros_like(theta)
    given = iter(estimates)
    for t, g in enumerate(grads):
        m = b1 * m + (1 - b1) * g
        if t % k == 0:
            h = b2 * h + (1 - b2) * next(given)
        theta = theta * (1 - lr * wd)
        theta = theta - lr * torch.clamp(m / torch.clamp(gamma * h, min=eps), -1, 1)
    return theta


@pytest.mark.parametrize("k", [1, 3])
def test_sophia_is_its_algorithm_written_out(k):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(6, dtype=torch.float64, generator=gen)
    grads = [torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(7)]
    # estimates of both signs and tiny ones, so that clipping and ε both act
    estimates = [torch.randn(6, dtype=torch.float64, generator=gen) * 50 for _ in range(7)]
    p = nn.Parameter(theta0.clone())
    opt = Sophia(
        [p],
        lr=0.05,
        betas=(0.9, 0.8),
        gamma=0.02,
        eps=1e-3,
        weight_decay=0.1,
        update_every=k,
        guard=False,
    )
    given = iter(estimates)
    opt._estimates = lambda group, params: [next(given) for _ in params]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _sophia_by_hand(theta0, grads, estimates, 0.05, 0.9, 0.8, 0.02, 1e-3, 0.1, k)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", ["hesscale_gn", "hesscale", "ggn_mc", "hutchinson"])
def test_sophia_trains_with_every_estimator_and_round_trips(estimator):
    model, loss_fn, x, y = _problem()
    opt = Sophia(model.parameters(), lr=0.05, update_every=2, estimator=estimator)
    hutch = estimator == "hutchinson"
    torch.manual_seed(5)
    losses = _train(model, loss_fn, x, y, opt, 12, create_graph=hutch)
    assert losses[-1] < losses[0]
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    _train(model, loss_fn, x, y, opt, 3, create_graph=hutch)
    fresh, *_ = _problem(seed=1)
    fresh.load_state_dict(saved_model)
    fresh_opt = Sophia(fresh.parameters(), lr=0.5, update_every=2, estimator=estimator)
    fresh_opt.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    _train(fresh, loss_fn, x, y, fresh_opt, 3, create_graph=hutch)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_sophia_refuses_bad_settings():
    model, *_ = _problem()
    with pytest.raises(ValueError, match="Invalid estimator: 'kfac'"):
        Sophia(model.parameters(), estimator="kfac")
    with pytest.raises(ValueError, match="Invalid gamma value: 0"):
        Sophia(model.parameters(), gamma=0)


def test_the_guard_reads_the_parameters_only_when_its_bound_cannot_clear_an_update(monkeypatch):
    """Ordinary steps cost one norm of the update; a blow-up after them is still refused."""
    import hesscale.optim._functional as functional

    model, loss_fn, x, y = _problem()
    opt = Adam(model.parameters(), lr=1e-3)
    _train(model, loss_fn, x, y, opt, 3)  # the first step reads the parameters' norm
    calls = []
    real = functional._norms
    monkeypatch.setattr(functional, "_norms", lambda ts: calls.append(len(ts)) or real(ts))
    _train(model, loss_fn, x, y, opt, 10)
    assert len(calls) == 10  # the update's norms only
    opt.param_groups[0]["lr"] = 1e6  # an update 100x the parameters' norm
    with pytest.raises(UpdateError, match="would grow the parameters' norm"):
        _train(model, loss_fn, x, y, opt, 1)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_adahessian_on_fused_attention_says_to_use_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hesscale.experiments.networks import tiny_gpt

    torch.manual_seed(0)
    model, ids = tiny_gpt(), torch.randint(0, 10, (3, 4))
    opt = AdaHessian(model.parameters())
    nn.functional.cross_entropy(model(ids), ids).backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"sdpa_kernel\(SDPBackend.MATH\)"):
        opt.step()
    opt.zero_grad()
    with sdpa_kernel(SDPBackend.MATH):
        nn.functional.cross_entropy(model(ids), ids).backward(create_graph=True)
        opt.step()
