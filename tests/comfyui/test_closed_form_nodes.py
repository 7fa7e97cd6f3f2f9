"""The closed-form nodes on ComfyUI's real ModelPatcher and CLIP (random-weight SD1.5 checkpoint).

Run with the command in tests/comfyui/README.md; skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from comfy_harness import sample

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PACK = "concept_erasers"
NODE_IDS = {"EraserClosedForm", "EraserSave", "EraserLoad", "EraserApply"}
PREFIX = "diffusion_model."
PROMPT = "a painting by Van Gogh"


def import_pack():
    """The repository root imported as a package, the way ComfyUI imports a custom-node folder (once)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    elif not hasattr(sys.modules[PACK], "comfy_entrypoint"):
        # first imported by the unit tests before ComfyUI was importable: run the entry point again
        importlib.reload(sys.modules[PACK])
    return sys.modules[PACK]


@pytest.fixture(scope="session")
def pack(comfy):
    return import_pack()


@pytest.fixture(scope="session")
def nodes(pack):
    return importlib.import_module(f"{PACK}.nodes.closed_form")


@pytest.fixture(scope="session")
def adapters(pack):
    return importlib.import_module(f"{PACK}.nodes.adapters")


@pytest.fixture
def erasers_dir(comfy, tmp_path, monkeypatch):
    """models/erasers redirected to a temporary folder (the shared ComfyUI checkout stays clean)."""
    monkeypatch.setattr(comfy.folder_paths, "models_dir", str(tmp_path / "models"))
    folder = tmp_path / "models" / "erasers"
    folder.mkdir(parents=True)
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "erasers", ([str(folder)], {".safetensors"}))
    monkeypatch.setitem(
        comfy.folder_paths.folder_names_and_paths, "spm", ([str(tmp_path / "models" / "spm")], {".safetensors"})
    )
    return folder


def kv_keys(model):
    return sorted(k for k in model.model_state_dict() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")))


@pytest.fixture(scope="module")
def sd15_eraser(nodes, sd15_loaded):
    model, clip, _ = sd15_loaded
    return erase(nodes, model, clip, strength=0.0)[1]


def erase(nodes, model, clip, strength=1.0, concepts="Van Gogh"):
    out = nodes.EraserClosedForm.execute(model, clip, "uce", concepts, "", "", strength)
    return out.args


def test_pack_loads_as_a_custom_node(comfy, pack, erasers_dir):
    extension = asyncio.run(pack.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    schemas = [cls.GET_SCHEMA() for cls in node_list]  # what ComfyUI runs when it registers a V3 node
    # every node id of the pack is fixed (saved workflows name them); every input has a tooltip
    assert {s.node_id for s in schemas} == NODE_IDS | {
        "EraserSPMLoad",
        "EraserLoRALoad",
        "EraserSAFREE",
        "EraserSLD",
        "EraserConceptGuidance",
        "EraserTokenSuppress",
        "EraserCheck",
    }
    for cls, schema in zip(node_list, schemas):
        inputs = cls.INPUT_TYPES()  # the /object_info view
        widgets = {**inputs["required"], **inputs.get("optional", {})}
        untipped = [name for name, (_, opts) in widgets.items() if not opts.get("tooltip")]
        assert not untipped, f"{schema.node_id}: inputs without a tooltip: {untipped}"
    assert "erasers" in comfy.folder_paths.folder_names_and_paths


def test_erase_changes_the_concept_output_and_leaves_the_input_model_alone(comfy, nodes, sd15_loaded):
    model, clip, _ = sd15_loaded
    patches_before = {k: list(v) for k, v in model.patches.items()}
    base = sample(comfy, model, clip, PROMPT, "", seed=2)
    erased_model, eraser = erase(nodes, model, clip)
    assert model.patches == patches_before, "the node modified its input ModelPatcher"
    assert erased_model is not model and erased_model.is_clone(model)
    assert sorted(erased_model.patches) == sorted(PREFIX + k for k in eraser.keys()) == kv_keys(model)
    out = sample(comfy, erased_model, clip, PROMPT, "", seed=2)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, base), "erasing the prompt's concept left the sampled latent unchanged"


def test_strength_zero_gives_bit_identical_output(comfy, nodes, sd15_loaded):
    model, clip, _ = sd15_loaded
    base = sample(comfy, model, clip, PROMPT, "", seed=4)
    same_model, eraser = erase(nodes, model, clip, strength=0.0)
    assert same_model.patches == {} and len(eraser.keys()) > 0
    assert torch.equal(sample(comfy, same_model, clip, PROMPT, "", seed=4), base)


def test_unpatch_restores_the_base_weights_bit_for_bit(comfy, nodes, sd15_loaded):
    model, clip, _ = sd15_loaded
    comfy.model_management.unload_all_models()
    originals = {k: v.detach().clone() for k, v in model.model_state_dict().items() if k in set(kv_keys(model))}
    erased_model, _ = erase(nodes, model, clip, strength=2.0)
    sample(comfy, erased_model, clip, PROMPT, "", seed=5)  # loads the clone: the patches are applied
    comfy.model_management.unload_all_models()
    current = model.model_state_dict()
    changed = [k for k in originals if not torch.equal(current[k], originals[k])]
    assert not changed, f"not restored after unload_all_models(): {changed[:4]}"


def test_base_weights_include_a_patch_applied_before(comfy, adapters, sd15_loaded):
    model, _, _ = sd15_loaded
    key = kv_keys(model)[0]
    canonical = key[len(PREFIX) :]
    diff = torch.randn(model.model_state_dict()[key].shape, generator=torch.Generator().manual_seed(7)) * 0.1
    with_lora = model.clone()
    with_lora.add_patches({key: ("diff", (diff,))}, 0.5)
    base = adapters.canonical_base_weights(with_lora, [canonical])[canonical]
    expected = model.model_state_dict()[key].float() + 0.5 * diff
    assert torch.allclose(base, expected, atol=1e-6)
    assert adapters.model_family(model).value == "sd1"


def test_save_then_load_gives_identical_patches(comfy, nodes, sd15_loaded, erasers_dir):
    model, clip, _ = sd15_loaded
    erased_model, eraser = erase(nodes, model, clip, strength=0.8, concepts="Van Gogh\nMonet")
    nodes.EraserSave.execute(eraser, "vangogh_monet")
    assert (erasers_dir / "vangogh_monet.safetensors").is_file()
    loaded_model, loaded = nodes.EraserLoad.execute(model, "vangogh_monet.safetensors", 0.8).args
    assert loaded.concepts == ["Van Gogh", "Monet"] and loaded.family == eraser.family
    assert sorted(loaded_model.patches) == sorted(erased_model.patches)
    for key, entries in erased_model.patches.items():
        ((s1, (kind1, (d1,)), *_),) = entries
        ((s2, (kind2, (d2,)), *_),) = loaded_model.patches[key]
        assert (s1, kind1) == (s2, kind2) == (0.8, "diff")
        assert d1.dtype == d2.dtype and torch.equal(d1, d2), key
    applied = nodes.EraserApply.execute(model, loaded, 0.8).args[0]
    assert all(torch.equal(applied.patches[k][0][1][1][0], v[0][1][1][0]) for k, v in erased_model.patches.items())


@pytest.mark.parametrize("name", ["../escape", "sub/dir", "..", "a\\b", ""])
def test_save_refuses_paths(nodes, sd15_eraser, erasers_dir, name):
    with pytest.raises(ValueError, match="plain file name"):
        nodes.EraserSave.execute(sd15_eraser, name)
    assert list(erasers_dir.iterdir()) == []


def test_eraser_for_another_model_is_refused(comfy, nodes, sd15_loaded, sd15_eraser):
    import dataclasses

    model, _, _ = sd15_loaded
    deltas = dict(sd15_eraser.deltas)
    deltas["input_blocks.99.1.transformer_blocks.0.attn2.to_k.weight"] = deltas[sd15_eraser.keys()[0]]
    with pytest.raises(ValueError, match="input_blocks.99"):
        nodes.EraserApply.execute(model, dataclasses.replace(sd15_eraser, deltas=deltas), 1.0)
    sdxl = dataclasses.replace(sd15_eraser, family=type(sd15_eraser.family)("sdxl"))
    with pytest.raises(ValueError, match="made for SDXL"):
        nodes.EraserApply.execute(model, sdxl, 1.0)


@pytest.mark.server
def test_a_workflow_through_the_node_runs_in_a_comfyui_server(comfy_server):
    info = comfy_server.object_info()
    assert NODE_IDS <= set(info), "the pack's nodes are not registered in the server"
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ce_test_sd15.safetensors"}},
        "8": {
            "class_type": "EraserClosedForm",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "method": "uce",
                "concepts": "Van Gogh\nMonet",
                "anchors": "",
                "preserve": "a photo",
                "strength": 1.0,
            },
        },
        "9": {"class_type": "EraserSave", "inputs": {"eraser": ["8", 1], "filename": "server_test"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["8", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ce_erased"}},
    }
    entry = comfy_server.run_prompt(graph, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["7"]["images"][0]["filename"].endswith(".png")
    assert (comfy_server.base_dir / "models" / "erasers" / "server_test.safetensors").is_file()


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_names(node_info: dict) -> list:
    """Widget inputs in the order the frontend stores them in ``widgets_values`` (required, then optional)."""
    names = []
    for group in ("required", "optional"):
        for name, spec in node_info["input"].get(group, {}).items():
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                names.append(name)
    return names


@pytest.mark.server
def test_example_workflows_match_the_server_node_schemas(comfy, comfy_server):
    import json

    from comfy_harness import needs_newer_comfyui

    info = comfy_server.object_info()
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        if needs_newer_comfyui(workflow, comfy.version):
            continue  # a family workflow for a newer ComfyUI (it says which)
        for node in workflow["nodes"]:
            assert node["type"] in info, f"{path.name}: {node['type']} is not a node of this ComfyUI"
            if node["type"] in NODE_IDS:
                names = widget_names(info[node["type"]])
                assert len(node["widgets_values"]) == len(names), f"{path.name} {node['type']}: {names}"


class TokenizerOnlyCLIP:
    """ComfyUI's real SDXL/Flux tokenizers (files ship with ComfyUI) behind a stand-in encoder that returns
    each section's token ids as its 'hidden state', so the reshape can be checked position by position."""

    def __init__(self, tokenizer, width):
        self.tokenizer, self.width = tokenizer, width

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False):
        key = "t5xxl" if "t5xxl" in tokens else "l"
        ids = torch.tensor([[t for t, _ in section] for section in tokens[key]], dtype=torch.float32)
        cond = ids.reshape(1, -1, 1).expand(1, ids.numel(), self.width)
        return cond, ids[:1, -1:].expand(1, 768)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_real_tokenizers_give_one_section_per_prompt(comfy, adapters, family):
    import comfy.sdxl_clip
    import comfy.text_encoders.flux

    tokenizer = comfy.sdxl_clip.SDXLTokenizer() if family == "sdxl" else comfy.text_encoders.flux.FluxTokenizer()
    encoder = adapters.ComfyCLIPEncoder(TokenizerOnlyCLIP(tokenizer, 2048 if family == "sdxl" else 4096))
    assert encoder.family == family
    prompts = ["a photo of a cat", "Van Gogh (painter)"]
    out = encoder.encode(prompts)
    expected_len = 77 if family == "sdxl" else 256
    assert encoder.context_length == expected_len and out.hidden.shape[:2] == (2, expected_len)
    for i, prompt in enumerate(prompts):
        ids = out.token_ids[i]
        assert out.hidden[i, : len(ids), 0].tolist() == ids, "row i must hold prompt i's tokens"
        assert out.lengths[i] == len(ids)
    assert out.has_bos == (family == "sdxl")
    if family == "sdxl":
        assert out.token_ids[0][0] == 49406 and out.token_ids[0][-1] == 49407
    else:
        assert out.token_ids[0][-1] == 1 and out.pooled.shape == (2, 768)
    with pytest.raises(ValueError, match="chunk"):
        encoder.encode(["word " * 90])
