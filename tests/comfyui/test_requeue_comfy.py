"""Edit only the prompt text and queue again, in a real ComfyUI server (opt-in: ``COMFYUI_PATH``).

SAFREE (empty prompt: read from the workflow) and the facilitated-transport gate read the prompt text from
the workflow graph, which ComfyUI's cache key does not see. Before #13 the second queue reused the MODEL
prepared for the old prompt: SAFREE left the new prompt unguarded and the gate scored it by a cruder rule.
Here the second image must equal the one made for the new prompt by a node that had to run afresh.
"""

from __future__ import annotations

import os
import shutil

import pytest
from comfy_harness import ComfyServer, txt2img_prompt
from safetensors.torch import save_file

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        not os.environ.get("COMFYUI_PATH", "").strip(), reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped"
    ),
]

FIRST, SECOND = "a bowl of tomato soup on a table", "a photo of a nude person on a beach, snoopy"


@pytest.fixture(scope="module")
def server(comfy, sd15_checkpoint, tmp_path_factory):
    server = ComfyServer(comfy.path, tmp_path_factory.mktemp("requeue_base"), checkpoint=sd15_checkpoint)
    server.start(timeout=900)
    try:
        yield server
    finally:
        server.stop()


def run(server, graph, prefix) -> bytes:
    """The saved image's pixels (the PNG itself embeds the workflow, which differs between runs)."""
    from PIL import Image

    graph["7"]["inputs"]["filename_prefix"] = prefix
    history = server.run_prompt(graph, timeout=900)
    status = history.get("status", {})
    assert status.get("status_str") == "success", (status, server.log_tail())
    image = history["outputs"]["7"]["images"][0]["filename"]
    with Image.open(server.base_dir / "output" / image) as png:
        return png.convert("RGB").tobytes()


def with_node(text: str, node: dict) -> dict:
    graph = txt2img_prompt(text, "", seed=3)
    graph["e"] = node
    graph["5"]["inputs"]["model"] = ["e", 0]
    return graph


def safree(prompt: str = "") -> dict:
    return {
        "class_type": "EraserSAFREE",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "prompt": prompt,
            "concepts": "nude, naked",
            "preset": "nudity",
            "alpha": 0.0,
            "include_eos": True,
            "self_validating": False,
            "keywords_as_negative": False,
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "risk_gate": 0.0,
        },
    }


def test_safree_follows_a_prompt_edited_between_queues(server):
    run(server, with_node(FIRST, safree()), "rq_safree_1")
    edited = run(server, with_node(SECOND, safree()), "rq_safree_2")  # only node 2's text changed
    fresh = run(server, with_node(SECOND, safree(prompt=SECOND)), "rq_safree_typed")  # a new input: runs afresh
    assert edited == fresh, "the re-queued run did not apply SAFREE to the edited prompt"
    # a prompt typed into SAFREE that is not the sampler's prompt: refused before sampling, no image
    history = server.run_prompt(with_node(SECOND, safree(prompt=FIRST)), timeout=900)
    assert history.get("status", {}).get("status_str") == "error"
    assert "not the encoding of the prompt this node analysed" in str(history["status"]), history["status"]


@pytest.fixture(scope="module")
def membrane(server, sd15_loaded, tmp_path_factory):
    """A rank-1 SPM membrane on every attn2 K/V of the random SD1.5 (concept "snoopy")."""
    import torch
    from comfy_harness import REPO_ROOT  # noqa: F401  (the harness puts the pack on sys.path)

    model = sd15_loaded[0]
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for key, value in model.model.diffusion_model.state_dict().items():
        if "attn2.to_k.weight" in key or "attn2.to_v.weight" in key:
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[name + ".lora_up.weight"] = torch.randn(value.shape[0], 1, generator=generator)
            tensors[name + ".lora_down.weight"] = torch.randn(1, value.shape[1], generator=generator)
            tensors[name + ".alpha"] = torch.tensor(1.0)
    folder = server.base_dir / "models" / "spm"
    folder.mkdir(parents=True, exist_ok=True)
    path = tmp_path_factory.mktemp("rq_spm") / "snoopy.safetensors"
    save_file(tensors, str(path), metadata={"prompts": "snoopy", "rank": "1", "alpha": "1.0"})
    shutil.copy(path, folder / "rq_snoopy.safetensors")
    return "rq_snoopy.safetensors"


def spm(name: str, concepts: str = "") -> dict:
    return {
        "class_type": "EraserSPMLoad",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "membrane": name,
            "strength": 1.0,
            "transport": True,
            "combination": "official",
            "concepts": concepts,  # ignored when the file names its concepts: only makes the node run afresh
        },
    }


def test_spm_gate_follows_a_prompt_edited_between_queues(server, membrane):
    # concept prompt first, then an unrelated one: a stale gate cannot read the new text and opens fully
    run(server, with_node(SECOND, spm(membrane)), "rq_spm_1")
    edited = run(server, with_node(FIRST, spm(membrane)), "rq_spm_2")  # only node 2's text changed
    fresh = run(server, with_node(FIRST, spm(membrane, concepts="x")), "rq_spm_fresh")
    always = with_node(FIRST, spm(membrane))
    always["e"]["inputs"]["transport"] = False
    assert edited == fresh, "the re-queued run gated the edited prompt differently from a fresh run"
    assert edited != run(server, always, "rq_spm_always"), "the gate did not close for the unrelated prompt"
