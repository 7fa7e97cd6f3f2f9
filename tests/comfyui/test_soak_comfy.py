"""A short run of the ComfyUI soak bench's patcher part (erasers_dev/bench/soak_comfy.py, which runs 1,000
cycles and a 50-workflow server soak): clones made by the pack's closed-form and erasure-LoRA nodes,
applied and removed through ComfyUI's real ModelPatcher by every route the bench knows (direct
patch/unpatch, load_models_gpu/unload_all_models, a lazy switch between two clones, a clone garbage-collected
while loaded), leave the base UNet and CLIP bit-identical. Not timed."""

from __future__ import annotations

import importlib
import sys

from comfy_harness import REPO_ROOT


def soak_module():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("erasers_dev.bench.soak_comfy")


def test_apply_remove_cycles_leave_the_base_weights_bit_identical(comfy, sd15_loaded):
    model, clip, _ = sd15_loaded
    result = soak_module().patcher_cycles(comfy, model, clip, cycles=48, full_every=16, seed=1)
    assert all(s["cycles"] > 0 for s in result["stats"].values()), result["stats"]  # every route ran
    assert result["failures"] == [], result["failures"][:5]
    assert result["full_checks"] == 3 and result["full_failures"] == 0
    for route, s in result["stats"].items():
        assert s["patched_ok"] == s["restored_ok"] == s["cycles"], (route, s)
