"""The Eraser Check node (issue #17) in a real ComfyUI: a --cpu server on the random SD1.5 checkpoint, and
the node's pieces in-process. Run with the command in tests/comfyui/README.md; skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
from comfy_harness import CHECKPOINT_NAME
from test_closed_form_nodes import pack  # noqa: F401  (fixture)

from erasers.check import grid_geometry, validate_report


def report_of(text: str) -> dict:
    """The node's STRING output is the table followed by the JSON report."""
    return json.loads(text[text.index("\n{") + 1 :])


def check_graph(**widgets) -> dict:
    inputs = {
        "erased_model": ["2", 0],
        "original_model": ["1", 0],
        "clip": ["1", 1],
        "vae": ["1", 2],
        "concepts": "",  # read from the eraser upstream
        "extra_prompts": "a starry night, painted",
        "keep": "",  # the eraser's preserve list
        "concept_type": "art",
        "seed": 3,
        "seeds": 1,
        "steps": 2,
        "cfg": 7.0,
        "width": 64,
        "height": 64,
        "sampler_name": "euler",
        "scheduler": "normal",
        **widgets,
    }
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {
            "class_type": "EraserClosedForm",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "method": "uce",
                "concepts": "Van Gogh",
                "anchors": "",
                "preserve": "Claude Monet",
                "strength": 1.0,
                "concept_type": "art",
            },
        },
        "3": {"class_type": "EraserCheck", "inputs": inputs},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ce_check"}},
    }


@pytest.mark.server
def test_the_node_runs_in_a_server_and_returns_the_documented_grid_and_a_valid_report(comfy_server):
    from PIL import Image

    assert "EraserCheck" in comfy_server.object_info()
    entry = comfy_server.run_prompt(check_graph(), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    shown = entry["outputs"]["3"]
    assert shown["images"], "the node shows no preview"
    report = report_of(shown["text"][0])
    assert validate_report(report) == []
    # concepts and neighbours read from the EraserClosedForm upstream; a UCE edit gets the c′ probe
    assert report["concepts"] == ["Van Gogh"]
    assert report["eraser"]["kind"] == "weight" and report["eraser"]["methods"] == ["uce"]
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["concept"] + ["phrasing"] * 3 + ["extra", "neighbour", "unrelated", "unrelated", "adversarial"]
    assert [r["prompt"] for r in report["rows"] if r["kind"] == "neighbour"] == ["Claude Monet"]
    assert report["score"]["computed"] is False and "no score was computed" in report["score"]["reason"]
    assert report["settings"]["seeds"] == [3] and report["settings"]["steps"] == 2
    gap = report["adversarial"]["Van Gogh"]
    assert gap["c_prime"] < gap["plain"], gap  # c′ gets closer to the original response than the concept
    # the saved grid has the documented size (erasers/check/grid.py)
    g = grid_geometry(len(report["rows"]), 2, 64, 64)
    saved = entry["outputs"]["4"]["images"][0]
    with Image.open(comfy_server.base_dir / "output" / saved.get("subfolder", "") / saved["filename"]) as img:
        assert img.size == (g.width, g.height)
    assert report["grid"]["size"] == [g.height, g.width]


@pytest.mark.server
def test_without_an_eraser_there_is_no_c_prime_probe(comfy_server):
    graph = check_graph(erased_model=["1", 0], concepts="Van Gogh", keep="a cat", concept_type="object")
    entry = comfy_server.run_prompt(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = report_of(entry["outputs"]["3"]["text"][0])
    assert validate_report(report) == []
    assert "adversarial" not in [r["kind"] for r in report["rows"]]
    assert any("no c' probe" in n for n in report["notes"])
    assert report["eraser"]["kind"] == "unknown"


@pytest.fixture(scope="module")
def check_module(pack):  # noqa: F811
    return importlib.import_module(f"{sys.modules['concept_erasers'].__name__}.nodes.check")


def test_clip_vision_score_is_refused_for_a_text_tower_without_projection(comfy, sd15_loaded, check_module):
    """SD1.x checkpoints do not carry CLIP's text projection: the node says why no score was computed."""
    _, clip, _ = sd15_loaded
    with pytest.raises(ValueError, match="no trained text projection"):
        check_module.ClipVisionScorer(object(), clip)


def test_upstream_erasers_stop_at_the_original_model(check_module):
    prompt = check_graph()["3"]["inputs"]
    graph = check_graph()
    graph["5"] = {"class_type": "EraserSLD", "inputs": {"model": ["1", 0], "concepts": "nudity"}}
    graph["3"]["inputs"] = {**prompt, "original_model": ["5", 0], "erased_model": ["2", 0]}
    methods, concepts, preserve = check_module.upstream_erasers(graph, "3")
    # the SLD node is on the original model's side; only the closed-form edit sits between the two
    assert methods == ["uce"] and concepts == ["Van Gogh"] and preserve == ["Claude Monet"]
