"""Official SPM files: layout counts, recognition, key mapping (diffusers and LDM names), family checks."""

import pytest
import torch
from safetensors.torch import save_file

from erasers.errors import FamilyMismatch, UnknownFormat, UnknownKeys
from erasers.files.eraser_file import read_safetensors
from erasers.files.families import Family
from erasers.files.keys import diffusers_to_canonical
from erasers.membranes.formats import convert_file, detect_format, spm
from erasers_dev.testing import spm_model_shapes, spm_tensors

META = {"prompts": "snoopy,mickey", "rank": "1", "alpha": "1.0"}


@pytest.mark.parametrize(
    "family,modules,weights", [(Family.SD1, 192, 423936), (Family.SD2, 192, 432128), (Family.SDXL, 722, 2659840)]
)
def test_fixture_has_official_counts(family, modules, weights):
    tensors = spm_tensors(family)
    assert len(tensors) == 3 * modules
    assert sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha")) == weights


def test_sd1_shapes_follow_the_reference_table():
    t = spm_tensors(Family.SD1)
    assert t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (1, 320, 1, 1)
    assert t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (1, 768)
    assert t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape == (
        2560,
        1,
    )
    assert t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight"].shape == (1, 1280)
    assert t["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (1, 1280, 1, 1)


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL])
def test_every_module_maps_and_equals_the_direct_delta(family, tmp_path):
    tensors = spm_tensors(family, alpha=0.5)
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata=META)
    tensors, metadata = read_safetensors(path)
    assert detect_format(tensors, metadata) is spm
    shapes = spm_model_shapes(family)
    deltas, report = convert_file(tensors, metadata, shapes, source="m.safetensors")
    assert report.format == "spm" and not report.unmatched
    assert report.concepts == ["snoopy", "mickey"]
    assert len(deltas) == len(tensors) // 3
    stem = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    key = diffusers_to_canonical(stem + ".weight")
    kohya = "lora_unet_" + stem.replace(".", "_")
    direct = 0.5 * tensors[kohya + ".lora_up.weight"] @ tensors[kohya + ".lora_down.weight"]  # (α/r)·U·D
    torch.testing.assert_close(deltas[key].dense(), direct)


def test_conv_1x1_factors_become_2d_and_reshape_to_the_weight():
    tensors = spm_tensors(Family.SD1)
    deltas, _ = convert_file(tensors, META, spm_model_shapes(Family.SD1))
    d = deltas["input_blocks.1.1.proj_in.weight"]
    up = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    down = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert d.shape == (320, 320)
    x = torch.randn(1, 320, 4, 4)
    conv = torch.nn.functional.conv2d
    official = conv(conv(x, down), up)  # the reference forward: lora_up(lora_down(x)), α/r = 1
    torch.testing.assert_close(conv(x, d.dense().reshape(320, 320, 1, 1)), official, rtol=1e-4, atol=1e-6)


def test_ldm_spelled_membrane_maps_too():
    tensors = {
        k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_"): v
        for k, v in spm_tensors(Family.SD1).items()
    }
    deltas, report = convert_file(tensors, META, spm_model_shapes(Family.SD1))
    assert not report.unmatched and "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in deltas


def test_unmatched_keys_are_reported_not_dropped_silently():
    tensors = spm_tensors(Family.SD1)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(1, 8)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 1)
    deltas, report = convert_file(tensors, META, spm_model_shapes(Family.SD1))
    assert report.unmatched == ["lora_unet_down_blocks_9_attentions_0_proj_in"]
    assert len(deltas) == 192


@pytest.mark.parametrize(
    "file_family,model_family", [(Family.SD1, Family.SDXL), (Family.SD2, Family.SD1), (Family.SDXL, Family.SD2)]
)
def test_wrong_family_is_refused_naming_both(file_family, model_family):
    with pytest.raises(FamilyMismatch) as err:
        convert_file(spm_tensors(file_family), META, spm_model_shapes(model_family))
    assert file_family.label in str(err.value) and model_family.label in str(err.value)


def test_file_matching_nothing_is_refused():
    tensors = {
        "lora_unet_foo_bar.lora_down.weight": torch.zeros(1, 4),
        "lora_unet_foo_bar.lora_up.weight": torch.zeros(4, 1),
    }
    with pytest.raises(UnknownKeys, match="matches no layer"):
        convert_file(tensors, META, spm_model_shapes(Family.SD1))


def test_membrane_without_metadata_is_still_recognised_by_layout():
    assert detect_format(spm_tensors(Family.SD1), {}) is spm
    _, report = convert_file(spm_tensors(Family.SD1), {}, spm_model_shapes(Family.SD1))
    assert report.concepts == [] and "prompts" in report.summary()


def test_unknown_layout_lists_every_format_tried():
    with pytest.raises(UnknownFormat) as err:
        detect_format({"something.else": torch.zeros(2)}, {})
    for name in ("spm", "kohya", "peft", "eraseanything", "uce_weights", "esd"):
        assert name in str(err.value)
