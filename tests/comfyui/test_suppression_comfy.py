"""Suppression nodes inside a real ComfyUI (opt-in: ``COMFYUI_PATH``; checked with v0.3.64): SD1.5 and
Flux in real sampling runs, SD3 joint blocks (models and stand-in CLIPs: suppression_models.py)."""

from __future__ import annotations

import os

import pytest
import torch
from suppression_models import (  # noqa: F401  (comfy, pack, counts, sd15, flux, sd3 are fixtures)
    COMMON,
    PROMPT,
    comfy,
    counts,
    flux,
    makers,
    pack,
    run_node,
    sample,
    sd3,
    sd15,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)


def test_sd15_each_node_samples_and_strength_zero_is_bit_identical(comfy, pack, sd15, counts):
    nodes, _ = pack
    model, clip = sd15
    base = sample(comfy, model, clip, PROMPT)
    assert torch.isfinite(base).all()
    variants = makers(nodes, model, clip, safety_concept="nudity")
    for name, make in variants.items():
        off = sample(comfy, make(0.0), clip, PROMPT)
        assert torch.equal(off, base), f"{name}: strength 0 must leave the output bit-identical"
        on = sample(comfy, make(1.0), clip, PROMPT)
        assert torch.isfinite(on).all(), name
        if name != "safree":  # SAFREE may legitimately flag nothing on a random-weight CLIP
            assert not torch.equal(on, base), f"{name} had no effect"
    assert counts["nag"] > 0 and counts["biased"] > 0


def test_sd15_outside_window_and_benign_prompt_are_bit_identical(comfy, pack, sd15):
    nodes, _ = pack
    model, clip = sd15
    benign = "a red house"
    base = sample(comfy, model, clip, benign)
    # token suppression with exact matching only: the benign prompt has no concept token → untouched
    m = run_node(
        nodes.EraserTokenSuppress,
        model=model,
        clip=clip,
        concepts="nude",
        factor=0.0,
        include_eos=True,
        similarity=1.0,
        prompt=benign,
        **COMMON,
    )
    assert torch.equal(sample(comfy, m, clip, benign), base)
    # a window that no step of this schedule falls into
    m = run_node(
        nodes.EraserConceptGuidance,
        model=model,
        clip=clip,
        concepts="nude",
        phi=5.0,
        tau=2.5,
        alpha=0.25,
        sigma_end=1e6,
        **COMMON,
    )
    assert torch.equal(sample(comfy, m, clip, PROMPT), sample(comfy, model, clip, PROMPT))


def test_methods_compose(comfy, pack, sd15, counts):
    nodes, _ = pack
    model, clip = sd15
    m = run_node(
        nodes.EraserTokenSuppress,
        model=model,
        clip=clip,
        concepts="nude",
        factor=0.0,
        include_eos=True,
        similarity=0.99,
        prompt=PROMPT,
        **COMMON,
    )
    m = run_node(
        nodes.EraserConceptGuidance,
        model=m,
        clip=clip,
        concepts="nude",
        phi=5.0,
        tau=2.5,
        alpha=0.25,
        sigma_end=0.0,
        **COMMON,
    )
    out = sample(comfy, m, clip, PROMPT)
    assert torch.isfinite(out).all() and counts["nag"] > 0 and counts["biased"] > 0


def test_flux_concept_guidance_and_token_suppression(comfy, pack, flux, counts, monkeypatch):
    nodes, hooks = pack
    model, clip = flux
    seen = []
    original = hooks.DitDispatch.__call__

    def spy(self, args, extra):
        seen.append((self.kind, self.index))
        return original(self, args, extra)

    monkeypatch.setattr(hooks.DitDispatch, "__call__", spy)
    base = sample(comfy, model, clip, PROMPT, cfg=1.0, channels=16)
    m = run_node(
        nodes.EraserConceptGuidance,
        model=model,
        clip=clip,
        concepts="nude",
        phi=5.0,
        tau=2.5,
        alpha=0.25,
        sigma_end=0.0,
        **COMMON,
    )
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert {("double", 0), ("double", 1), ("single", 0), ("single", 1)} <= set(seen)
    assert counts["nag"] >= 4
    m = run_node(
        nodes.EraserTokenSuppress,
        model=model,
        clip=clip,
        concepts="nude",
        factor=0.0,
        include_eos=False,
        similarity=0.99,
        prompt=PROMPT,
        **COMMON,
    )
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert (
        torch.isfinite(out).all() and not torch.equal(out, base) and counts["biased"] >= 4
    )  # image rows of every block
    off = run_node(
        nodes.EraserTokenSuppress,
        model=model,
        clip=clip,
        concepts="nude",
        factor=0.0,
        include_eos=False,
        similarity=0.99,
        prompt=PROMPT,
        **dict(COMMON, strength=0.0),
    )
    assert torch.equal(sample(comfy, off, clip, PROMPT, cfg=1.0, channels=16), base)


def test_flux_safree_projects_t5_and_sld_is_refused(comfy, pack, flux):
    nodes, _ = pack
    model, clip = flux
    m = makers(nodes, model, clip)["safree"](1.0)
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Flux"):
        run_node(nodes.EraserSLD, model=model, clip=clip, preset="medium", safety_concept="nudity", **COMMON)


def test_sd3_joint_blocks_all_methods(comfy, pack, sd3, counts):
    nodes, _ = pack
    model, clip = sd3
    base = sample(comfy, model, clip, PROMPT, channels=16)
    made = {
        "guidance": run_node(
            nodes.EraserConceptGuidance,
            model=model,
            clip=clip,
            concepts="nude",
            phi=5.0,
            tau=2.5,
            alpha=0.25,
            sigma_end=0.0,
            **COMMON,
        ),
        "tokens": run_node(
            nodes.EraserTokenSuppress,
            model=model,
            clip=clip,
            concepts="nude",
            factor=0.0,
            include_eos=False,
            similarity=0.99,
            prompt=PROMPT,
            **COMMON,
        ),
        "sld": run_node(nodes.EraserSLD, model=model, clip=clip, preset="max", safety_concept="nudity", **COMMON),
        "safree": run_node(
            nodes.EraserSAFREE,
            model=model,
            clip=clip,
            prompt=PROMPT,
            concepts="nude",
            preset="nudity",
            alpha=0.01,
            include_eos=True,
            self_validating=False,
            keywords_as_negative=False,
            **COMMON,
        ),
    }
    for name, m in made.items():
        out = sample(comfy, m, clip, PROMPT, channels=16)
        assert torch.isfinite(out).all(), name
        if name != "safree":
            assert not torch.equal(out, base), f"{name} had no effect on SD3"
    assert counts["nag"] > 0 and counts["biased"] > 0
