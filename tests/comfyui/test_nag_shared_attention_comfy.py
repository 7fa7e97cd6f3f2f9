"""Concept guidance on DiTs shares the image-key attention between NAG's two branches (log-sum-exp merge,
erasers/guards/attention_lse.py). Against a real ComfyUI (``COMFYUI_PATH``): the shared path must give the same
samples as the reference path — the model's own attention for Z⁺, a full second attention for Z⁻ — on
Flux (cfg 1: every row guided; cfg 3: the unconditional rows go through the host unguided; composed with
token suppression and with a second concept guidance) and on SD3 (with its x-only self-attention blocks)."""

from __future__ import annotations

import os

import pytest
import torch
from suppression_models import COMMON, PROMPT, comfy, flux, pack, run_node, sample, sd3  # noqa: F401

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
)


def _guided(nodes, model, clip, with_tokens=False, twice=False):
    m = model
    if with_tokens:
        m = run_node(
            nodes.EraserTokenSuppress,
            model=m,
            clip=clip,
            concepts="nude",
            factor=0.1,
            include_eos=False,
            similarity=0.99,
            prompt=PROMPT,
            **COMMON,
        )
    if twice:  # a second concept guidance: its op takes the first one's output as Z⁺
        m = run_node(
            nodes.EraserConceptGuidance,
            model=m,
            clip=clip,
            concepts="beach",
            phi=3.0,
            tau=2.5,
            alpha=0.25,
            sigma_end=0.0,
            **COMMON,
        )
    return run_node(
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


def _both_paths(hooks, monkeypatch, draw):
    """(shared, reference) samples, and how many times the shared path ran."""
    ran = {"guided": 0}
    guided = hooks.DitDispatch.guided

    def spy(self, *a, **k):
        ran["guided"] += 1
        return guided(self, *a, **k)

    monkeypatch.setattr(hooks.DitDispatch, "guided", spy)
    shared = draw()
    monkeypatch.setattr(hooks.DitDispatch, "share_image_attention", False)
    reference = draw()
    return shared, reference, ran["guided"]


@pytest.mark.parametrize(
    "cfg,with_tokens,twice", [(1.0, False, False), (3.0, False, False), (1.0, True, False), (3.0, True, True)]
)
def test_flux_shared_image_attention_equals_reference(comfy, pack, flux, monkeypatch, cfg, with_tokens, twice):
    nodes, hooks = pack
    model, clip = flux
    m = _guided(nodes, model, clip, with_tokens, twice)
    base = sample(comfy, model, clip, PROMPT, cfg=cfg, channels=16, size=16)
    shared, reference, ran = _both_paths(
        hooks, monkeypatch, lambda: sample(comfy, m, clip, PROMPT, cfg=cfg, channels=16, size=16)
    )
    assert ran >= 4 * 2  # 2 double + 2 single blocks, 2 steps
    assert not torch.equal(shared, base)
    torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-5)


def test_sd3_shared_image_attention_equals_reference(comfy, pack, sd3, monkeypatch):
    nodes, hooks = pack
    model, clip = sd3
    m = _guided(nodes, model, clip, with_tokens=True)
    shared, reference, ran = _both_paths(hooks, monkeypatch, lambda: sample(comfy, m, clip, PROMPT, channels=16))
    assert ran >= 2
    torch.testing.assert_close(shared, reference, rtol=1e-4, atol=1e-5)
