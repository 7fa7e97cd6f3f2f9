"""``python -m erasers check --eraser FILE`` with an SPM membrane or an erasure LoRA (issue #17), on the tiny
random diffusers SD folder of test_spm_generate: the kind is read from the file, the file acts on the
"after" side through the diffusers hooks (so the concept row changes), there is no c′ probe, and a file
no loader reads is refused naming what check takes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402
from test_spm_generate import model_dir  # noqa: E402, F401  (fixture)

from erasers.check import grid_geometry, validate_report  # noqa: E402
from erasers_diffusers.cli import main  # noqa: E402

SIZE = 32


def run_check(model_dir, eraser, out, *extra):  # noqa: F811
    argv = ["check", "--model", str(model_dir / "model"), "--eraser", str(eraser), "--seeds", "0", "--steps", "2"]
    return main(argv + ["--size", str(SIZE), "--device", "cpu", "--out", str(out), *extra])


def read(out):
    from PIL import Image

    report = json.loads((out / "check.json").read_text(encoding="utf-8"))
    with Image.open(out / "check.png") as im:
        grid = np.asarray(im.convert("RGB")).astype(np.int16)
    return report, grid


def tile(grid, report, row, col):
    g = grid_geometry(report["grid"]["rows"], report["grid"]["columns"], SIZE, SIZE)
    y, x = g.tile_origin(row, col)
    return grid[y : y + SIZE, x : x + SIZE]


def assert_hooked_check(report, grid, method):
    assert validate_report(report) == []
    assert report["eraser"]["methods"] == [method] and report["eraser"]["kind"] == "membrane"
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds[0] == "concept" and "adversarial" not in kinds
    assert any("no c' probe" in n for n in report["notes"])
    assert not report.get("adversarial")  # no c′ gaps either
    # the concept row's "after" tile (column 1) is not the "before" tile: the file acted on the render
    assert np.abs(tile(grid, report, 0, 1) - tile(grid, report, 0, 0)).max() > 0


def test_check_takes_an_spm_membrane(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "spm"
    assert run_check(model_dir, model_dir / "snoopy.safetensors", out) == 0
    printed = capsys.readouterr().out
    assert "spm: " in printed  # the conversion report of the loader
    report, grid = read(out)
    assert report["concepts"] == ["snoopy"]  # the membrane's recorded prompts
    assert_hooked_check(report, grid, "spm")


def write_kohya_lora(model_dir, path):  # noqa: F811
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model_dir / "model"))
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, mod in pipe.unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = 0.5 * torch.randn(2, mod.weight.shape[1], generator=g)
            tensors[f"{stem}.lora_up.weight"] = 0.5 * torch.randn(mod.weight.shape[0], 2, generator=g)
    save_file(tensors, str(path))


def test_check_takes_an_erasure_lora_and_needs_its_concept(model_dir, tmp_path, capsys):  # noqa: F811
    lora = tmp_path / "esd_x_snoopy.safetensors"
    write_kohya_lora(model_dir, lora)
    # a LoRA records no concept: check asks for one instead of guessing
    assert run_check(model_dir, lora, tmp_path / "none") != 0
    assert "records no concepts" in capsys.readouterr().err
    out = tmp_path / "lora"
    assert run_check(model_dir, lora, out, "--concept", "snoopy") == 0
    assert "kohya: " in capsys.readouterr().out
    report, grid = read(out)
    assert report["concepts"] == ["snoopy"]
    assert_hooked_check(report, grid, "lora")


def test_a_file_no_loader_reads_is_refused_naming_what_check_takes(model_dir, tmp_path, capsys):  # noqa: F811
    foreign = tmp_path / "vae_lora.safetensors"
    save_file(
        {
            "vae.decoder.conv_in.lora_up.weight": torch.zeros(4, 2),
            "vae.decoder.conv_in.lora_down.weight": torch.zeros(2, 4),
        },
        str(foreign),
    )
    assert run_check(model_dir, foreign, tmp_path / "x") != 0
    err = capsys.readouterr().err
    assert "no loader of the pack reads this file" in err and "SPM membrane or an erasure LoRA" in err
    assert not (tmp_path / "x" / "check.png").exists()


def test_the_shapes_world_refuses_a_membrane(model_dir, tmp_path, capsys):  # noqa: F811
    argv = ["check", "--model", "shapes", "--eraser", str(model_dir / "snoopy.safetensors"), "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "s")]) != 0
    assert "--model shapes takes the pack's eraser files only" in capsys.readouterr().err
