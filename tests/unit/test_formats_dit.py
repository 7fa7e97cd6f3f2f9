"""The newer DiTs' LoRA names (erasers/membranes/formats/dit.py, erasers/files/keys.py comfy_lora_names),
on canonical key layouts written out by hand (ComfyUI's own table is checked against real classes in
tests/comfyui/test_family_lora_files_comfy.py)."""

import pytest
import torch

from erasers.errors import UnknownKeys
from erasers.files.keys import comfy_lora_names
from erasers.membranes.formats import convert_file, detect_format, dit, eraseanything

H = 8
QWEN = {
    "img_in.weight": (H, 16),
    "txt_norm.weight": (12,),
    "txt_in.weight": (H, 12),
    "transformer_blocks.0.attn.to_k.weight": (H, H),
    "transformer_blocks.0.attn.add_k_proj.weight": (H, H),
}
CHROMA = {
    "img_in.weight": (H, 16),
    "txt_in.weight": (H, 12),
    "distilled_guidance_layer.in_proj.weight": (H, 4),
    "double_blocks.0.img_attn.qkv.weight": (3 * H, H),
    "double_blocks.0.txt_attn.qkv.weight": (3 * H, H),
    "single_blocks.0.linear1.weight": (5 * H, H),  # mlp_ratio 2
}
WAN = {
    "text_embedding.0.weight": (H, 12),
    "text_embedding.2.weight": (H, H),
    "blocks.0.cross_attn.k.weight": (H, H),
    "blocks.0.cross_attn.v.weight": (H, H),
}


def lora(names, shapes, seed=0, style="peft"):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (key, rows) in names.items():
        up, down = torch.randn(rows, 2, generator=gen), torch.randn(2, shapes[key][1], generator=gen)
        if style == "peft":
            out.update({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down})
        else:
            out.update(
                {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}
            )
    return out


def test_one_file_name_is_a_layer_of_its_own_on_qwen_image_and_fused_rows_on_chroma():
    name = "transformer_blocks.0.attn.add_k_proj"
    qwen, _ = convert_file(lora({name: ("transformer_blocks.0.attn.add_k_proj.weight", H)}, QWEN), {}, QWEN)
    assert list(qwen) == ["transformer_blocks.0.attn.add_k_proj.weight"]
    tensors = lora({name: ("double_blocks.0.txt_attn.qkv.weight", H)}, CHROMA)
    chroma, report = convert_file(tensors, {}, CHROMA)
    assert list(chroma) == [("double_blocks.0.txt_attn.qkv.weight", (0, H, H))] and report.format == "dit"
    # on Flux.1 keys (no distilled_guidance_layer) the same file stays EraseAnything's
    flux = {k: v for k, v in CHROMA.items() if not k.startswith("distilled")}
    _, report = convert_file(tensors, {}, flux)
    assert report.format == eraseanything.NAME


def test_alpha_scales_and_dense_diffs_are_read():
    tensors = lora({"lora_unet_txt_in": ("txt_in.weight", H)}, QWEN, style="kohya")
    tensors["lora_unet_txt_in.alpha"] = torch.tensor(1.0)  # rank 2: scale ½
    diff = torch.randn(H, H)
    tensors["diffusion_model.transformer_blocks.0.attn.to_k.diff"] = diff
    deltas, _ = convert_file(tensors, {}, QWEN)
    up, down = tensors["lora_unet_txt_in.lora_up.weight"], tensors["lora_unet_txt_in.lora_down.weight"]
    torch.testing.assert_close(deltas["txt_in.weight"].dense(), 0.5 * up @ down)
    assert torch.equal(deltas["transformer_blocks.0.attn.to_k.weight"], diff)


def test_the_mlp_input_of_a_flux_single_block_is_every_row_after_qkv():
    table = comfy_lora_names(CHROMA, "chroma")
    assert table["transformer.single_transformer_blocks.0.proj_mlp"] == (
        "single_blocks.0.linear1.weight",
        (0, 3 * H, 2 * H),
    )
    assert table["diffusion_model.single_blocks.0.linear1_qkv"] == ("single_blocks.0.linear1.weight", (0, 0, 3 * H))


def test_wan_reads_the_generic_and_fun_names_and_refuses_diffusers_names_by_family():
    fun = lora({"lora_unet__blocks_0_cross_attn_k": ("blocks.0.cross_attn.k.weight", H)}, WAN, style="kohya")
    deltas, report = convert_file(fun, {}, WAN)
    assert list(deltas) == ["blocks.0.cross_attn.k.weight"] and report.notes
    diffusers = lora({"transformer.blocks.0.attn2.to_k": ("blocks.0.cross_attn.k.weight", H)}, WAN)
    with pytest.raises(UnknownKeys, match=r"Wan 2\.1/2\.2.*transformer\.blocks\.0\.attn2\.to_k"):
        convert_file(diffusers, {}, WAN)


def test_unmatched_names_are_listed():
    tensors = lora(
        {
            "transformer.txt_in": ("txt_in.weight", H),
            "transformer.transformer_blocks.5.attn.to_k": ("txt_in.weight", H),
        },
        QWEN,
    )
    deltas, report = convert_file(tensors, {}, QWEN)
    assert list(deltas) == ["txt_in.weight"] and report.unmatched == ["transformer.transformer_blocks.5.attn.to_k"]


def test_without_a_model_only_the_spellings_no_other_format_reads_are_this_format():
    assert detect_format(lora({"lycoris_txt_in": ("txt_in.weight", H)}, QWEN), {}) is dit
    assert detect_format(lora({"diffusion_model.txt_in": ("txt_in.weight", H)}, QWEN), {}) is dit
    assert not dit.recognise(lora({"transformer.txt_in": ("txt_in.weight", H)}, QWEN), {})


def test_other_families_are_not_in_the_table():
    with pytest.raises(ValueError, match="flux"):
        comfy_lora_names(CHROMA, "flux")
