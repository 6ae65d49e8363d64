"""Subnormal floats are flushed inside the curvature rules and the optimizer update only."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import hesscale
import hesscale.engine._apply as engine
import hesscale.optim._base as optim_base
from hesscale._floating import flushing_denormals
from hesscale.optim import AdaHesScale

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def _tiny_curvature_model():
    """A second layer with weights of 1e-20: the first layer's curvature is ~1e-40 (subnormal)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e-20)
    return model, torch.randn(8, 3), torch.randint(0, 3, (8,))


def _no_flush(monkeypatch):
    nothing = lambda *args, **kwargs: contextlib.nullcontext()
    monkeypatch.setattr(engine, "flushing_denormals", lambda: True)  # "already on": no flush
    monkeypatch.setattr(engine, "flush_denormals", nothing)
    monkeypatch.setattr(optim_base, "flush_denormals", nothing)


def _subnormal(t):
    return ((t != 0) & (t.abs() < TINY)).any()


def test_estimates_hold_no_subnormal_numbers(monkeypatch):
    model, x, y = _tiny_curvature_model()
    gn = dict(method="hesscale_gn")  # no σ''·g term, which is not tiny
    _, estimate = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, **gn)
    assert estimate["0.weight"].abs().max() < 1e-30  # the case is what it claims to be
    assert not any(_subnormal(v) for v in estimate.values())
    _no_flush(monkeypatch)
    _, unflushed = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, **gn)
    assert _subnormal(unflushed["0.weight"])  # without the flush they are there


@pytest.mark.parametrize("user_setting", [False, True])
def test_the_callers_setting_is_kept(user_setting):
    model, x, y = _tiny_curvature_model()
    model = hesscale.extend(model)
    opt = AdaHesScale(model.parameters(), lr=1e-3)
    torch.set_flush_denormal(user_setting)
    try:
        for _ in range(2):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            assert flushing_denormals() == user_setting
            opt.step()
            assert flushing_denormals() == user_setting
    finally:
        torch.set_flush_denormal(False)


def test_results_are_identical_where_nothing_is_subnormal(monkeypatch):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def run():
        model = hesscale.extend(copy.deepcopy(base))
        opt = AdaHesScale(model.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    flushed = run()
    _no_flush(monkeypatch)
    for a, b in zip(flushed, run()):
        assert torch.equal(a, b)
