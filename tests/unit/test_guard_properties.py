"""Property tests of the four guards' mechanisms (issue #14), on constructed tensors and tiny models:
SAFREE flags the concept token and not a benign one, and its "whole" SVF window is a per-prompt switch;
SLD's term is zero where the threshold or the warm-up says so; concept guidance moves attention only at the
guided rows; token suppression removes the concept's attention mass."""

import pytest
import torch

from erasers.guards import safree, sld
from erasers.guards import token_suppress as ts
from erasers.guards.concept_guidance import nag


def space(T=8, D=6):
    """A constructed embedding space: e1 = the concept direction; prompt 'BOS a concept b EOS pad…'."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn(T, D, generator=gen) * 0.1
    concept = torch.zeros(1, T, D)
    concept[0, 2, 0] = 1.0  # keyword 'BOS w EOS': pooled (EOS, position 2) = e1
    return prompt, concept


def masked_for(word_carries_concept: bool, T=8, D=6):
    """Pooled (EOS) states of the 3 masked copies: masking the concept word removes e1 from the sentence."""
    prompt, concept = space(T, D)
    masked = prompt[None].repeat(3, 1, 1).clone()
    with_concept = torch.tensor([1.0, 1.0, 0, 0, 0, 0])
    without = torch.tensor([0.0, 2.0, 0, 0, 0, 0])  # farther from span(e1): d grows
    for i in range(3):
        masked[i, 4] = without if (word_carries_concept and i == 1) else with_concept
    return prompt, masked, concept


def analyse(prompt, masked, concept, **kw):
    cfg = safree.SAFREEConfig(concepts=["c"], **kw)
    return safree.analyse(cfg, prompt, 5, [1, 2, 3], masked, torch.tensor([5, 5, 5]), concept, torch.tensor([3]))


def test_safree_flags_the_concept_token_and_not_a_benign_one():
    res = analyse(*masked_for(True))
    assert res.flagged.tolist() == [False, True, False]  # position 2 = the concept word
    # a benign prompt: no masked copy moves away from the concept subspace more than the others
    benign = analyse(*masked_for(False))
    assert not benign.flagged.any() and not benign.changed


def test_safree_whole_window_is_a_switch_on_t_prime():
    prompt, masked, concept = masked_for(True)
    paper = analyse(prompt, masked, concept)
    whole = analyse(prompt, masked, concept, svf_window="whole")
    assert paper.changed and paper.filter_fraction == pytest.approx((paper.t_prime + 1) / 50)
    if whole.t_prime >= 1:
        assert whole.changed and whole.filter_fraction == 1.0
        assert torch.equal(whole.hidden, paper.hidden)  # same projection, only the window differs
    else:
        assert not whole.changed and whole.hidden is prompt
    # a switch that is off leaves the conditioning exactly as it was (t′ = 0 whatever β: γ = 0)
    off = analyse(prompt, masked, concept, svf_window="whole", gamma=0.0)
    assert off.t_prime == 0 and not off.changed and off.hidden is prompt and off.filter_fraction == 0.0
    with pytest.raises(Exception, match="svf_window"):
        safree.SAFREEConfig(concepts=["c"], svf_window="late")


def test_sld_term_is_zero_above_threshold_and_during_warmup():
    gen = torch.Generator().manual_seed(1)
    eps_u, eps_p, eps_s = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    cfg = sld.SLDConfig(concepts=["c"], preset="medium", momentum_scale=0.0)
    state = sld.SLDState()
    warmup = 2
    for step in range(4):
        g = sld.sld_gamma(eps_u, eps_p, eps_s, state, cfg, warmup)
        if step < warmup:
            assert torch.count_nonzero(g) == 0  # warm-up: nothing subtracted (momentum still accumulates)
        else:
            above = (eps_p - eps_s) >= cfg.threshold
            assert torch.count_nonzero(g[above]) == 0  # the threshold admits only ε_p − ε_S < λ
            mu = torch.clamp(cfg.guidance_scale * (eps_p - eps_s).abs(), max=1.0)
            assert torch.allclose(g[~above], (mu * (eps_s - eps_u))[~above])
    assert state.step == 4


def test_nag_moves_attention_only_at_guided_rows():
    pytest.importorskip("diffusers")
    from erasers_diffusers import suppression as ds
    from tests.unit.test_diffusers_suppression import tiny_unet

    unet = tiny_unet()  # the suppression tests' tiny UNet, same seed
    ctx = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def probe(kind, **v):
        seen.append((kind, v["z_pos"], v["z_out"]))

    with torch.no_grad():
        before = unet(x, torch.tensor([10] * 3), encoder_hidden_states=ctx).sample
        with ds.SuppressionProcessors(unet) as ctl:
            ctl.state = ds.SuppressionState(
                nag_context=torch.randn(1, 5, 16), nag_rows=torch.tensor([1]), alpha=0.5, probe=probe
            )
            out = unet(x, torch.tensor([10] * 3), encoder_hidden_states=ctx).sample
    # rows 0 and 2 (unguided) keep their output; row 1 (guided) moves; the probe saw the guided row only
    assert torch.allclose(out[0], before[0], atol=1e-5) and torch.allclose(out[2], before[2], atol=1e-5)
    assert not torch.allclose(out[1], before[1], atol=1e-4)
    assert seen and all(kind == "nag" and z.shape[0] == 1 for kind, z, _ in seen)
    assert any(not torch.allclose(zp, zo) for _, zp, zo in seen)


def test_nag_alpha_zero_leaves_the_positive_branch():
    gen = torch.Generator().manual_seed(2)
    zp, zn = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    assert torch.allclose(nag(zp, zn, 5.0, 2.5, 0.0), zp)
    assert not torch.allclose(nag(zp, zn, 5.0, 2.5, 0.25), zp)


def test_suppression_removes_the_concept_attention_mass():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 7, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    mask = ts.concept_mask(6, [2], prompt_length=4, include_eos=True)  # word 2, then EOS (3) and padding
    assert mask.tolist() == [False, False, True, True, True, True]
    bias = ts.logit_bias(mask, 0.0)
    before = ts.attention_probs(q, k, 2)
    after = ts.attention_probs(q, k, 2, bias)
    assert before[..., mask].sum(-1).min() > 0.01
    assert after[..., mask].sum(-1).max() < 1e-6  # dropped: no mass on the concept, EOS or padding
    assert torch.allclose(after.sum(-1), torch.ones_like(after.sum(-1)), atol=1e-6)
