"""Every workflow in example_workflows/ validates against /object_info and, converted to API format,
runs on the random-weight SD1.5 checkpoint (COMFYUI_PATH set; otherwise skipped by conftest).

The only changes made for the test: the checkpoint name becomes the test checkpoint, latents shrink to
64x64 and samplers take 2 steps (CPU); the Eraser Check renders one seed at 64x64 in 2 steps. Workflows
run in name order, so one that saves an eraser file (erase_then_save) runs before one that loads it
(load_then_sample). The SPM membranes and erasure LoRAs the examples name are written first as small
random low-rank files for the test UNet's cross-attention (SPM files with ``prompts`` metadata = the
file's stem; LoRAs without metadata).
"""

from __future__ import annotations

import copy
import json
import logging
import time

import pytest
import torch
from comfy_harness import CHECKPOINT_NAME, REPO_ROOT, needs_newer_comfyui, sd15_checkpoint_shapes
from safetensors.torch import save_file
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
        elif node["type"] == "EraserCheck":
            # [concepts, extra_prompts, keep, concept_type, seed, control, seeds, steps, cfg, width, height, …]
            values[6], values[7], values[9], values[10] = 1, 2, 64, 64
    return wf


#: loader widgets that name model files a DiT example expects the user to have
MODEL_FILE_WIDGETS = {
    ("UNETLoader", "unet_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("VAELoader", "vae_name"),
    ("CLIPLoader", "clip_name"),
    *(("QuadrupleCLIPLoader", f"clip_name{i}") for i in range(1, 5)),
}


def is_dit_workflow(workflow: dict) -> bool:
    return any(node["type"] == "UNETLoader" for node in workflow["nodes"])


ADAPTER_NODES = {"EraserSPMLoad": ("spm", "membrane"), "EraserLoRALoad": ("loras", "file")}
UNET_PREFIX = "model.diffusion_model."


def write_adapter_files(comfy, unet_config, models_dir, workflows) -> list:
    """Random rank-1 files on attn2 to_k/to_v for every SPM / erasure-LoRA file the examples name."""
    from erasers.files.keys import kohya_name

    kv = {
        k[len(UNET_PREFIX) :]: shape
        for k, (shape, _) in sd15_checkpoint_shapes(comfy, unet_config).items()
        if k.startswith(UNET_PREFIX) and (k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight"))
    }
    written = []
    for workflow in workflows:
        for node in workflow["nodes"]:
            if node["type"] not in ADAPTER_NODES:
                continue
            folder, _ = ADAPTER_NODES[node["type"]]
            name = node["widgets_values"][0]
            path = models_dir / folder / name
            if path.exists():
                continue
            gen = torch.Generator().manual_seed(len(written))
            tensors = {}
            for key, (out_f, in_f) in kv.items():
                stem = kohya_name(key)
                tensors[f"{stem}.lora_down.weight"] = 0.05 * torch.randn(1, in_f, generator=gen)
                tensors[f"{stem}.lora_up.weight"] = 0.05 * torch.randn(out_f, 1, generator=gen)
                tensors[f"{stem}.alpha"] = torch.tensor(1.0)
            metadata = {"prompts": path.stem, "rank": "1", "alpha": "1.0"} if folder == "spm" else None
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata=metadata)
            written.append(path)
    return written


@pytest.mark.server
@pytest.mark.slow
def test_every_example_workflow_validates_and_runs(comfy, sd15_unet_config, comfy_server):
    assert EXAMPLES, "example_workflows/ is empty"
    workflows = [json.loads(p.read_text(encoding="utf-8")) for p in EXAMPLES]
    write_adapter_files(comfy, sd15_unet_config, comfy_server.base_dir / "models", workflows)
    for path in EXAMPLES:
        workflow = for_cpu_test(json.loads(path.read_text(encoding="utf-8")))
        if needs_newer_comfyui(workflow, comfy.version):
            log.info("%s needs ComfyUI %s (this is %s): not validated here", path.name,
                     workflow["extra"]["concept_erasers"]["requires_comfyui"], comfy.version)  # fmt: skip
            continue
        object_info = comfy_server.object_info()  # fresh: files saved by earlier examples appear in combos
        problems = validate(workflow, object_info)
        dit = is_dit_workflow(workflow)
        if dit:  # their model files (Flux weights) cannot exist here; everything else must validate
            problems = [p for p in problems if not any(f"({t}): '{w}'" in p for t, w in MODEL_FILE_WIDGETS)]
        assert not problems, f"{path.name}:\n" + "\n".join(problems)
        if dit:
            # a DiT graph cannot run on the SD1.5 test checkpoint, and the families' text encoders (T5, Qwen,
            # Gemma, Llama: billions of weights) cannot exist here; the hooks run on reduced models of the same
            # classes in suppression_models.py / test_*families_comfy.py / test_hidream_comfy.py
            log.info("%s validated; not run (needs the family's weights)", path.name)
            continue
        prompt = to_api(workflow, object_info)
        t0 = time.monotonic()
        entry = comfy_server.run_prompt(prompt, timeout=600)
        log.info("%s ran in %.1f s", path.name, time.monotonic() - t0)
        assert entry["status"]["status_str"] == "success", (path.name, entry["status"])
        savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
        for nid in savers:
            images = entry["outputs"].get(nid, {}).get("images", [])
            assert images and images[0]["filename"].endswith(".png"), (path.name, nid, entry["outputs"])
