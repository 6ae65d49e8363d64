"""HesScale on general computation graphs, against exact float64 ground truth and against the
properties the graph rule implies: sums over consumers and over a parameter's uses, the loss
side kept exact, and what is backpropagated being exactly what is estimated."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesscale
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal

from .conftest import assert_close_dicts

D = torch.float64
METHODS = ["hesscale", "hesscale_gn"]


class ResidualMLP(nn.Module):
    """Residual blocks of two tanh layers, post- or pre-activation, and a linear head."""

    def __init__(self, width=5, blocks=2, pre=False, inputs=4, outputs=3):
        super().__init__()
        self.pre = pre
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)]) for _ in range(blocks)
        )
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        h = self.inp(x)
        for a, b in self.blocks:
            if self.pre:
                h = h + b(torch.tanh(a(torch.tanh(h))))
            else:
                h = torch.tanh(h + b(torch.tanh(a(h))))
        return self.head(h)


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.conv2(F.relu(self.conv1(h))))
        return self.head(h.mean((2, 3)))


class Gated(nn.Module):
    """A SwiGLU MLP block: ``W₃ (silu(W₁x) ⊙ W₂x)``, and a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.gate = nn.Linear(6, 6)
        self.w3 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.silu(self.w1(x)) * self.w2(x)
        return self.w3(h * torch.sigmoid(self.gate(h)))


class TinyLM(nn.Module):
    """Token and position embeddings, a GELU MLP on a residual stream, a tied output head."""

    def __init__(self, vocab=7, width=6, context=4, tied=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.5)
        self.fc1, self.fc2 = nn.Linear(width, 8), nn.Linear(8, width)
        self.out = None if tied else nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        weight = self.tok.weight if self.out is None else self.out.weight
        return F.linear(h, weight).flatten(0, 1)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class Branching(nn.Module):
    """Python control flow on the data: which layers run depends on the batch."""

    def __init__(self):
        super().__init__()
        self.a, self.left, self.right = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.left(h)) if h.sum() > 0 else torch.sigmoid(self.right(h))
        return self.head(h)


def _classification(model, inputs=4, classes=3, n=5, seed=0):
    torch.manual_seed(seed)
    model = model.to(D)
    return (
        model,
        nn.CrossEntropyLoss(),
        torch.randn(n, inputs, dtype=D),
        torch.randint(0, classes, (n,)),
    )


def _head(model, names):
    return {n for n in names if n.startswith(("head.", "w3.", "b."))}


NETWORKS = {
    "residual-post": lambda: _classification(ResidualMLP()),
    "residual-pre": lambda: _classification(ResidualMLP(pre=True)),
    "gated-swiglu": lambda: _classification(Gated()),
    "residual-cnn": lambda: (
        ResidualCNN().to(D),
        nn.CrossEntropyLoss(),
        torch.randn(2, 2, 4, 4, dtype=D),
        torch.tensor([0, 2]),
    ),
    "reused-module": lambda: _classification(Reused(), inputs=3, classes=2),
    "branching": lambda: _classification(Branching(), inputs=3, classes=2),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NETWORKS)
def test_last_layer_is_exact_on_graphs(name, method):
    """The loss side is exact, so the head (whose input no later layer mixes) is exact."""
    torch.manual_seed(0)
    model, loss_fn, x, y = NETWORKS[name]()
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    head = _head(model, estimate)
    assert head
    assert_close_dicts({k: estimate[k] for k in head}, {k: exact[k] for k in head})
    for k, v in estimate.items():
        assert torch.isfinite(v).all() and v.shape == dict(model.named_parameters())[k].shape
    inner = [k for k in estimate if k not in head]
    assert any(not torch.allclose(estimate[k], exact[k], rtol=1e-3) for k in inner)


def test_piecewise_linear_graph_gives_the_exact_ggn_where_no_branch_is_dropped():
    """A ReLU residual network of width one has no off-diagonal terms inside the layers; only
    the fan-out's cross terms are dropped: HesScale and HesScaleGN coincide."""
    torch.manual_seed(0)
    model = ResidualCNN().to(D)
    x, y = torch.randn(2, 2, 4, 4, dtype=D), torch.tensor([0, 2])
    _, h = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y)
    _, gn = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method="hesscale_gn")
    assert_close_dicts(h, gn)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Flatten(), nn.Linear(5, 3)
        )

    def forward(self, x):
        return self.net(x)


class Functional(nn.Module):
    """The same network written with functional calls and tensor methods."""

    def __init__(self, plain: Plain):
        super().__init__()
        self.p = nn.ParameterList(p for p in plain.parameters())

    def forward(self, x):
        w0, b0, w1, b1, w2, b2 = self.p
        h = F.relu(F.linear(x, w0, b0))
        h = (h @ w1.T + b1).tanh()
        return torch.addmm(b2, h.view(len(h), -1), w2.t())


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
def test_functional_calls_equal_the_module_chain(method):
    model, loss_fn, x, y = _classification(Plain())
    _, chain = hesscale.diagonal(model, loss_fn, x, y, method=method)
    functional = Functional(model)
    _, graph = hesscale.diagonal(functional, loss_fn, x, y, method=method)
    names = [n for n, _ in model.named_parameters()]
    assert_close_dicts({f"p.{i}": chain[n] for i, n in enumerate(names)}, graph)


@pytest.mark.parametrize("method", METHODS)
def test_a_reused_module_gets_the_sum_over_its_calls(method):
    """Calling ``a`` twice equals two separate layers with the same weights, summed."""
    model, loss_fn, x, y = _classification(Reused(), inputs=3, classes=2)

    class Untied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2 = nn.Linear(3, 3).to(D), nn.Linear(3, 3).to(D)
            self.b = nn.Linear(3, 2).to(D)
            for layer in (self.a1, self.a2):
                layer.load_state_dict(model.a.state_dict())
            self.b.load_state_dict(model.b.state_dict())

        def forward(self, x):
            return self.b(torch.tanh(self.a2(torch.tanh(self.a1(x)))))

    _, tied = hesscale.diagonal(model, loss_fn, x, y, method=method)
    _, untied = hesscale.diagonal(Untied(), loss_fn, x, y, method=method)
    for name in ("weight", "bias"):
        torch.testing.assert_close(tied[f"a.{name}"], untied[f"a1.{name}"] + untied[f"a2.{name}"])


@pytest.mark.parametrize("method", METHODS)
def test_tied_embeddings_get_the_sum_over_their_uses(method):
    torch.manual_seed(0)
    tied = TinyLM().to(D)
    untied = TinyLM(tied=False).to(D)
    untied.load_state_dict(tied.state_dict(), strict=False)
    untied.out.weight.data.copy_(tied.tok.weight.data)
    ids = torch.randint(0, 7, (3, 4))
    targets = torch.randint(0, 7, (12,))
    loss_fn = nn.CrossEntropyLoss()
    _, a = hesscale.diagonal(tied, loss_fn, ids, targets, method=method)
    _, b = hesscale.diagonal(untied, loss_fn, ids, targets, method=method)
    torch.testing.assert_close(a["tok.weight"], b["tok.weight"] + b["out.weight"])
    assert torch.isfinite(a["pos"]).all() and a["pos"].abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_data_dependent_branches_follow_the_pass_that_ran(method):
    model, loss_fn, x, y = _classification(Branching(), inputs=3, classes=2)
    for sign in (1.0, -1.0):  # make the branch go either way
        model.a.bias.data.fill_(sign * 5.0)
        model.zero_grad()
        _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
        ran, skipped = ("left", "right") if sign > 0 else ("right", "left")
        assert estimate[f"{ran}.weight"].abs().sum() > 0
        assert torch.equal(estimate[f"{skipped}.weight"], torch.zeros(3, 3, dtype=D))
        exact = exact_hessian_diagonal(model, loss_fn, x, y)
        assert_close_dicts(
            {"head.weight": estimate["head.weight"]}, {"head.weight": exact["head.weight"]}
        )


def _estimate_of(model, backpropagated, method="hesscale"):
    """``p.hess_diag`` after ``backpropagated(model).backward()`` with an optimizer's request."""
    hesscale.extend(model)
    hesscale.request(model.parameters(), method)
    try:
        model.zero_grad()
        backpropagated(model).backward()
        return {n: p.hess_diag.clone() for n, p in model.named_parameters()}
    finally:
        hesscale.request(model.parameters(), None)


@pytest.mark.parametrize("method", METHODS)
def test_several_forward_passes_and_losses_add_up(method):
    """The two silent cases of the chain engine: ``L(f(x1)) + L(f(x2))`` is estimated as the
    sum of the two, and its head is exact."""
    model, loss_fn, x, y = _classification(ResidualMLP())
    x2, y2 = torch.randn(4, 4, dtype=D), torch.randint(0, 3, (4,))
    both = _estimate_of(model, lambda m: loss_fn(m(x), y) + 0.5 * loss_fn(m(x2), y2), method)
    first = _estimate_of(model, lambda m: loss_fn(m(x), y), method)
    second = _estimate_of(model, lambda m: 0.5 * loss_fn(m(x2), y2), method)
    assert_close_dicts(both, {k: first[k] + second[k] for k in first})

    def total(out, target):  # the same objective as one function of the parameters
        return loss_fn(out[: len(x)], y) + 0.5 * loss_fn(out[len(x) :], y2)

    exact = exact_hessian_diagonal(model, total, torch.cat([x, x2]), None)
    for k in ("head.weight", "head.bias"):
        torch.testing.assert_close(both[k], exact[k])


@pytest.mark.parametrize("method", METHODS)
def test_an_l2_penalty_adds_exactly_two_lambda(method):
    model, loss_fn, x, y = _classification(ResidualMLP(pre=True))
    lam = 0.1
    penalized = _estimate_of(
        model,
        lambda m: loss_fn(m(x), y) + lam * sum((p**2).sum() for p in m.parameters()),
        method,
    )
    plain = _estimate_of(model, lambda m: loss_fn(m(x), y), method)
    assert_close_dicts(penalized, {k: v + 2 * lam for k, v in plain.items()})
    exact = exact_hessian_diagonal(model, loss_fn, x, y)
    torch.testing.assert_close(penalized["head.weight"], exact["head.weight"] + 2 * lam)


def test_a_scaled_loss_scales_the_estimate():
    model, loss_fn, x, y = _classification(Gated())
    scaled = _estimate_of(model, lambda m: 8.0 * loss_fn(m(x), y))
    plain = _estimate_of(model, lambda m: loss_fn(m(x), y))
    assert_close_dicts(scaled, {k: 8.0 * v for k, v in plain.items()})


class WithLoss(nn.Module):
    """A model that computes its loss inside, as Hugging Face models do with ``labels=``."""

    def __init__(self):
        super().__init__()
        self.net = Gated()

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("method", METHODS)
def test_in_place_changes_of_a_returned_loss_keep_it_marked(method):
    """``loss *= 8`` on a loss returned by the model (``transformers.Trainer`` does that) gives
    the estimates of ``8 * loss``; changing a layer's output in place is refused by name."""
    model, loss_fn, x, y = _classification(Gated())
    inside = WithLoss().to(D)
    inside.net.load_state_dict(model.state_dict())

    def scaled_in_place(m):
        loss = m(x, y)
        loss *= 8.0
        return loss

    scaled = _estimate_of(inside, scaled_in_place, method)
    plain = _estimate_of(model, lambda m: loss_fn(m(x), y), method)
    assert_close_dicts(scaled, {f"net.{k}": 8.0 * v for k, v in plain.items()})

    def doubled_in_place(m):
        out = m(x)
        out *= 2
        return loss_fn(out, y)

    # autograd sees the change (the layer rule of w3 reads only its input and the curvature)
    assert_close_dicts(
        _estimate_of(model, doubled_in_place, method),
        _estimate_of(model, lambda m: loss_fn(2 * m(x), y), method),
    )


class Scale(nn.Module):
    """``y = c ⊙ x`` with a layer rule that reads the output (``ŝ_c = Σ ŝ y² / c²``)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.rand(3, dtype=D) + 0.5)

    def forward(self, x):
        return self.c * x


def _scale_rule(ctx):
    s, c = ctx.curvature_output, ctx.module.c
    return hesscale.Backprop(s * c**2, {"c": (s * ctx.output**2 / c**2).sum(0)})


def test_changing_an_output_that_a_layer_rule_reads_is_refused():
    hesscale.register_rule(Scale, _scale_rule)  # reads ctx.output: the engine keeps it
    model = nn.Sequential(nn.Linear(4, 3), Scale()).to(D)
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    expected = exact_hessian_diagonal(model, loss_fn, x, y)["1.c"]
    assert_close_dicts(
        {"c": _estimate_of(model, lambda m: loss_fn(m(x), y))["1.c"]}, {"c": expected}
    )

    def doubled_in_place(m):
        out = m(x)
        out *= 2
        return loss_fn(out, y)

    with pytest.raises(RuntimeError, match="output of module '1' was modified in place"):
        _estimate_of(model, doubled_in_place)


@pytest.mark.parametrize("name", ["residual-post", "gated-swiglu", "residual-cnn"])
def test_individual_estimates_on_graphs_are_the_single_example_estimates(name):
    model, loss_fn, x, y = NETWORKS[name]()
    loss_fn.reduction = "sum"
    _, each = hesscale.diagonal(model, loss_fn, x, y, individual=True)
    for i in range(len(x)):
        _, single = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1])
        assert_close_dicts({k: v[i] for k, v in each.items()}, single)


def test_ggn_mc_on_a_graph_converges_to_the_ggn_of_the_head():
    model, loss_fn, x, y = _classification(ResidualMLP())
    generator = torch.Generator().manual_seed(0)
    _, mc = hesscale.diagonal(
        model, loss_fn, x, y, method="ggn_mc", samples=4000, generator=generator
    )
    exact = ggn_diagonal(model, loss_fn, x, y)
    for k in ("head.weight", "inp.weight"):
        scale = exact[k].abs().max()
        torch.testing.assert_close(mc[k] / scale, exact[k] / scale, rtol=0.1, atol=0.05)


class NormResNet(nn.Module):
    """Conv → BatchNorm → ReLU with a residual block, pooled into a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn1(self.conv(h)))
        return self.head(h.mean((2, 3)))


def assert_exact_head(estimate, exact):
    """Every parameter estimated and finite, and the last layer's estimate exact."""
    assert set(estimate) == set(exact)
    head = {"head.weight", "head.bias"}
    assert_close_dicts({k: estimate[k] for k in head}, {k: exact[k] for k in head})
    for v in estimate.values():
        assert torch.isfinite(v).all()


class LayerNormMLP(nn.Module):
    """A residual MLP block with LayerNorm before (pre-LN) or after (post-LN) the branch."""

    def __init__(self, pre: bool):
        super().__init__()
        self.pre = pre
        self.inp, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.pre:
            h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        else:
            h = self.norm(h + self.fc2(F.gelu(self.fc1(h))))
        return self.head(h)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["train", "eval", "pre-ln", "post-ln"])
def test_normalized_networks_have_an_exact_head(mode, method):
    torch.manual_seed(0)
    if mode in ("train", "eval"):
        model = NormResNet().to(D).train(mode == "train")
        x, y = torch.randn(4, 2, 4, 4, dtype=D), torch.tensor([0, 2, 1, 1])
        if mode == "eval":  # running statistics that are not the identity
            model.train()(x)
            model.eval()
    else:
        model = LayerNormMLP(pre=mode == "pre-ln").to(D)
        x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    reference = copy.deepcopy(model)
    if mode == "train":  # torch.func cannot update running statistics; the forward is the same
        torch.func.replace_all_batch_norm_modules_(reference)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y, method=method)
    exact = exact_hessian_diagonal(reference, loss_fn, x, y)
    assert_exact_head(estimate, exact)


class Embedded(nn.Module):
    """Token embeddings (a module, or the functional call on its weight) into a tanh head."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.tok = nn.Embedding(7, 4, padding_idx=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = F.embedding(ids, self.tok.weight, padding_idx=1) if self.functional else self.tok(ids)
        return self.fc(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
def test_an_embedding_layer_equals_the_functional_lookup(method):
    torch.manual_seed(0)
    module, functional = Embedded(False).to(D), Embedded(True).to(D)
    functional.load_state_dict(module.state_dict())
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5,))
    _, a = hesscale.diagonal(module, nn.CrossEntropyLoss(), ids, y, method=method)
    _, b = hesscale.diagonal(functional, nn.CrossEntropyLoss(), ids, y, method=method)
    assert_close_dicts(a, b)
    assert torch.equal(a["tok.weight"][1], torch.zeros(4, dtype=D))  # the padding row


def test_embedding_layers_give_per_example_estimates_and_ggn_mc():
    torch.manual_seed(0)
    model = Embedded(False).to(D)
    ids, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    _, each = hesscale.diagonal(model, loss_fn, ids, y, individual=True)
    for i in range(len(ids)):
        _, single = hesscale.diagonal(model, loss_fn, ids[i : i + 1], y[i : i + 1])
        assert_close_dicts({k: v[i] for k, v in each.items()}, single)
    generator = torch.Generator().manual_seed(0)
    _, mc = hesscale.diagonal(
        model, loss_fn, ids, y, method="ggn_mc", samples=4000, generator=generator
    )
    exact = ggn_diagonal(model, loss_fn, ids, y)
    scale = exact["tok.weight"].abs().max()
    torch.testing.assert_close(
        mc["tok.weight"] / scale, exact["tok.weight"] / scale, rtol=0.1, atol=0.05
    )


class Transformer(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1 if self.layer.self_attn.batch_first else 0))


class Attention(nn.Module):
    def __init__(self, need_weights: bool, batch_first: bool):
        super().__init__()
        self.need_weights = need_weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = torch.zeros(x.shape[0 if self.attn.batch_first else 1], 5, dtype=torch.bool)
        pad[:, -1] = True  # the last position is padding
        out, _ = self.attn(x, x, x, need_weights=self.need_weights, key_padding_mask=pad)
        return self.head(out.mean(1 if self.attn.batch_first else 0))


class Decoder(nn.Module):
    """``nn.TransformerDecoderLayer``: causal self-attention, then cross-attention to a memory
    computed from the same input."""

    def __init__(self, **kwargs):
        super().__init__()
        self.memory = nn.Linear(8, 8)
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, **kwargs)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        out = self.layer(x, torch.tanh(self.memory(x)), tgt_mask=causal, tgt_is_causal=True)
        return self.head(out.mean(1))


TRANSFORMERS = {
    "post-ln": lambda: Transformer(batch_first=True),
    "decoder-post-ln": lambda: Decoder(),
    "decoder-pre-ln-gelu": lambda: Decoder(norm_first=True, activation="gelu"),
    "pre-ln-gelu": lambda: Transformer(batch_first=True, norm_first=True, activation="gelu"),
    "sequence-first": lambda: Transformer(),
    "mha-weights": lambda: Attention(need_weights=True, batch_first=True),
    "mha-fused-sequence-first": lambda: Attention(need_weights=False, batch_first=False),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_layers_have_an_exact_head(name, method):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = TRANSFORMERS[name]().to(D)
    batch_first = "sequence-first" not in name
    x = torch.randn(4, 5, 8, dtype=D) if batch_first else torch.randn(5, 4, 8, dtype=D)
    y = torch.tensor([0, 1, 2, 0])
    _, estimate = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method=method)
    with sdpa_kernel(SDPBackend.MATH):
        exact = exact_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert_exact_head(estimate, exact)


class RMSNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.inp(x))))


def test_rms_norm_layers_give_per_example_estimates():
    torch.manual_seed(0)
    model = RMSNormMLP().to(D)
    x, y = torch.randn(4, 4, dtype=D), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    _, each = hesscale.diagonal(model, loss_fn, x, y, individual=True)
    for i in range(len(x)):
        _, single = hesscale.diagonal(model, loss_fn, x[i : i + 1], y[i : i + 1])
        assert_close_dicts({k: v[i] for k, v in each.items()}, single)


class EncoderStack(nn.Module):
    """``nn.TransformerEncoder`` (nested tensors enabled, a padding mask): in eval mode without
    gradients PyTorch would run its fused fast path, which no hook sees."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:2, -1] = True
        return self.head(self.encoder(x, src_key_padding_mask=pad)[:, 0])


@pytest.mark.parametrize("method", METHODS)
def test_a_transformer_encoder_in_eval_mode_runs_its_regular_path(method):
    """While an estimate is computed gradients are on, and PyTorch then takes the regular path
    (the fast path is for inference): the stack's head is exact and every estimate finite."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = EncoderStack().to(D).eval()
    x, y = torch.randn(4, 5, 8, dtype=D), torch.tensor([0, 1, 2, 0])
    _, estimate = hesscale.diagonal(model, nn.CrossEntropyLoss(), x, y, method=method)
    # torch.func's parameters do not require grad: the reference would take the nested path
    reference = copy.deepcopy(model)
    reference.encoder.use_nested_tensor = False
    with sdpa_kernel(SDPBackend.MATH):
        exact = exact_hessian_diagonal(reference, nn.CrossEntropyLoss(), x, y)
    assert_exact_head(estimate, exact)


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph")
def test_a_backward_that_keeps_its_graph_gives_the_same_estimates():
    """``backward(create_graph=True)`` (a gradient penalty, AdaHessian beside it) turns grad
    mode on inside the backward pass; the rules run with it off and give the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.GELU()
    )
    model = hesscale.extend(nn.Sequential(model, nn.Linear(4, 2)).double())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    estimates, grads = {}, {}
    for keep in (False, True):
        hesscale.request(model.parameters(), "hesscale")
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward(create_graph=keep)
        estimates[keep] = {n: p.hess_diag.clone() for n, p in model.named_parameters()}
        grads[keep] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g.requires_grad for g in grads[True].values())  # autograd's graph is kept
    assert not any(p.hess_diag.requires_grad for p in model.parameters())
    assert_close_dicts(estimates[True], estimates[False])
    hesscale.request(model.parameters(), None)
    exact = exact_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y)
    head = {"1.weight", "1.bias"}
    assert_close_dicts({k: estimates[True][k] for k in head}, {k: exact[k] for k in head})
