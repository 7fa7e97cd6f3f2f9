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
