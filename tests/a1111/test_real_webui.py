"""The glue against the real webui modules: the Lora built-in's own merge/restore code on a small model
with LDM-named layers and random weights (see conftest.py for when this runs)."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("a1111_glue_fakes", ROOT / "tests" / "unit" / "test_a1111_glue.py")
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)  # the fake model and helpers of the unit tier

from a1111_erasers import backend as be  # noqa: E402
from a1111_erasers import runtime, settings  # noqa: E402


def real_forward_all(networks, sd_model):
    """Run the Lora built-in's own lazy merge on every Linear, as its patched forward would (the webui
    samples under ``torch.no_grad()``, which the merge's in-place copies rely on)."""
    with torch.no_grad():
        for module in sd_model.model.modules():
            if isinstance(module, torch.nn.Linear):
                networks.network_apply_weights(module)


def set_current_model(monkeypatch, sd_model):
    """Make ``shared.sd_model`` return the toy model. On A1111 ≥ 1.6 it is a property backed by
    ``sd_models.model_data`` whose getter loads a checkpoint when none is set, so patch the backing field."""
    from modules import sd_models, shared

    model_data = getattr(sd_models, "model_data", None)
    if model_data is not None and hasattr(model_data, "sd_model"):
        monkeypatch.setattr(model_data, "sd_model", sd_model)
    else:
        monkeypatch.setattr(shared, "sd_model", sd_model, raising=False)


@pytest.mark.a1111_only("the Lora built-in's network_apply_weights merge (Forge merges through its ModelPatcher)")
def test_real_lora_merge_enable_disable_and_compose(webui, tmp_path, monkeypatch):
    networks, network = webui["networks"], webui["network"]
    sd_model = fakes.FakeSDModel()
    set_current_model(monkeypatch, sd_model)
    for name, module in sd_model.model.named_modules():
        module.network_layer_name = name.replace(".", "_")
    controller = runtime.Controller(
        runtime.Host(models_path=str(tmp_path)), backend=be.Backend(be.A1111, networks, network)
    )
    original = fakes.snapshot(sd_model)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    layer = sd_model.model.diffusion_model.get_submodule(key[:-7])

    p = fakes.FakeP(sd_model)
    controller.begin(p, fakes.UCE_UI)
    networks.loaded_networks.clear()
    controller.apply_weights(p, "networks")
    assert all(isinstance(n, network.Network) for n in networks.loaded_networks)
    real_forward_all(networks, sd_model)
    (eraser,) = controller.erasers.values()
    fakes.close(layer.weight, original["diffusion_model." + key] + eraser.dense(key), atol=1e-5)
    controller.finish(p)

    lora = fakes.UserLora(sd_model)
    networks.loaded_networks[:] = [lora]
    p2 = fakes.FakeP(sd_model)
    controller.begin(p2, fakes.UCE_UI)
    controller.apply_weights(p2, "networks")
    real_forward_all(networks, sd_model)
    lora_k = lora.deltas["diffusion_model_" + key[:-7].replace(".", "_")]
    fakes.close(layer.weight, original["diffusion_model." + key] + lora_k + eraser.dense(key), atol=1e-5)
    controller.finish(p2)

    networks.loaded_networks.clear()
    p3 = fakes.FakeP(sd_model)
    controller.begin(p3, settings.UISettings())
    controller.apply_weights(p3, "networks")
    real_forward_all(networks, sd_model)
    fakes.assert_bit_identical(sd_model, original)


def test_real_infotext_round_trip(webui):
    try:
        from modules import infotext_utils as iu
    except ImportError:
        from modules import generation_parameters_copypaste as iu
    ui = settings.UISettings(enabled=True, concepts="Van Gogh, Monet", anchors="art", strength=0.7)
    # the webui only reads the last line as parameters when it holds at least three "Key: value" pairs
    text = (
        "a painting\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, "
        f"{settings.INFOTEXT_KEY}: {iu.quote(ui.to_infotext())}"
    )
    params = iu.parse_generation_parameters(text)
    pasted = settings.UISettings.from_dict({n: settings.paste_getter(n)(params) for n in settings.ARG_ORDER})
    assert pasted == ui


@pytest.mark.forge2_only("Forge 2's ModelPatcher.add_patches / LoraLoader merge and restore")
def test_real_forge2_patcher_merges_composes_and_restores_bit_identically(webui, tmp_path):
    """Forge 2's own objects around the small random-weight UNet: ``UnetPatcher`` (``add_patches`` on a clone)
    and ``LoraLoader.refresh`` (what ``memory_management`` runs when it loads the UNet for sampling), reset
    per pass from ``forge_objects_after_applying_lora`` as ``modules.processing`` does."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.patcher.unet import UnetPatcher

    sd_model = fakes.FakeSDModel()
    kmodel = torch.nn.Module()  # stands in for Forge's KModel: parameters named "diffusion_model.<canonical>"
    kmodel.add_module("diffusion_model", sd_model.model.diffusion_model)
    cpu = torch.device("cpu")
    base = UnetPatcher(kmodel, load_device=cpu, offload_device=cpu)
    sd_model.forge_objects_original = ForgeObjects(base, None, None, None)
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)))  # detected by import probing
    assert controller.backend.kind == be.FORGE2 and controller.backend.weight_route == "forge"
    original = fakes.snapshot(sd_model)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

    def weight():  # looked up each time: Forge swaps the Parameter objects when it merges and restores
        return kmodel.get_parameter("diffusion_model." + key)

    def generation(ui, strength=None):
        p = fakes.FakeP(sd_model)
        sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
        controller.begin(p, ui)
        controller.apply_weights(p, "networks")
        sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
        controller.apply_weights(p, "sampling")  # process_before_every_sampling
        assert "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
        sd_model.forge_objects.unet.refresh_loras()  # the merge memory_management does before sampling
        controller.finish(p)
        return p

    ui = settings.UISettings(**{**fakes.UCE_UI.__dict__, "strength": 0.7})
    generation(ui)
    (eraser,) = controller.erasers.values()
    fakes.close(weight(), original["diffusion_model." + key] + 0.7 * eraser.dense(key), atol=1e-5)
    assert base.lora_patches == {}  # only the per-pass clone carried our patches

    generation(ui)  # solved against the checkpoint's weights (Forge's backup), not the merged ones: cache hit
    assert len(controller.erasers) == 1
    fakes.close(weight(), original["diffusion_model." + key] + 0.7 * eraser.dense(key), atol=1e-5)

    # a user LoRA as sd_forge_lora adds it (on forge_objects_after_applying_lora): both are merged
    lora_delta = torch.randn(weight().shape, generator=torch.Generator().manual_seed(5)) * 0.01
    with_lora = base.clone()
    with_lora.add_patches(
        filename="user_lora.safetensors",
        patches={"diffusion_model." + key: (lora_delta,)},
        strength_patch=1.0,
        strength_model=1.0,
    )
    sd_model.forge_objects_after_applying_lora = ForgeObjects(with_lora, None, None, None)
    generation(ui)
    fakes.close(weight(), original["diffusion_model." + key] + lora_delta + 0.7 * eraser.dense(key), atol=1e-5)

    # erasers off and the LoRA gone: Forge restores from its backup, bit for bit
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()
    generation(settings.UISettings())
    fakes.assert_bit_identical(sd_model, original)
    assert base.lora_loader.backup == {}

    # Forge 2's ModelPatcher.model_dtype() is None for its KModel; a half-stored UNet still gets half diffs
    from a1111_erasers import inject

    assert base.model_dtype() is None and inject.patch_dtype(base) == torch.float32
    kmodel.storage_dtype = torch.float16
    assert inject.patch_dtype(base) == torch.float16


@pytest.mark.forge2_only("Forge 2's ClassicTextProcessingEngine and its shipped CLIP tokenizer")
def test_real_forge2_closed_form_through_its_text_engine(webui, tmp_path):
    """A UCE solve whose prompts go through Forge 2's own text path: the real ``ClassicTextProcessingEngine``
    with the CLIP tokenizer Forge ships, over a one-layer random-weight CLIP text model, and
    ``get_learned_conditioning`` under ``torch.inference_mode`` exactly as Forge's SD1.5 engine runs it."""
    import transformers
    from backend.diffusion_engine.base import ForgeObjects
    from backend.nn.clip import IntegratedCLIP
    from backend.patcher.unet import UnetPatcher
    from backend.text_processing.classic_engine import ClassicTextProcessingEngine

    hf = (
        Path(webui["scripts"].__file__).resolve().parents[1]
        / "backend"
        / "huggingface"
        / "runwayml"
        / "stable-diffusion-v1-5"
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf / "tokenizer"))
    config = transformers.CLIPTextConfig.from_pretrained(str(hf / "text_encoder"), num_hidden_layers=1)
    torch.manual_seed(0)
    clip = IntegratedCLIP(transformers.CLIPTextModel, config).eval()
    engine = ClassicTextProcessingEngine(
        text_encoder=clip,
        tokenizer=tokenizer,
        embedding_dir=None,
        embedding_key="clip_l",
        embedding_expected_shape=768,
        emphasis_name="Original",
        text_projection=False,
        minimal_clip_skip=1,
        clip_skip=1,
        return_pooled=False,
        final_layer_norm=True,
    )

    class ForgeSD15:  # the parts of backend.diffusion_engine.sd15.StableDiffusion the glue uses
        is_sd1, is_sd2, is_sdxl = True, False, False
        text_processing_engine = engine

        @torch.inference_mode()
        def get_learned_conditioning(self, prompt):
            return engine(prompt)

    sd_model = ForgeSD15()
    kmodel = torch.nn.Module()
    kmodel.add_module("diffusion_model", fakes.build_unet())
    cpu = torch.device("cpu")
    sd_model.forge_objects = ForgeObjects(UnetPatcher(kmodel, load_device=cpu, offload_device=cpu), None, None, None)
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)))
    p = fakes.FakeP(sd_model)
    controller.begin(p, fakes.UCE_UI)
    entries = controller.apply_weights(p, "sampling")
    assert "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
    assert len(entries) == 1 and entries[0].label == "uce(van gogh)"
    (eraser,) = controller.erasers.values()
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert float(eraser.dense(key).abs().max()) > 0
    assert set(sd_model.forge_objects.unet.lora_patches) == {(entries[0].name, 1.0, 1.0, False)}


@pytest.mark.forge2_only("Forge 2's extra_networks prompt parsing/activation feeding its UnetPatcher")
def test_real_forge2_eraser_tag_through_extra_networks(webui, tmp_path, monkeypatch):
    """``<eraser:name:0.5>`` parsed and activated by Forge's own ``modules.extra_networks`` (with our network
    registered), then applied before sampling as an ``add_patches`` patch at strength 0.5."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.patcher.unet import UnetPatcher
    from modules import extra_networks

    from a1111_erasers import extra_networks as en

    eraser, _ = fakes.save_eraser(tmp_path, "snoopy_eraser")
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)))
    monkeypatch.setattr(extra_networks, "extra_network_registry", {})
    monkeypatch.setattr(extra_networks, "extra_network_aliases", {}, raising=False)
    extra_networks.register_extra_network(en.make_extra_network(extra_networks, "eraser", controller))
    sd_model = fakes.FakeSDModel()
    kmodel = torch.nn.Module()
    kmodel.add_module("diffusion_model", sd_model.model.diffusion_model)
    cpu = torch.device("cpu")
    sd_model.forge_objects = ForgeObjects(UnetPatcher(kmodel, load_device=cpu, offload_device=cpu), None, None, None)
    p = fakes.FakeP(sd_model, prompts=("a dog <eraser:snoopy_eraser:0.5>",))
    p.scripts = None  # activate() then calls scripts' after_extra_networks_activate when set
    controller.begin(p, settings.UISettings())
    prompts, data = extra_networks.parse_prompts(p.prompts)
    assert prompts == ["a dog "], prompts
    extra_networks.activate(p, data)
    (entry,) = controller.apply_weights(p, "sampling")
    assert "Concept Erasers error" not in p.extra_generation_params, p.extra_generation_params
    assert set(sd_model.forge_objects.unet.lora_patches) == {(entry.name, 0.5, 1.0, False)}
    sd_model.forge_objects.unet.refresh_loras()
    key = "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    original = fakes.build_unet().get_parameter(key)
    fakes.close(kmodel.get_parameter("diffusion_model." + key), original + 0.5 * eraser.dense(key), atol=1e-5)
