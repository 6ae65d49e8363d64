"""Bad input is refused early with messages that say what is wrong and what is supported."""

import pytest
import torch
from torch import nn

import hesscale
from hesscale import UnsupportedModuleError


def _run(model, method="hesscale", loss_fn=None):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    return hesscale.diagonal(model, loss_fn or nn.CrossEntropyLoss(), x, y, method=method)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.encoder(x).cumsum(1))


def test_an_operation_without_rule_is_refused_by_name_and_place_before_any_number():
    model = Cumulative()
    hesscale.extend(model)
    before = model.head.weight.grad
    with pytest.raises(
        UnsupportedModuleError, match=r"CumsumBackward0 \(in module '<root>'.*hutchinson"
    ):
        _run(model)
    assert before is None and model.head.weight.grad is None  # autograd never ran
    assert not hasattr(model.head.weight, "hess_diag")


class Cumsum(nn.Module):
    """A layer whose operation has no rule (a cumulative sum mixes all earlier features)."""

    def forward(self, x):
        return x.cumsum(-1)


def test_an_unsupported_layer_is_named_with_its_module_path():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(Cumsum()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match=r"CumsumBackward0 \(in module '1\.0'"):
        _run(model)


def test_an_unsupported_term_of_the_loss_is_refused_as_outside_the_model():
    model = nn.Sequential(nn.Linear(3, 2))
    hesscale.extend(model)
    hesscale.request(model.parameters(), "hesscale")
    try:
        out = model(torch.randn(4, 3))
        loss = nn.CrossEntropyLoss()(out, torch.tensor([0, 1, 0, 1])) + out.cumsum(1).sum()
        with pytest.raises(UnsupportedModuleError, match="CumsumBackward0 .outside the model"):
            loss.backward()
    finally:
        hesscale.request(model.parameters(), None)


def test_operations_that_do_not_lead_to_parameters_need_no_rule():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x).cumsum(1))

    model = Frozen()
    model.a.requires_grad_(False)
    _, estimate = _run(model)
    assert set(estimate) == {"b.weight", "b.bias"}


@pytest.mark.parametrize(
    "module, words",
    [(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "padding_mode")],
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


def test_a_loss_without_rules_is_refused_at_backward():
    model, x, y = nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(UnsupportedModuleError, match="HuberLossBackward0 .outside the model"):
        hesscale.diagonal(model, nn.functional.huber_loss, x, y)


def test_individual_estimates_refuse_parameters_outside_layers():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) * self.scale

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UnsupportedModuleError, match="MulBackward0.*individual=True"):
        hesscale.diagonal(Scaled(), nn.CrossEntropyLoss(), x, y, individual=True)
    with pytest.raises(UnsupportedModuleError, match="MulBackward0.*GGN-MC"):
        hesscale.diagonal(Scaled(), nn.CrossEntropyLoss(), x, y, method="ggn_mc")
    _, estimate = hesscale.diagonal(Scaled(), nn.CrossEntropyLoss(), x, y)
    assert estimate["scale"].shape == (2,)


def test_ggn_mc_refuses_a_penalty_it_cannot_see():
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 2)))
    loss_fn = hesscale.extend(nn.CrossEntropyLoss())
    hesscale.request(model.parameters(), "ggn_mc")
    try:
        out = model(torch.randn(4, 3))
        loss = loss_fn(out, torch.tensor([0, 1, 0, 1])) + (model[0].weight ** 2).sum()
        with pytest.raises(UnsupportedModuleError, match="PowBackward0.*penalties"):
            loss.backward()
    finally:
        hesscale.request(model.parameters(), None)


def test_ggn_mc_without_an_extended_loss_says_what_to_do():
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 2)))
    hesscale.request(model.parameters(), "ggn_mc")
    try:
        loss = nn.CrossEntropyLoss()(model(torch.randn(2, 3)), torch.tensor([0, 1]))
        with pytest.raises(UnsupportedModuleError, match=r"hesscale\.extend\(loss_fn\)"):
            loss.backward()
    finally:
        hesscale.request(model.parameters(), None)


def test_a_second_backward_through_a_released_graph_is_refused():
    """Without retain_graph=True the first pass released the records (autograd its saved
    tensors): a second pass says what to do (with retain_graph see test_training_loops)."""
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    hesscale.request(model.parameters(), "hesscale")
    try:
        loss = nn.CrossEntropyLoss()(model(torch.randn(2, 3)), torch.tensor([0, 1]))
        loss.backward()
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            loss.backward()
    finally:
        hesscale.request(model.parameters(), None)


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
    assert type(out) is torch.Tensor
    loss_fn(out, torch.zeros(2, 2)).backward()
    assert all(not hasattr(p, "hess_diag") for p in model.parameters())


class Scale(nn.Module):
    """y = c ⊙ x with a learnable per-feature c, written with an op that has no rule."""

    def __init__(self, n):
        super().__init__()
        self.c = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.addcmul(torch.zeros_like(x), x, self.c)


def test_registering_a_rule_for_a_custom_layer():
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


def test_a_layer_rule_returning_an_estimate_under_a_wrong_name_is_named():
    class Gain(Scale):  # its own type, its own rule (rules match the exact type)
        pass

    def misnamed_rule(ctx):
        s = ctx.curvature_output
        return hesscale.Backprop(s, {"gains": (s * ctx.input**2).sum(0)})

    hesscale.register_rule(Gain, misnamed_rule)
    model = nn.Sequential(nn.Linear(3, 3), Gain(3), nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match=r"'1'.*'gains'.*not a parameter of Gain.*\['c'\]"):
        _run(model)


def test_registering_a_rule_for_a_custom_autograd_function():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    def cube_rule(ctx):
        (x,) = ctx.node.saved_tensors
        s = 9 * x**4 * ctx.s if ctx.s is not None else torch.zeros_like(x)
        return (s + 6 * x * ctx.g if ctx.second_order else s,)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(Cube.apply(self.a(x)))

    torch.manual_seed(0)
    model = Model().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UnsupportedModuleError, match="CubeBackward.*register_rule"):
        hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y)
    hesscale.register_rule(Cube, cube_rule)

    class Reference(nn.Module):  # the same network with x³ as autograd's own operation
        def __init__(self):
            super().__init__()
            self.a, self.b = model.a, model.b

        def forward(self, x):
            return self.b(self.a(x) ** 3)

    model.zero_grad()
    _, estimate = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y)
    _, expected = hesscale.diagonal(Reference(), nn.CrossEntropyLoss(), x, y)
    for k in expected:
        torch.testing.assert_close(estimate[k], expected[k])


def test_compiled_models_are_refused_with_a_clear_message():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(UnsupportedModuleError, match="torch.compile"):
        hesscale.extend(torch.compile(model))


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace the builtin")
def test_compiling_an_extended_model_is_refused_or_changes_nothing():
    """torch.compile either is refused by name or leaves the hooks' view intact (dynamo falls
    back to eager around them): never a different number."""
    torch.manual_seed(0)
    model = hesscale.extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    _, expected = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y)
    model.zero_grad()  # else the estimate accumulates, as the gradient does
    hesscale.request(model.parameters(), "hesscale")
    try:
        loss = nn.CrossEntropyLoss()(torch.compile(model)(x), y)
        loss.backward()
    except UnsupportedModuleError as error:
        assert "torch.compile" in str(error) or "no HesScale rule" in str(error)
    else:
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.hess_diag, expected[name])
    finally:
        hesscale.request(model.parameters(), None)


@pytest.mark.parametrize("method", ["hesscale", "ggn_mc"])
@pytest.mark.parametrize("backward", [True, False])
def test_no_reference_cycle_keeps_a_model_alive(method, backward):
    """Records must not form cycles through autograd's C++ graph, which gc cannot collect."""
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


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "diagonal"])
@pytest.mark.parametrize("network", ["residual MLP", "GPT"])
def test_a_step_leaves_nothing_to_the_cyclic_garbage_collector(method, network):
    """What a backward pass records is freed by reference counting when the pass ends: objects
    left in reference cycles make Python's cyclic collector run, and its full collections
    stall a process that has imported torch for about 0.1 s."""
    import gc

    from hesscale.experiments.networks import ResidualTanhMLP, tiny_gpt

    torch.manual_seed(0)
    if network == "GPT":
        model, x = tiny_gpt(), torch.randint(0, 10, (2, 4))
        y = torch.randint(0, 10, (2, 4))
    else:
        model, x = ResidualTanhMLP(3, 5, 2, 4), torch.randn(6, 3)
        y = torch.randint(0, 4, (6,))
    hesscale.extend(model)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        if method == "diagonal":
            hesscale.diagonal(model, loss_fn, x, y)
            return
        hesscale.request(model.parameters(), method)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    step()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable goes to gc.garbage
    try:
        for _ in range(3):
            step()
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("hesscale")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        hesscale.request(model.parameters(), None)
    assert not ours, f"left in reference cycles: {sorted({type(o).__name__ for o in ours})}"
