"""Every model class ComfyUI ships meets each class-reading pack node: served, or refused by name first.

Issue #16: "no model class ComfyUI 0.29 ships can make a pack node crash mid-sampling (try them all:
refused before sampling, or works)". Each subclass of ``comfy.model_base.BaseModel`` in the ComfyUI at
``COMFYUI_PATH`` is put behind a stand-in ModelPatcher (the class itself, without weights: the nodes decide
by the class and its model_config's class before they read a weight) and handed to the four guard nodes and
the closed-form node. For every class and node, exactly one of:

* the node refuses it with an error that names the class, before the CLIP is touched (nothing encoded,
  nothing sampled);
* the node serves it — and then the class is one of those the real-model tests run end to end
  (tests/comfyui/test_*families_comfy.py, test_suppression_comfy.py, test_closed_form_nodes.py).

The file-reading nodes (Apply Eraser, Load Erasure LoRA, Load SPM) decide by the model's keys and are
tested for wrong-family refusal elsewhere.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from suppression_models import (  # noqa: F401  (comfy, pack are fixtures)
    COMMON,
    SAFREE_ARGS,
    SD15_UNET,
    SDXL_UNET,
    FakeSDXLClip,
    comfy,
    makers,
    pack,
    random_patcher,
    randomise,
    run_node,
    sample,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)

#: (model class, model_config class) pairs the real-model tiers sample end to end; the legacy UNet class
#: BaseModel (SD1.x / SD2.x by width) and SDXL's subclasses are served by the legacy helpers
END_TO_END = {"BaseModel", "SDXL", "SD3", "Flux", "Chroma", "Flux2", "QwenImage", "Lumina2", "WAN21", "WAN22"}
#: the guarded UNet variants sampled below (test_the_guarded_unet_variants_sample_with_every_guard)
END_TO_END |= {"SDXL_instructpix2pix", "SD21UNCLIP"}
#: HiDream-I1: closed form and all four guards, sampled end to end in test_hidream_comfy.py
END_TO_END |= {"HiDream"}
#: AuraFlow (Tier 2): closed form and all four guards, sampled in
#: test_guards_new_families_comfy.py and test_guidance_joint_families_comfy.py
END_TO_END |= {"AuraFlow"}
#: the closed form also edits these UNet variants' attn2 K/V (same CLIP, same cross-attention as the UNet
#: they derive from; the family comes from the keys' widths): a weight edit, nothing that runs in sampling
CLOSED_FORM_ONLY = {"SDXLRefiner", "SD15_instructpix2pix", "SD_X4Upscaler"}


class NoCLIP:
    """A CLIP that fails the test if a node touches it."""

    def __getattr__(self, name):
        raise AssertionError(f"the node used the CLIP ({name}) before deciding on the model class")


class ClassOnlyPatcher:
    """What the nodes read first: ``model`` (an instance of the host class, no weights) and its config."""

    def __init__(self, base):
        self.model = base

    def clone(self):
        raise AssertionError("the node cloned the model before deciding on its class")

    def model_state_dict(self, *a, **k):
        raise AssertionError("the node read the weights: it accepted the class before deciding")


def config_for(comfy, cls):
    """The model_config the family table accepts for ``cls`` (so a served class is served), else a config
    of a made-up class; legacy UNets get SD1.5's context width."""
    from concept_erasers_suppression_test.erasers import families

    accepted = [c for r in families.RECORDS if r.host_class == cls.__name__ for c in r.config_classes]
    name = accepted[0] if accepted else "UnlistedConfig"
    config = type(name, (), {})()
    config.unet_config = {"context_dim": 768}
    return config


def host_classes(comfy):
    import comfy.model_base as mb

    return sorted(
        (c for _, c in inspect.getmembers(mb, inspect.isclass) if issubclass(c, mb.BaseModel)),
        key=lambda c: c.__name__,
    )


def node_calls(nodes):
    """Each guard node as a function of the model (the suppression tests' settings, ``makers``)."""
    labels = {"tokens": "token suppression", "sld": "SLD", "safree": "SAFREE", "guidance": "concept guidance"}
    return {
        label: (lambda m, key=key: makers(nodes, m, NoCLIP(), prompt="a nude person")[key](1.0))
        for key, label in labels.items()
    }


def test_every_shipped_class_is_served_end_to_end_or_refused_by_name(comfy, pack):
    import importlib

    nodes, _ = pack
    closed = importlib.import_module(nodes.__name__.rsplit(".", 1)[0] + ".closed_form")
    calls = node_calls(nodes)
    calls["closed form"] = lambda m: run_node(
        closed.EraserClosedForm,
        model=m,
        clip=NoCLIP(),
        method="uce",
        concepts="nude",
        anchors="",
        preserve="",
        strength=1.0,
    )
    classes = host_classes(comfy)
    assert len(classes) > 40, f"only {len(classes)} model classes found: is COMFYUI_PATH a full ComfyUI?"
    served, refused, wrong = {}, 0, []
    for cls in classes:
        base = cls.__new__(cls)
        base.model_config = config_for(comfy, cls)
        for node, call in calls.items():
            try:
                call(ClassOnlyPatcher(base))
            except AssertionError as exc:  # touched the CLIP / cloned: it accepted the class
                if "before deciding" not in str(exc):
                    raise
                served.setdefault(cls.__name__, []).append(node)
            except ValueError as exc:  # the pack's refusals are ValueErrors (UnsupportedFamily, ConfigError)
                if cls.__name__ not in str(exc):
                    wrong.append(f"{cls.__name__} / {node}: refused without naming the class: {exc}")
                refused += 1
            except Exception as exc:  # noqa: BLE001 — anything else is a crash, not a refusal
                wrong.append(f"{cls.__name__} / {node}: {type(exc).__name__}: {exc}")
    assert not wrong, "\n".join(wrong[:20])
    untested = {
        c: n for c, n in served.items() if c not in END_TO_END and not (c in CLOSED_FORM_ONLY and n == ["closed form"])
    }
    assert not untested, f"served but never sampled end to end by the real-model tests: {untested}"
    assert refused > len(classes) * 3, (refused, len(classes))


def unclip_patcher(comfy):
    """SD2.1 unCLIP-H (model_base.SD21UNCLIP) on a reduced SD2 UNet, with ComfyUI's own SD2 CLIP (random)."""
    import comfy.supported_models as sm

    unet = dict(
        SD15_UNET, context_dim=1024, use_linear_in_transformer=True, adm_in_channels=2048, num_classes="sequential"
    )
    unet.pop("num_heads")
    unet["num_head_channels"] = 64
    cfg = sm.SD21UnclipH(unet)
    patcher = random_patcher(comfy, cfg, 7)
    clip = comfy.sd.CLIP(target=cfg.clip_target())
    randomise(clip.cond_stage_model, 8)
    return patcher, clip, 4


def pix2pix_patcher(comfy):
    """SDXL InstructPix2Pix (model_base.SDXL_instructpix2pix: 8 input channels, the image latent concatenated;
    ComfyUI fills zeros when no image is given) on the reduced SDXL UNet."""
    import comfy.supported_models as sm

    cfg = sm.SDXL_instructpix2pix(dict(SDXL_UNET, in_channels=8))
    return random_patcher(comfy, cfg, 9), FakeSDXLClip(), 4


@pytest.mark.parametrize("variant", ["SDXL_instructpix2pix", "SD21UNCLIP"])
def test_the_guarded_unet_variants_sample_with_every_guard(comfy, pack, variant):
    """The two UNet variants the guards serve besides SD1.x/SD2.x/SDXL: every guard samples, changes the
    output of a prompt with the concept, and at strength 0 is bit-identical."""
    nodes, _ = pack
    model, clip, channels = (pix2pix_patcher if variant == "SDXL_instructpix2pix" else unclip_patcher)(comfy)
    assert type(model.model).__name__ == variant
    prompt = "a photo of a nude person on a beach"
    with torch.no_grad():
        base = sample(comfy, model, clip, prompt, channels=channels)
        for name, make in makers(nodes, model, clip, prompt=prompt).items():
            off = sample(comfy, make(0.0), clip, prompt, channels=channels)
            assert torch.equal(off, base), f"{name} at strength 0 changed {variant}'s output"
            on = sample(comfy, make(1.0), clip, prompt, channels=channels)
            assert torch.isfinite(on).all(), f"{name} made {variant}'s output non-finite"
            assert not torch.equal(on, base), f"{name} did not act on {variant}"
