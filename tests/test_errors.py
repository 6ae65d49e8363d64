"""Bad input is refused early with messages that say what is wrong and what is supported."""

import pytest
import torch
from torch import nn

import hesscale
from hesscale import NonChainForwardError, UnsupportedModuleError


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x) + x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class TailOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) * 2


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _run(model, method="hesscale"):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    return hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method=method)


def test_unsupported_layer_is_named_with_its_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.Linear(4, 2))
    with pytest.raises(
        UnsupportedModuleError, match=r"'1\.0' \(BatchNorm1d\).*Supported layers:.*Linear"
    ):
        hesscale.extend(model)


@pytest.mark.parametrize(
    "module, words",
    [
        (nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.ReLU(inplace=True), "inplace"),
        (nn.MaxPool2d(2, return_indices=True), "return_indices"),
        (nn.LogSoftmax(), "explicit dim"),
    ],
)
def test_unsupported_configuration(module, words):
    with pytest.raises(UnsupportedModuleError, match=words):
        hesscale.extend(nn.Sequential(module))


@pytest.mark.parametrize(
    "loss, words",
    [
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
        (nn.HuberLoss(), "HuberLoss.*Supported losses"),
    ],
)
def test_unsupported_loss(loss, words):
    with pytest.raises(UnsupportedModuleError, match=words):
        hesscale.extend(loss)


@pytest.mark.parametrize(
    "model, words",
    [
        (Residual(), "not the unmodified output.*'a'"),
        (Functional(), "not the unmodified output"),
        (Reused(), "called twice"),
        (TailOp(), "computation follows"),
    ],
)
def test_non_chain_forward_is_refused(model, words):
    with pytest.raises(NonChainForwardError, match=words):
        _run(model)


def test_custom_chain_module_is_supported():
    _, estimate = _run(Chain())
    assert set(estimate) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}


def test_parameters_outside_layers_are_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) * self.scale

    with pytest.raises(UnsupportedModuleError, match="owns parameters"):
        hesscale.extend(Scaled())


def test_missing_loss_extension_says_which_call():
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 2)))
    hesscale.request(model.parameters(), "hesscale")
    loss = nn.CrossEntropyLoss()(model(torch.randn(2, 3)), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"hesscale\.extend\(loss_fn\)"):
        loss.backward()


def test_unknown_method():
    with pytest.raises(UnsupportedModuleError, match="unknown method 'foo'"):
        _run(nn.Sequential(nn.Linear(3, 2)), method="foo")


def test_extend_is_idempotent_and_returns_argument():
    model, loss = nn.Sequential(nn.Linear(3, 2)), nn.MSELoss()
    assert hesscale.extend(hesscale.extend(model)) is model
    assert hesscale.extend(hesscale.extend(loss)) is loss
    assert len(model._forward_hooks) == 1 and len(loss._forward_hooks) == 1


def test_extended_model_without_request_records_nothing():
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    loss_fn = hesscale.extend(nn.MSELoss())
    out = model(torch.randn(2, 3))
    assert not hasattr(out, "_hesscale_tape")
    loss_fn(out, torch.zeros(2, 2)).backward()
    assert all(not hasattr(p, "hess_diag") for p in model.parameters())


def test_registering_a_rule_for_a_custom_layer():
    class Scale(nn.Module):
        """y = c ⊙ x with a learnable per-feature c."""

        def __init__(self, n):
            super().__init__()
            self.c = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.c

    def scale_rule(ctx):
        s = ctx.curvature_output
        return hesscale.Backprop(s * ctx.module.c**2, {"c": (s * ctx.input**2).sum(0)})

    hesscale.register_rule(Scale, scale_rule)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), Scale(3), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    _, estimate = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y)
    from hesscale.reference import recursion_reference

    expected = recursion_reference(model, nn.CrossEntropyLoss(), x, y)
    for k in expected:
        torch.testing.assert_close(estimate[k], expected[k])


def test_compiled_models_are_refused_with_a_clear_message():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(UnsupportedModuleError, match="torch.compile"):
        hesscale.extend(torch.compile(model))


def test_compiling_an_extended_model_is_refused():
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 2)))
    hesscale.request(model.parameters(), "hesscale")
    try:
        with pytest.raises(UnsupportedModuleError, match="torch.compile"):
            torch.compile(model)(torch.randn(2, 3))
    finally:
        hesscale.request(model.parameters(), None)


@pytest.mark.parametrize("method", ["hesscale", "ggn_mc"])
@pytest.mark.parametrize("backward", [True, False])
def test_no_reference_cycle_keeps_a_model_alive(method, backward):
    """Tapes must not form cycles through autograd's C++ graph, which gc cannot collect."""
    import gc
    import weakref

    def run():
        model = hesscale.extend(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
        loss_fn = hesscale.extend(nn.CrossEntropyLoss())
        hesscale.request(model.parameters(), method)
        loss = loss_fn(model(torch.randn(5, 3)), torch.tensor([0, 1, 0, 1, 1]))
        if backward:
            loss.backward()
        # the next forward releases what an unfinished GGN-MC pass kept
        hesscale.request(model.parameters(), None)
        model(torch.randn(1, 3)).sum()
        return weakref.ref(model[0]), weakref.ref(model)

    leaf, root = run()
    gc.collect()
    assert root() is None and leaf() is None
