"""The A1111 sampling-time guards (``a1111_erasers/guards.py``) on fakes of the webui's sampler.

``FakeCFGDenoiser`` follows A1111's ``CFGDenoiser.forward`` in the order that matters to the guards:
build ``x_in`` (cond rows first, uncond rows at the tail), fire ``cfg_denoiser`` and read ``text_cond``
back, run the UNet on the concatenated conds, fire ``cfg_denoised`` (the tensor is *not* read back, so
SLD must edit it in place), then combine CFG. The fake UNet's cross-attention modules have the ldm
``CrossAttention`` shape (``heads``, ``to_q/to_k/to_v/to_out``, ``forward(x, context, mask)``).
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1 + 1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import erasers  # noqa: E402,F401  (first, so load_core reuses it and erasers_dev.testing shares its classes)
from a1111_erasers import backend as be  # noqa: E402
from a1111_erasers import guards, plugins, runtime, settings  # noqa: E402
from a1111_erasers.core import core_module, load_core  # noqa: E402
from erasers_dev import testing  # noqa: E402

core = load_core()

CTX, DIM, INNER, HEADS = 768, 32, 64, 4
CONCEPT = "snoopy"
PROMPT = "a photo of snoopy dancing on a beach"


class FakeCrossAttention(torch.nn.Module):
    """ldm.modules.attention.CrossAttention's interface; its class forward is 'the optimiser'."""

    def __init__(self, gen):
        super().__init__()
        self.heads = HEADS
        self.to_q = torch.nn.Linear(DIM, INNER, bias=False)
        self.to_k = torch.nn.Linear(CTX, INNER, bias=False)
        self.to_v = torch.nn.Linear(CTX, INNER, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(INNER, DIM), torch.nn.Dropout(0.0))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)

    def forward(self, x, context=None, mask=None):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        qh, kh, vh = (t.reshape(b, t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
        return self.to_out(out.transpose(1, 2).reshape(b, n, INNER))


class Block(torch.nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.attn2 = FakeCrossAttention(gen)


class FakeUNet(torch.nn.Module):
    """ε(x, context): latent pixels as tokens → two transformer blocks with cross-attention → ε."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj_in = torch.nn.Linear(4, DIM)
        self.input_blocks = torch.nn.ModuleList([Block(gen), Block(gen)])
        self.proj_out = torch.nn.Linear(DIM, 4)
        with torch.no_grad():
            for p in list(self.proj_in.parameters()) + list(self.proj_out.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.proj_in(x.flatten(2).transpose(1, 2))
        for block in self.input_blocks:
            t = t + block.attn2(t, context=context)
        return self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class FakeCondStage:
    def __init__(self, toy):
        self.toy, self.id_start, self.id_end = toy, toy.BOS, toy.EOS

    def tokenize(self, texts):
        return [self.toy.tokenize(t)[1:-1] for t in texts]


class FakeSDModel:
    def __init__(self):
        self.model = torch.nn.Module()
        self.model.add_module("diffusion_model", FakeUNet())
        self.is_sdxl, self.is_sd2, self.is_sd1 = False, False, True
        self.toy = testing.ToyTextEncoder(dim=CTX)
        self.cond_stage_model = FakeCondStage(self.toy)
        self.sd_model_hash = "fake"

    def get_learned_conditioning(self, prompts):
        return self.toy.encode(list(prompts)).hidden.clone()

    def inner_model(self, x, sigma, cond):
        """k-diffusion's denoiser: x₀ = x − σ·ε(x, c)."""
        context = cond["c_crossattn"][0]
        eps = self.model.diffusion_model(x, context)
        return x - sigma.reshape(-1, 1, 1, 1) * eps


class FakeCFGDenoiser:
    def __init__(self, sd_model, callbacks=True):
        self.sd_model, self.callbacks = sd_model, callbacks

    # the real-webui tier overrides these four with modules.script_callbacks' classes and dispatchers
    def denoiser_params(self, x, image_cond, sigma, step, total, text_cond, text_uncond):
        return SimpleNamespace(
            x=x,
            image_cond=image_cond,
            sigma=sigma,
            sampling_step=step,
            total_sampling_steps=total,
            text_cond=text_cond,
            text_uncond=text_uncond,
            denoiser=self,
        )

    def denoised_params(self, x, step, total, inner_model):
        return SimpleNamespace(x=x, sampling_step=step, total_sampling_steps=total, inner_model=inner_model)

    def fire_denoiser(self, params):
        guards.on_cfg_denoiser(params)

    def fire_denoised(self, params):
        guards.on_cfg_denoised(params)

    def __call__(self, x, sigma, cond, uncond, cond_scale, step, total):
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        image_cond_in = torch.zeros(x_in.shape[0], 5, 1, 1)
        params = self.denoiser_params(x_in, image_cond_in, sigma_in, step, total, cond, uncond)
        if self.callbacks:
            self.fire_denoiser(params)
        x_in, sigma_in, tensor, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
        cond_in = torch.cat([tensor, uncond])
        x_out = self.sd_model.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in], "c_concat": [image_cond_in]})
        if self.callbacks:
            self.fire_denoised(self.denoised_params(x_out, step, total, self.sd_model.inner_model))
        n = tensor.shape[0]
        return x_out[n:] + cond_scale * (x_out[:n] - x_out[n:])


DENOISER = FakeCFGDenoiser  # swapped by the real-webui tier


def sample(sd_model, prompt=PROMPT, steps=3, sigma0=10.0, callbacks=True):
    """A tiny Euler loop; returns every step's denoised output."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=gen) * sigma0
    cond = sd_model.get_learned_conditioning([prompt])
    uncond = sd_model.get_learned_conditioning([""])
    den = DENOISER(sd_model, callbacks)
    outs = []
    sigmas = torch.linspace(sigma0, 1.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            s = sigmas[i].reshape(1)
            d = den(x, s, cond, uncond, 7.0, i, steps)
            outs.append(d.clone())
            x = x + (x - d) / s * (sigmas[i + 1] - s)
    return outs


def fake_p(sd_model, prompt=PROMPT):
    return SimpleNamespace(
        sd_model=sd_model,
        prompts=[prompt],
        all_prompts=[prompt],
        extra_generation_params={},
        comment=lambda text: None,
    )


def controller():
    return runtime.Controller(runtime.Host(), backend=be.Backend(be.A1111))


def ui(guard, preset="max", enabled=True, concepts=CONCEPT):
    return settings.UISettings(
        enabled=enabled, guards=[guard] if guard else [], guard_preset=preset, guard_concepts=concepts
    )


@pytest.fixture(autouse=True)
def _no_session():
    guards.remove()
    yield
    guards.remove()


def identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def no_instance_forward(sd_model):
    return all("forward" not in vars(m) for m in sd_model.model.modules())


def run_with(sd_model, settings_, prompt=PROMPT, sigma0=10.0):
    c = controller()
    p = fake_p(sd_model, prompt)
    c.begin(p, settings_)
    labels = c.apply_guards(p)
    outs = sample(sd_model, prompt, sigma0=sigma0)
    c.finish(p)
    return labels, outs, p


# ----------------------------------------------------------------------------------------------------
# disabled → bit-identical, nothing patched
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no_guard", "switch_off"])
def test_disabled_guards_are_bit_identical(case):
    sd_model = FakeSDModel()
    baseline = sample(sd_model, callbacks=False)
    s = ui(None) if case == "no_guard" else ui("token_suppress", enabled=False)
    c = controller()
    p = fake_p(sd_model)
    c.begin(p, s)
    assert c.apply_guards(p) == []
    assert guards.ACTIVE is None and no_instance_forward(sd_model)
    assert identical(sample(sd_model), baseline)


def test_every_guard_changes_the_output_and_restores_after_postprocess():
    sd_model = FakeSDModel()
    baseline = sample(sd_model, callbacks=False)
    weights = {k: v.clone() for k, v in sd_model.model.state_dict().items()}
    for guard in plugins.WIRED_GUARDS:
        labels, outs, p = run_with(sd_model, ui(guard))
        assert labels, guard
        assert "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
        assert not identical(outs, baseline), f"{guard} changed nothing"
        # after postprocess: no session, no instance forward, weights untouched → bit-identical again
        assert guards.ACTIVE is None and no_instance_forward(sd_model), guard
        assert all(torch.equal(v, weights[k]) for k, v in sd_model.model.state_dict().items())
        assert identical(sample(sd_model), baseline), guard


def test_strength_zero_configs_install_nothing(monkeypatch):
    sd_model = FakeSDModel()
    baseline = sample(sd_model, callbacks=False)
    real = guards.guard_configs

    def zero_strength(s):
        out = real(s)
        for config in out.values():
            config.strength = 0.0
        return out

    monkeypatch.setattr(guards, "guard_configs", zero_strength)
    labels, outs, _ = run_with(sd_model, ui("sld"))
    assert labels == [] and identical(outs, baseline)


# ----------------------------------------------------------------------------------------------------
# each guard calls its core function with the right tensors
# ----------------------------------------------------------------------------------------------------
def test_sld_gamma_gets_the_eps_of_cond_uncond_and_safety_and_edits_cond_rows(monkeypatch):
    sld = core_module("guards.sld")
    calls = []
    real = sld.sld_gamma

    def spy(eps_u, eps_p, eps_s, state, config, warmup):
        calls.append((eps_u.clone(), eps_p.clone(), eps_s.clone(), warmup))
        return real(eps_u, eps_p, eps_s, state, config, warmup)

    monkeypatch.setattr(sld, "sld_gamma", spy)
    sd_model = FakeSDModel()
    _, outs, _ = run_with(sd_model, ui("sld", preset="max"))
    assert len(calls) == 3
    eps_u, eps_p, eps_s, warmup = calls[0]
    assert warmup == 0  # "max": δ = 0
    # recompute the first step's three ε by hand: x₀ = x − σε ⇒ ε is the UNet output itself
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 4, generator=gen) * 10.0
    unet = sd_model.model.diffusion_model
    enc = sd_model.get_learned_conditioning
    with torch.no_grad():
        want_p = unet(x, enc([PROMPT]))
        want_u = unet(x, enc([""]))
        want_s = unet(x, enc([CONCEPT]))  # the guard concepts are SLD's safety concept
    for got, want in ((eps_p, want_p), (eps_u, want_u), (eps_s, want_s)):
        assert torch.allclose(got, want, atol=1e-4)


def test_safree_projects_the_prompt_rows_of_text_cond(monkeypatch):
    safree = core_module("guards.safree")
    seen = []
    real = safree.analyse

    def spy(config, prompt_hidden, *args, **kwargs):
        result = real(config, prompt_hidden, *args, **kwargs)
        seen.append((prompt_hidden.clone(), result))
        return result

    monkeypatch.setattr(safree, "analyse", spy)
    sd_model = FakeSDModel()
    conds = []
    real_cb = guards.GuardSession.on_cfg_denoiser

    def record(self, params):
        real_cb(self, params)
        conds.append(params.text_cond.clone())

    monkeypatch.setattr(guards.GuardSession, "on_cfg_denoiser", record)
    run_with(sd_model, ui("safree", preset="max"))
    ((prompt_hidden, result),) = seen
    assert torch.equal(prompt_hidden, sd_model.get_learned_conditioning([PROMPT])[0])
    assert result.changed, "the concept word must be flagged in a prompt that contains it"
    assert torch.equal(conds[0][0], result.hidden)  # the webui's text_cond now holds the projection


@pytest.mark.parametrize("preset", list(settings.GUARD_PRESETS))
def test_safree_presets_keep_self_validation_and_pick_the_measured_window(preset):
    """weak/medium = the paper's window; strong/max = 'whole' (issue #14, measured on the shapes world)."""
    (config,) = guards.guard_configs(ui("safree", preset=preset)).values()
    assert config.self_validating is True
    assert config.svf_window == ("whole" if preset in ("strong", "max") else "paper")
    assert guards.label("safree", config) == f"SAFREE(svf_window={config.svf_window})"


@pytest.mark.parametrize("preset", ["medium", "strong"])
def test_safree_window_on_the_webui_and_in_the_infotext(monkeypatch, preset):
    """strong ('whole'): every step samples with the projection; medium ('paper'): only the first t′ + 1 of
    50 (here: of the 3 steps, the first). The resolved setting is written into the infotext."""
    safree = core_module("guards.safree")
    seen = []
    real = safree.analyse

    def spy(config, *args, **kwargs):
        result = real(config, *args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(safree, "analyse", spy)
    sd_model = FakeSDModel()
    prompt_cond = sd_model.get_learned_conditioning([PROMPT])[0]
    conds = []
    real_cb = guards.GuardSession.on_cfg_denoiser

    def record(self, params):
        real_cb(self, params)
        conds.append(params.text_cond[0].clone())

    monkeypatch.setattr(guards.GuardSession, "on_cfg_denoiser", record)
    labels, _, p = run_with(sd_model, ui("safree", preset=preset))
    ((result,),) = [seen]
    assert result.t_prime >= 1 and result.changed, "the concept prompt must switch the projection on"
    projected = [torch.equal(c, result.hidden) for c in conds]
    if preset == "strong":
        assert result.filter_fraction == 1.0 and all(projected), projected
    else:
        on = int(result.filter_fraction * len(conds) + 1e-9)  # steps with step/total ≤ (t′ + 1)/50
        assert projected == [i <= on for i in range(len(conds))], (result.filter_fraction, projected)
        assert not all(projected) and all(torch.equal(c, prompt_cond) for c, hit in zip(conds, projected) if not hit)
    window = "whole" if preset == "strong" else "paper"
    assert labels == [f"SAFREE(svf_window={window})"]
    assert p.extra_generation_params[runtime.GUARDS_KEY] == f"SAFREE(svf_window={window})"


def test_token_suppression_biases_the_concept_columns_of_positive_rows_only(monkeypatch):
    ts = core_module("guards.token_suppress")
    calls = []
    real = ts.suppressed_attention

    def spy(q, k, v, heads, bias, plain=None):
        calls.append(bias.clone())
        return real(q, k, v, heads, bias, plain)

    monkeypatch.setattr(ts, "suppressed_attention", spy)
    sd_model = FakeSDModel()
    run_with(sd_model, ui("token_suppress", preset="max"))
    assert calls, "the patched attn2.forward never ran the suppression"
    bias = calls[0]
    assert bias.shape == (2, 77)
    concept_pos = PROMPT.split().index(CONCEPT) + 1  # after BOS
    assert bias[0, concept_pos] <= ts.DROP_BIAS  # factor 0 ("max") drops the column
    assert bias[0, 1] == 0  # "a" is kept
    assert not bool(bias[1].any())  # the uncond row is untouched


def test_concept_guidance_runs_nag_on_positive_rows_while_sigma_is_high(monkeypatch):
    cg = core_module("guards.concept_guidance")
    calls = []
    real = cg.nag

    def spy(z_pos, z_neg, phi, tau, alpha):
        calls.append((z_pos.shape, phi, alpha))
        return real(z_pos, z_neg, phi, tau, alpha)

    monkeypatch.setattr(cg, "nag", spy)
    sd_model = FakeSDModel()
    run_with(sd_model, ui("concept_guidance", preset="strong"), sigma0=6.0)
    assert calls
    shape, phi, alpha = calls[0]
    assert shape[0] == 1 and phi == guards.NAG_PHI["strong"] and alpha > 0
    # σ = 6, 4.33, 2.67 over 3 steps; NAG acts while σ ≥ 4 (SIGMA_END for sd1): 2 steps × 2 blocks
    assert len(calls) == 4


# ----------------------------------------------------------------------------------------------------
# lifecycle, errors, infotext
# ----------------------------------------------------------------------------------------------------
def test_reinstall_for_hires_and_restore_on_interrupted_run():
    sd_model = FakeSDModel()
    c = controller()
    p = fake_p(sd_model)
    c.begin(p, ui("token_suppress"))
    c.apply_guards(p)
    first = guards.ACTIVE
    c.apply_guards(p)  # process_before_every_sampling again (hires pass): one session, patched once
    assert guards.ACTIVE is not first
    assert sum("forward" in vars(m) for m in sd_model.model.modules()) == 2
    # a run that died before postprocess: the next begin() cleans up
    c.begin(fake_p(sd_model), ui(None))
    assert guards.ACTIVE is None and no_instance_forward(sd_model)


def test_forge_backend_refuses_guards_with_a_message():
    sd_model = FakeSDModel()
    c = runtime.Controller(runtime.Host(), backend=be.Backend(be.FORGE2))
    p = fake_p(sd_model)
    c.begin(p, ui("sld"))
    assert c.apply_guards(p) == []
    assert "Automatic1111" in p.extra_generation_params[runtime.ERROR_KEY]
    assert guards.ACTIVE is None and no_instance_forward(sd_model)
    assert not plugins.guard_available("sld", be.Backend(be.FORGE2))
    assert plugins.guard_available("sld", be.Backend(be.A1111))


def test_guard_settings_round_trip_through_the_infotext():
    s = settings.UISettings(
        enabled=True, guards=["sld", "token_suppress"], guard_preset="strong", guard_concepts="snoopy, mickey mouse"
    )
    text = s.to_infotext()
    back = settings.UISettings.from_dict(
        {n: settings.paste_getter(n)({settings.INFOTEXT_KEY: text}) for n in settings.ARG_ORDER}
    )
    assert back == s
    # and through the API's positional args
    assert settings.UISettings.from_args(s.to_args()) == s


def test_word_masked_prompts_cover_every_token_of_a_word():
    tokenize = lambda texts: [[7] * (2 if t == "snoopy" else 1) for t in texts]  # noqa: E731
    positions, texts, lengths = guards.word_masked_prompts("a snoopy", tokenize)
    assert positions == [1, 2, 3]
    assert texts == ["! snoopy", "a !", "a !"]


def test_attention_replaced_by_another_extension_stops_the_run_not_the_guard():
    """Fail closed: a guard that would not act in some blocks stops the generation with an error."""
    sd_model = FakeSDModel()
    name, foreign = next((n, m) for n, m in sd_model.model.named_modules() if n.endswith("attn2"))
    foreign.forward = lambda *a, **k: None  # another extension's instance forward
    c = controller()
    p = fake_p(sd_model)
    c.begin(p, ui("token_suppress"))
    assert c.apply_guards(p) == []
    assert "Concept Erasers error" in p.extra_generation_params
    assert name.split("diffusion_model.")[-1] in p.extra_generation_params["Concept Erasers error"]
    guarded = [m for m in sd_model.model.modules() if isinstance(vars(m).get("forward"), guards._Bound)]
    assert guarded == [] and guards.ACTIVE is None
    del foreign.forward
