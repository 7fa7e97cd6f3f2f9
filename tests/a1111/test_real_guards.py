"""The sampling-time guards against the real webui: ``modules.script_callbacks`` (registration, the
``CFGDenoiserParams`` / ``CFGDenoisedParams`` classes and their dispatchers), the real
``ldm.modules.attention.CrossAttention`` with A1111's "sdp" optimiser installed as its class forward
(``modules.sd_hijack_optimizations``), on a two-block random-weight UNet (see conftest.py for when this runs).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("a1111_guard_fakes", ROOT / "tests" / "unit" / "test_a1111_guards.py")
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)

from a1111_erasers import guards  # noqa: E402


@pytest.fixture
def real(webui, monkeypatch):
    import ldm.modules.attention as attention
    from modules import script_callbacks, sd_hijack_optimizations

    # A1111's optimiser replaces CrossAttention.forward at class level; put the "sdp" one in for this test
    monkeypatch.setattr(
        attention.CrossAttention, "forward", sd_hijack_optimizations.scaled_dot_product_attention_forward
    )

    class RealCallbacksDenoiser(fakes.FakeCFGDenoiser):
        def denoiser_params(self, x, image_cond, sigma, step, total, text_cond, text_uncond):
            return script_callbacks.CFGDenoiserParams(x, image_cond, sigma, step, total, text_cond, text_uncond, self)

        def denoised_params(self, x, step, total, inner_model):
            return script_callbacks.CFGDenoisedParams(x, step, total, inner_model)

        def fire_denoiser(self, params):
            script_callbacks.cfg_denoiser_callback(params)

        def fire_denoised(self, params):
            script_callbacks.cfg_denoised_callback(params)

    monkeypatch.setattr(fakes, "DENOISER", RealCallbacksDenoiser)
    script_callbacks.on_cfg_denoiser(guards.on_cfg_denoiser)
    script_callbacks.on_cfg_denoised(guards.on_cfg_denoised)
    yield attention
    script_callbacks.remove_callbacks_for_function(guards.on_cfg_denoiser)
    script_callbacks.remove_callbacks_for_function(guards.on_cfg_denoised)
    guards.remove()


def real_sd_model(attention):
    """The fake model with every attn2 replaced by a real ldm CrossAttention (seeded weights). Inner dim =
    query dim, as in every SD UNet (A1111's optimised forwards take the head size from the query width)."""
    sd_model = fakes.FakeSDModel()
    gen = torch.Generator().manual_seed(3)
    for block in sd_model.model.diffusion_model.input_blocks:
        layer = attention.CrossAttention(
            fakes.DIM, context_dim=fakes.CTX, heads=fakes.HEADS, dim_head=fakes.DIM // fakes.HEADS
        )
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        block.attn2 = layer
    return sd_model


@pytest.mark.a1111_only("the guards hook A1111's CFGDenoiser callbacks and ldm attention (refused on Forge)")
@pytest.mark.parametrize("guard", ["safree", "sld", "token_suppress", "concept_guidance"])
def test_real_guard_changes_sampling_and_restores(real, guard):
    sd_model = real_sd_model(real)
    baseline = fakes.sample(sd_model, callbacks=False)
    assert fakes.identical(fakes.sample(sd_model), baseline)  # callbacks registered, no session: inert
    labels, outs, p = fakes.run_with(sd_model, fakes.ui(guard, preset="max"))
    assert labels and "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
    assert not fakes.identical(outs, baseline)
    assert guards.ACTIVE is None and fakes.no_instance_forward(sd_model)
    assert fakes.identical(fakes.sample(sd_model), baseline)


@pytest.mark.a1111_only("ldm CrossAttention and A1111's sdp optimiser")
def test_real_token_suppression_uses_the_patched_forward_not_the_optimiser(real, monkeypatch):
    calls = []
    original = real.CrossAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(real.CrossAttention, "forward", counting)
    sd_model = real_sd_model(real)
    fakes.run_with(sd_model, fakes.ui("token_suppress", preset="max"))
    # every attn2 call had a guarded positive row, so the instance forward computed attention itself
    assert calls == []
    fakes.sample(sd_model)
    assert len(calls) == 2 * 3  # after restore: the class forward again, 2 blocks × 3 steps


def test_real_gradio_accordion_offers_the_guards_on_a1111(webui, tmp_path):
    """The accordion built with the webui's own gradio: the guard controls are live on A1111 and their
    components sit at the API arg positions 12–14."""
    import gradio as gr

    from a1111_erasers import backend as be
    from a1111_erasers import runtime, settings, ui

    class ScriptStub:
        pass

    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)), backend=be.Backend(be.A1111))
    script = ScriptStub()
    with gr.Blocks():
        components = ui.build(script, False, controller)
    assert len(components) == len(settings.ARG_ORDER)
    guards_dd = components[settings.ARG_ORDER.index("guards")]
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in guards_dd.choices]
    assert set(choices) == {"safree", "sld", "concept_guidance", "token_suppress"}
    assert guards_dd.interactive is not False
    assert settings.ARG_ORDER[12:15] == ("guards", "guard_preset", "guard_concepts")

    forge = runtime.Controller(runtime.Host(models_path=str(tmp_path)), backend=be.Backend(be.FORGE2))
    with gr.Blocks():
        components = ui.build(ScriptStub(), False, forge)
    assert components[settings.ARG_ORDER.index("guards")].interactive is False  # disabled, with a message


@pytest.mark.forge2_only("the guards are deliberately not wired on Forge")
@pytest.mark.parametrize("guard", ["safree", "sld", "token_suppress", "concept_guidance"])
def test_real_forge2_refuses_the_guards_with_a_message(webui, monkeypatch, guard):
    """Through the entry script as Forge's ``script_loading`` loads it: a guard requested on Forge stops the
    generation (Forge's own ``shared.state.interrupt``) with the reason, and patches nothing."""
    import sys

    from modules import script_callbacks, script_loading, shared

    monkeypatch.setattr(sys, "path", [str(ROOT)] + sys.path)
    before = {k: list(v) for k, v in script_callbacks.callback_map.items()}
    monkeypatch.setattr(shared.state, "interrupted", False)
    module = script_loading.load_module(str(ROOT / "scripts" / "concept_erasers_a1111.py"))
    try:
        script = module.ConceptErasersScript()
        sd_model = fakes.FakeSDModel()
        p = fakes.fake_p(sd_model, fakes.PROMPT)
        args = fakes.ui(guard, preset="max").to_args()
        script.before_process(p, *args)
        script.process_before_every_sampling(p, *args)
        message = p.extra_generation_params.get("Concept Erasers error", "")
        assert "not available" in message and "Forge 2" in message, p.extra_generation_params
        assert shared.state.interrupted, "the generation was not stopped"
        assert module.guards.ACTIVE is None and fakes.no_instance_forward(sd_model)
        script.postprocess(p, None, *args)
    finally:
        for key, callbacks in script_callbacks.callback_map.items():
            callbacks[:] = before.get(key, [])


@pytest.mark.a1111_only("the guards are wired on A1111 only")
def test_real_entry_script_installs_the_guards_in_the_hook_this_webui_calls(real, monkeypatch):
    """Through the entry script as ``script_loading`` loads it (with its own copy of the glue package and its
    own callback registrations), in the order the webui's ScriptRunner calls its hooks: a webui whose
    ``scripts.Script`` has ``process_before_every_sampling`` (1.10+) gets the guards there — once per
    sampling pass, so hires fix is covered — an older one in ``process_batch``."""
    import sys

    from modules import script_callbacks, script_loading, scripts

    monkeypatch.setattr(sys, "path", [str(ROOT)] + sys.path)
    before = {k: list(v) for k, v in script_callbacks.callback_map.items()}
    module = script_loading.load_module(str(ROOT / "scripts" / "concept_erasers_a1111.py"))
    glue_guards = module.guards  # not ``guards`` above: the script imports the glue under its own name
    newer = hasattr(scripts.Script, "process_before_every_sampling")
    try:
        sd_model = real_sd_model(real)
        baseline = fakes.sample(sd_model, callbacks=False)
        script = module.ConceptErasersScript()
        p = fakes.fake_p(sd_model, fakes.PROMPT)
        args = fakes.ui("token_suppress", preset="max").to_args()
        script.before_process(p, *args)
        script.process_batch(p, *args, batch_number=0, prompts=p.prompts, seeds=[1], subseeds=[1])
        assert (glue_guards.ACTIVE is None) == newer, "guards installed in the wrong hook for this webui"
        if newer:
            script.process_before_every_sampling(p, *args)
        assert glue_guards.ACTIVE is not None, p.extra_generation_params
        assert "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
        outs = fakes.sample(sd_model)
        script.postprocess(p, None, *args)
        assert not fakes.identical(outs, baseline)
        assert glue_guards.ACTIVE is None and fakes.no_instance_forward(sd_model)
        assert fakes.identical(fakes.sample(sd_model), baseline)
    finally:
        glue_guards.remove()
        for key, callbacks in script_callbacks.callback_map.items():
            callbacks[:] = before.get(key, [])
