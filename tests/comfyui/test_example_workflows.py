"""Every workflow in example_workflows/ validates against /object_info and, converted to API format,
runs on the random-weight SD1.5 checkpoint (COMFYUI_PATH set; otherwise skipped by conftest).

The only changes made for the test: the checkpoint name becomes the test checkpoint, latents shrink to
64x64 and samplers take 2 steps (CPU). Workflows run in name order, so one that saves an eraser file
(erase_then_save) runs before one that loads it (load_then_sample).
"""
from __future__ import annotations

import copy
import json
import logging
import time

import pytest

from comfy_harness import CHECKPOINT_NAME, REPO_ROOT
from ui_to_api import to_api, validate

log = logging.getLogger(__name__)

EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))


def for_cpu_test(workflow: dict) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple":
            values[0] = CHECKPOINT_NAME
        elif node["type"] == "EmptyLatentImage":
            values[0] = values[1] = 64
        elif node["type"] == "KSampler":
            values[2] = 2  # [seed, control_after_generate, steps, cfg, sampler, scheduler, denoise]
    return wf


@pytest.mark.server
@pytest.mark.slow
def test_every_example_workflow_validates_and_runs(comfy_server):
    assert EXAMPLES, "example_workflows/ is empty"
    for path in EXAMPLES:
        workflow = for_cpu_test(json.loads(path.read_text(encoding="utf-8")))
        object_info = comfy_server.object_info()  # fresh: files saved by earlier examples appear in combos
        problems = validate(workflow, object_info)
        assert not problems, f"{path.name}:\n" + "\n".join(problems)
        prompt = to_api(workflow, object_info)
        t0 = time.monotonic()
        entry = comfy_server.run_prompt(prompt, timeout=600)
        log.info("%s ran in %.1f s", path.name, time.monotonic() - t0)
        assert entry["status"]["status_str"] == "success", (path.name, entry["status"])
        savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
        for nid in savers:
            images = entry["outputs"].get(nid, {}).get("images", [])
            assert images and images[0]["filename"].endswith(".png"), (path.name, nid, entry["outputs"])
