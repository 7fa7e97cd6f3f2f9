"""example_workflows/*.json: valid UI-format graphs with consistent links and known node types."""

import json
import re
from pathlib import Path

import pytest

from erasers.edits.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
CORE_TYPES = {
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "VAEDecode",
    "VAEEncode",
    "SaveImage",
    "PreviewImage",
    "LoadImage",
    "LoraLoader",
    "LoraLoaderModelOnly",
    "CLIPSetLastLayer",
    "Note",
    "MarkdownNote",
    "Reroute",
    "PrimitiveNode",
    # the Flux examples load the diffusion model, both text encoders and the VAE separately
    "UNETLoader",
    "DualCLIPLoader",
    "VAELoader",
    "FluxGuidance",
    "EmptySD3LatentImage",
    "ConditioningZeroOut",
    # the family examples (erasers_dev/family_workflows.py): their text-encoder loaders and latents
    "CLIPLoader",
    "QuadrupleCLIPLoader",
    "EmptyFlux2LatentImage",
    "EmptyHunyuanLatentVideo",
}


def pack_node_ids() -> set:
    """Node ids declared by the pack (read from the sources: the node modules need ComfyUI to import)."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id="(\w+)"', path.read_text(encoding="utf-8")))
    return ids


def test_the_three_shipped_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"erase_then_sample.json", "erase_then_save.json", "load_then_sample.json"}
    assert {"EraserClosedForm", "EraserSave", "EraserLoad", "EraserApply"} <= pack_node_ids()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_consistent_ui_format(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list), "not UI format"
    assert "class_type" not in json.dumps(data), "API format: example_workflows/ needs the UI format"
    nodes = {n["id"]: n for n in data["nodes"]}
    assert len(nodes) == len(data["nodes"]), "duplicate node ids"
    assert data["last_node_id"] >= max(nodes)
    known = CORE_TYPES | pack_node_ids()
    unknown = sorted({n["type"] for n in nodes.values()} - known)
    assert not unknown, f"node types that are neither ComfyUI core nor this pack: {unknown}"

    links = {}
    for link in data["links"]:
        link_id, src, src_slot, dst, dst_slot, type_ = link
        assert link_id not in links, f"duplicate link id {link_id}"
        links[link_id] = link
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in (out.get("links") or []), f"link {link_id} missing from node {src} output {src_slot}"
        assert inp.get("link") == link_id, f"link {link_id} missing from node {dst} input {dst_slot}"
        assert out["type"] == type_ == inp["type"], f"link {link_id}: {out['type']} → {type_} → {inp['type']}"
    assert not links or data["last_link_id"] >= max(links)
    for node in nodes.values():
        for slot in node.get("inputs", []):
            assert slot.get("link") is None or slot["link"] in links, f"node {node['id']}: dangling {slot}"
        for slot in node.get("outputs", []):
            for link_id in slot.get("links") or []:
                assert link_id in links, f"node {node['id']}: dangling output link {link_id}"
        if node["type"] == "EraserClosedForm":
            assert node["widgets_values"][0] in METHODS


def test_the_family_workflows_are_what_the_generator_writes():
    """example_workflows/family_*.json are generated (python -m erasers_dev.family_workflows): edited by hand
    they would drift from the family table's guards."""
    from erasers_dev import family_workflows as fw

    for name in fw.FAMILIES:
        path = fw.OUT / f"family_{name}.json"
        assert json.loads(path.read_text(encoding="utf-8")) == fw.family_workflow(name), path.name


def test_each_family_workflow_uses_a_guard_its_family_serves():
    from erasers import families
    from erasers_dev import family_workflows as fw

    record_of = {
        "chroma": ("Chroma", "Chroma"),
        "flux2_klein": ("Flux2", "Flux2"),
        "qwen_image": ("QwenImage", "QwenImage"),
        "lumina2": ("Lumina2", "Lumina2"),
        "zimage_turbo": ("Lumina2", "ZImage"),
        "wan21_t2v": ("WAN21", "WAN21_T2V"),
        "hidream": ("HiDream", "HiDream"),
    }
    guard_name = {"token": "token_suppression", "guidance": "concept_guidance", "sld": "sld", "safree": "safree"}
    assert set(record_of) == set(fw.FAMILIES)
    for name, spec in fw.FAMILIES.items():
        families.lookup_guard(*record_of[name], guard_name[spec[5]])  # raises if the family refuses the guard
        assert "uce" in families.lookup(*record_of[name]).methods
