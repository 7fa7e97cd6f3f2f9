"""Every example_workflows/family_*.json, run node by node on a tiny model of its family (COMFYUI_PATH).

The server test validates these graphs against the real /object_info; it cannot run them (no family weights
exist offline). Here each graph runs as written — its own widget values for the eraser chain, the prompts
and the sampler — through the pack's real nodes and ComfyUI's own CLIPTextEncode / KSampler, with the
loaders' outputs replaced by the reduced random-weight models and stand-in text encoders of the family
tests, the latent by the family's tiny latent and the steps cut to 2 (CPU). The graph must sample to a
finite latent that differs from the same graph with the eraser chain bypassed. VAEDecode / SaveImage are
not run (no family VAE here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_closed_form_families_comfy import FAMILIES, build
from test_guards_new_families_comfy import LATENT, guard_clip

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
#: workflow → the family test model it runs on
MODEL_OF = {
    "chroma": "chroma",
    "flux2_klein": "flux2",
    "qwen_image": "qwen_image",
    "lumina2": "lumina2",
    "zimage_turbo": "zimage",
    "wan21_t2v": "wan",
    "hidream": "hidream",
}
LOADERS = {"UNETLoader", "CLIPLoader", "QuadrupleCLIPLoader", "VAELoader"}
NOT_RUN = {"VAEDecode", "SaveImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage", "EmptyHunyuanLatentVideo"}


def tiny(comfy, family):
    if family == "hidream":
        import comfy.supported_models as sm
        from test_closed_form_families_comfy import built, config_of
        from test_hidream_comfy import HIDREAM, HiDreamStandInCLIP

        return built(comfy, config_of(comfy, HIDREAM, sm.HiDream), 21), HiDreamStandInCLIP(), (16, 8, 8)
    patcher, clip, _ = build(comfy, family)
    return patcher, guard_clip(clip), LATENT[family]


def widget_names(node_class) -> list:
    """The V3 node's widget inputs in schema order (links — model, clip, … — carry no widget value)."""
    schema = node_class.define_schema()
    links = {"MODEL", "CLIP", "ERASER", "VAE", "IMAGE", "CLIP_VISION", "CONDITIONING", "LATENT"}
    return [i.id for i in schema.inputs if getattr(i, "io_type", None) not in links]


def run_graph(comfy, workflow, model, clip, latent_shape, bypass_erasers=False):
    import importlib

    from test_closed_form_nodes import PACK

    import nodes as core

    pack_nodes = {}
    for module in ("closed_form", "suppression"):
        for cls in importlib.import_module(f"{PACK}.nodes.{module}").NODES:
            pack_nodes[cls.define_schema().node_id] = cls
    by_id = {n["id"]: n for n in workflow["nodes"]}
    source = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    values = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["order"]):
        kind, widgets = node["type"], node.get("widgets_values") or []
        links = {i["name"]: values[source[i["link"]]] for i in node["inputs"] if i.get("link") is not None}
        nid = node["id"]
        if kind == "UNETLoader":
            out = [model]
        elif kind in ("CLIPLoader", "QuadrupleCLIPLoader"):
            out = [clip]
        elif kind in ("VAELoader",) or kind in NOT_RUN:
            out = [None]
        elif kind in pack_nodes:
            if bypass_erasers:
                out = [links["model"], None]
            else:
                kwargs = dict(zip(widget_names(pack_nodes[kind]), widgets), **links)
                out = list(pack_nodes[kind].execute(**kwargs).args)
        elif kind == "CLIPTextEncode":
            out = list(core.CLIPTextEncode().encode(links["clip"], widgets[0]))
        elif kind == "KSampler":
            seed, _, _, cfg, sampler, scheduler, denoise = widgets
            # not all zeros: KSampler would take it for an empty latent and reshape it to the family's full
            # latent format (Flux.2: 128 channels), which the tiny models do not have
            latent = {"samples": torch.full((1,) + tuple(latent_shape), 1e-3)}
            with torch.no_grad():
                out = list(
                    core.KSampler().sample(
                        links["model"], seed, 2, cfg, sampler, scheduler, links["positive"], links["negative"], latent,
                        denoise,
                    )
                )  # fmt: skip
        else:
            raise AssertionError(f"{kind} (node {nid}) is not handled by this runner")
        for slot, value in enumerate(out):
            values[(nid, slot)] = value
    (sampler_id,) = [n for n, v in by_id.items() if v["type"] == "KSampler"]
    return values[(sampler_id, 0)]["samples"]


@pytest.mark.parametrize("name", sorted(MODEL_OF))
def test_family_workflow_runs_on_a_tiny_model_of_its_family(comfy, name):
    import comfy.model_base as mb
    from test_closed_form_nodes import import_pack

    import_pack()
    path = EXAMPLES / f"family_{name}.json"
    workflow = json.loads(path.read_text(encoding="utf-8"))
    host = "HiDream" if name == "hidream" else FAMILIES[MODEL_OF[name]][0]
    if not hasattr(mb, host):
        pytest.skip(f"this ComfyUI has no {host} class")
    model, clip, latent_shape = tiny(comfy, MODEL_OF[name])
    erased = run_graph(comfy, workflow, model, clip, latent_shape)
    plain = run_graph(comfy, workflow, model, clip, latent_shape, bypass_erasers=True)
    assert torch.isfinite(erased).all(), f"{path.name} sampled non-finite values"
    assert not torch.equal(erased, plain), f"{path.name}: the eraser chain changed nothing"
    assert model.patches == {}, f"{path.name} patched the loaded model"
