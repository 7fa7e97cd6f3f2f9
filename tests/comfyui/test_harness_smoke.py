"""Smoke tests of the real-ComfyUI harness: checkpoint detection, sampling, patch/unpatch, server."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from comfy_harness import (
    SD15_FULL_UNET_CONFIG,
    expected_attn2_kv_keys,
    sample,
    sd15_checkpoint_shapes,
    txt2img_prompt,
)

log = logging.getLogger(__name__)

KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")


def _kv_keys(model):
    return sorted(k for k in model.model_state_dict() if k.endswith(KV_SUFFIXES))


def test_full_sd15_topology_has_32_attn2_kv_keys(comfy):
    # Meta device only: the real SD1.5 layout has 16 cross-attention blocks, 32 to_k/to_v weights.
    shapes = sd15_checkpoint_shapes(comfy, SD15_FULL_UNET_CONFIG)
    kv = [k for k in shapes if k.endswith(KV_SUFFIXES)]
    assert len(kv) == 32 == expected_attn2_kv_keys(SD15_FULL_UNET_CONFIG)
    assert all(shapes[k][0][1] == 768 for k in kv)


def test_checkpoint_is_detected_as_sd15(sd15_loaded, sd15_unet_config):
    model, clip, vae = sd15_loaded
    assert type(model.model.model_config).__name__ == "SD15"
    kv = _kv_keys(model)
    assert len(kv) == expected_attn2_kv_keys(sd15_unet_config)
    assert all(k.startswith("diffusion_model.") for k in kv)
    sd = model.model_state_dict()
    assert all(sd[k].shape[1] == 768 for k in kv)


def test_sample_two_steps_is_finite(comfy, sd15_loaded):
    model, clip, vae = sd15_loaded
    t0 = time.monotonic()
    latent = sample(comfy, model, clip, "a photo of a cat", "", seed=0, steps=2, size=64)
    log.info("2-step 64x64 sample took %.2f s", time.monotonic() - t0)
    assert latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all()
    image = vae.decode(latent)
    assert image.shape[-3:] == (64, 64, 3)
    assert torch.isfinite(image).all()


def test_diff_patch_changes_output_and_unpatches_bit_exactly(comfy, sd15_loaded):
    model, clip, _ = sd15_loaded
    comfy.model_management.unload_all_models()
    kv = _kv_keys(model)
    originals = {k: v.detach().clone() for k, v in model.model_state_dict().items() if k in kv}

    base = sample(comfy, model, clip, "a photo of a cat", "", seed=1)

    gen = torch.Generator().manual_seed(123)
    patched = model.clone()
    patches = {k: ("diff", (torch.randn(originals[k].shape, generator=gen) * 0.05,)) for k in kv}
    applied = patched.add_patches(patches, 1.0)
    assert sorted(applied) == kv
    out = sample(comfy, patched, clip, "a photo of a cat", "", seed=1)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, base), "a diff patch on every attn2 to_k/to_v left the output unchanged"

    comfy.model_management.unload_all_models()
    current = model.model_state_dict()
    for k in kv:
        assert torch.equal(current[k], originals[k]), f"{k} not restored after unload_all_models()"
    again = sample(comfy, model, clip, "a photo of a cat", "", seed=1)
    assert torch.allclose(again, base, rtol=0, atol=1e-6)


@pytest.mark.server
def test_server_starts_and_answers_object_info(comfy_server):
    log.info("ComfyUI server start-up took %.1f s", comfy_server.startup_s)
    stats = comfy_server.get("/system_stats")
    assert "system" in stats
    info = comfy_server.object_info()
    assert "KSampler" in info and "CheckpointLoaderSimple" in info
    ckpts = comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert "ce_test_sd15.safetensors" in ckpts["ckpt_name"][0]


@pytest.mark.server
def test_server_runs_txt2img_with_the_random_checkpoint(comfy_server):
    t0 = time.monotonic()
    entry = comfy_server.run_prompt(txt2img_prompt("a photo of a cat", seed=3), timeout=300)
    log.info("txt2img prompt via the server took %.1f s", time.monotonic() - t0)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")
