"""``python -m erasers info FILE`` describes every kind of file the pack loads (issue #17).

One small file per kind, in the layout its loader in ``erasers/membranes/formats`` (or the pack's eraser
reader) recognises; the description must name the format the loader reads it as, the family, the layers
(UNet and text encoder), the modules, the rank and the concepts. Where the loader can convert the file
against SD1.x shapes, the layer count is checked against what the loader actually matched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from erasers.edits.eraser import compute_eraser
from erasers.edits.uce import UCEConfig
from erasers.files import file_info
from erasers.files.eraser_file import save_eraser
from erasers.files.families import Family
from erasers.membranes.formats import convert_file
from erasers_dev.testing import ToyTextEncoder, layer_weights, spm_model_shapes

cli = pytest.importorskip("erasers_diffusers.cli")

TE = "te.clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight"
SD1 = {**spm_model_shapes(Family.SD1), TE: (768, 768)}
BLOCK = "input_blocks_4_1_transformer_blocks_0"  # down_blocks.1.attentions.0 in diffusers names (640 wide)
DIFF_BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kohya_pair(stem, out, inn, rank, seed=0):
    return {
        f"{stem}.lora_up.weight": rand(out, rank, seed=seed),
        f"{stem}.lora_down.weight": rand(rank, inn, seed=seed),
    }


def info_json(capsys, path) -> dict:
    code = cli.main(["info", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def info_text(capsys, path) -> str:
    assert cli.main(["info", str(path)]) == 0
    return capsys.readouterr().out


def loader_layers(path) -> int:
    deltas, report = convert_file(load_file(str(path)), {}, SD1)
    assert not report.unmatched, report.summary()
    return len(deltas)


def test_the_packs_own_eraser_file(tmp_path, capsys):
    eraser = compute_eraser(
        UCEConfig(concepts=["Van Gogh"], preserve=["Monet"], concept_type="art"),
        ToyTextEncoder(),
        layer_weights(Family.SD1),
    )
    path = save_eraser(eraser, str(tmp_path / "vangogh.safetensors"))
    info = info_json(capsys, path)
    assert (info["kind"], info["method"], info["family"]) == ("eraser", "uce", "sd1")
    assert info["concepts"] == ["Van Gogh"] and info["preserve"] == ["Monet"]
    assert len(info["layers"]) == len(eraser.deltas) and info["ok"]
    # the header-only description (the ComfyUI file-info panel's) agrees
    header = file_info.describe_header(path)
    assert (header["kind"], header["method"], header["concepts"], header["layers"]) == (
        "eraser",
        "uce",
        ["Van Gogh"],
        len(eraser.deltas),
    )


def spm_tensors():
    tensors = {}
    for i, module in enumerate(("attn1_to_q", "attn2_to_k", "attn2_to_v", "ff_net_0_proj")):
        inn = 768 if module.startswith("attn2_to_") else 640
        out = 5120 if module == "ff_net_0_proj" else 640
        tensors.update(kohya_pair(f"lora_unet_{BLOCK}_{module}", out, inn, rank=1, seed=i))
    return tensors


def test_an_spm_membrane_with_its_metadata(tmp_path, capsys):
    path = tmp_path / "snoopy_spm.safetensors"
    save_file(spm_tensors(), str(path), metadata={"prompts": "snoopy, mickey", "rank": "1", "alpha": "1.0"})
    info = info_json(capsys, path)
    assert (info["kind"], info["method"], info["format"], info["family"]) == ("spm", "spm", "spm", "sd1")
    assert info["concepts"] == ["snoopy", "mickey"] and info["rank"] == 1 and info["ranks"] == [1]
    assert info["modules"] == {"attn1.to_q": 1, "attn2.to_k": 1, "attn2.to_v": 1, "ff.net.0.proj": 1}
    assert (info["layers"], info["text_encoder_layers"], info["text_encoders"]) == (4, 0, [])
    assert info["layers"] == loader_layers(path)
    text = info_text(capsys, path)
    assert "kind:        spm" in text and "snoopy, mickey" in text and "attn2.to_k ×1" in text
    assert "has no eraser metadata" not in text


def test_an_spm_membrane_recognised_by_layout_alone(tmp_path, capsys):
    path = tmp_path / "bare_spm.safetensors"
    save_file(spm_tensors(), str(path))  # no metadata: rank 1, transformer-internal layers only
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["concepts"], info["rank"]) == ("spm", "spm", [], 1)
    assert "(not recorded)" in info_text(capsys, path)


def test_a_kohya_lora_with_text_encoder_keys(tmp_path, capsys):
    tensors = {
        **kohya_pair(f"lora_unet_{BLOCK}_attn2_to_k", 640, 768, rank=4),
        **kohya_pair(f"lora_unet_{BLOCK}_attn2_to_out_0", 640, 640, rank=8, seed=1),
        **kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, rank=4, seed=2),
        f"lora_unet_{BLOCK}_attn2_to_k.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "esd_x_kohya.safetensors"
    save_file(tensors, str(path), metadata={"ss_output_name": "esd-x vangogh", "ss_base_model_version": "sd_v1"})
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["family"], info["title"]) == ("lora", "kohya", "sd1", "esd-x vangogh")
    assert (info["layers"], info["unet_layers"], info["text_encoder_layers"]) == (3, 2, 1)
    assert info["text_encoders"] == ["te"] and info["ranks"] == [4, 8] and info["rank"] == 8
    assert info["modules"] == {"attn2.to_k": 1, "attn2.to_out.0": 1}
    assert info["layers"] == loader_layers(path)
    text = info_text(capsys, path)
    assert "format:      kohya" in text and "1 text encoder" in text and "text keys:   te" in text


def test_a_peft_lora_with_text_encoder_keys(tmp_path, capsys):
    tensors = {
        f"unet.{DIFF_BLOCK}.attn2.to_k.lora_A.weight": rand(4, 768),
        f"unet.{DIFF_BLOCK}.attn2.to_k.lora_B.weight": rand(640, 4),
        f"unet.{DIFF_BLOCK}.attn2.to_v.lora_A.weight": rand(4, 768, seed=1),
        f"unet.{DIFF_BLOCK}.attn2.to_v.lora_B.weight": rand(640, 4, seed=1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": rand(4, 768, seed=2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": rand(768, 4, seed=2),
    }
    path = tmp_path / "peft.safetensors"
    save_file(tensors, str(path))
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["family"], info["rank"]) == ("lora", "peft", "sd1", 4)
    assert (info["unet_layers"], info["text_encoder_layers"], info["text_encoders"]) == (2, 1, ["text_encoder"])
    assert info["modules"] == {"attn2.to_k": 1, "attn2.to_v": 1}
    assert info["layers"] == loader_layers(path)


def test_esd_fine_tuned_unet_weights(tmp_path, capsys):
    prefix = "model.diffusion_model."
    keys = [f"input_blocks.4.1.transformer_blocks.0.attn2.{m}.weight" for m in ("to_q", "to_k", "to_v")] + [
        "input_blocks.4.1.proj_in.weight"
    ]
    tensors = {prefix + k: rand(*SD1[k], seed=i) for i, k in enumerate(keys)}
    path = tmp_path / "esd_u.safetensors"
    save_file(tensors, str(path))
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["family"], info["rank"]) == ("lora", "esd", "sd1", None)
    assert (info["layers"], info["text_encoder_layers"]) == (4, 0)
    assert info["modules"] == {"attn2.to_q": 1, "attn2.to_k": 1, "attn2.to_v": 1, "proj_in": 1}


def test_uce_replacement_weights(tmp_path, capsys):
    keys = [f"{DIFF_BLOCK}.attn2.{m}.weight" for m in ("to_k", "to_v")]
    path = tmp_path / "uce_weights.safetensors"
    save_file({k: rand(640, 768, seed=i) for i, k in enumerate(keys)}, str(path))
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["family"], info["layers"]) == ("lora", "uce_weights", "sd1", 2)
    assert info["modules"] == {"attn2.to_k": 1, "attn2.to_v": 1}


def test_an_eraseanything_flux_lora(tmp_path, capsys):
    tensors = {}
    for i, m in enumerate(("to_q", "to_k", "to_v", "add_k_proj")):
        stem = f"transformer.transformer_blocks.0.attn.{m}"
        tensors[f"{stem}.lora_A.weight"] = rand(2, 32, seed=i)
        tensors[f"{stem}.lora_B.weight"] = rand(32, 2, seed=i)
    path = tmp_path / "eraseanything.safetensors"
    save_file(tensors, str(path))
    info = info_json(capsys, path)
    assert (info["kind"], info["format"], info["family"], info["rank"]) == ("lora", "eraseanything", "flux", 2)
    assert info["modules"] == {"attn.add_k_proj": 1, "attn.to_k": 1, "attn.to_q": 1, "attn.to_v": 1}
    assert (info["layers"], info["text_encoder_layers"]) == (4, 0)


def test_a_layout_no_loader_reads_is_said_so(tmp_path, capsys):
    path = tmp_path / "foreign.safetensors"
    save_file(
        {"vae.decoder.conv_in.lora_up.weight": rand(4, 2), "vae.decoder.conv_in.lora_down.weight": rand(2, 4)},
        str(path),
    )
    info = info_json(capsys, path)
    assert info["format"] is None and "no loader of the pack recognises" in info["note"]
    assert "kohya" in info["note"] and "(not recognised)" in info_text(capsys, path)
