"""SPM membranes in a real ComfyUI sampling run (random-weight SD1.5 checkpoint, CPU).

The concept prompt (its token is in the prompt: m = 1) must change the output; an unrelated prompt must
get exactly the formula's share: with the official combination one membrane acts at m(p)², so sampling
it equals sampling the same membrane with transport off at strength m(p) (rate m → ΔW·m²).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys

import pytest
import torch
from comfy_harness import REPO_ROOT, sample
from safetensors.torch import save_file

PACK = "concept_erasers_spm_test"
TARGET = re.compile(
    r"^((input|output)_blocks\.\d+\.1|middle_block\.1)\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
CONCEPT, UNRELATED = "a photo of snoopy", "a bowl of tomato soup on a table"


def import_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.nodes.spm_runtime"), importlib.import_module(
        f"{PACK}.erasers.membranes.spm"
    )


@pytest.fixture(scope="module")
def membrane_file(sd15_loaded, tmp_path_factory):
    import_pack()
    kohya_name = importlib.import_module(f"{PACK}.erasers.files.keys").kohya_name
    model = sd15_loaded[0]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, w in model.model.diffusion_model.state_dict().items():
        if TARGET.match(key):
            stem = kohya_name(key)
            tail = tuple(w.shape[2:])
            tensors[f"{stem}.lora_down.weight"] = 0.15 * torch.randn((1, w.shape[1]) + tail, generator=g)
            tensors[f"{stem}.lora_up.weight"] = 0.15 * torch.randn((w.shape[0], 1) + tail, generator=g)
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    assert tensors, "no SPM target layer found in the test UNet"
    path = tmp_path_factory.mktemp("spm") / "snoopy.safetensors"
    save_file(tensors, str(path), metadata={"prompts": "snoopy", "rank": "1", "alpha": "1.0"})
    return str(path)


def test_membrane_in_a_real_sampling_run(comfy, sd15_loaded, membrane_file):
    runtime, core = import_pack()
    model, clip, _ = sd15_loaded
    deltas, report = runtime.convert_for_model(model, membrane_file, fmt="spm")
    assert not report.unmatched and report.concepts == ["snoopy"]
    encoder = runtime.ComfyTextEncoder(clip)

    def with_membrane(transport, strength):
        gate = core.Gate(core.GATE_FT if transport else core.GATE_ALWAYS, ["snoopy"])
        m = model.clone()
        runtime.attach(
            m, core.Membrane(deltas, gate, strength), encoder if transport else None, [CONCEPT, UNRELATED], "official"
        )
        return m

    def run(m, text):
        return sample(comfy, m, clip, text, "", seed=3, steps=2, size=64)

    base_c, base_u = run(model, CONCEPT), run(model, UNRELATED)
    gated = with_membrane(True, 1.0)
    out_c, out_u = run(gated, CONCEPT), run(gated, UNRELATED)
    m_u = (
        core.RateCache(gated.model_options["transformer_options"][runtime.MEMBRANES_KEY].membranes, encoder)
        .rates([UNRELATED])[0, 0]
        .item()
    )
    assert 0.0 < m_u < 1.0
    change_c = (out_c - base_c).norm() / base_c.norm()
    change_u = (out_u - base_u).norm() / base_u.norm()
    assert change_c > 1e-2, f"the concept prompt's output barely moved ({change_c:.3g})"
    formula = run(with_membrane(False, m_u), UNRELATED)  # static membrane at rate m → ΔW·m²
    torch.testing.assert_close(out_u, formula, rtol=1e-3, atol=1e-3)
    full = run(with_membrane(False, 1.0), UNRELATED)
    assert change_u < (full - base_u).norm() / base_u.norm()
    assert torch.equal(run(model, UNRELATED), base_u)  # the input model is untouched


@pytest.fixture(scope="module")
def spm_server(comfy, sd15_checkpoint, tmp_path_factory):
    """Like the harness's comfy_server, with a long start-up limit (shared CPUs can be slow)."""
    from comfy_harness import ComfyServer

    server = ComfyServer(comfy.path, tmp_path_factory.mktemp("spm_base"), checkpoint=sd15_checkpoint)
    server.start(timeout=900)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.server
def test_nodes_run_in_a_server_workflow(spm_server, membrane_file):
    import shutil

    from comfy_harness import txt2img_prompt

    comfy_server = spm_server

    info = comfy_server.object_info()
    assert "EraserSPMLoad" in info and "EraserLoRALoad" in info, comfy_server.log_tail()
    spm_dir = comfy_server.base_dir / "models" / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(membrane_file, spm_dir / "snoopy.safetensors")
    outputs = {}
    for name, loaders in (("base", None), ("one", 1), ("three", 3)):
        prompt = txt2img_prompt(CONCEPT, "", seed=5, prefix=f"ce_spm_{name}")
        source = ["1", 0]
        for i in range(loaders or 0):
            node_id = f"s{i}"
            prompt[node_id] = {
                "class_type": "EraserSPMLoad",
                "inputs": {
                    "model": source,
                    "clip": ["1", 1],
                    "membrane": "snoopy.safetensors",
                    "strength": 1.0,
                    "transport": True,
                    "combination": "official",
                    "concepts": "",
                },
            }
            source = [node_id, 0]
        prompt["5"]["inputs"]["model"] = source
        history = comfy_server.run_prompt(prompt, timeout=900)
        assert history.get("status", {}).get("status_str") == "success", comfy_server.log_tail()
        images = history["outputs"]["7"]["images"]
        outputs[name] = (comfy_server.base_dir / "output" / images[0]["filename"]).read_bytes()
    assert outputs["one"] != outputs["base"] and outputs["three"] != outputs["one"]


def test_erasure_lora_always_gate_equals_the_hooked_delta(comfy, sd15_loaded, membrane_file):
    """The static add_patches path ("always") and the run-time hook path give the same sampling result."""
    runtime, core = import_pack()
    lora = importlib.import_module(f"{PACK}.nodes.lora")
    model, clip, _ = sd15_loaded
    deltas, report = runtime.convert_for_model(model, membrane_file)
    assert report.format == "spm" and not report.unmatched
    static = model.clone()
    applied = static.add_patches(lora.static_patches(deltas), 0.5)
    assert len(applied) == len(deltas)
    hooked = model.clone()
    runtime.attach(hooked, core.Membrane(deltas, core.Gate(core.GATE_ALWAYS), 0.5), None, [], None)
    base = sample(comfy, model, clip, UNRELATED, "", seed=4, steps=2, size=64)
    out_static = sample(comfy, static, clip, UNRELATED, "", seed=4, steps=2, size=64)
    out_hooked = sample(comfy, hooked, clip, UNRELATED, "", seed=4, steps=2, size=64)
    assert (out_static - base).norm() > 1e-3 * base.norm()
    torch.testing.assert_close(out_static, out_hooked, rtol=1e-3, atol=1e-3)
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(comfy, model, clip, UNRELATED, "", seed=4, steps=2, size=64), base)
