"""The A1111/Forge glue (``a1111_erasers/``) on small fakes of the webui objects it touches.

The fake ``networks`` module below re-implements the behaviour of the built-in Lora extension that the
glue relies on (a1111_host.md §A2.5): a CPU backup taken before the first merge, restore + re-merge of
every loaded network whenever ``wanted_names`` changes, ``calc_updown`` → (ΔW, bias). The fake model has
full-size SD1.x cross-attention layers under their LDM names with random weights.
"""

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import erasers  # noqa: E402,F401  (imported first, so load_core reuses it and erasers_dev.testing shares its classes)
from a1111_erasers import backend as be  # noqa: E402
from a1111_erasers import extra_networks as en  # noqa: E402
from a1111_erasers import files, inject, runtime, settings, tags  # noqa: E402
from a1111_erasers.core import CORE_NAME, load_core  # noqa: E402
from a1111_erasers.text_encoder import WebuiTextEncoder  # noqa: E402
from erasers_dev import testing  # noqa: E402

core = load_core()
families = __import__(f"{core.__name__}.files.families", fromlist=["x"])
eraser_file = __import__(f"{core.__name__}.files.eraser_file", fromlist=["x"])
eraser_mod = __import__(f"{core.__name__}.edits.eraser", fromlist=["x"])
methods = __import__(f"{core.__name__}.edits.methods", fromlist=["x"])


# ----------------------------------------------------------------------------------------------------
# fakes
# ----------------------------------------------------------------------------------------------------
SMALL = 16  # to_q / to_out / attn1 are not edited: small stand-ins keep the fake cheap


def _linear(out_f, in_f, gen, bias=False):
    layer = torch.nn.utils.skip_init(torch.nn.Linear, in_f, out_f, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return layer


_UNETS = {}


def build_unet(seed=0):
    """nn.Module tree whose named_modules() are the LDM names, with full-size SD1.x attn2 to_k / to_v."""
    if seed not in _UNETS:
        gen = torch.Generator().manual_seed(seed)
        root = torch.nn.Module()
        for key, shape in testing.layer_shapes(families.Family.SD1).items():
            if not key.endswith("attn2.to_k.weight"):
                continue
            block = key[: -len(".attn2.to_k.weight")]
            out_f, ctx = shape
            parent = root
            for part in block.split("."):
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            attn2 = torch.nn.Module()
            attn2.add_module("to_q", _linear(SMALL, SMALL, gen))
            attn2.add_module("to_k", _linear(out_f, ctx, gen))
            attn2.add_module("to_v", _linear(out_f, ctx, gen))
            attn2.add_module("to_out", torch.nn.Sequential(_linear(SMALL, SMALL, gen, bias=True)))
            attn1 = torch.nn.Module()
            attn1.add_module("to_q", _linear(SMALL, SMALL, gen))
            parent.add_module("attn1", attn1)
            parent.add_module("attn2", attn2)
        _UNETS[seed] = root
    return copy.deepcopy(_UNETS[seed])


def close(actual, expected, atol=1e-6):
    diff = float((actual.detach().float() - expected.float()).abs().max())
    assert diff <= atol, f"max |difference| {diff:.3g} > {atol}"


class FakeCondStageModel:
    """The webui's prompt wrapper: ``tokenize`` without BOS/EOS, ``id_start`` / ``id_end``."""

    def __init__(self, toy):
        self.toy = toy
        self.id_start, self.id_end = toy.BOS, toy.EOS

    def tokenize(self, texts):
        return [self.toy.tokenize(t)[1:-1] for t in texts]


class FakeSDModel:
    def __init__(self, seed=0):
        self.model = torch.nn.Module()
        self.model.add_module("diffusion_model", build_unet(seed=seed))
        self.is_sdxl, self.is_sd2, self.is_sd1 = False, False, True
        self.toy = testing.ToyTextEncoder(dim=768)
        self.cond_stage_model = FakeCondStageModel(self.toy)
        self.encode_calls = 0
        self.sd_model_hash = "fake"

    def get_learned_conditioning(self, prompts):
        self.encode_calls += 1
        return self.toy.encode(list(prompts)).hidden.clone()


def make_fake_networks():
    """A module shaped like the Lora built-in's ``networks`` with its merge/restore semantics."""
    mod = types.ModuleType("networks")
    mod.loaded_networks = []

    def assign_network_names_to_compvis_modules(sd_model):
        for name, module in sd_model.model.named_modules():
            module.network_layer_name = name.replace(".", "_")

    def network_apply_weights(layer):
        name = getattr(layer, "network_layer_name", None)
        if name is None:
            return
        current = getattr(layer, "network_current_names", ())
        wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in mod.loaded_networks)
        backup = getattr(layer, "network_weights_backup", None)
        if backup is None and wanted != ():
            if current != ():
                raise RuntimeError("no backup weights found and current weights are not unchanged")
            layer.network_weights_backup = layer.weight.detach().to("cpu", copy=True)
        if current != wanted:
            with torch.no_grad():
                if getattr(layer, "network_weights_backup", None) is not None:
                    layer.weight.copy_(layer.network_weights_backup)
                for net in mod.loaded_networks:
                    module = net.modules.get(name)
                    if module is None:
                        continue
                    updown, ex_bias = module.calc_updown(layer.weight)
                    layer.weight.copy_((layer.weight.to(updown.dtype) + updown).to(layer.weight.dtype))
            layer.network_current_names = wanted

    def forward_all(sd_model):
        """What a generation's forward passes do to every Linear (the Lora extension's patched forward)."""
        for module in sd_model.model.modules():
            if isinstance(module, torch.nn.Linear):
                network_apply_weights(module)

    mod.assign_network_names_to_compvis_modules = assign_network_names_to_compvis_modules
    mod.network_apply_weights = network_apply_weights
    mod.forward_all = forward_all
    return mod


class UserLora:
    """A user's ``<lora:…>`` network touching one attn2.to_k layer (and one attn1 layer)."""

    def __init__(self, sd_model, multiplier=1.0, seed=5):
        gen = torch.Generator().manual_seed(seed)
        self.name, self.te_multiplier, self.unet_multiplier, self.dyn_dim = "user_lora", multiplier, multiplier, None
        self.targets = {
            "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (320, 768),
            "diffusion_model_middle_block_1_transformer_blocks_0_attn1_to_q": (SMALL, SMALL),
        }
        self.deltas = {k: 0.01 * torch.randn(s, generator=gen) for k, s in self.targets.items()}
        self.modules = {
            k: types.SimpleNamespace(calc_updown=(lambda w, d=d: (d * self.unet_multiplier, None)))
            for k, d in self.deltas.items()
        }
        self.bundle_embeddings = {}


class FakeP:
    def __init__(self, sd_model, prompts=("a photo",)):
        self.sd_model = sd_model
        self.prompts = list(prompts)
        self.extra_generation_params = {}
        self.comments = []

    def comment(self, text):
        self.comments.append(text)


def snapshot(sd_model):
    return {k: v.detach().clone() for k, v in sd_model.model.state_dict().items()}


def assert_bit_identical(sd_model, snap):
    for key, value in sd_model.model.state_dict().items():
        assert torch.equal(value, snap[key]), f"{key} differs from the checkpoint"


def lora_controller(tmp_path, networks=None):
    networks = networks or make_fake_networks()
    backend = be.Backend(be.A1111, networks, None)
    interrupts = []
    host = runtime.Host(models_path=str(tmp_path), interrupt=lambda: interrupts.append(1))
    return runtime.Controller(host, backend=backend), networks, interrupts


def run_generation(controller, networks, sd_model, ui, user_loras=(), tag_requests=None):
    """The webui's order of calls for one txt2img generation with one batch."""
    p = FakeP(sd_model)
    controller.begin(p, ui)
    networks.loaded_networks[:] = list(user_loras)  # Lora's activate() refills the list every batch
    if tag_requests:
        controller.set_tags(p, "eraser", tag_requests)
    controller.apply_weights(p, "networks")  # after_extra_networks_activate
    controller.apply_weights(p, "sampling")  # process_before_every_sampling
    networks.forward_all(sd_model)  # sampling
    controller.finish(p)  # postprocess
    return p


UCE_UI = settings.UISettings(enabled=True, method="uce", concepts="van gogh", anchors="art")


# ----------------------------------------------------------------------------------------------------
# weights through the Lora machinery
# ----------------------------------------------------------------------------------------------------
def test_enable_changes_kv_by_the_eraser_delta_and_disable_restores_bit_for_bit(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)

    p = run_generation(controller, networks, sd_model, UCE_UI)
    assert "Concept Erasers" in p.extra_generation_params
    (eraser,) = controller.erasers.values()
    kv = inject.text_projection_modules(sd_model.model.diffusion_model)
    assert len(kv) == 32 and set(eraser.deltas) == set(kv)
    for key, module in kv.items():
        expected = original["diffusion_model." + key] + eraser.dense(key)
        close(module.weight.detach(), expected, atol=1e-6)
        assert not torch.equal(module.weight.detach(), original["diffusion_model." + key])
    # nothing but attn2 K/V moved
    for key, value in sd_model.model.state_dict().items():
        if not inject.KV.search(key[: -len(".weight")]):
            assert torch.equal(value, original[key]), key
    # our networks left the list at postprocess
    assert not any(inject.is_ours(n) for n in networks.loaded_networks)

    run_generation(controller, networks, sd_model, settings.UISettings(enabled=False, concepts="van gogh"))
    assert_bit_identical(sd_model, original)


def test_lora_and_eraser_are_both_applied_then_each_removed_cleanly(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    lora = UserLora(sd_model)
    k_key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    q_key = "middle_block.1.transformer_blocks.0.attn1.to_q.weight"

    run_generation(controller, networks, sd_model, UCE_UI, user_loras=[lora])
    (eraser,) = controller.erasers.values()
    k = sd_model.model.diffusion_model.get_submodule(k_key[:-7]).weight.detach()
    lora_k = lora.deltas["diffusion_model_" + k_key[:-7].replace(".", "_")]
    close(k, original["diffusion_model." + k_key] + lora_k + eraser.dense(k_key), atol=1e-6)
    q = sd_model.model.diffusion_model.get_submodule(q_key[:-7]).weight.detach()
    lora_q = lora.deltas["diffusion_model_" + q_key[:-7].replace(".", "_")]
    close(q, original["diffusion_model." + q_key] + lora_q, atol=1e-6)

    # eraser off, LoRA still on: exactly the LoRA
    run_generation(controller, networks, sd_model, settings.UISettings(), user_loras=[lora])
    close(
        sd_model.model.diffusion_model.get_submodule(k_key[:-7]).weight.detach(),
        original["diffusion_model." + k_key] + lora_k,
        atol=1e-6,
    )
    # eraser computed from the checkpoint weights, not the LoRA-merged ones: same eraser reused
    run_generation(controller, networks, sd_model, UCE_UI, user_loras=[lora])
    assert len(controller.erasers) == 1
    # neither: the checkpoint, bit for bit
    run_generation(controller, networks, sd_model, settings.UISettings())
    assert_bit_identical(sd_model, original)


def test_strength_scales_the_delta_and_zero_applies_nothing(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    key = "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    half = settings.UISettings(**{**UCE_UI.__dict__, "strength": 0.5})
    run_generation(controller, networks, sd_model, half)
    (eraser,) = controller.erasers.values()
    close(
        sd_model.model.diffusion_model.get_submodule(key[:-7]).weight.detach(),
        original["diffusion_model." + key] + 0.5 * eraser.dense(key),
        atol=1e-6,
    )
    zero = settings.UISettings(**{**UCE_UI.__dict__, "strength": 0.0})
    p = FakeP(sd_model)
    controller.begin(p, zero)
    assert controller.apply_weights(p, "networks") == []
    networks.forward_all(sd_model)
    assert_bit_identical(sd_model, original)


def test_closed_form_is_cached_per_model_and_settings_and_invalidated_on_model_load(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    run_generation(controller, networks, sd_model, UCE_UI)
    calls = sd_model.encode_calls
    assert calls > 0
    run_generation(controller, networks, sd_model, UCE_UI)
    assert sd_model.encode_calls == calls  # same model + settings: nothing re-encoded or re-solved
    other = settings.UISettings(**{**UCE_UI.__dict__, "concepts": "snoopy"})
    run_generation(controller, networks, sd_model, other)
    assert sd_model.encode_calls > calls and len(controller.erasers) == 2
    controller.invalidate(sd_model)  # on_model_loaded
    assert len(controller.erasers) == 0
    # a different checkpoint (other weights) gets its own eraser even without invalidation
    run_generation(controller, networks, sd_model, UCE_UI)
    other_model = FakeSDModel(seed=1)
    networks.assign_network_names_to_compvis_modules(other_model)
    run_generation(controller, networks, other_model, UCE_UI)
    assert len(controller.erasers) == 2


def test_the_network_names_change_with_content_so_lora_remerges(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    p = FakeP(sd_model)
    controller.begin(p, UCE_UI)
    first = controller.apply_weights(p, "networks")
    again = controller.apply_weights(p, "sampling")
    assert [e.name for e in first] == [e.name for e in again]  # idempotent within a batch
    assert sum(inject.is_ours(n) for n in networks.loaded_networks) == 1  # not appended twice
    p2 = FakeP(sd_model)
    controller.begin(p2, settings.UISettings(**{**UCE_UI.__dict__, "concepts": "snoopy"}))
    assert controller.apply_weights(p2, "networks")[0].name != first[0].name
    # network_layer_name assigned when the Lora extension had not done it yet
    assert all(
        hasattr(m, "network_layer_name")
        for m in inject.text_projection_modules(sd_model.model.diffusion_model).values()
    )


# ----------------------------------------------------------------------------------------------------
# the other routes
# ----------------------------------------------------------------------------------------------------
def test_direct_route_applies_before_sampling_and_restores_bit_for_bit(tmp_path):
    sd_model = FakeSDModel()
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)), backend=be.Backend(be.A1111))
    assert controller.backend.weight_route == "direct"
    original = snapshot(sd_model)
    p = FakeP(sd_model)
    controller.begin(p, UCE_UI)
    controller.apply_weights(p, "networks")
    assert_bit_identical(sd_model, original)  # nothing before sampling
    controller.apply_weights(p, "sampling")
    controller.apply_weights(p, "sampling")  # hires pass: idempotent, not applied twice
    (eraser,) = controller.erasers.values()
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    close(
        sd_model.model.diffusion_model.get_submodule(key[:-7]).weight.detach(),
        original["diffusion_model." + key] + eraser.dense(key),
        atol=1e-6,
    )
    controller.finish(p)
    assert_bit_identical(sd_model, original)
    # a generation that died before postprocess is cleaned up by the next one, and by a model load
    controller.begin(p, UCE_UI)
    controller.apply_weights(p, "sampling")
    controller.invalidate(sd_model)
    assert_bit_identical(sd_model, original)


class FakeForgePatcher:
    def __init__(self, model, forge2=True):
        self.model = model
        self.patches = {}
        self.forge2 = forge2
        if forge2:
            self.add_patches = self._add_patches_forge2
        else:
            self.add_patches = self._add_patches_forge1

    def clone(self):
        other = FakeForgePatcher(self.model, self.forge2)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        return other

    def _add_patches_forge2(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model, filename))

    def _add_patches_forge1(self, patches, strength_patch=1.0, strength_model=1.0):
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None))


@pytest.mark.parametrize("forge2", [True, False])
def test_forge_route_patches_a_clone_through_add_patches(tmp_path, forge2):
    sd_model = FakeSDModel()
    kmodel = torch.nn.Module()
    kmodel.add_module("diffusion_model", sd_model.model.diffusion_model)
    base = FakeForgePatcher(kmodel, forge2)
    sd_model.forge_objects = types.SimpleNamespace(unet=base, clip=None)
    original = snapshot(sd_model)
    kind = be.FORGE2 if forge2 else be.FORGE1
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)), backend=be.Backend(kind))
    p = FakeP(sd_model)
    ui = settings.UISettings(**{**UCE_UI.__dict__, "strength": 0.7})
    controller.begin(p, ui)
    controller.apply_weights(p, "networks")
    assert sd_model.forge_objects.unet is base  # only right before sampling
    controller.apply_weights(p, "sampling")
    patched = sd_model.forge_objects.unet
    assert patched is not base and base.patches == {}
    (eraser,) = controller.erasers.values()
    assert set(patched.patches) == {"diffusion_model." + k for k in eraser.deltas}
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    ((strength, value, strength_model, _name),) = patched.patches["diffusion_model." + key]
    assert strength == pytest.approx(0.7) and strength_model == 1.0 and len(value) == 1
    close(value[0], eraser.dense(key), atol=1e-6)
    assert_bit_identical(sd_model, original)  # Forge merges later, on its own backup


def test_forge_patch_dtype_follows_the_stored_unet_dtype():
    class Forge1:  # model_dtype() answers
        model = None

        def __init__(self, dtype):
            self.model_dtype = lambda: dtype

    class Forge2:  # model_dtype() is None; Forge 2's KModel keeps storage_dtype
        def __init__(self, dtype):
            self.model = types.SimpleNamespace(storage_dtype=dtype)
            self.model_dtype = lambda: None

    for holder in (Forge1, Forge2):
        assert inject.patch_dtype(holder(torch.float16)) == torch.float16
        assert inject.patch_dtype(holder(torch.bfloat16)) == torch.float16
        assert inject.patch_dtype(holder(torch.float32)) == torch.float32
    assert inject.patch_dtype(Forge2("nf4")) == torch.float32
    assert inject.patch_dtype(types.SimpleNamespace()) == torch.float32


# ----------------------------------------------------------------------------------------------------
# eraser files, tags, cards
# ----------------------------------------------------------------------------------------------------
def save_eraser(tmp_path, name, family=None, concepts=("snoopy",)):
    family = family or families.Family.SD1
    config = methods.config_from_dict({"method": "uce", "concepts": list(concepts)})
    weights = testing.layer_weights(family)
    dim = 768 if family == families.Family.SD1 else (1024 if family == families.Family.SD2 else 2048)
    eraser = eraser_mod.compute_eraser(config, testing.ToyTextEncoder(dim=dim), weights, family)
    path = tmp_path / "erasers" / f"{name}.safetensors"
    eraser_file.save_eraser(eraser, str(path))
    return eraser, path


def test_eraser_tag_applies_the_file_at_its_weight(tmp_path):
    eraser, _ = save_eraser(tmp_path, "snoopy_eraser")
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    requests = tags.find_tags("a dog <eraser:snoopy_eraser:0.5>")
    run_generation(controller, networks, sd_model, settings.UISettings(), tag_requests=requests)
    key = "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    close(
        sd_model.model.diffusion_model.get_submodule(key[:-7]).weight.detach(),
        original["diffusion_model." + key] + 0.5 * eraser.dense(key),
        atol=1e-5,
    )
    run_generation(controller, networks, sd_model, settings.UISettings())
    assert_bit_identical(sd_model, original)


def test_wrong_family_file_applies_nothing_and_stops_with_a_message(tmp_path):
    save_eraser(tmp_path, "xl_eraser", family=families.Family.SD2)
    sd_model = FakeSDModel()
    controller, networks, interrupts = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    p = FakeP(sd_model)
    controller.begin(p, UCE_UI)  # a valid closed-form edit too: it must not be applied alone
    controller.set_tags(p, "eraser", tags.find_tags("<eraser:xl_eraser:1>"))
    assert controller.apply_weights(p, "networks") == []
    assert not any(inject.is_ours(n) for n in networks.loaded_networks)
    assert "SD2.x" in p.extra_generation_params[runtime.ERROR_KEY] and interrupts == [1] and p.comments
    networks.forward_all(sd_model)
    assert_bit_identical(sd_model, original)
    missing = FakeP(sd_model)
    controller.begin(missing, settings.UISettings())
    controller.set_tags(missing, "eraser", tags.find_tags("<eraser:nope:1>"))
    controller.apply_weights(missing, "networks")
    assert "No eraser file named 'nope'" in missing.extra_generation_params[runtime.ERROR_KEY]


def test_tag_parsing():
    assert tags.find_tags("x <eraser:a/b:0.5> y <spm:cat> <lora:z:1>") == [
        tags.TagRequest("eraser", "a/b", 0.5),
        tags.TagRequest("spm", "cat", 1.0),
    ]
    assert tags.find_tags("<spm:cat:0.7:ft=0>") == [tags.TagRequest("spm", "cat", 0.7, transport=False)]
    assert tags.find_tags("<eraser:e>", default_weight=0.8)[0].weight == 0.8
    params = types.SimpleNamespace(items=["e", "0.3"], positional=["e", "0.3"], named={})
    assert tags.from_extra_network_params("eraser", [params]) == [tags.TagRequest("eraser", "e", 0.3)]
    with pytest.raises(ValueError, match="must be a number"):
        tags.find_tags("<eraser:e:lots>")
    with pytest.raises(ValueError, match="needs a file name"):
        tags.parse_params("spm", [""])


def test_extra_network_activate_records_the_request_for_the_script_hook(tmp_path):
    base = types.ModuleType("extra_networks")

    class ExtraNetwork:
        def __init__(self, name):
            self.name = name

    base.ExtraNetwork = ExtraNetwork
    controller, _networks, _ = lora_controller(tmp_path)
    net = en.make_extra_network(base, "eraser", controller)
    assert net.name == "eraser" and isinstance(net, ExtraNetwork)
    p = FakeP(FakeSDModel())
    controller.begin(p, settings.UISettings())
    net.activate(p, [types.SimpleNamespace(items=["e", "0.25"], positional=["e", "0.25"], named={})])
    assert controller.state(p).tags["eraser"] == [tags.TagRequest("eraser", "e", 0.25)]
    net.activate(p, [])  # "disable yourself": every call overrides the previous one
    assert controller.state(p).tags["eraser"] == []


def test_card_page_lists_files_with_their_concepts(tmp_path):
    save_eraser(tmp_path, "snoopy_eraser", concepts=("snoopy", "woodstock"))
    (tmp_path / "spm").mkdir()
    from safetensors.torch import save_file

    save_file(
        {"lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
        str(tmp_path / "spm" / "cat_spm.safetensors"),
        metadata={"prompts": "cat,kitten", "rank": "1", "alpha": "1.0"},
    )
    ui_base = types.ModuleType("ui_extra_networks")

    class ExtraNetworksPage:
        def __init__(self, title):
            self.title = title

    ui_base.ExtraNetworksPage = ExtraNetworksPage
    controller, _networks, _ = lora_controller(tmp_path)
    page = en.make_page(ui_base, "eraser", controller)
    (item,) = list(page.list_items())
    assert item["name"] == "snoopy_eraser" and item["metadata"]["concepts"] == ["snoopy", "woodstock"]
    assert "snoopy, woodstock" in item["description"] and "uce" in item["description"]
    assert item["prompt"] == '"<eraser:snoopy_eraser:" + opts.extra_networks_default_multiplier + ">"'
    spm_page = en.make_page(ui_base, "spm", controller)
    (spm_item,) = list(spm_page.list_items())
    assert spm_item["metadata"]["concepts"] == ["cat", "kitten"] and spm_page.title == "SPM"
    assert page.allowed_directories_for_previews() == [str(tmp_path / "erasers")]
    assert files.model_dirs("spm", str(tmp_path), "/elsewhere") == ["/elsewhere"]


# ----------------------------------------------------------------------------------------------------
# infotext, API args, text encoder, backend detection, install.py, module names
# ----------------------------------------------------------------------------------------------------
def webui_quote(text):
    """How the webui writes an infotext value containing ',' or ':' (a JSON string)."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def test_infotext_round_trip_through_paste_getters():
    ui = settings.UISettings(
        enabled=True,
        method="uce",
        concepts='Van Gogh\n"Mickey, Mouse"',
        anchors="art",
        preserve="Monet",
        strength=0.8,
        method_options='{"lam": 0.3}',
        eraser_files=["x/y"],
        eraser_weight=0.5,
        guards=["sld"],
        guard_preset="strong",
    )
    written = ui.to_infotext()
    assert "enabled" not in json.loads(written) and json.loads(written)["v"] == 1
    line = f"Steps: 20, {settings.INFOTEXT_KEY}: {webui_quote(written)}"
    # the webui's parser un-quotes JSON-string values before handing params to the getters
    value = line.split(f"{settings.INFOTEXT_KEY}: ", 1)[1]
    params = {settings.INFOTEXT_KEY: json.loads(value) if value.startswith('"') else value}
    pasted = settings.UISettings.from_dict({name: settings.paste_getter(name)(params) for name in settings.ARG_ORDER})
    assert pasted == ui
    # an image made without erasers switches the accordion off and leaves the rest alone
    assert settings.paste_getter("enabled")({"Steps": "20"}) is False
    assert settings.paste_getter("concepts")({"Steps": "20"}) is None
    assert ui.config_dict() == {
        "method": "uce",
        "concepts": ["Van Gogh", "Mickey, Mouse"],
        "anchors": ["art"],
        "preserve": ["Monet"],
        "lam": 0.3,
    }


def test_api_args_are_positional_and_may_be_short():
    assert settings.ARG_ORDER[:6] == ("enabled", "method", "concepts", "anchors", "preserve", "strength")
    ui = settings.UISettings.from_args([True, "uce", "snoopy"])
    assert ui.enabled and ui.concepts == "snoopy" and ui.strength == 1.0 and ui.guards == []
    full = settings.UISettings(enabled=True, concepts="a", spm_files=["s"], guards=["sld"])
    assert settings.UISettings.from_args(full.to_args()) == full
    assert settings.UISettings.from_args(["true", "uce", "a", "", "", "0.5"]).strength == 0.5
    with pytest.raises(ValueError, match="JSON object"):
        settings.UISettings(enabled=True, concepts="a", method_options="lam=1").config_dict()


def test_text_encoder_adapter_is_batched_and_matches_the_webui_conditioning():
    sd_model = FakeSDModel()
    encoder = WebuiTextEncoder(sd_model)
    assert isinstance(encoder, __import__(f"{core.__name__}.text", fromlist=["x"]).TextEncoder)
    prompts = ["van gogh", "a painting of a starry night", ""]
    enc = encoder.encode(prompts)
    assert sd_model.encode_calls == 1  # one pass for the batch
    ref = sd_model.toy.encode(prompts)
    assert torch.equal(enc.hidden, ref.hidden) and enc.hidden.dtype == torch.float32
    assert enc.lengths.tolist() == ref.lengths.tolist() and enc.token_ids == ref.token_ids
    assert encoder.family == "sd1" and encoder.context_dim == 768


@pytest.mark.parametrize(
    "present, kind, route",
    [
        ({"backend.patcher.unet", "modules_forge.unet_patcher", "ldm.modules.attention"}, be.FORGE2, "forge"),
        ({"modules_forge.unet_patcher", "ldm.modules.attention", "networks"}, be.FORGE1, "forge"),
        ({"ldm.modules.attention", "networks", "network"}, be.A1111, "lora"),
        ({"sgm.modules.attention", "networks"}, be.A1111, "lora"),
        ({"ldm.modules.attention"}, be.A1111, "direct"),
        (set(), be.UNSUPPORTED, None),
    ],
)
def test_backend_detection_by_import_probing(present, kind, route):
    def importer(name):
        if name not in present:
            raise ModuleNotFoundError(name)
        module = types.ModuleType(name)
        if name == "networks":
            module.loaded_networks = []
        return module

    backend = be.detect_backend(importer)
    assert backend.kind == kind
    if route is None:
        assert not backend.supported and "could not recognise" in backend.message()
    else:
        assert backend.weight_route == route


def test_unsupported_backend_applies_nothing(tmp_path):
    sd_model = FakeSDModel()
    controller = runtime.Controller(runtime.Host(models_path=str(tmp_path)), backend=be.Backend(be.UNSUPPORTED))
    p = FakeP(sd_model)
    controller.begin(p, UCE_UI)
    assert controller.apply_weights(p, "sampling") == [] and controller.erasers == {}


@pytest.mark.parametrize("kind", [be.FORGE2, be.A1111])
def test_nothing_requested_never_reads_the_model_or_stops_the_generation(tmp_path, kind):
    # a model the glue cannot read (e.g. Flux on Forge 2: no ``forge_objects.unet`` UNet of ours)
    sd_model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=None))
    interrupts = []
    host = runtime.Host(models_path=str(tmp_path), interrupt=lambda: interrupts.append(1))
    controller = runtime.Controller(host, backend=be.Backend(kind, make_fake_networks() if kind == be.A1111 else None))
    for ui in (settings.UISettings(), settings.UISettings(enabled=True, concepts="")):
        p = FakeP(sd_model)
        controller.begin(p, ui)
        assert controller.apply_weights(p, "networks") == [] and controller.apply_weights(p, "sampling") == []
        controller.finish(p)
        assert interrupts == [] and "Concept Erasers error" not in p.extra_generation_params


def test_install_py_is_inert_outside_the_webui(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "install.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout == "" and run.stderr == ""


def test_install_py_uses_launch_run_pip_only_for_missing_packages(tmp_path):
    """Inside the webui (a ``launch`` module on PYTHONPATH) pip runs only through ``launch.run_pip``."""
    fake = tmp_path / "webui"
    fake.mkdir()
    log = tmp_path / "pip.log"
    (fake / "launch.py").write_text(
        "import os\n"
        "MISSING = set(os.environ.get('FAKE_MISSING', '').split(','))\n"
        "def is_installed(name):\n    return name not in MISSING\n"
        f"def run_pip(args, desc=None):\n    open({str(log)!r}, 'a').write(args + '\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for missing, expected in (("", ""), ("safetensors", "install safetensors")):
        log.unlink(missing_ok=True)
        run = subprocess.run(
            [sys.executable, str(ROOT / "install.py")],
            cwd=tmp_path,
            timeout=60,
            env={**env, "PYTHONPATH": str(fake), "FAKE_MISSING": missing},
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        written = log.read_text() if log.exists() else ""
        assert written.startswith(expected) and (expected or written == "")


def test_core_and_glue_load_under_unique_names():
    import importlib.util

    assert core.__name__ in (CORE_NAME, "erasers") and sys.modules[CORE_NAME] is core
    package_dir = ROOT / "a1111_erasers"
    name = "concept_erasers_a1111_glue_test"
    spec = importlib.util.spec_from_file_location(
        name, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        settings_copy = __import__(f"{name}.settings", fromlist=["x"])
        assert settings_copy.ARG_ORDER == settings.ARG_ORDER
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


# ----------------------------------------------------------------------------------------------------
# SPM membranes (core: erasers/membranes/spm.py, formats/spm.py, transport.py)
# ----------------------------------------------------------------------------------------------------
def save_spm(tmp_path, name="snoopy_spm", prompts="snoopy"):
    """A rank-1 membrane in the Con6924/SPM kohya layout on two SD1 attn2 layers."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for stem, out_f in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v", 320),
    ):
        tensors[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(out_f, 1, generator=gen)
        tensors[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(1, 768, generator=gen)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    (tmp_path / "spm").mkdir(exist_ok=True)
    save_file(
        tensors,
        str(tmp_path / "spm" / f"{name}.safetensors"),
        metadata={"prompts": prompts, "rank": "1", "alpha": "1.0"},
    )
    return {
        (
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            if "to_k" in s
            else "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
        ): tensors[f"{s}.lora_up.weight"] @ tensors[f"{s}.lora_down.weight"]
        for s in {k.split(".")[0] for k in tensors}
    }


def spm_generation(controller, networks, sd_model, prompt, tag):
    p = FakeP(sd_model, prompts=[prompt])
    controller.begin(p, settings.UISettings())
    controller.set_tags(p, "spm", tags.find_tags(tag))
    entries = controller.apply_weights(p, "networks")
    networks.forward_all(sd_model)
    controller.finish(p)
    return p, entries


def test_spm_tag_applies_the_membrane_at_its_transport_rate(tmp_path):
    dense = save_spm(tmp_path)
    sd_model = FakeSDModel()
    controller, networks, _ = lora_controller(tmp_path)
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    layer = sd_model.model.diffusion_model.get_submodule(key[:-7])

    # the prompt names the concept: token overlap 1 → m = 1; official rule → (0.5·m)² · UD
    p, entries = spm_generation(controller, networks, sd_model, "a photo of snoopy", "<spm:snoopy_spm:0.5>")
    assert len(entries) == 1 and runtime.ERROR_KEY not in p.extra_generation_params
    close(layer.weight, original["diffusion_model." + key] + 0.25 * dense[key], atol=1e-6)

    # an unrelated prompt opens the membrane less
    spm_generation(controller, networks, sd_model, "a bowl of fruit", "<spm:snoopy_spm:0.5>")
    moved = (layer.weight.detach() - original["diffusion_model." + key]).norm()
    assert 0 < moved < (0.25 * dense[key]).norm()

    # transport off: a plain LoRA at the weight (official rule: weight²)
    spm_generation(controller, networks, sd_model, "a bowl of fruit", "<spm:snoopy_spm:0.5:ft=0>")
    close(layer.weight, original["diffusion_model." + key] + 0.25 * dense[key], atol=1e-6)

    spm_generation(controller, networks, sd_model, "a bowl of fruit", "")
    assert_bit_identical(sd_model, original)


def test_missing_spm_file_stops_with_a_message(tmp_path):
    sd_model = FakeSDModel()
    controller, networks, interrupts = lora_controller(tmp_path)
    p, entries = spm_generation(controller, networks, sd_model, "x", "<spm:nothing_here:1>")
    assert entries == [] and "No SPM membrane named 'nothing_here'" in p.extra_generation_params[runtime.ERROR_KEY]
    assert interrupts == [1]


def test_entry_script_loads_and_drives_the_hooks_with_a_fake_webui(tmp_path, monkeypatch):
    """scripts/concept_erasers_a1111.py imported the way the webui does, against fake ``modules``."""
    import importlib.util

    calls = {}
    mods = {
        name: types.ModuleType(name)
        for name in (
            "modules",
            "modules.scripts",
            "modules.script_callbacks",
            "modules.devices",
            "modules.paths",
            "modules.shared",
        )
    }

    class Script:
        pass

    mods["modules.scripts"].Script, mods["modules.scripts"].AlwaysVisible = Script, object()
    for hook in ("on_model_loaded", "on_before_ui", "on_script_unloaded", "on_cfg_denoiser", "on_cfg_denoised"):
        setattr(mods["modules.script_callbacks"], hook, lambda fn, hook=hook: calls.setdefault(hook, fn))
    mods["modules.paths"].models_path = str(tmp_path)
    mods["modules.shared"].cmd_opts = types.SimpleNamespace(erasers_dir=None, spm_dir=None)
    mods["modules.shared"].opts = types.SimpleNamespace(extra_networks_default_multiplier=1.0)
    mods["modules.shared"].state = types.SimpleNamespace(interrupt=lambda: None)
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            setattr(mods["modules"], name.split(".")[1], module)
    networks = make_fake_networks()
    monkeypatch.setitem(sys.modules, "networks", networks)
    monkeypatch.setitem(sys.modules, "ldm.modules.attention", types.ModuleType("ldm.modules.attention"))
    for name in [k for k in sys.modules if k.startswith("concept_erasers_a1111_glue")]:
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location(
        "concept_erasers_a1111_entry", ROOT / "scripts" / "concept_erasers_a1111.py"
    )
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setattr(entry.controller, "_detect", lambda: be.Backend(be.A1111, networks, None))
    assert set(calls) == {
        "on_model_loaded",
        "on_before_ui",
        "on_script_unloaded",
        "on_cfg_denoiser",
        "on_cfg_denoised",
    }
    script = entry.ConceptErasersScript()
    assert script.title() == "Concept Erasers" and script.show(False) is mods["modules.scripts"].AlwaysVisible

    sd_model = FakeSDModel()
    networks.assign_network_names_to_compvis_modules(sd_model)
    original = snapshot(sd_model)
    p = FakeP(sd_model)
    args = [True, "uce", "van gogh", "art"]  # API-style short args
    script.before_process(p, *args)
    script.after_extra_networks_activate(
        p, *args, batch_number=0, prompts=p.prompts, seeds=[1], subseeds=[1], extra_network_data={}
    )
    script.process_before_every_sampling(p, *args, x=None, noise=None, c=None, uc=None)
    networks.forward_all(sd_model)
    script.postprocess(p, None, *args)
    assert json.loads(p.extra_generation_params["Concept Erasers"])["concepts"] == "van gogh"
    key = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(
        sd_model.model.diffusion_model.get_submodule(key[:-7]).weight, original["diffusion_model." + key]
    )
    p2 = FakeP(sd_model)
    script.before_process(p2, False)
    script.after_extra_networks_activate(p2, False)
    networks.forward_all(sd_model)
    script.postprocess(p2, None, False)
    assert_bit_identical(sd_model, original)
    calls["on_model_loaded"](sd_model)
    assert entry.controller.erasers == {}
