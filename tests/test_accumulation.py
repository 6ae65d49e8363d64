"""Gradient accumulation: estimates accumulate over backward passes as ``.grad`` does.

Float64 ground truth: k micro-batches (uneven ones too), each loss weighted by its share of the
batch, give the estimate and the optimizer step of the whole batch in one pass, on networks
without batch coupling. The rule of when a pass adds and when it writes over is pinned case by
case (``hesscale.engine._store``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hesscale
from hesscale.experiments.networks import GPT
from hesscale.optim import AdaBL89, AdaGGNMC, AdaHesScale, AdaHesScaleGN, Adam, Sophia

D = torch.float64
N = 7  # batch size: k = 2, 3, 4 split it unevenly


class ResidualCNN(nn.Module):
    """conv → tanh → conv, added to its input, → tanh → mean over positions → linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.proj, self.head = nn.Conv2d(2, 3, 1), nn.Linear(3, 4)

    def forward(self, x):
        h = self.conv2(torch.tanh(self.conv1(x))) + self.proj(x)
        return self.head(torch.tanh(h).mean((2, 3)))


def _network(name: str, seed: int = 0):
    """``(model, x, y, loss(out, y, reduction))`` in float64."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 3)
        )
        x, y = torch.randn(N, 4), torch.randint(0, 3, (N,))
    elif name == "residual-cnn":
        model = ResidualCNN()
        x, y = torch.randn(N, 2, 4, 4), torch.randint(0, 4, (N,))
    else:
        model = GPT(vocab=11, width=8, context=5, heads=2, layers=1)
        x = torch.randint(0, 11, (N, 5))
        y = torch.randint(0, 11, (N, 5))
    return hesscale.extend(model.to(D)), x.to(D) if x.is_floating_point() else x, y


def _loss(out, y, reduction="mean"):
    return nn.functional.cross_entropy(out, y, reduction=reduction)


def _micro_batches(k: int):
    return torch.tensor_split(torch.arange(N), k)


def _whole_batch(model, x, y, method, reduction):
    model.zero_grad(set_to_none=True)
    hesscale.request(model.parameters(), method)
    _loss(model(x), y, reduction).backward()
    hesscale.request(model.parameters(), None)
    return {n: (p.grad.clone(), p.hess_diag.clone()) for n, p in model.named_parameters()}


def _accumulated(model, x, y, method, reduction, k):
    model.zero_grad(set_to_none=True)
    hesscale.request(model.parameters(), method)
    for part in _micro_batches(k):
        weight = len(part) / N if reduction == "mean" else 1.0
        (_loss(model(x[part]), y[part], reduction) * weight).backward()
    hesscale.request(model.parameters(), None)
    return {n: (p.grad.clone(), p.hess_diag.clone()) for n, p in model.named_parameters()}


def _assert_same(actual: dict, expected: dict):
    for name, (grad, estimate) in expected.items():
        torch.testing.assert_close(actual[name][0], grad, rtol=1e-10, atol=1e-13, msg=name)
        torch.testing.assert_close(actual[name][1], estimate, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("network", ["mlp", "residual-cnn", "gpt"])
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_micro_batches_accumulate_to_the_whole_batch_estimate(network, method, reduction, k):
    model, x, y = _network(network)
    whole = _whole_batch(model, x, y, method, reduction)
    _assert_same(_accumulated(model, x, y, method, reduction, k), whole)


def test_the_accumulation_is_not_the_last_micro_batch_alone():
    """A guard against a vacuous check: the last micro-batch's own estimate differs."""
    model, x, y = _network("mlp")
    whole = _whole_batch(model, x, y, "hesscale", "sum")
    last = _micro_batches(2)[-1]
    alone = _whole_batch(model, x[last], y[last], "hesscale", "sum")
    assert not torch.allclose(alone["4.weight"][1], whole["4.weight"][1])


def test_ggn_mc_accumulates_each_passes_sampled_estimate():
    """GGN-MC samples: the accumulation of two passes is the sum of the two passes run alone
    with the same random numbers, each of its own weighted loss."""
    model, x, y = _network("mlp")
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    parts = _micro_batches(2)

    def run(indices, accumulate):
        estimates = []
        model.zero_grad(set_to_none=True)
        hesscale.request(model.parameters(), "ggn_mc")
        for i in indices:
            if not accumulate:
                model.zero_grad(set_to_none=True)
            torch.manual_seed(10 + i)
            (loss_fn(model(x[parts[i]]), y[parts[i]]) * len(parts[i]) / N).backward()
            estimates.append({n: p.hess_diag.clone() for n, p in model.named_parameters()})
        hesscale.request(model.parameters(), None)
        return estimates

    alone = run([0, 1], accumulate=False)
    accumulated = run([0, 1], accumulate=True)[-1]
    for name in accumulated:
        torch.testing.assert_close(accumulated[name], alone[0][name] + alone[1][name])


OPTIMIZERS = {
    "AdaHesScale": lambda p: AdaHesScale(p, lr=0.05),
    "AdaHesScaleGN": lambda p: AdaHesScaleGN(p, lr=0.05, update_every=2),
    "AdaBL89": lambda p: AdaBL89(p, lr=0.05, clip=1.0),
    "Sophia": lambda p: Sophia(p, lr=0.05, update_every=2),
    "Adam": lambda p: Adam(p, lr=0.05, delta=1e-3),
    "AdaHesScale-scaled": lambda p: AdaHesScale(p, lr=0.05, delta=1e-3, clip=1.0),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("network", ["mlp", "gpt"])
def test_a_step_after_accumulation_is_the_whole_batch_step(optimizer, network):
    """Three steps (with update_every=2: estimates on steps 1 and 3 only), each of one batch or
    of 3 accumulated micro-batches: the same parameters."""
    model, x, y = _network(network)
    runs = []
    for k in (1, 3):
        copy_ = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](copy_.parameters())
        for _ in range(3):
            opt.zero_grad()
            for part in _micro_batches(k):
                (_loss(copy_(x[part]), y[part]) * len(part) / N).backward()
            opt.step()
        runs.append(list(copy_.parameters()))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaggnmc_steps_after_accumulation_like_after_one_pass():
    """AdaGGNMC samples, so only what its steps do with the accumulated estimate is pinned:
    it runs, and its estimate is the accumulation the sampled passes gave."""
    model, x, y = _network("mlp")
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    opt = AdaGGNMC(model.parameters(), lr=1e-3)
    opt.zero_grad()
    for part in _micro_batches(2):
        (loss_fn(model(x[part]), y[part]) * len(part) / N).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- when a pass adds and when it writes over ---------------------------------------------


def _estimate(model, x, y):
    hesscale.request(model.parameters(), "hesscale")
    _loss(model(x), y).backward()
    hesscale.request(model.parameters(), None)
    return model[4].weight.hess_diag.clone()


@pytest.mark.parametrize(
    "between",
    [
        "zero_grad",
        "zero_grad(set_to_none=False)",
        "model.zero_grad",
        "grad = None",
        "clip_grad_norm_",
        "optimizer step",
    ],
)
def test_what_starts_an_estimate_afresh(between):
    model, x, y = _network("mlp")
    once = _estimate(model, x, y)
    opt = AdaHesScale(model.parameters(), lr=0.0)  # lr 0: the step changes no parameter
    model.zero_grad()
    _estimate(model, x, y)
    if between == "zero_grad":
        opt.zero_grad()
    elif between == "zero_grad(set_to_none=False)":
        opt.zero_grad(set_to_none=False)
    elif between == "model.zero_grad":
        model.zero_grad()
    elif between == "grad = None":
        for p in model.parameters():
            p.grad = None
    elif between == "clip_grad_norm_":
        nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    else:
        opt.step()
    again = _estimate(model, x, y)
    torch.testing.assert_close(again, once)


def test_passes_without_anything_between_accumulate():
    model, x, y = _network("mlp")
    model.zero_grad()
    once = _estimate(model, x, y)
    twice = _estimate(model, x, y)
    torch.testing.assert_close(twice, 2 * once)
    torch.testing.assert_close(model[4].weight.grad, 2 * model[4].weight.grad / 2)


def test_diagonal_returns_each_passes_own_estimate_as_fresh_tensors():
    model, x, y = _network("mlp")
    _, first = hesscale.diagonal(model, _loss, x, y)
    kept = {n: t.clone() for n, t in first.items()}
    _, second = hesscale.diagonal(model, _loss, x, y)  # .grad accumulates, so does hess_diag
    for name in first:
        torch.testing.assert_close(second[name], kept[name])
        torch.testing.assert_close(first[name], kept[name])  # not changed in place
        torch.testing.assert_close(model.get_parameter(name).hess_diag, 2 * kept[name])


def test_a_parameter_reached_by_one_micro_batch_only():
    """A branch taken by the first micro-batch only: its parameters' estimate is the first
    pass's, and the optimizer takes it (it is not stale: the pass that wrote it belongs to
    this step)."""
    torch.manual_seed(0)

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x[0, 0] > 0 else self.b(x)

    model = hesscale.extend(Branch().to(D))
    x = torch.randn(4, 3, dtype=D)
    x[:2, 0], x[2:, 0] = 1.0, -1.0
    y = torch.tensor([0, 1, 1, 0])
    opt = AdaHesScale(model.parameters(), lr=0.01)
    opt.zero_grad()
    (_loss(model(x[:2]), y[:2]) / 2).backward()
    first = model.a.weight.hess_diag.clone()
    (_loss(model(x[2:]), y[2:]) / 2).backward()
    torch.testing.assert_close(model.a.weight.hess_diag, first)
    opt.step()  # every parameter with a gradient has its estimate


@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("functional", [False, True], ids=["loss-module", "functional-loss"])
def test_grad_scaler_with_accumulation_steps_like_unscaled_training(unscale, functional):
    """``scaler.scale(loss / k).backward()`` over micro-batches, ``scaler.unscale_`` (as for
    gradient clipping) or not, then ``scaler.step``: the updates of unscaled training. After
    ``unscale_`` the estimates are unscaled by the scale found in the backpropagated value."""
    model, x, y = _network("mlp")
    loss_fn = _loss if functional else hesscale.extend(nn.CrossEntropyLoss())
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)):
        copy_ = copy.deepcopy(model)
        opt = AdaHesScale(copy_.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            for part in _micro_batches(2):
                loss = loss_fn(copy_(x[part]), y[part]) * len(part) / N
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
                continue
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        runs.append(list(copy_.parameters()))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_unrecognisable_loss_scale_after_unscale_is_refused():
    """After scaler.unscale_ the optimizer must know the scale in its estimates: a value that is
    not scaler.scale(...) times numbers is refused, not divided by a guess."""
    model, x, y = _network("mlp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = AdaHesScale(model.parameters(), lr=0.05)
    opt.zero_grad()
    loss = _loss(model(x), y)
    (scaler.scale(loss) + 0.0 * loss).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="no recognisable loss scale"):
        scaler.step(opt)


def test_train_mode_batch_norm_accumulates_each_micro_batchs_own_estimate():
    """Train-mode BatchNorm normalises each micro-batch by its own statistics, so neither the
    gradient nor the estimate of k micro-batches is the whole batch's; the estimate is the sum
    of the micro-batches' estimates, each with its own statistics, as the gradient is the sum
    of theirs (what the documentation says, pinned)."""
    torch.manual_seed(0)
    model = hesscale.extend(
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    )
    x, y = torch.randn(N, 4, dtype=D), torch.randint(0, 3, (N,))
    parts = _micro_batches(2)
    alone = []
    for part in parts:
        state = copy.deepcopy(model[1].state_dict())
        one = _whole_batch(model, x[part], y[part], "hesscale", "sum")
        model[1].load_state_dict(state)  # running statistics as before the micro-batch
        alone.append(one)
    accumulated = _accumulated(model, x, y, "hesscale", "sum", 2)
    whole = _whole_batch(model, x, y, "hesscale", "sum")
    for name in accumulated:
        for i in (0, 1):  # gradient, estimate
            torch.testing.assert_close(accumulated[name][i], alone[0][name][i] + alone[1][name][i])
    assert not torch.allclose(accumulated["0.weight"][1], whole["0.weight"][1])


def test_per_example_estimates_never_accumulate():
    """individual=True: each pass's per-example estimates, whatever the gradient did."""
    model, x, y = _network("mlp")
    _, first = hesscale.diagonal(model, _loss, x, y, individual=True)
    _, second = hesscale.diagonal(model, _loss, x, y, individual=True)  # .grad accumulates
    for name in first:
        torch.testing.assert_close(second[name], first[name])
        torch.testing.assert_close(model.get_parameter(name).hess_diag, first[name])
