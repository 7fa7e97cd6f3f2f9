import pytest
import torch
from pack_import import pack_module as load

from erasers.config import ConfigError
from erasers.errors import EmptyConceptList
from erasers.guards import concept_guidance as cg

hooks = load("nodes.suppression_hooks")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_extrapolation_formula():
    zp, zn = rand(2, 16, 32, seed=1), rand(2, 16, 32, seed=2)
    assert torch.allclose(cg.extrapolate(zp, zn, 5.0), 5.0 * zp - 4.0 * zn, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.5, 4.0])
def test_normalisation_clamp_holds(tau):
    zp, zn = rand(2, 64, 40, seed=3), rand(2, 64, 40, seed=4)
    zt = cg.extrapolate(zp, zn, 8.0)
    s = cg.l1_ratio(zt, zp)
    zh = cg.normalise(zt, s, tau)
    ratio = zh.abs().sum(-1) / zp.abs().sum(-1)
    assert (ratio <= tau * (1 + 1e-5)).all()
    small = s[..., 0] <= tau
    assert torch.equal(zh[small], zt[small])  # tokens under the cap are left alone
    assert (s > tau).any()  # the cap was exercised
    assert torch.allclose(ratio[~small], torch.full_like(ratio[~small], tau), rtol=1e-5)


def test_phi_one_is_identity_and_alpha_zero_is_exact():
    zp, zn = rand(2, 16, 32, seed=5), rand(2, 16, 32, seed=6)
    assert torch.allclose(cg.nag(zp, zn, 1.0, 2.5, 0.25), zp, atol=1e-6)
    assert torch.equal(cg.nag(zp, zn, 5.0, 2.5, 0.0), zp)
    assert not torch.allclose(cg.nag(zp, zn, 5.0, 2.5, 0.25), zp)


def test_config_defaults_and_cutoffs():
    c = cg.ConceptGuidanceConfig(concepts=["nudity"])
    assert (c.phi, c.tau, c.alpha) == (5.0, 2.5, 0.25)
    assert c.sigma_end_for("flux") == 0.75 and c.sigma_end_for("sd3") == 0.75
    assert c.sigma_end_for("sd1") == 4.0 and c.sigma_end_for("sdxl") == 4.0
    assert cg.ConceptGuidanceConfig(concepts=["x"], sigma_end=2.0).sigma_end_for("flux") == 2.0
    assert cg.ConceptGuidanceConfig(concepts=["x"], strength=0.5).effective_alpha == 0.125
    assert cg.ConceptGuidanceConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        cg.ConceptGuidanceConfig(concepts=["x"], tau=0.5)
    with pytest.raises(EmptyConceptList):
        cg.ConceptGuidanceConfig(concepts=[])


def unet_call(state, heads=4, seed=7):
    """One cross-attention block the way ComfyUI calls it: attn2_patch, then to_k/to_v, then the replace."""
    B, HW, C, T, D = 2, 16, 32, 6, 24
    gen = torch.Generator().manual_seed(seed)
    n, ctx = torch.randn(B, HW, C, generator=gen), torch.randn(B, T, D, generator=gen)
    wq, wk, wv = torch.randn(C, C, generator=gen), torch.randn(C, D, generator=gen), torch.randn(C, D, generator=gen)
    extra = {"n_heads": heads, "cond_or_uncond": [1, 0]}
    if state is not None:
        extra[hooks.STATE_KEY] = state
    n2, c2, v2 = hooks.NagAttn2Patch()(n, ctx, ctx, extra)
    q, k, v = n2 @ wq.T, c2 @ wk.T, v2 @ wv.T
    out = hooks.Attn2Dispatch(attention=lambda q, k, v, h, mask=None, **kw: hooks.ts.attention(q, k, v, h, mask))(
        q, k, v, extra
    )
    plain = hooks.ts.attention(n @ wq.T, ctx @ wk.T, ctx @ wv.T, heads)
    return out, plain, (n, wq, wk, wv)


def test_unet_guidance_is_cond_only():
    neg = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(8))
    op = {"phi": 5.0, "tau": 2.5, "alpha": 0.25, "neg": neg, "rows": torch.tensor([1]), "stream": {}}
    out, plain, (n, wq, wk, wv) = unet_call({"nag": [op]})
    assert torch.equal(out[0], plain[0])  # uncond row (cond_or_uncond[0] = 1) untouched
    z_neg = hooks.ts.attention(n[1:] @ wq.T, neg @ wk.T, neg @ wv.T, 4)
    assert torch.allclose(out[1:], cg.nag(plain[1:], z_neg, 5.0, 2.5, 0.25), atol=1e-5)
    assert not torch.allclose(out[1], plain[1])


def test_unet_without_state_is_bit_identical():
    out, plain, _ = unet_call(None)
    assert torch.equal(out, plain)


def test_nag_wrapper_respects_sigma_cutoff_and_rows():
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        seen["to"] = transformer_options
        return x

    cfg = cg.ConceptGuidanceConfig(concepts=["x"])
    ctx = torch.randn(4, 6, 8)
    w = hooks.make_nag_wrapper(cfg, torch.randn(1, 6, 8), torch.randn(1, 6, 8), 1e9, 0.0, nag_sigma_end=4.0)
    to = {"cond_or_uncond": [1, 0]}
    w(executor, torch.zeros(4), torch.tensor([3.0] * 4), None, ctx, None, to)
    assert seen["to"] is to  # σ = 3 < σ_end = 4: NAG off, options untouched
    w(executor, torch.zeros(4), torch.tensor([9.0] * 4), None, ctx, None, to)
    op = seen["to"][hooks.STATE_KEY]["nag"][0]
    assert op["rows"].tolist() == [2, 3] and op["alpha"] == 0.25 and hooks.STATE_KEY not in to


def test_every_family_the_table_serves_guidance_on_has_its_cut_off():
    """A family missing from SIGMA_END would get σ_end = 0: NAG over the whole schedule, unlike its siblings."""
    from erasers import families

    served = {
        r.family.value for r in families.RECORDS if r.family is not None and r.guard_reason("concept_guidance") is None
    }
    assert served and not served - set(cg.SIGMA_END), sorted(served - set(cg.SIGMA_END))
