"""The front-end extension in the real ComfyUI frontend, driven by headless Debian chromium.

Needs COMFYUI_PATH (else skipped by conftest), a chromium (``/usr/bin/chromium`` or ``CE_CHROMIUM``),
``node`` and playwright-core (never downloads a browser): ``npm --prefix tools/browser install`` or
``CE_PLAYWRIGHT_DIR=<folder whose node_modules holds playwright-core>``. The screenshot goes to
``tests/_artifacts/sidebar.png``; with ``CE_UPDATE_SCREENSHOT=1`` it also refreshes
``docs/images/sidebar.png`` (palette-reduced to stay small).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from comfy_harness import REPO_ROOT, needs_newer_comfyui

log = logging.getLogger(__name__)

CHROMIUM = os.environ.get("CE_CHROMIUM", "/usr/bin/chromium")
EXAMPLES = REPO_ROOT / "example_workflows"
ARTIFACTS = REPO_ROOT / "tests" / "_artifacts"
TEST_FILE = "ce_frontend_vangogh.safetensors"
MISSING_FILE = "ce_missing_vangogh.safetensors"


def playwright_dir():
    candidates = [os.environ.get("CE_PLAYWRIGHT_DIR", ""), str(REPO_ROOT / "tools" / "browser")]
    for folder in candidates:
        if folder and Path(folder, "node_modules", "playwright-core", "package.json").is_file():
            return folder
    return None


def require_browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set CE_CHROMIUM)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if playwright_dir() is None:
        pytest.skip("playwright-core not found: run `npm --prefix tools/browser install` or set CE_PLAYWRIGHT_DIR")


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def node_of(workflow: dict, node_type: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == node_type)


def write_test_eraser(folder: Path) -> Path:
    """A real eraser file (Van Gogh, Monet) made by the core with the toy encoder and SD1 shapes."""
    from erasers.edits.eraser import compute_eraser
    from erasers.edits.uce import UCEConfig
    from erasers.files.eraser_file import save_eraser
    from erasers.files.families import Family
    from erasers_dev.testing import ToyTextEncoder, layer_weights

    folder.mkdir(parents=True, exist_ok=True)
    eraser = compute_eraser(
        UCEConfig(concepts=["Van Gogh", "Monet"], concept_type="art", variant="2023"),
        ToyTextEncoder(),
        layer_weights(Family.SD1),
    )
    return Path(save_eraser(eraser, str(folder / TEST_FILE)))


def showcase_workflow() -> dict:
    """erase_then_sample with a Load Eraser inserted after Erase Concepts (for the screenshot)."""
    wf = copy.deepcopy(example("erase_then_sample.json"))
    erase = node_of(wf, "EraserClosedForm")
    erase["widgets_values"][1] = "Van Gogh\nClaude Monet\nPablo Picasso"
    sampler = node_of(wf, "KSampler")
    link = next(ln for ln in wf["links"] if ln[1] == erase["id"] and ln[3] == sampler["id"])
    new_id, new_link = 20, max(ln[0] for ln in wf["links"]) + 1
    link[1] = new_id
    wf["links"].append([new_link, erase["id"], 0, new_id, 0, "MODEL"])
    erase["outputs"][0]["links"] = [new_link]
    loader = copy.deepcopy(node_of(example("load_then_sample.json"), "EraserLoad"))
    loader.update(id=new_id, pos=[erase["pos"][0], erase["pos"][1] + erase["size"][1] + 60])
    loader["inputs"][0]["link"] = new_link
    loader["outputs"][0]["links"] = [link[0]]
    loader["outputs"][1]["links"] = None
    wf["nodes"].append(loader)
    wf["last_node_id"], wf["last_link_id"] = new_id, new_link
    return wf


def post_setting(url: str, key: str, value) -> None:
    req = urllib.request.Request(
        f"{url}/settings/{key}",
        data=json.dumps(value).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()


def save_small_png(src: Path, dst: Path) -> None:
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=96).save(dst, optimize=True)


@pytest.mark.server
def test_sidebar_switches_info_panel_and_missing_files(comfy, comfy_server, tmp_path):
    comfy_version = comfy.version
    require_browser()
    eraser_path = write_test_eraser(comfy_server.base_dir / "models" / "erasers")
    post_setting(comfy_server.url, "Comfy.TutorialCompleted", True)  # no template browser on first start

    missing = copy.deepcopy(example("load_then_sample.json"))
    node_of(missing, "EraserLoad")["widgets_values"][0] = MISSING_FILE
    missing.setdefault("extra", {})["concept_erasers"] = {
        "version": 1,
        "erasers": [
            {
                "node": node_of(missing, "EraserLoad")["id"],
                "type": "EraserLoad",
                "kind": "eraser file",
                "enabled": True,
                "file": {"folder": "erasers", "name": MISSING_FILE, "sha256": "0123abcd99"},
                "concepts": ["Van Gogh", "Starry Night"],
            }
        ],
    }

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "sidebar.png"
    config = {
        "url": comfy_server.url,
        "chromium": CHROMIUM,
        "playwrightDir": playwright_dir(),
        "screenshot": str(shot),
        "examples": {
            p.name: wf
            for p in sorted(EXAMPLES.glob("*.json"))
            if not needs_newer_comfyui(wf := json.loads(p.read_text(encoding="utf-8")), comfy_version)
        },
        "missingWorkflow": missing,
        "listWorkflow": example("erase_then_sample.json"),
        "fileWorkflow": example("load_then_sample.json"),
        "showcaseWorkflow": showcase_workflow(),
        "choose": {"type": "EraserLoad", "widget": "eraser_name", "file": TEST_FILE},
    }
    cfg = tmp_path / "driver.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.run(
        ["node", str(Path(__file__).with_name("frontend_driver.mjs")), str(cfg)],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, (
        f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{comfy_server.log_tail()}"
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [line for line in out["console"] if "concept_erasers" in line or "Concept Erasers" in line]
    assert not ours, ours
    steps = out["steps"]

    # every example workflow loads with all node types known
    assert steps["examples"], "no example workflows found"
    for name, result in steps["examples"].items():
        assert result["count"] > 0 and result["unknown"] == [], (name, result)

    # a missing file is named with the concepts it erased (sidebar and toast)
    assert any(MISSING_FILE in line and "Van Gogh, Starry Night" in line for line in steps["missing"]["sidebar"]), (
        steps["missing"]
    )
    assert any(MISSING_FILE in t for t in steps["missing"]["toasts"]), steps["missing"]

    # the sidebar lists the example's eraser; the switches bypass (mode 4) and restore (mode 0)
    listing = steps["list"]
    erase_id = node_of(example("erase_then_sample.json"), "EraserClosedForm")["id"]
    assert [e["id"] for e in listing["entries"]] == [erase_id]
    entry = listing["entries"][0]
    assert entry["kind"] == "closed form · uce" and entry["concepts"] == ["Van Gogh"] and entry["switchOn"]
    assert listing["afterSwitchOff"] == 4 and listing["afterSwitchOn"] == 0
    assert listing["afterMasterOff"][str(erase_id)] == 4
    others = {k: v for k, v in listing["afterMasterOff"].items() if k != str(erase_id)}
    assert set(others.values()) == {0}, "the master switch touched a node that is not an eraser"
    assert listing["afterMasterOn"][str(erase_id)] == 0
    assert listing["strength"] == pytest.approx(0.35)

    # the info panel shows the chosen file's metadata; the badge and sidebar show its concepts
    info = steps["info"]
    short = hashlib.sha256(eraser_path.read_bytes()).hexdigest()[:10]
    assert info["rows"]["concepts"] == "Van Gogh, Monet"
    assert info["rows"]["method"] == "uce" and info["rows"]["family"] == "SD1.x" and info["rows"]["sha256"] == short
    assert "Van Gogh, Monet" in info["badge"]
    assert info["entries"][0]["concepts"] == ["Van Gogh", "Monet"]
    summary = info["extra"]
    assert summary["version"] == 1
    (item,) = summary["erasers"]
    assert item["file"] == {"folder": "erasers", "name": TEST_FILE, "sha256": short, "method": "uce", "family": "sd1"}
    assert item["concepts"] == ["Van Gogh", "Monet"]

    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("CE_UPDATE_SCREENSHOT") == "1":
        save_small_png(shot, REPO_ROOT / "docs" / "images" / "sidebar.png")
    log.info("frontend %s; screenshot %s", out.get("frontendVersion"), shot)
