"""The Eraser Check node's output in the real ComfyUI frontend (headless chromium), and its screenshot.

Loads ``example_workflows/check_erasure.json`` (checkpoint = the random-weight SD1.5 the conftest writes,
so the rendered images are noise: the picture shows the node's grid layout, not an erasure), queues it
from the page like the Queue button, waits until the node shows the grid it returned and screenshots the
canvas region with Erase Concepts, Eraser Check and Preview Image. The screenshot goes to
``tests/_artifacts/check_node.png``; with ``CE_WRITE_SCREENSHOTS=1`` it also refreshes
``docs/images/check_node.png`` (palette-reduced). Needs what ``test_frontend.py`` needs (chromium, node,
playwright-core); skipped without them.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
from comfy_harness import CHECKPOINT_NAME, REPO_ROOT
from test_check_comfy import report_of
from test_frontend import ARTIFACTS, CHROMIUM, example, node_of, playwright_dir, post_setting, require_browser

from erasers.check import grid_geometry, validate_report

#: small enough for a shared CPU (a few minutes); 96 px tiles are the smallest whose column labels
#: ("seed 0 before", 6 px per character at label scale 1) are not clipped
SIZE, STEPS, SEEDS = 96, 2, 1
EXTRA = "a starry night, painted"


def screenshot_workflow() -> dict:
    wf = copy.deepcopy(example("check_erasure.json"))
    node_of(wf, "CheckpointLoaderSimple")["widgets_values"][0] = CHECKPOINT_NAME
    check = node_of(wf, "EraserCheck")
    # [concepts, extra_prompts, keep, concept_type, seed, control, seeds, steps, cfg, width, height, sampler, …]
    values = check["widgets_values"]
    values[1], values[6], values[7], values[9], values[10] = EXTRA, SEEDS, STEPS, SIZE, SIZE
    check["size"] = [470, 1400]
    preview = node_of(wf, "PreviewImage")
    preview["pos"], preview["size"] = [check["pos"][0] + 510, check["pos"][1]], [460, 1060]
    return wf


@pytest.mark.server
def test_the_check_node_shows_its_grid_in_the_frontend(comfy_server, tmp_path):
    from PIL import Image

    require_browser()
    post_setting(comfy_server.url, "Comfy.TutorialCompleted", True)  # no template browser on first start
    post_setting(comfy_server.url, "Comfy.Minimap.Visible", False)  # it would cover the Preview Image node
    wf = screenshot_workflow()
    check_id = node_of(wf, "EraserCheck")["id"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "check_node.png"
    config = {
        "url": comfy_server.url,
        "chromium": CHROMIUM,
        "playwrightDir": playwright_dir(),
        "screenshot": str(shot),
        "viewport": {"width": 1500, "height": 1380},
        "workflow": wf,
        "checkNodeId": check_id,
        "frameNodeIds": [node_of(wf, t)["id"] for t in ("EraserClosedForm", "EraserCheck", "PreviewImage")],
        "timeoutMs": 480_000,
    }
    cfg = tmp_path / "driver.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.run(
        ["node", str(Path(__file__).with_name("check_screenshot_driver.mjs")), str(cfg)],
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert proc.returncode == 0, (
        f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{comfy_server.log_tail()}"
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [line for line in out["console"] if "concept_erasers" in line or "Concept Erasers" in line]
    assert not ours, ours

    # the page queued one prompt; the server ran it and the node returned a valid report
    (prompt_id,) = out["executed"]
    entry = comfy_server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = report_of(entry["outputs"][str(check_id)]["text"][0])
    assert validate_report(report) == []
    assert report["concepts"] == ["Van Gogh"] and report["settings"]["seeds"] == list(range(SEEDS))
    assert EXTRA in [r["prompt"] for r in report["rows"]]

    # what the node shows is the grid of the documented size
    g = grid_geometry(len(report["rows"]), 2 * SEEDS, SIZE, SIZE)
    (shown,) = out["nodeImages"]
    assert (shown["width"], shown["height"]) == (g.width, g.height), (shown, g)
    assert report["grid"]["size"] == [g.height, g.width]

    with Image.open(shot) as im:
        assert im.size == (round(out["clip"]["width"]), round(out["clip"]["height"]))
    assert shot.stat().st_size > 20_000
    if os.environ.get("CE_WRITE_SCREENSHOTS") == "1":
        from test_frontend import save_small_png

        save_small_png(shot, REPO_ROOT / "docs" / "images" / "check_node.png")
