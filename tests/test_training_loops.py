"""An audit of what people do around ``loss.backward()`` and ``opt.step()``: each case is exact
(checked against an equivalent loop) or refused by name. Accumulation and checkpointing have
files of their own (test_accumulation, test_checkpointing); this one covers the rest of the
table in docs/getting_started.rst ("Training loops").
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hesscale
from hesscale.optim import AdaHesScale, AdaHesScaleGN
from hesscale.reference import exact_hessian_diagonal

D = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ELU(), nn.Linear(5, 3))
    return hesscale.extend(model.to(D)), torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


def _estimates(model, x, y, method="hesscale", backward=None):
    """The estimates of one fresh backward pass (gradients zeroed first)."""
    model.zero_grad(set_to_none=True)
    hesscale.request(model.parameters(), method)
    loss = _loss(model(x), y)
    (backward or (lambda loss: loss.backward()))(loss)
    hesscale.request(model.parameters(), None)
    return {n: p.hess_diag.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-10, atol=1e-14, msg=name)


# --- entry points of the backward pass ------------------------------------------------------


def test_torch_autograd_backward_computes_the_estimates():
    model, x, y = _mlp()
    expected = _estimates(model, x, y)
    actual = _estimates(model, x, y, backward=lambda loss: torch.autograd.backward([loss]))
    _assert_same(actual, expected)


def test_torch_autograd_grad_of_requested_parameters_is_refused():
    model, x, y = _mlp()
    hesscale.request(model.parameters(), "hesscale")
    try:
        loss = _loss(model(x), y)
        with pytest.raises(hesscale.UnsupportedModuleError, match="autograd.grad of parameters"):
            torch.autograd.grad(loss, list(model.parameters()))
    finally:
        hesscale.request(model.parameters(), None)


def test_torch_autograd_grad_of_inputs_runs_as_usual():
    """A gradient penalty on the input: autograd.grad of a non-parameter is not refused, and
    the gradient it returns is autograd's."""
    model, x, y = _mlp()
    x = x.clone().requires_grad_()
    hesscale.request(model.parameters(), "hesscale")
    try:
        (grad,) = torch.autograd.grad(_loss(model(x), y), x)
    finally:
        hesscale.request(model.parameters(), None)
    plain = copy.deepcopy(model)
    (expected,) = torch.autograd.grad(_loss(plain(x), y), x)
    torch.testing.assert_close(grad, expected)


def test_backward_with_inputs_estimates_only_those_parameters():
    """loss.backward(inputs=[...]): autograd accumulates only their gradients, the engine only
    their estimates, equal to those of a full pass."""
    model, x, y = _mlp()
    expected = _estimates(model, x, y)
    chosen = [model[4].weight, model[2].bias]
    actual = _estimates(model, x, y, backward=lambda loss: loss.backward(inputs=chosen))
    assert set(actual) == {"4.weight", "2.bias"}
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name])


def test_retain_graph_and_two_backward_passes_accumulate():
    """Two passes through one retained graph: twice the gradient, twice the estimate."""
    model, x, y = _mlp()
    once = _estimates(model, x, y)
    model.zero_grad(set_to_none=True)
    hesscale.request(model.parameters(), "hesscale")
    loss = _loss(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    hesscale.request(model.parameters(), None)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.hess_diag, 2 * once[name])


# --- what the model and the optimizers are -----------------------------------------------------


def test_frozen_parameters_get_no_estimate_and_change_no_other():
    model, x, y = _mlp()
    expected = _estimates(model, x, y)
    model[2].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    actual = _estimates(model, x, y)
    assert "2.weight" not in actual and "0.bias" not in actual
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name])


def test_parameter_groups_and_a_second_optimizer_on_the_rest():
    """AdaHesScale on two groups (different step sizes) and torch's Adam on the head: the
    same parameters as the equivalent per-tensor loop of each update rule."""
    model, x, y = _mlp()
    twin = copy.deepcopy(model)
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    opt = AdaHesScale([{"params": body[:2], "lr": 0.01}, {"params": body[2:], "lr": 0.02}])
    adam = torch.optim.Adam(model[4].parameters(), lr=0.03)
    twin_body = [p for n, p in twin.named_parameters() if not n.startswith("4.")]
    first = AdaHesScale(twin_body[:2], lr=0.01)
    second = AdaHesScale(twin_body[2:], lr=0.02)
    twin_adam = torch.optim.Adam(twin[4].parameters(), lr=0.03)
    for _ in range(3):
        for optimizers, net in (((opt, adam), model), ((first, second, twin_adam), twin)):
            for o in optimizers:
                o.zero_grad()
            _loss(net(x), y).backward()
            for o in optimizers:
                o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_two_curvature_optimizers_of_different_estimates_on_one_model_are_refused():
    model, x, y = _mlp()
    AdaHesScale(model[0].parameters())
    AdaHesScaleGN(model[4].parameters())
    with pytest.raises(ValueError, match="request different estimates"):
        _loss(model(x), y)


def test_a_parameter_without_a_gradient_this_step_is_left_alone():
    """An optimizer whose estimate was requested for a parameter that got no gradient this
    step (an unused branch): the step skips it, as torch's optimizers skip it."""
    model, x, y = _mlp()
    unused = nn.Linear(4, 3).to(D)
    opt = AdaHesScale(list(model.parameters()) + list(unused.parameters()), lr=0.01)
    before = [p.detach().clone() for p in unused.parameters()]
    opt.zero_grad()
    _loss(model(x), y).backward()
    opt.step()
    for a, b in zip(before, unused.parameters()):
        assert torch.equal(a, b)


def test_zero_grad_between_the_forward_and_the_backward_pass():
    model, x, y = _mlp()
    expected = _estimates(model, x, y)
    opt = AdaHesScale(model.parameters(), lr=0.0)
    _loss(model(x), y).backward()  # an earlier pass, to be zeroed
    out = model(x)
    opt.zero_grad()
    _loss(out, y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.hess_diag, expected[name])


def test_eval_and_train_switches_between_steps():
    """A validation forward pass in eval mode under no_grad between training steps changes no
    estimate; an estimate in eval mode is that of the eval-mode network (dropout off)."""
    torch.manual_seed(0)
    model = hesscale.extend(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(D)
    )
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    model.eval()
    expected = exact_hessian_diagonal(model, _loss, x, y)["3.weight"]
    _, eval_estimate = hesscale.diagonal(model, _loss, x, y)
    torch.testing.assert_close(eval_estimate["3.weight"], expected)
    model.train()
    torch.manual_seed(1)
    _, first = hesscale.diagonal(model, _loss, x, y)
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    torch.manual_seed(1)
    model.zero_grad()
    _, again = hesscale.diagonal(model, _loss, x, y)
    _assert_same(again, first)


class Teacher(nn.Module):
    """A frozen teacher run under no_grad inside the student's forward."""

    def __init__(self):
        super().__init__()
        self.teacher, self.student = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
        return self.student(x), target


def test_a_model_run_under_no_grad_for_part_of_its_forward():
    """A frozen teacher (or an EMA target network) inside the forward: its part contributes no
    curvature and no estimate; the student's head is exact."""
    torch.manual_seed(0)
    model = hesscale.extend(Teacher().to(D))
    x = torch.randn(8, 4, dtype=D)

    def distill(outputs, _):
        logits, target = outputs
        return nn.functional.cross_entropy(logits, target)

    _, estimate = hesscale.diagonal(model, distill, x, None)
    assert model.teacher.weight.grad is None
    assert torch.equal(estimate["teacher.weight"], torch.zeros(3, 4, dtype=D))
    with torch.no_grad():
        target = model.teacher(x).softmax(-1)
    student = nn.Sequential(copy.deepcopy(model.student))
    expected = exact_hessian_diagonal(student, nn.functional.cross_entropy, x, target)
    torch.testing.assert_close(estimate["student.weight"], expected["0.weight"])


def test_hooks_of_other_libraries_on_the_same_modules():
    """A forward pre-hook that shifts a layer's input and a forward hook that rescales its
    output (registered after extend, as another library would): the estimates of the same
    computation written out."""
    model, x, y = _mlp()
    model[2].register_forward_pre_hook(lambda module, args: (args[0] + 0.5,))
    model[2].register_forward_hook(lambda module, args, output: 2.0 * output)
    hooked = _estimates(model, x, y)

    class Explicit(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            h = self.layers[1](self.layers[0](x))
            h = 2.0 * self.layers[2](h + 0.5)
            return self.layers[4](self.layers[3](h))

    plain = copy.deepcopy(model)
    for module in plain.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    explicit = hesscale.extend(Explicit(plain))
    expected = _estimates(explicit, x, y)
    _assert_same(hooked, {n.removeprefix("layers."): v for n, v in expected.items()})


# --- libraries on top ------------------------------------------------------------------------


def test_peft_lora_adapters_on_a_frozen_model():
    """PEFT's LoRA on the last layer of a frozen MLP: estimates for the adapters only; the
    adapter B of the output layer (the output is linear in it) has the exact diagonal."""
    peft = pytest.importorskip("peft")
    model, x, y = _mlp()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["2", "4"], lora_dropout=0.0)
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; any value will do here
            torch.manual_seed(len(name))
            p.data.normal_()
    lora = hesscale.extend(lora.to(D))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    estimate = _estimates(lora, x, y)
    assert set(estimate) == trainable
    assert all(torch.isfinite(v).all() for v in estimate.values())
    exact = exact_hessian_diagonal(lora, _loss, x, y)
    (head_b,) = [n for n in trainable if ".4." in n and "lora_B" in n]
    torch.testing.assert_close(estimate[head_b], exact[head_b])
    opt = AdaHesScale([p for p in lora.parameters() if p.requires_grad], lr=0.01)
    opt.zero_grad()
    _loss(lora(x), y).backward()
    opt.step()


def test_a_model_wrapped_in_ddp_after_extend_on_one_process(tmp_path):
    """DistributedDataParallel around an extended model (one gloo process): the estimates of
    the unwrapped model."""
    import os

    import torch.distributed as dist

    from .test_scale_out import _free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(
        "gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "s"), 1)
    )
    try:
        model, x, y = _mlp()
        expected = _estimates(model, x, y)
        ddp = nn.parallel.DistributedDataParallel(model)
        model.zero_grad(set_to_none=True)
        hesscale.request(model.parameters(), "hesscale")
        _loss(ddp(x), y).backward()
        hesscale.request(model.parameters(), None)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.hess_diag, expected[name])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_trainer_with_accumulation_and_checkpointing_steps_like_a_plain_loop(name, tmp_path):
    """``transformers.Trainer`` with ``gradient_accumulation_steps=2`` and
    ``gradient_checkpointing=True`` trains a tiny model with AdaHesScale exactly as a plain loop
    over the same micro-batches without checkpointing (float64, the data in order)."""
    transformers = pytest.importorskip("transformers")
    from hesscale.experiments import huggingface as hf

    torch.manual_seed(0)
    model = hf.tiny_model(name, "sdpa", layers=1).double()
    twin = copy.deepcopy(model)
    windows = torch.randint(1, model.config.vocab_size, (8, 6))
    labels = windows.clone()
    # the first label is never predicted; masking it makes the Trainer's count of label tokens
    # over the accumulated batch (which some versions take before the shift) the loss's
    labels[:, 0] = -100
    data = [{"input_ids": w, "labels": t} for w, t in zip(windows, labels)]

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **hf.checkpointing_argument(transformers),
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        dataloader_drop_last=True,
    )
    model = hesscale.extend(model)
    opt = AdaHesScale(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, schedule)).train()

    twin = hesscale.extend(twin.train())
    twin_opt = AdaHesScale(twin.parameters(), lr=0.01)
    for step in range(2):
        twin_opt.zero_grad()
        for micro in range(2):
            part = slice(4 * step + 2 * micro, 4 * step + 2 * micro + 2)
            (twin(windows[part], labels=labels[part]).loss / 2).backward()
        twin_opt.step()
    for (key, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(
            a, b, rtol=1e-9, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}"
        )
