import pytest
import torch
from pack_import import pack_module as load

from erasers.config import ConfigError
from erasers.guards import sld

hooks = load("nodes.suppression_hooks")


def test_presets_and_default_concept():
    assert sld.PRESETS == {
        "weak": (15, 20.0, 0.0, 0.0, 0.0),
        "medium": (10, 1000.0, 0.01, 0.3, 0.4),
        "strong": (7, 2000.0, 0.025, 0.5, 0.7),
        "max": (0, 5000.0, 1.0, 0.5, 0.7),
    }
    c = sld.SLDConfig(preset="strong")
    assert (c.warmup_steps, c.guidance_scale, c.threshold, c.momentum_scale, c.momentum_beta) == (
        7,
        2000,
        0.025,
        0.5,
        0.7,
    )
    assert sld.SLDConfig().safety_concept.startswith("an image showing hate, harassment, violence")
    assert sld.SLDConfig().safety_concept.endswith("child abuse, brutality, cruelty")
    assert sld.SLDConfig(preset="medium", threshold=0.5).threshold == 0.5
    assert sld.SLDConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        sld.SLDConfig(preset="extreme")
    assert sld.SLDConfig(preset="medium").warmup_for(25) == 5 and sld.SLDConfig().warmup_for(50) == 10


def paper_sld(eps_u, eps_p, eps_s, s_g, preset, steps, delta=None):
    """The paper's formula, written out independently of erasers.guards.sld (diffusers semantics, §2.1)."""
    preset_delta, s_s, lam, s_m, beta_m = sld.PRESETS[preset]
    delta = preset_delta if delta is None else delta
    nu = torch.zeros_like(eps_u[0])
    outs = []
    for i in range(steps):
        diff = eps_p[i] - eps_s[i]
        mu = torch.minimum(torch.ones_like(diff), s_s * diff.abs())
        mu[diff >= lam] = 0
        gamma = mu * (eps_s[i] - eps_u[i]) + s_m * nu
        nu = beta_m * nu + (1 - beta_m) * gamma
        guidance = (eps_p[i] - eps_u[i]) - (gamma if i >= delta else 0)
        outs.append(eps_u[i] + s_g * guidance)
    return outs


@pytest.mark.parametrize("preset", list(sld.PRESETS))
def test_sld_combine_equals_paper_formula(preset):
    gen = torch.Generator().manual_seed(0)
    steps = 12
    eps_u, eps_p, eps_s = (torch.randn(steps, 1, 4, 8, 8, generator=gen) * 0.05 for _ in range(3))
    cfg = sld.SLDConfig(preset=preset, warmup_steps=3)
    state = sld.SLDState()
    got = [sld.sld_combine(eps_u[i], eps_p[i], eps_s[i], 7.5, state, cfg, cfg.warmup_steps) for i in range(steps)]
    expected = paper_sld(eps_u, eps_p, eps_s, 7.5, preset, steps, delta=3)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)
    # the safety term actually does something after warm-up (otherwise the test proves nothing)
    plain = eps_u[-1] + 7.5 * (eps_p[-1] - eps_u[-1])
    assert not torch.allclose(got[-1], plain)


def test_conversions_round_trip_and_definitions():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigma = 3.7
    x = x0 + sigma * eps  # ComfyUI's k-diffusion form for eps and v models
    assert torch.allclose(sld.to_eps(x, x0, sigma, "eps"), eps, atol=1e-5)
    assert torch.allclose(sld.from_eps(x, eps, sigma, "v"), x0, atol=1e-5)
    s = 0.6
    xt = (1 - s) * x0 + s * eps  # rectified flow
    assert torch.allclose(sld.to_eps(xt, x0, s, "flow"), eps, atol=1e-5)
    assert torch.allclose(sld.from_eps(xt, eps, s, "flow"), x0, atol=1e-5)
    assert torch.allclose(sld.to_velocity(xt, x0, s), eps - x0, atol=1e-5)
    assert torch.allclose(sld.from_velocity(xt, eps - x0, s), x0, atol=1e-5)
    with pytest.raises(ConfigError):
        sld.to_eps(x, x0, sigma, "edm")


def test_v_prediction_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor([600])
    abar = sched.alphas_cumprod[600]
    sigma = float(((1 - abar) / abar).sqrt())
    v_ref = sched.get_velocity(x0, eps, t)
    assert torch.allclose(sld.to_v_prediction(x0 + sigma * eps, x0, sigma), v_ref, atol=1e-4)


@pytest.mark.parametrize("param", ["eps", "v", "flow"])
def test_pre_cfg_hook_gives_paper_result_for_each_parameterisation(param):
    """The host receives x₀; after the hook's ε_p′ and the host's own CFG in x₀ space, the result must equal
    the paper's ε̃ (velocity for flow) computed directly on the guidance-space tensors."""
    gen = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.7 if param == "flow" else 2.5])
    x = torch.randn(1, 4, 8, 8, generator=gen)
    g_u, g_p, g_s = (torch.randn(1, 4, 8, 8, generator=gen) * 0.02 for _ in range(3))
    if param == "flow":
        to_x0 = lambda g: x - sigma * g  # velocity → x₀
    else:
        to_x0 = lambda g: x - sigma * g  # ε → x₀ (k-diffusion form, eps and v models)
    cfg = sld.SLDConfig(preset="max")
    sigmas = torch.tensor([sigma.item(), 0.0])
    fn = hooks.make_sld_pre_cfg(
        cfg, None, param, 1e9, 0.0, torch.zeros(1, 4, 4), calc=lambda model, cond, x_, s, mo: to_x0(g_s)
    )
    args = {
        "conds_out": [to_x0(g_p), to_x0(g_u)],
        "input": x,
        "sigma": sigma,
        "model": None,
        "conds": None,
        "model_options": {"transformer_options": {"sample_sigmas": sigmas}},
    }
    cond_new, uncond = fn(args)
    s_g = 6.0
    x0_cfg = uncond + s_g * (cond_new - uncond)  # what the host's CFG does with x₀
    expected_g = paper_sld(g_u[None], g_p[None], g_s[None], s_g, "max", 1)[0]
    assert torch.allclose(x0_cfg, to_x0(expected_g), atol=1e-4)


def test_pre_cfg_warmup_and_window_leave_predictions_alone():
    x = torch.randn(1, 4, 8, 8)
    out = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)]
    calls = []
    cfg = sld.SLDConfig(preset="medium")
    fn = hooks.make_sld_pre_cfg(
        cfg, None, "eps", 5.0, 1.0, torch.zeros(1, 4, 4), calc=lambda *a: calls.append(1) or out[0]
    )
    args = {
        "conds_out": out,
        "input": x,
        "sigma": torch.tensor([9.0]),
        "model": None,
        "conds": None,
        "model_options": {"transformer_options": {}},
    }
    assert fn(args) is out and not calls  # σ = 9 outside [1, 5]: no extra pass
    sigmas = torch.linspace(5, 0, 51)
    args.update(sigma=sigmas[2:3], model_options={"transformer_options": {"sample_sigmas": sigmas}})
    res = fn(args)
    assert calls  # step 2 < δ = 10: the safety pass runs (momentum accumulates) but γ is not applied
    assert torch.allclose(res[0], out[0], atol=1e-5)
