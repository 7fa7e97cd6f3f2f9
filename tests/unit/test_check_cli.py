"""``python -m erasers check`` end to end: the shapes world (scored by its classifier) and a tiny random
diffusers StableDiffusionPipeline saved to disk (no scorer: the report says so)."""

import json

import pytest

diffusers = pytest.importorskip("diffusers")

from test_spm_generate import model_dir  # noqa: E402, F401  (fixture)

from erasers.check import grid_geometry, validate_report  # noqa: E402
from erasers_diffusers.cli import main  # noqa: E402


def read(out):
    from PIL import Image

    report = json.loads((out / "check.json").read_text(encoding="utf-8"))
    with Image.open(out / "check.png") as img:
        size = img.size
    return report, size


def test_check_command_on_the_shapes_world(tmp_path):
    from erasers_dev.bench.shapes import closed_form_config
    from erasers_dev.shapes import load_default
    from erasers_diffusers import api

    eraser = api.compute_eraser_for_pipeline(load_default(), closed_form_config("uce", ["circle"]))
    path = api.save_eraser(eraser, str(tmp_path / "uce_circle.safetensors"))
    out = tmp_path / "check"
    argv = ["check", "--model", "shapes", "--eraser", path, "--seeds", "0", "--steps", "6", "--out", str(out)]
    assert main(argv) == 0
    report, size = read(out)
    assert validate_report(report) == []
    assert report["score"]["scorer"] == "shapes classifier"
    assert report["concepts"] == ["circle"]  # from the file
    assert [r["prompt"] for r in report["rows"] if r["kind"] == "neighbour"] == ["square", "triangle", "cross"]
    g = grid_geometry(len(report["rows"]), 2, 16, 16, upscale=8)
    assert size == (g.width, g.height)


def test_check_command_on_a_diffusers_folder(model_dir, tmp_path):  # noqa: F811
    from erasers.edits.uce import UCEConfig
    from erasers_diffusers import api

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model_dir / "model"))
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["snoopy"], preserve=["a bowl of soup"]))
    path = api.save_eraser(eraser, str(tmp_path / "uce_snoopy.safetensors"))
    out = tmp_path / "check"
    argv = ["check", "--model", str(model_dir / "model"), "--eraser", path, "--seeds", "0,5", "--steps", "2"]
    assert main(argv + ["--size", "32", "--device", "cpu", "--prompt", "snoopy soup", "--out", str(out)]) == 0
    report, size = read(out)
    assert validate_report(report) == []
    assert report["score"]["computed"] is False and "no score was computed" in report["score"]["reason"]
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds[0] == "concept" and kinds[-1] == "adversarial" and "extra" in kinds and "neighbour" in kinds
    gap = report["adversarial"]["snoopy"]
    assert gap["c_prime"] < gap["plain"]
    g = grid_geometry(len(report["rows"]), 4, 32, 32)
    assert size == (g.width, g.height)
