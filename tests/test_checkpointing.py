"""Activation checkpointing gives the estimates of the model without it (float64, exact).

Both modes of ``torch.utils.checkpoint``: ``use_reentrant=False`` (autograd's ordinary graph;
the rules read the recomputed tensors in a graph-execution group of their own) and
``use_reentrant=True`` (a nested curvature pass inside the checkpoint's backward), nested
checkpoints, ``checkpoint_sequential``, a checkpointed attention block, a checkpointed
convolution before a train-mode BatchNorm (the fused rule), and Hugging Face's
``gradient_checkpointing_enable()``.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import hesscale
from hesscale.experiments import huggingface as hf
from hesscale.experiments.networks import GPTBlock
from hesscale.optim import AdaHesScale, AdaHesScaleGN

D = torch.float64
MODES = {"non-reentrant": False, "reentrant": True}


class Checkpointed(nn.Module):
    """Runs ``inner`` (a module) under ``torch.utils.checkpoint``, or plainly (``mode=None``)."""

    def __init__(self, inner, mode):
        super().__init__()
        self.inner, self.mode = inner, mode

    def forward(self, *args):
        if self.mode is None:
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=self.mode)


class Tanh2(nn.Module):
    """Two tanh layers."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))


def _mlp(mode, nested=False):
    inner = Tanh2(5)
    if nested:  # a checkpoint inside a checkpoint
        inner.b = Checkpointed(nn.Sequential(nn.Linear(5, 5), nn.ELU()), mode)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Checkpointed(inner, mode), nn.Linear(5, 3))


class SequentialMLP(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.body = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.Tanh()
        )
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        if self.mode is None:
            h = self.body(x)
        else:
            h = checkpoint_sequential(self.body, 2, x, use_reentrant=self.mode)
        return self.head(h)


class BlockLM(nn.Module):
    """Embedding, a checkpointed GPT block (attention and MLP), an output layer."""

    def __init__(self, mode):
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.block = Checkpointed(GPTBlock(8, 2), mode)
        self.out = nn.Linear(8, 11)

    def forward(self, ids):
        return self.out(self.block(self.tok(ids))).transpose(1, 2)


class NormalizedCNN(nn.Module):
    """A checkpointed convolution → train-mode BatchNorm → tanh, then a linear head."""

    def __init__(self, mode):
        super().__init__()
        body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh())
        self.body, self.head = Checkpointed(body, mode), nn.Linear(3 * 16, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


NETWORKS = {
    "mlp": (lambda mode: _mlp(mode), lambda: torch.randn(6, 4), 3),
    "nested": (lambda mode: _mlp(mode, nested=True), lambda: torch.randn(6, 4), 3),
    "sequential": (SequentialMLP, lambda: torch.randn(6, 4), 3),
    "attention-block": (BlockLM, lambda: torch.randint(0, 11, (3, 5)), 11),
    "conv-batchnorm": (NormalizedCNN, lambda: torch.randn(6, 2, 4, 4), 3),
}


def _twins(name, mode):
    """The network with checkpointing and without, with the same parameters, and a batch."""
    make, inputs, classes = NETWORKS[name]
    torch.manual_seed(0)
    plain = make(None).to(D)
    checked = make(mode).to(D)
    checked.load_state_dict(plain.state_dict())
    x = inputs()
    # a reentrant checkpoint whose inputs need no gradient gives its parameters none either
    # (PyTorch's warning "None of the inputs have requires_grad=True"): inputs that need one
    x = x.to(D).requires_grad_() if x.is_floating_point() else x
    y = torch.randint(0, classes, x.shape[:1] if name != "attention-block" else x.shape)
    return plain, checked, x, y


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn", "bl89"])
def test_a_checkpointed_model_gives_the_estimates_of_its_unchecked_twin(name, mode, method):
    plain, checked, x, y = _twins(name, MODES[mode])
    _, expected = hesscale.diagonal(plain, _loss, x, y, method=method)
    _, actual = hesscale.diagonal(checked, _loss, x, y, method=method)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-10, atol=1e-14, msg=key)
    for (key, p), q in zip(checked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=key)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", [AdaHesScale, AdaHesScaleGN])
def test_training_steps_with_checkpointing_and_accumulation_are_those_without(mode, optimizer):
    """Three steps of two accumulated micro-batches each, through the optimizer's request."""
    plain, checked, x, y = _twins("attention-block", MODES[mode])
    runs = []
    for model in (plain, checked):
        model = hesscale.extend(copy.deepcopy(model))
        opt = optimizer(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            for part in torch.tensor_split(torch.arange(len(x)), 2):
                (_loss(model(x[part]), y[part]) * len(part) / len(x)).backward()
            opt.step()
        runs.append(list(model.parameters()))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Recorder(nn.Linear):
    """A Linear layer that keeps weak references to its inputs."""

    inputs: list = []

    def forward(self, x):
        Recorder.inputs.append(weakref.ref(x))
        return super().forward(x)


def test_a_non_reentrant_checkpoint_keeps_no_layer_input_alive():
    """Inside the region the engine keeps none of the Linear layers' inputs: they are
    recomputed with the region in the backward pass, as autograd's own are."""
    torch.manual_seed(0)
    inner = nn.Sequential(Recorder(5, 5), nn.Tanh(), Recorder(5, 5))
    model = hesscale.extend(nn.Sequential(nn.Linear(4, 5), Checkpointed(inner, False)).to(D))
    hesscale.request(model.parameters(), "hesscale")
    Recorder.inputs.clear()
    out = model(torch.randn(3, 4, dtype=D))
    alive = [ref() is not None for ref in Recorder.inputs]
    out.square().sum().backward()
    hesscale.request(model.parameters(), None)
    assert alive == [True, False]  # the region's first input is its argument, kept by autograd
    assert all(torch.isfinite(p.hess_diag).all() for p in model.parameters())


def test_without_the_saved_tensor_hooks_the_layer_inputs_are_kept_as_before():
    """Outside checkpoint regions the layer call keeps its input (autograd keeps it anyway)."""
    torch.manual_seed(0)
    model = hesscale.extend(nn.Sequential(Recorder(4, 5), nn.Tanh(), Recorder(5, 5)).to(D))
    hesscale.request(model.parameters(), "hesscale")
    Recorder.inputs.clear()
    out = model(torch.randn(3, 4, dtype=D))
    assert [ref() is not None for ref in Recorder.inputs] == [True, True]
    out.sum().backward()
    hesscale.request(model.parameters(), None)


@pytest.mark.parametrize("name", hf.MODELS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_hugging_face_gradient_checkpointing_gives_the_same_estimates(name, reentrant):
    """``model.gradient_checkpointing_enable()`` (non-reentrant by default) on the tiny
    Hugging Face models, with their own loss, in train mode."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    plain = hf.tiny_model(name, "sdpa").double().train()
    checked = copy.deepcopy(plain)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(checked, "activation_checkpointing_enable"):  # transformers 5
        checked.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        checked.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    x, _ = hf.batch(name, torch.Generator().manual_seed(0))
    if x.is_floating_point():  # a reentrant checkpoint needs an input that needs a gradient
        x = x.double().requires_grad_()
    labels = x if name in ("gpt2", "llama") else torch.tensor([0, 2])
    estimates = []
    for model in (plain, checked):
        model = hesscale.extend(model)
        hesscale.request(model.parameters(), "hesscale")
        model(x, labels=labels).loss.backward()
        hesscale.request(model.parameters(), None)
        estimates.append({n: p.hess_diag for n, p in model.named_parameters()})
    for key, value in estimates[0].items():
        torch.testing.assert_close(estimates[1][key], value, rtol=1e-10, atol=1e-14, msg=key)


def test_without_a_graph_execution_group_a_non_reentrant_checkpoint_is_refused(monkeypatch):
    """PyTorch before 2.10 has no GraphExecGroup: the rules' reading of a recomputed tensor
    would use up autograd's one unpacking; refused by name, no estimate written."""
    import hesscale.engine._plan as plan

    monkeypatch.setattr(plan, "new_exec_group", lambda: None)
    _, checked, x, y = _twins("mlp", False)
    with pytest.raises(hesscale.UnsupportedModuleError, match="use_reentrant=True"):
        hesscale.diagonal(checked, _loss, x, y)
    assert all(getattr(p, "hess_diag", None) is None for p in checked.parameters())


def test_reentrant_checkpoints_are_refused_under_ggn_mc():
    _, checked, x, y = _twins("mlp", True)
    with pytest.raises(hesscale.UnsupportedModuleError, match="GGN-MC"):
        hesscale.diagonal(checked, nn.CrossEntropyLoss(), x, y, method="ggn_mc")
