"""Model zoos: small in-repository replicas of the constructs that torchvision and timm models
were refused for (float64, the head exact against torch.func), the in-place patterns that stay
refused and why, and a sample of real zoo models where torchvision and timm are installed.

``benchmarks/zoo.py`` runs every installed model; these tests keep what it found covered
without the zoos.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesscale
from hesscale.reference import exact_hessian_diagonal

D = torch.float64


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


class DropoutOnFlattenedView(nn.Module):
    """EfficientNet's classifier: pooled features flattened (a view) and dropped out in place,
    in train mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(2, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.dropout, self.head = nn.Dropout(0.3, inplace=True), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.flatten(self.pool(nn.functional.silu(self.conv(x))), 1)
        return self.head(self.dropout(h))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last features: x + γ x N(x) + β with
    ``N = ‖x‖₂ over positions / mean over channels``."""

    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(-0.5, 0.5, channels))
        self.beta = nn.Parameter(torch.linspace(0.1, 0.2, channels))

    def forward(self, x):
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + self.gamma * (x * n) + self.beta


class GRNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.grn, self.head = (
            nn.Conv2d(2, 4, 3, padding=1),
            GlobalResponseNorm(4),
            nn.Linear(4, 3),
        )

    def forward(self, x):
        h = self.grn(self.conv(x).permute(0, 2, 3, 1))
        return self.head(h.mean((1, 2)))


class UpsampleNet(nn.Module):
    """A feature map up-sampled (bilinear, then bicubic with align_corners) and pooled."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = nn.functional.interpolate(h, scale_factor=2, mode="bilinear")
        h = nn.functional.interpolate(h, size=(5, 7), mode="bicubic", align_corners=True)
        return self.head(h.mean((2, 3)))


class SequenceTagger(nn.Module):
    """A GRU over tokens with a classifier on every step's output."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = (
            nn.Embedding(7, 3),
            nn.GRU(3, 4, batch_first=True),
            nn.Linear(4, 5),
        )

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out).transpose(1, 2)


REPLICAS = {
    "dropout-in-place-on-a-flattened-view": (
        DropoutOnFlattenedView,
        lambda: torch.randn(4, 2, 4, 4),
        lambda: torch.randint(0, 3, (4,)),
        "head",
    ),
    "global-response-norm": (
        GRNNet,
        lambda: torch.randn(4, 2, 4, 4),
        lambda: torch.randint(0, 3, (4,)),
        "head",
    ),
    "bilinear-and-bicubic-up-sampling": (
        UpsampleNet,
        lambda: torch.randn(4, 2, 3, 3),
        lambda: torch.randint(0, 3, (4,)),
        "head",
    ),
    "sequence-tagger": (
        SequenceTagger,
        lambda: torch.randint(0, 7, (2, 5)),
        lambda: torch.randint(0, 5, (2, 5)),
        "head",
    ),
}


@pytest.mark.parametrize("name", REPLICAS)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_replicas_of_refused_constructs_run_with_an_exact_head(name, method):
    make, inputs, targets, head = REPLICAS[name]
    torch.manual_seed(0)
    model = make().to(D).train()
    x = inputs()
    x = x.to(D) if x.is_floating_point() else x
    y = targets()
    torch.manual_seed(1)  # the same dropout mask for the estimate and the truth
    _, estimate = hesscale.diagonal(model, _loss, x, y, method=method)
    assert all(torch.isfinite(v).all() for v in estimate.values())
    assert all(v.abs().sum() > 0 for k, v in estimate.items() if not k.endswith("bias"))
    torch.manual_seed(1)
    if name == "dropout-in-place-on-a-flattened-view":  # torch.func cannot replay the mask
        from hesscale.reference import double_backward_hessian_diagonal as truth
    else:
        truth = exact_hessian_diagonal
    exact = truth(model, _loss, x, y)
    for key in (f"{head}.weight", f"{head}.bias"):
        torch.testing.assert_close(estimate[key], exact[key])


class Operation(nn.Module):
    def __init__(self, fn, shapes):
        super().__init__()
        self.fn = fn
        self.p = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(s, dtype=D)) for k, s in shapes.items()}
        )

    def forward(self, x):
        return self.fn(self.p)


def _written(a, write):
    t = a * 1.0
    write(t)
    return t


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda p: _written(p["a"], lambda t: t[:, :2].mul_(p["b"])), "weights other than 0 or 1"),
        (lambda p: _written(p["a"], lambda t: t[:, 1:].sub_(p["c"])), "weights other than 0 or 1"),
        (lambda p: _written(p["a"], lambda t: t[:, :3].cumsum_(1)), "mixes the view's elements"),
    ],
    ids=["mul-by-a-parameter", "sub-a-parameter", "cumsum"],
)
def test_in_place_writes_into_views_that_stay_refused(fn, match):
    torch.manual_seed(0)
    model = Operation(fn, {"a": (3, 4), "b": (3, 2), "c": (3, 3)})
    target = torch.zeros(1, dtype=D)
    with pytest.raises(hesscale.UnsupportedModuleError, match=match):
        hesscale.diagonal(model, lambda out, _: (out**2).sum(), target, target)


class InPlaceSiLUOnAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act, self.head = nn.Linear(3, 4), nn.SiLU(inplace=True), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        self.act(h[:, :2])
        return self.head(h)


def test_an_in_place_activation_with_curvature_on_a_view_is_refused_under_hesscale():
    """The second derivative of SiLU applied in place to a view is hidden inside CopySlices:
    refused by name under HesScale; HesScaleGN, which drops that term, runs."""
    torch.manual_seed(0)
    model = InPlaceSiLUOnAView().to(D)
    x, y = torch.randn(4, 3, dtype=D), torch.tensor([0, 1, 1, 0])
    with pytest.raises(
        hesscale.UnsupportedModuleError, match=r"'act' \(SiLU\).*in place to a view"
    ):
        hesscale.diagonal(model, _loss, x, y)
    _, estimate = hesscale.diagonal(model, _loss, x, y, method="hesscale_gn")
    assert all(torch.isfinite(v).all() for v in estimate.values())


# --- a sample of the real zoos (where torchvision and timm are installed) -------------------


def _zoos():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
    spec = importlib.util.spec_from_file_location("benchmark_zoo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, *module.import_zoos()


SAMPLE = [
    ("torchvision", "mobilenet_v3_small", {}),
    ("torchvision", "efficientnet_b0", {}),
    ("torchvision", "convnext_tiny", {}),
    ("torchvision", "swin_v2_t", {}),
    ("timm", "convnextv2_atto", {}),
    ("timm", "edgenext_xx_small", {}),
    ("timm", "ghostnet_050", {}),
    ("timm", "efficientformerv2_s0", {}),
]


AVERAGED_HEADS = {"efficientformerv2_s0"}


@pytest.mark.parametrize("zoo, name, kwargs", SAMPLE, ids=[f"{z}-{n}" for z, n, _ in SAMPLE])
def test_a_sample_of_zoo_models_runs_with_an_exact_head(zoo, name, kwargs):
    bench, models_of, timm = _zoos()
    if (zoo == "torchvision" and models_of is None) or (zoo == "timm" and timm is None):
        pytest.skip(f"{zoo} is not installed")
    torch.manual_seed(0)
    model, native = bench.build(zoo, name, models_of, timm)
    model.train()
    for size in (64, native):
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                out = model(x)
            break
        except Exception:
            continue
    y = torch.randint(0, out.shape[1], (2,))
    with bench.HeadProbe(model) as probe:  # the head's input of the estimate's forward pass
        _, estimate = hesscale.diagonal(model, _loss, x, y)
    assert all(torch.isfinite(v).all() for v in estimate.values()), name
    head = probe.head()
    if head is None:  # the model averages two heads (a distillation head): neither is last
        assert name in AVERAGED_HEADS
        return
    module, h, logits = head
    names = {id(p): n for n, p in model.named_parameters()}
    exact = bench.exact_head_diagonal(h, logits, module.bias is not None)
    got = estimate[names[id(module.weight)]].double()
    torch.testing.assert_close(got, exact["weight"], rtol=1e-4, atol=1e-7)
