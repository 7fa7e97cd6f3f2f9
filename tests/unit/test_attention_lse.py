"""The log-sum-exp merge that lets NAG share the image-key attention between its branches is exact."""

from __future__ import annotations

import math

import pytest
import torch

from erasers.guards import attention_lse as lse


def _qkv(lq=33, lk=50, seed=0, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(2, 3, n, 16, generator=gen) * s).to(dtype) for n, s in ((lq, scale), (lk, scale), (lk, 1.0))
    )


def _reference(q, k, v, bias=None):
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()
    return s.softmax(-1) @ v.double(), s.logsumexp(-1)


@pytest.mark.parametrize("split", [1, 17, 49])
def test_merge_of_two_key_sets_is_attention_over_their_union(split):
    q, k, v = _qkv()
    bias = torch.randn(2, 1, 1, 50)
    a = lse.attention_lse(q, k[:, :, :split], v[:, :, :split], bias[..., :split])
    b = lse.attention_lse(q, k[:, :, split:], v[:, :, split:], bias[..., split:])
    out, total = lse.merge(*a, *b)
    want_out, want_lse = _reference(q, k, v, bias)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_merge_stays_finite_for_large_logits_and_a_dropped_set():
    q, k, v = _qkv(scale=30.0)  # logits in the hundreds: exp would overflow without the max shift
    a = lse.attention_lse(q, k[:, :, :10], v[:, :, :10])
    dropped = lse.attention_lse(q, k[:, :, 10:], v[:, :, 10:], torch.full((1, 1, 1, 40), -1e4))
    out, total = lse.merge(*a, *dropped)
    assert torch.isfinite(out).all() and torch.isfinite(total).all()
    torch.testing.assert_close(out, a[0].float(), rtol=1e-5, atol=1e-5)  # a −1e4 bias removes the set


def test_fused_kernel_and_plain_formula_agree(monkeypatch):
    q, k, v = _qkv()
    bias = torch.randn(2, 1, 1, 50)
    fused = lse.attention_lse(q, k, v, bias)
    monkeypatch.setattr(lse, "FALLBACK_QUERY_CHUNK", 8)  # several query chunks
    plain = lse.plain_attention_lse(q, k, v, bias)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[0].double(), _reference(q, k, v, bias)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_lse_close_to_the_exact_value():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out, total = lse.attention_lse(q, k, v)
    assert out.dtype == torch.bfloat16 and total.dtype == torch.float32
    want_out, want_lse = _reference(q, k, v)
    torch.testing.assert_close(total.double(), want_lse, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), want_out, rtol=3e-2, atol=3e-2)


def test_a_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(lse, "_FUSED_CHECKED", {})
    monkeypatch.setattr(lse, "_fused", lambda q, k, v, bias: (torch.zeros_like(q), torch.zeros(q.shape[:3])))
    q, k, v = _qkv()
    out, total = lse.attention_lse(q, k, v)
    torch.testing.assert_close(out.double(), _reference(q, k, v)[0], rtol=1e-5, atol=1e-5)
    assert "disagrees" in caplog.text
