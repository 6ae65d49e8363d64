"""The engine reproduces the paper authors' original implementation (BackPACK-based) on the
fixed networks of ``fixtures/original_hesscale_mlp.json``, and their exact diagonals."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import hesscale
from hesscale.reference import exact_hessian_diagonal

from .conftest import assert_close_dicts

VECTORS = json.loads(
    (Path(__file__).parent / "fixtures" / "original_hesscale_mlp.json").read_text()
)


def _layer(name: str, params: dict, index: int) -> nn.Module:
    if name == "Linear":
        out_features, in_features = torch.tensor(params[f"{index}.weight"]).shape
        return nn.Linear(in_features, out_features)
    if name.startswith("LeakyReLU"):
        return nn.LeakyReLU(float(name.split("=")[1].rstrip(")")))
    return getattr(nn, name)()


def _build(case):
    model = nn.Sequential(*(_layer(n, case["params"], i) for i, n in enumerate(case["layers"])))
    model = model.double()
    model.load_state_dict(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in case["params"].items()}
    )
    loss = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}[case["loss"]]
    x = torch.tensor(case["inputs"], dtype=torch.float64)
    y = torch.tensor(case["targets"])
    if y.is_floating_point():
        y = torch.tensor(case["targets"], dtype=torch.float64)
    return model, loss(reduction=case["reduction"]), x, y


def _expected(case, key):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in case[key].items()}


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_reproduces_original_implementation(case, method):
    model, loss_fn, x, y = _build(case)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
    assert_close_dicts(estimate, _expected(case, method), rtol=1e-10, atol=1e-13)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_close_dicts(grads, _expected(case, "grad"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_reference_reproduces_exact_diagonals(case):
    model, loss_fn, x, y = _build(case)
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    assert_close_dicts(exact, _expected(case, "exact"), rtol=1e-10, atol=1e-13)
