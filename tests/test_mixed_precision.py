"""Mixed precision: models stored in bf16, and float32 models under bf16 autocast.

Under autocast the curvature pass computes at the forward's precision: the rules run under the
same autocast (the products autocast runs in bf16 run in bf16, with float32 accumulation), the
attention rule in float32, and the estimates of float32 parameters are float32 (summed over the
uses of a parameter in float32). Each check runs on every available device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesscale
from hesscale.experiments.networks import GPT

from .cases import CASES, build


def test_bfloat16_model_runs(device):
    model, loss_fn, x, y = build(CASES["conv2d-groups2"], device, torch.bfloat16)
    _, estimate = hesscale.diagonal(model, loss_fn, x, y)
    _, ref = hesscale.diagonal(*build(CASES["conv2d-groups2"], device, torch.float64))
    for k in ref:
        assert estimate[k].dtype == torch.bfloat16
        torch.testing.assert_close(estimate[k].double(), ref[k], rtol=0.1, atol=1e-2)


@pytest.mark.parametrize("method", ["hesscale", "ggn_mc"])
def test_bfloat16_autocast_gives_float32_estimates_close_to_float32(method, device):
    model, loss_fn, x, y = build(CASES["dropout-train"], device, dtype=torch.float32)

    def estimate():
        model.zero_grad()
        torch.manual_seed(0)
        generator = torch.Generator(device).manual_seed(0)
        return hesscale.diagonal(
            model, loss_fn, x, y, method=method, samples=2000, generator=generator
        )[1]

    ref = estimate()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        est = estimate()
    for k in ref:
        assert est[k].dtype == torch.float32
        scale = ref[k].abs().max()
        torch.testing.assert_close(est[k] / scale, ref[k] / scale, rtol=0.05, atol=0.03)


def _gpt(device):
    torch.manual_seed(0)
    model = GPT(vocab=11, width=16, context=8, heads=2, layers=2, gpt2_init=True).to(device)
    ids = torch.randint(0, 11, (3, 8), device=device)
    return model, ids


def _attention_nodes(output) -> set[str]:
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return {type(n).__name__ for n in seen if "Attention" in type(n).__name__}


@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_a_transformer_under_bf16_autocast_with_the_fused_attention_kernel(method, device):
    """A GPT with a tied output layer, its attention on the fused kernel (flash on a GPU):
    float32 estimates within bf16's precision of the float32 model's."""
    model, ids = _gpt(device)

    def loss_fn(out, target):
        return nn.functional.cross_entropy(out, target)

    _, ref = hesscale.diagonal(model, loss_fn, ids, ids, method=method)
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        fused = {"cpu": "ScaledDotProductFlashAttentionForCpuBackward0"}.get(
            device.type, "ScaledDotProductFlashAttentionBackward0"
        )
        assert _attention_nodes(model(ids)) == {fused}
        _, est = hesscale.diagonal(model, loss_fn, ids, ids, method=method)
    for name in ref:
        assert est[name].dtype == torch.float32
        scale = ref[name].abs().max()
        torch.testing.assert_close(est[name] / scale, ref[name] / scale, rtol=0, atol=2e-2)


class _Recorded(torch.autograd.Function):
    """``y = 2x``, whose rule records the autocast state it runs under."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _recording_rule(ctx):
    device = ctx.grad_outputs[0].device.type
    _Recorded.seen.append(
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    )
    return (4 * ctx.s,)


hesscale.register_rule(_Recorded, _recording_rule)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return _Recorded.apply(self.lin(x))


@pytest.mark.parametrize(
    "forward, backward, seen",
    [(True, False, torch.bfloat16), (False, True, None), (False, False, None)],
)
def test_rules_run_under_the_forward_passes_autocast(forward, backward, seen, device):
    """Whatever autocast ``backward()`` is called under, the rules see the forward's."""
    torch.manual_seed(0)
    model = hesscale.extend(_Model().to(device))
    x = torch.randn(4, 3, device=device)
    _Recorded.seen.clear()
    hesscale.request(model.parameters(), "hesscale")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=forward):
        loss = model(x).float().square().sum()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backward):
        loss.backward()
    hesscale.request(model.parameters(), None)
    assert _Recorded.seen == [seen]
    assert model.lin.weight.hess_diag.dtype == torch.float32


def test_a_second_forward_pass_in_one_autocast_region(device):
    """autocast caches its casts of the weights for the whole region: the second forward pass
    reuses the first's (made before its layers started), and its estimate is the same."""
    model, ids = _gpt(device)
    model = hesscale.extend(model)

    def estimate():
        model.zero_grad()
        hesscale.request(model.parameters(), "hesscale")
        nn.functional.cross_entropy(model(ids), ids).backward()
        hesscale.request(model.parameters(), None)
        return {n: p.hess_diag.clone() for n, p in model.named_parameters()}

    with torch.autocast(device.type, dtype=torch.bfloat16):
        first, second = estimate(), estimate()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        fresh = estimate()
    for name in first:
        torch.testing.assert_close(second[name], first[name])
        torch.testing.assert_close(fresh[name], first[name])
