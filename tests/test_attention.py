"""The rule of fused attention (``hesscale.rules.attention``) against ground truth.

On the CPU, PyTorch's fused kernel runs as one operation and its estimate is checked against
torch.func on the math kernel (float64). The rule forms the attention probabilities from the
saved log-sum-exp in blocks of queries: every check runs with one block and with one query per
block. The GPU kernels (flash, memory-efficient, cuDNN) save the same quantities under other
names and layouts: their nodes are imitated on the CPU from the CPU kernel's saved tensors, and
on a machine with CUDA the real kernels are checked against the math kernel.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesscale
from hesscale.reference import exact_hessian_diagonal, ggn_diagonal
from hesscale.rules import attention
from hesscale.rules._registry import NodeContext, Settings

from .conftest import assert_close_dicts
from .test_operations import Operation, quadratic

D = torch.float64

ATTENTION = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal-more-keys": {"is_causal": True},
    "causal-fewer-keys": {"is_causal": True},
    "scale": {"scale": 0.7},
    "bool-mask": {"attn_mask": torch.tensor([[True, False, True, True, False, True]] * 5)},
    "additive-mask": {"attn_mask": torch.linspace(-1.0, 1.0, 30, dtype=D).view(5, 6)},
    "key-padding-mask": {"attn_mask": torch.tensor([[[[True] * 4 + [False] * 2]]] * 2)},
    "grouped-query": {"enable_gqa": True},  # 3 query heads share 1 key/value head
    "grouped-query-causal": {"enable_gqa": True, "is_causal": True},
}
KEYS = {"causal": 5, "causal-more-keys": 7, "causal-fewer-keys": 3, "grouped-query-causal": 5}


def _attention_model(name, head_dim=4, device="cpu", dtype=D):
    kwargs = ATTENTION[name]
    keys = KEYS.get(name, 6)
    heads = 1 if kwargs.get("enable_gqa") else 3
    torch.manual_seed(0)
    model = Operation(
        lambda p: F.scaled_dot_product_attention(p["q"], p["k"], p["v"], **kwargs),
        {"q": (2, 3, 5, head_dim), "k": (2, heads, keys, head_dim), "v": (2, heads, keys, 4)},
    ).to(device, dtype)
    out = model(None)
    target = tuple(
        t.to(device, dtype)
        for t in (torch.rand(out.shape, dtype=D) + 0.1, torch.randn(out.shape, dtype=D))
    )
    return model, target, kwargs


@pytest.fixture(params=["one block", "one query per block"])
def blocks(request, monkeypatch):
    """Run the rule with all queries in one block, or with one query per block."""
    if request.param == "one query per block":
        monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 1)
    return request.param


def _fused_estimate(model, target, method, rule, backend=SDPBackend.FLASH_ATTENTION, node=None):
    hesscale.extend(model, attention=rule)
    with sdpa_kernel(backend):
        name = type(model(None).grad_fn).__name__
        assert name == (node or "ScaledDotProductFlashAttentionForCpuBackward0"), name
        x = torch.zeros(1, dtype=D)
        return hesscale.diagonal(model, quadratic, x, target, method=method)[1]


def _math_reference(fn, model, target):
    with sdpa_kernel(SDPBackend.MATH):
        return fn(model, quadratic, torch.zeros(1, dtype=D), target)


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_fused_attention_is_exact_given_a_diagonal_output_hessian(name, method, blocks):
    """PyTorch's fused CPU attention kernel as one operation, with the exact query rule (the
    reference runs the math kernel, which torch.func can differentiate twice)."""
    model, target, _ = _attention_model(name)
    estimate = _fused_estimate(model, target, method, "exact")
    reference = exact_hessian_diagonal if method == "hesscale" else ggn_diagonal
    assert_close_dicts(estimate, _math_reference(reference, model, target))


class _Logits(nn.Module):
    """``O = softmax(z + mask) V`` with the logits ``z`` as parameters (V fixed)."""

    def __init__(self, z, v, kwargs):
        super().__init__()
        self.z, self.v, self.kwargs = nn.Parameter(z), v, kwargs

    def weights(self):
        z, mask = self.z, self.kwargs.get("attn_mask")
        if mask is not None and mask.dtype == torch.bool:
            z = z.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            z = z + mask
        if self.kwargs.get("is_causal"):
            keep = torch.ones(z.shape[-2:], dtype=torch.bool).tril()
            z = z.masked_fill(~keep, float("-inf"))
        return torch.softmax(z, -1)

    def forward(self, _):
        return self.weights() @ self.v


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_fused_attention_centred_query_rule(name, method, blocks):
    """The default query rule: keys and values exact given a diagonal output Hessian; queries
    ``c² Σ_u diag(G_z)_tu (K_u − K̄_t)²`` with ``diag(G_z)`` the exact Gauss-Newton diagonal of
    the logits (torch.func), plus (HesScale) the exact second-order part, which centring at
    ``K̄_t = Σ_u A_tu K_u`` keeps whole. Differs from the exact rule (a guard against a vacuous
    check)."""
    model, target, kwargs = _attention_model(name)
    estimate = _fused_estimate(model, target, method, "centred")
    exact = _math_reference(exact_hessian_diagonal, model, target)
    ggn = _math_reference(ggn_diagonal, model, target)
    expected = exact if method == "hesscale" else ggn
    for p in ("k", "v"):
        torch.testing.assert_close(estimate[f"p.{p}"], expected[f"p.{p}"])
    q, k, v = (model.p[n].detach() for n in "qkv")
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    c = kwargs.get("scale", 1 / q.shape[-1] ** 0.5)
    logits = _Logits(c * q @ k.transpose(-1, -2), v, kwargs)
    g_z = _math_reference(ggn_diagonal, logits, target)["z"]
    with torch.no_grad():
        a = logits.weights()
    centred = k.unsqueeze(-3) - (a @ k).unsqueeze(-2)  # (…, t, u, i)
    expected_q = c * c * (g_z.unsqueeze(-1) * centred**2).sum(-2)
    if method == "hesscale":
        expected_q = expected_q + exact["p.q"] - ggn["p.q"]
    torch.testing.assert_close(estimate["p.q"], expected_q)
    assert (estimate["p.q"] - expected["p.q"]).abs().max() > 1e-6


def test_blocks_bound_the_temporaries(monkeypatch):
    """With a budget of 12 entries, a block of (2 × 3 heads) × 6 keys holds 2 queries; under
    is_causal a block reads only the keys its queries see."""
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 12 * 6)
    shapes = []
    original = attention._Probabilities.__call__

    def recording(self, rows):
        a = original(self, rows)
        shapes.append(tuple(a.shape))
        return a

    monkeypatch.setattr(attention._Probabilities, "__call__", recording)
    for name in ("plain", "causal"):
        model, target, _ = _attention_model(name)
        _fused_estimate(model, target, "hesscale", "centred")
    keys = [s[-1] for s in shapes]
    assert [s[-2] for s in shapes] == [2, 2, 1, 2, 2, 1]
    assert keys == [6, 6, 6, 2, 4, 5]


# --- the GPU kernels' nodes, imitated on the CPU --------------------------------------------


def _cpu_node(name):
    model, target, kwargs = _attention_model(name)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = model(None)
    return out.grad_fn, target


def _imitation(cpu_node, kernel: str, **changes):
    """A node named like a GPU kernel's, holding what that kernel saves, in its layout."""
    saved = {
        n: getattr(cpu_node, f"_saved_{n}")
        for n in ("query", "key", "value", "output", "dropout_p", "is_causal", "scale")
    }
    lse, mask = cpu_node._saved_logsumexp, cpu_node._saved_attn_mask
    if kernel == "ScaledDotProductEfficientAttentionBackward0":  # padded to 32 queries
        pad = 32 - lse.shape[-1] % 32
        saved.update(log_sumexp=F.pad(lse, (0, pad), value=float("inf")), attn_bias=mask)
    elif kernel == "ScaledDotProductCudnnAttentionBackward0":  # a trailing dimension
        saved.update(logsumexp=lse.unsqueeze(-1), attn_bias=mask, cum_seq_q=None)
    else:
        assert mask is None, "the flash kernel takes no mask"
        saved.update(logsumexp=lse, cum_seq_q=None)
    saved.update(changes)
    node = types.new_class(kernel)()
    for key, value in saved.items():
        setattr(node, f"_saved_{key}", value)
    return node


def _rule_outputs(node, target, method="hesscale", rule="centred"):
    s, c = target
    out = node._saved_output
    ctx = NodeContext(
        node=node,
        grad_outputs=(s * out + c,),
        curvature_outputs=(s,),
        needs=(True, True, True),
        second_order=hesscale.METHODS[method].second_order_term,
        method=hesscale.METHODS[method],
        dtype=D,
        settings=Settings(attention=rule),
    )
    with torch.no_grad():  # as the engine runs rules
        return attention.attention_rule(ctx)


GPU_KERNELS = {
    "ScaledDotProductFlashAttentionBackward0": ["plain", "causal", "scale"],
    "ScaledDotProductEfficientAttentionBackward0": ["plain", "causal", "additive-mask"],
    "ScaledDotProductCudnnAttentionBackward0": ["plain", "causal", "bool-mask"],
}


@pytest.mark.parametrize(
    "kernel, name", [(k, n) for k, names in GPU_KERNELS.items() for n in names]
)
@pytest.mark.parametrize("rule", ["centred", "exact"])
def test_gpu_kernels_saved_state_gives_the_cpu_kernels_estimate(kernel, name, rule, blocks):
    """The CPU kernel's estimate is exact (above); the GPU kernels' layouts of the same saved
    log-sum-exp and mask must give the same numbers."""
    cpu, target = _cpu_node(name)
    expected = _rule_outputs(cpu, target, rule=rule)
    actual = _rule_outputs(_imitation(cpu, kernel), target, rule=rule)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_a_log_sum_exp_that_does_not_match_is_refused(kernel, monkeypatch):
    """A kernel whose saved state means something else (here: ℓ off by 1, so rows of
    exp(z − ℓ) sum to e⁻¹) is refused by name, not used."""
    monkeypatch.setattr(attention, "_checked", set())
    cpu, target = _cpu_node("plain")
    lse = cpu._saved_logsumexp + 1
    changes = (
        {"log_sumexp": lse}
        if kernel == "ScaledDotProductEfficientAttentionBackward0"
        else {"logsumexp": lse.unsqueeze(-1) if "Cudnn" in kernel else lse}
    )
    with pytest.raises(NotImplementedError, match="sums to 0.3679 instead of 1"):
        _rule_outputs(_imitation(cpu, kernel, **changes), target)


def test_dropout_and_nested_inputs_are_refused():
    cpu, target = _cpu_node("plain")
    flash = "ScaledDotProductFlashAttentionBackward0"
    with pytest.raises(NotImplementedError, match="dropout_p > 0"):
        _rule_outputs(_imitation(cpu, flash, dropout_p=0.1), target)
    lengths = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="nested"):
        _rule_outputs(_imitation(cpu, flash, cum_seq_q=lengths), target)


# --- the real GPU kernels (run by benchmarks/gpu_check.sh on a machine with CUDA) -----------

CUDA_KERNELS = {
    SDPBackend.FLASH_ATTENTION: ("ScaledDotProductFlashAttentionBackward0", ["plain", "causal"]),
    SDPBackend.EFFICIENT_ATTENTION: (
        "ScaledDotProductEfficientAttentionBackward0",
        ["plain", "causal", "additive-mask", "causal-more-keys"],
    ),
    SDPBackend.CUDNN_ATTENTION: ("ScaledDotProductCudnnAttentionBackward0", ["plain", "causal"]),
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(
    "backend, name",
    [(b, n) for b, (_, names) in CUDA_KERNELS.items() for n in names],
    ids=lambda v: getattr(v, "name", v),
)
@pytest.mark.parametrize("method", ["hesscale", "hesscale_gn"])
def test_cuda_kernels_match_the_math_kernel(backend, name, method):
    """Each GPU kernel's estimate equals the math kernel's (whose products and softmax have
    their own rules). The memory-efficient kernel runs in float32 (tight); flash and cuDNN
    run only in half precision, so they run under bf16 autocast against float32 (loose)."""
    node, _ = CUDA_KERNELS[backend]
    dtype = torch.float32
    model, target, _ = _attention_model(name, head_dim=8, device="cuda", dtype=dtype)
    x = torch.zeros(1, device="cuda", dtype=dtype)
    with sdpa_kernel(SDPBackend.MATH):
        _, reference = hesscale.diagonal(model, quadratic, x, target, method=method)
    model.zero_grad()
    half = backend != SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(backend), torch.autocast("cuda", torch.bfloat16, enabled=half):
        out = model(None)
        assert type(out.grad_fn).__name__ == node
        _, estimate = hesscale.diagonal(model, quadratic, x, target, method=method)
    for key in reference:
        assert estimate[key].dtype == torch.float32
    tolerance = dict(rtol=5e-2, atol=2e-2) if half else dict(rtol=1e-4, atol=1e-5)
    assert_close_dicts(estimate, reference, **tolerance)
