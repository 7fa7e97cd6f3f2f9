"""The UI → API workflow converter of the real-ComfyUI tests, against a hand-written /object_info."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "comfyui"))
from ui_to_api import WorkflowError, to_api, validate, widget_values  # noqa: E402

INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"],
    },
    "KSampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"min": 0, "max": 2**64 - 1, "control_after_generate": True}],
                "steps": ["INT", {"min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}],
                "sampler_name": [["euler", "ddim"], {}],
                "positive": ["CONDITIONING", {}],
            }
        },
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "positive"]},
        "output": ["LATENT"],
    },
    "EraserLoad": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "eraser_name": ["COMBO", {"options": ["vg.safetensors"]}],
                "strength": ["FLOAT", {"min": 0.0, "max": 2.0}],
            },
            "optional": {"noise_seed": ["INT", {}], "note": ["STRING", {"forceInput": True}]},
        },
        "input_order": {"required": ["model", "eraser_name", "strength"], "optional": ["noise_seed", "note"]},
        "output": ["MODEL", "ERASER"],
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"],
    },
}


def node(nid, kind, widgets, inputs=(), mode=0):
    return {
        "id": nid,
        "type": kind,
        "mode": mode,
        "widgets_values": widgets,
        "inputs": [{"name": n, "type": t, "link": ln} for n, t, ln in inputs],
    }


def workflow(loader_mode=0):
    return {
        "nodes": [
            node(1, "CheckpointLoaderSimple", ["a.safetensors"]),
            node(2, "EraserLoad", ["vg.safetensors", 0.5, 7, "fixed"], [("model", "MODEL", 1)], mode=loader_mode),
            node(3, "CLIPTextEncode", ["a cat"], [("clip", "CLIP", 3)]),
            node(
                4,
                "KSampler",
                [42, "randomize", 2, 7.0, "euler"],
                [("model", "MODEL", 2), ("positive", "CONDITIONING", 4)],
            ),
            {"id": 5, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        ],
        "links": [
            [1, 1, 0, 2, 0, "MODEL"],
            [2, 2, 0, 4, 0, "MODEL"],
            [3, 1, 1, 3, 1, "CLIP"],
            [4, 3, 0, 4, 5, "CONDITIONING"],
        ],
    }


def test_positional_widgets_skip_control_after_generate():
    assert widget_values(workflow()["nodes"][3], INFO["KSampler"]) == {
        "seed": 42,
        "steps": 2,
        "cfg": 7.0,
        "sampler_name": "euler",
    }
    # optional INT named noise_seed gets a control widget by the legacy name rule; forceInput is no widget
    assert widget_values(workflow()["nodes"][1], INFO["EraserLoad"]) == {
        "eraser_name": "vg.safetensors",
        "strength": 0.5,
        "noise_seed": 7,
    }


def test_to_api_links_names_and_drops_notes():
    prompt = to_api(workflow(), INFO)
    assert set(prompt) == {"1", "2", "3", "4"}
    assert prompt["4"]["inputs"] == {
        "seed": 42,
        "steps": 2,
        "cfg": 7.0,
        "sampler_name": "euler",
        "model": ["2", 0],
        "positive": ["3", 0],
    }
    assert prompt["2"]["inputs"]["model"] == ["1", 0]


def test_bypassed_node_passes_its_input_through():
    prompt = to_api(workflow(loader_mode=4), INFO)
    assert "2" not in prompt and prompt["4"]["inputs"]["model"] == ["1", 0]


def test_validation_names_each_problem():
    wf = workflow()
    wf["nodes"][0]["widgets_values"] = ["missing.safetensors"]
    wf["nodes"][1]["widgets_values"][1] = 5.0
    wf["nodes"].append(node(9, "NoSuchNode", []))
    wf["links"].append([5, 3, 0, 4, 0, "MODEL"])
    problems = "\n".join(validate(wf, INFO))
    assert "'missing.safetensors' is not one of" in problems
    assert "'strength' = 5.0 outside [0.0, 2.0]" in problems
    assert "unknown node type 'NoSuchNode'" in problems
    assert "carries MODEL but output 0 of node 3 is CONDITIONING" in problems
    with pytest.raises(WorkflowError):
        to_api(wf, INFO)
