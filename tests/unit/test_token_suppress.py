import pytest
import torch
from pack_import import pack_module as load

from erasers.config import ConfigError
from erasers.guards import token_suppress as ts

hooks = load("nodes.suppression_hooks")


def qk(seed=0, B=2, Lq=16, T=10, heads=4, d=8):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Lq, heads * d, generator=gen),
        torch.randn(B, T, heads * d, generator=gen),
        torch.randn(B, T, heads * d, generator=gen),
    )


@pytest.mark.parametrize("factor", [0.5, 0.1, 0.0])
def test_attention_mass_on_suppressed_tokens_drops_by_the_factor(factor):
    q, k, _ = qk()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[3, 4]] = True
    before = ts.attention_probs(q, k, 4)
    after = ts.attention_probs(q, k, 4, ts.logit_bias(mask, factor))
    m0, u0 = before[..., mask].sum(-1), before[..., ~mask].sum(-1)
    m1, u1 = after[..., mask].sum(-1), after[..., ~mask].sum(-1)
    # the odds of attending to a suppressed token vs the kept ones drop by exactly c (logit bias log c)
    if factor > 0:
        assert torch.allclose(m1 / u1, factor * m0 / u0, rtol=1e-4)
    else:
        assert m1.max() < 1e-6
    # post-softmax rescale + renormalise gives the same attention
    rescaled = before * torch.where(mask, factor, 1.0)
    assert torch.allclose(after, rescaled / rescaled.sum(-1, keepdim=True), atol=1e-5)


def test_biased_attention_matches_explicit_softmax():
    q, k, v = qk(seed=1)
    bias = ts.logit_bias(torch.tensor([True] + [False] * 9), 0.25)
    out = ts.attention(q, k, v, 4, bias)
    probs = ts.attention_probs(q, k, 4, bias)
    vh = v.reshape(2, 10, 4, 8).transpose(1, 2)
    expected = (probs @ vh).transpose(1, 2).reshape(2, 16, 32)
    assert torch.allclose(out, expected, atol=1e-5)


def test_token_detection():
    assert ts.match_token_ids([1, 7, 8, 9, 7, 8, 2], [[7, 8]]) == [1, 2, 4, 5]
    assert ts.match_token_ids([1, 7, 2], [[5], []]) == []
    m = ts.concept_mask(8, [2], prompt_length=5, include_eos=True)
    assert m.tolist() == [False, False, True, False, True, True, True, True]
    assert not ts.concept_mask(8, [], prompt_length=5, include_eos=True).any()  # nothing found → no EOS either
    hidden = torch.eye(6)
    concept = torch.eye(6)[[2]] + 0.01
    assert ts.similar_tokens(hidden, concept, 0.9).tolist() == [False, False, True, False, False, False]


def test_config_strength_maps_to_factor():
    assert ts.TokenSuppressConfig(concepts=["x"], factor=0.2, strength=0.0).effective_factor == 1.0
    assert ts.TokenSuppressConfig(concepts=["x"], factor=0.2).effective_factor == pytest.approx(0.2)
    assert ts.TokenSuppressConfig(concepts=["x"], factor=0.2, strength=0.5).effective_factor == pytest.approx(0.6)
    with pytest.raises(ConfigError):
        ts.TokenSuppressConfig(concepts=["x"], factor=1.5)


def run_wrapper(sigma, concept_row=3, **cfg_kw):
    """Token wrapper + dispatcher on a fake block: returns (patched out, plain out, transformer_options seen)."""
    gen = torch.Generator().manual_seed(5)
    ctx = torch.randn(2, 8, 16, generator=gen)
    concept_tokens = ctx[1, concept_row : concept_row + 1] * 1.0  # the cond row's token 3 is "the concept"
    cfg = ts.TokenSuppressConfig(concepts=["x"], **cfg_kw)
    wrapper = hooks.make_token_wrapper(cfg, concept_tokens, ctx[1:2], sigma_start=10.0, sigma_end=1.0)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        seen["to"] = transformer_options
        q, k, v = qk(seed=6, T=8)
        extra = dict(transformer_options, n_heads=4)
        plain = ts.attention(q, k, v, 4)
        host = lambda q, k, v, h, mask=None, **kw: ts.attention(q, k, v, h, mask)  # noqa: E731
        out = hooks.Attn2Dispatch(attention=host)(q, k, v, extra)
        probs = ts.attention_probs(
            q, k, 4, (extra.get(hooks.STATE_KEY) or {}).get("token_bias", torch.zeros(2, 8))[:, None, None, :]
        )
        return out, plain, probs

    to = {"cond_or_uncond": [1, 0]}
    out, plain, probs = wrapper(executor, torch.zeros(2), torch.tensor([sigma, sigma]), None, ctx, None, to)
    return out, plain, probs, seen["to"], to


def test_wrapper_suppresses_cond_row_inside_window():
    out, plain, probs, seen, _ = run_wrapper(5.0, factor=0.0, include_eos=False)
    bias = seen[hooks.STATE_KEY]["token_bias"]
    assert bias[0].abs().sum() == 0  # uncond row untouched
    assert bias[1, 3] < -100 and bias[1, [0, 1, 2, 4, 5, 6, 7]].abs().sum() == 0
    # the uncond row sees a zero mask: the same logits (not necessarily the same kernel, hence allclose)
    assert torch.allclose(out[0], plain[0], atol=1e-6) and not torch.allclose(out[1], plain[1])
    assert probs[1, :, :, 3].max() < 1e-6
    _, _, _, seen_eos, _ = run_wrapper(5.0, factor=0.0, include_eos=True)
    assert (seen_eos[hooks.STATE_KEY]["token_bias"][1, 3:] < -100).all()  # all later (causal) positions too


def test_outside_sigma_window_output_is_bit_identical():
    out, plain, _, seen, to = run_wrapper(20.0)
    assert seen is to and torch.equal(out, plain)
    out, plain, _, seen, to = run_wrapper(5.0, risk_gate=1.0)  # gate closed
    assert seen is to and torch.equal(out, plain)


def test_suppressed_attention_is_the_explicit_biased_softmax_through_the_given_function():
    q, k, v = qk(seed=9, B=3, T=10)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 7]] = True
    bias = torch.stack([torch.zeros(10), ts.logit_bias(mask, 0.0), ts.logit_bias(mask, 0.3)])
    probs = ts.attention_probs(q, k, 4, bias[:, None, None, :])
    vh = v.reshape(3, 10, 4, 8).transpose(1, 2)
    expected = (probs @ vh).transpose(1, 2).reshape(3, 16, 32)
    seen = []

    def host(q_, k_, v_, h, mask=None):  # stands for the host's optimized attention
        seen.append(mask.shape)
        return ts.attention(q_, k_, v_, h, mask)

    got = ts.suppressed_attention(q, k, v, 4, bias, host)
    assert seen == [(3, 1, 1, 10)]  # one call, the bias as an additive mask broadcast over heads and queries
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[0], ts.attention(q[:1], k[:1], v[:1], 4)[0], atol=1e-6)  # zero bias: plain
    assert probs[1][..., mask].max() < 1e-6  # dropped columns get no attention
