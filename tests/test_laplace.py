"""hesscale as laplace-torch's backend: its diagonal against laplace-torch's exact backends, and
everything laplace-torch builds on it (fit, prior precision, predictives, marginal-likelihood
training, subnetworks, last layer, Hugging Face dict inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")

from laplace import Laplace, marglik_training  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsGGN  # noqa: E402

from hesscale.laplace import HesScaleBackend  # noqa: E402


def _mlp(width: int, outputs: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(3, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, outputs),
    ).double()


def _loader(likelihood: str, n: int = 13, batch_size: int = 5, outputs: int = 4):
    """``n`` examples in batches that do not divide it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(0, outputs, (n,), generator=g)
    else:
        y = torch.randn(n, outputs, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _fit(model, likelihood, backend, subset="all", **kwargs):
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure="diag",
        backend=backend,
        **kwargs,
    )
    la.fit(_loader(likelihood))
    return la


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("exact", [CurvlinopsGGN, BackPackGGN])
def test_last_layer_diagonal_is_laplace_torchs_exact_ggn(likelihood, exact):
    model = _mlp(6)
    ours = _fit(model, likelihood, HesScaleBackend, "last_layer")
    theirs = _fit(model, likelihood, exact, "last_layer")
    torch.testing.assert_close(ours.H, theirs.H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.as_tensor(ours.loss), torch.as_tensor(theirs.loss))


@pytest.mark.parametrize("exact", [CurvlinopsGGN, BackPackGGN])
def test_every_layer_is_exact_where_hesscale_gn_drops_nothing(exact):
    """Hidden layers of width one and a Gaussian likelihood (its output Hessian is diagonal):
    HesScaleGN drops no off-diagonal term, so every layer's diagonal is the exact GGN's."""
    model = _mlp(1)
    ours = _fit(model, "regression", HesScaleBackend)
    theirs = _fit(model, "regression", exact)
    torch.testing.assert_close(ours.H, theirs.H, rtol=1e-10, atol=1e-12)


def test_classification_of_every_layer_is_exact_on_the_output_layer():
    """Under softmax the output Hessian is dense: HesScaleGN keeps its diagonal exactly (the
    output layer's entries are exact) and drops its off-diagonal terms below."""
    model = _mlp(6)
    ours = _fit(model, "classification", HesScaleBackend)
    theirs = _fit(model, "classification", CurvlinopsGGN)
    head = 6 * 4 + 4
    torch.testing.assert_close(ours.H[-head:], theirs.H[-head:], rtol=1e-10, atol=1e-12)
    assert (ours.H >= 0).all()
    relative = float((ours.H - theirs.H).abs().sum() / theirs.H.abs().sum())
    assert 0 < relative < 0.5


def test_empirical_fisher_is_laplace_torchs():
    model = _mlp(6)
    ours = _fit(
        model, "classification", HesScaleBackend, backend_kwargs={"method": "empirical_fisher"}
    )
    theirs = _fit(model, "classification", BackPackEF)
    torch.testing.assert_close(ours.H, theirs.H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["ggn_mc", "fisher"])
def test_other_methods_give_valid_precisions(method):
    generator = torch.Generator().manual_seed(0)
    la = _fit(
        _mlp(6),
        "classification",
        HesScaleBackend,
        backend_kwargs={"method": method, "generator": generator, "samples": 2},
    )
    assert torch.isfinite(la.H).all() and (la.H >= 0).all() and la.H.abs().sum() > 0


def test_signed_hesscale_is_refused_unless_clipped():
    with pytest.raises(ValueError, match="negative='clip'"):
        _fit(_mlp(6), "classification", HesScaleBackend, backend_kwargs={"method": "hesscale"})
    clipped = _fit(
        _mlp(6),
        "classification",
        HesScaleBackend,
        backend_kwargs={"method": "hesscale", "negative": "clip"},
    )
    raw = HesScaleBackend(_mlp(6), "classification", method="hesscale", negative="clip")
    raw.clip = False
    batches = [raw.diag(x, y)[1] for x, y in _loader("classification")]
    assert any((b < 0).any() for b in batches)  # HesScale's entries can be negative
    # each batch's diagonal is clipped (the backend sees one batch at a time)
    torch.testing.assert_close(clipped.H, sum(b.clamp(min=0) for b in batches))
    with pytest.raises(ValueError, match="not a curvature"):
        HesScaleBackend(_mlp(6), "classification", method="grad_sq")


def test_kron_and_full_name_the_backends_that_give_them():
    for structure, name in (("kron", "CurvlinopsGGN or AsdlGGN"), ("full", "CurvlinopsGGN")):
        la = Laplace(
            _mlp(6), "classification", hessian_structure=structure, backend=HesScaleBackend
        )
        with pytest.raises(NotImplementedError, match=name):
            la.fit(_loader("classification"))


class _BatchNormNet(nn.Module):
    """A small convolutional net with BatchNorm (laplace-torch's fit runs it in eval mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


def test_laplace_torch_runs_on_hesscale_with_batch_norm():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 5, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = _BatchNormNet()
    model.train()(x)  # running statistics of its own
    la = Laplace(model, "classification", hessian_structure="diag", backend=HesScaleBackend)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    assert torch.isfinite(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="gridsearch", val_loader=loader, pred_type="glm")
    for kwargs in (
        {"pred_type": "glm", "link_approx": "probit"},
        {"pred_type": "nn", "link_approx": "mc", "n_samples": 10},
    ):
        probs = la(x, **kwargs)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)))
    exact = Laplace(model, "classification", hessian_structure="diag", backend=BackPackGGN)
    exact.fit(loader)
    head = 4 * 3 + 3  # the output layer's entries are exact
    torch.testing.assert_close(la.H[-head:], exact.H[-head:], rtol=1e-4, atol=1e-6)
    assert (la.H >= 0).all()


def test_marginal_likelihood_prior_precision_is_close_to_the_exact_diagonals():
    """On an MLP (float64, all weights): the prior precision that maximises the marginal
    likelihood with HesScaleGN's diagonal, against the exact GGN diagonal's."""
    model = _mlp(6)
    precisions = {}
    for backend in (HesScaleBackend, CurvlinopsGGN):
        la = _fit(model, "classification", backend)
        la.optimize_prior_precision(method="marglik", n_steps=200)
        precisions[backend.__name__] = float(la.prior_precision)
    ratio = precisions["HesScaleBackend"] / precisions["CurvlinopsGGN"]
    assert 0.8 < ratio < 1.25, precisions


def test_marglik_training_and_a_diagonal_subnetwork():
    """Online marginal-likelihood training (a diagonal every epoch), in float32."""
    x, y = _loader("classification", n=40).dataset.tensors
    la, model, margliks, losses = marglik_training(
        _mlp(6).float(),
        DataLoader(TensorDataset(x.float(), y), batch_size=16),
        likelihood="classification",
        hessian_structure="diag",
        backend=HesScaleBackend,
        n_epochs=3,
        n_epochs_burnin=1,
        marglik_frequency=1,
        optimizer_kwargs={"lr": 1e-2},
    )
    assert len(margliks) >= 2 and all(torch.isfinite(torch.tensor(margliks)))
    indices = torch.arange(10, 30)
    subnet = Laplace(
        _mlp(6),
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure="diag",
        backend=HesScaleBackend,
        subnetwork_indices=indices,
    )
    subnet.fit(_loader("classification"))
    full = _fit(_mlp(6), "classification", HesScaleBackend)
    torch.testing.assert_close(subnet.H, full.H[indices])


def test_hugging_face_models_take_their_dict_inputs():
    transformers = pytest.importorskip("transformers")

    config = transformers.GPT2Config(
        vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2, pad_token_id=0, num_labels=3
    )
    torch.manual_seed(0)
    hf = transformers.GPT2ForSequenceClassification(config).double()

    class Classifier(nn.Module):  # laplace-torch's documented wrapper: a dict in, logits out
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, data):
            return self.hf(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"]
            ).logits

    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1, 30, (4, 6), generator=g),
            "attention_mask": torch.ones(4, 6, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(2)
    ]

    class Loader(list):
        dataset = range(8)

    model = Classifier(hf)
    results = {}
    for backend in (HesScaleBackend, CurvlinopsGGN):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="diag",
            backend=backend,
        )
        la.fit(Loader(data))
        results[backend.__name__] = la.H
    ours, exact = results["HesScaleBackend"], results["CurvlinopsGGN"]
    assert torch.isfinite(ours).all() and (ours >= 0).all()
    head = 3 * 8  # the classifier ("score", applied to every token, the last one's kept): exact
    torch.testing.assert_close(ours[-head:], exact[-head:], rtol=1e-10, atol=1e-12)
    last_layer = Laplace(model, "classification", hessian_structure="diag", backend=HesScaleBackend)
    with pytest.raises(ValueError, match="subset_of_weights='all'"):
        last_layer.fit(Loader(data))  # its last layer's output is pooled afterwards


def test_the_readme_snippet_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "HesScaleBackend" in b
    )
    torch.manual_seed(0)
    model = _mlp(6)
    loader = _loader("classification", n=24, batch_size=8)
    namespace = {
        "model": model,
        "train_loader": loader,
        "x": torch.randn(5, 3, dtype=torch.float64),
    }
    exec(compile(block, "README Laplace snippet", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (5, 4) and torch.allclose(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
