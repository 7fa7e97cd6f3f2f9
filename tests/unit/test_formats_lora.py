"""Erasure LoRA formats: kohya, PEFT, EraseAnything (Flux), UCE weights, ESD full UNets."""

import pytest
import torch

from erasers.errors import FamilyMismatch, UnknownKeys
from erasers.files.families import Family
from erasers.files.keys import canonical_to_diffusers_unet
from erasers.lowrank import LowRankDelta
from erasers.membranes.formats import convert_file, detect_format, eraseanything, esd, kohya, peft, uce_weights
from erasers.membranes.hooks import MembraneHooks
from erasers.membranes.spm import Membrane, build_stacks
from erasers_dev.testing import spm_model_shapes

SD1 = spm_model_shapes(Family.SD1)
K = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # down_blocks.1.attentions.0 in diffusers
Q1 = "output_blocks.11.1.transformer_blocks.0.attn1.to_q.weight"
TE = "te.clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight"
RES = "input_blocks.2.0.in_layers.2.weight"  # a 3×3 resnet conv


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pair(out, inn, rank=2, seed=0):
    return rand(out, rank, seed=seed), rand(rank, inn, seed=seed + 1)


def with_text(shapes):
    return {**shapes, TE: (768, 768)}


def test_kohya_unet_and_text_keys_map_and_scale():
    up, down = pair(640, 768)
    tup, tdown = pair(768, 768, seed=5)
    tensors = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": up,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": tup,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": tdown,
    }
    assert detect_format(tensors, {}) is kohya
    deltas, report = convert_file(tensors, {}, with_text(SD1))
    torch.testing.assert_close(deltas[K].dense(), 0.5 * up @ down)  # α/r = 1/2
    torch.testing.assert_close(deltas[TE].dense(), tup @ tdown)  # no alpha: scale 1
    # without a text encoder the te keys are reported, the UNet part still loads
    deltas, report = convert_file(tensors, {}, SD1)
    assert report.unmatched == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] and K in deltas


def test_peft_names_are_applied_not_skipped():
    up, down = pair(640, 768)
    qup, qdown = pair(320, 320, seed=3)
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": down,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": up,
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": qdown,
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": qup,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": rand(2, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": rand(768, 2),
    }
    assert detect_format(tensors, {}) is peft
    deltas, report = convert_file(tensors, {}, with_text(SD1))
    assert not report.unmatched
    torch.testing.assert_close(deltas[K].dense(), up @ down)
    torch.testing.assert_close(deltas[Q1].dense(), qup @ qdown)
    assert TE in deltas


def test_peft_alpha_from_adapter_metadata():
    up, down = pair(640, 768, rank=4)
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": down,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": up,
    }
    meta = {"lora_adapter_metadata": '{"unet": {"r": 4, "lora_alpha": 2}}'}
    deltas, _ = convert_file(tensors, meta, SD1)
    torch.testing.assert_close(deltas[K].dense(), 0.5 * up @ down)


def flux_shapes(h=32, blocks=2):
    shapes = {"txt_in.weight": (h, 64), "double_blocks.0.txt_attn.qkv.weight": (3 * h, h)}
    for i in range(blocks):
        shapes[f"double_blocks.{i}.txt_attn.qkv.weight"] = (3 * h, h)
        shapes[f"double_blocks.{i}.img_attn.qkv.weight"] = (3 * h, h)
        shapes[f"double_blocks.{i}.img_attn.proj.weight"] = (h, h)
        shapes[f"single_blocks.{i}.linear1.weight"] = (7 * h, h)
    return shapes


def test_eraseanything_flux_lora_lands_on_fused_rows():
    h = 32
    kup, kdown = pair(h, h)
    mup, mdown = pair(4 * h, h, seed=2)
    tensors = {
        "transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight": kdown,
        "transformer.transformer_blocks.1.attn.add_k_proj.lora_B.weight": kup,
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": mdown,
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": mup,
        "transformer.transformer_blocks.0.norm1.linear.lora_A.weight": rand(2, h),
        "transformer.transformer_blocks.0.norm1.linear.lora_B.weight": rand(6 * h, 2),
    }
    assert detect_format(tensors, {}) is eraseanything
    deltas, report = convert_file(tensors, {}, flux_shapes(h))
    key = ("double_blocks.1.txt_attn.qkv.weight", (0, h, h))
    torch.testing.assert_close(deltas[key].dense(), kup @ kdown)
    assert ("single_blocks.0.linear1.weight", (0, 3 * h, 4 * h)) in deltas
    assert report.unmatched == ["transformer.transformer_blocks.0.norm1.linear"]  # model has no img_mod here
    # applied through the hooks, only rows [h, 2h) of the fused output move
    net = torch.nn.Module()
    net.double_blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
    for blk in net.double_blocks:
        blk.txt_attn = torch.nn.Module()
        blk.txt_attn.qkv = torch.nn.Linear(h, 3 * h, bias=False)
    shapes = {k: v for k, v in flux_shapes(h).items() if k.startswith("double_blocks")}
    mem = Membrane({key: deltas[key]})
    x = rand(1, 3, h, seed=9)
    base = net.double_blocks[1].txt_attn.qkv(x)
    with MembraneHooks(net, build_stacks([mem], "linear", shapes)) as hooks:
        hooks.rates = torch.ones(1, 1)
        out = net.double_blocks[1].txt_attn.qkv(x)
    torch.testing.assert_close(out[..., :h], base[..., :h])
    torch.testing.assert_close(out[..., h : 2 * h], base[..., h : 2 * h] + x @ (kup @ kdown).T)
    torch.testing.assert_close(out[..., 2 * h :], base[..., 2 * h :])


def sd1_weights(keys, seed=0):
    return {k: rand(*SD1_FULL[k], seed=seed + i) for i, k in enumerate(keys)}


# a slice of an SD1 UNet: enough for family detection (attn2 to_k) and one layer of each kind
SD1_FULL = {K: SD1[K], Q1: SD1[Q1], RES: (320, 320, 3, 3), "input_blocks.2.0.in_layers.2.bias": (320,)}


def test_uce_replacement_weights_become_deltas_against_the_model():
    model = sd1_weights(SD1_FULL)
    new_k = model[K] + rand(640, 768, seed=42) * 0.01
    tensors = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": new_k}
    assert detect_format(tensors, {}) is uce_weights
    deltas, report = convert_file(tensors, {}, model)
    assert list(deltas) == [K]
    torch.testing.assert_close(deltas[K], new_k - model[K])
    with pytest.raises(UnknownKeys, match="model's weights"):
        convert_file(tensors, {}, {k: tuple(v.shape) for k, v in model.items()})


def test_uce_weights_of_another_family_refused():
    model = sd1_weights(SD1_FULL)
    tensors = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": rand(640, 1024)}
    with pytest.raises(FamilyMismatch, match="SD2.x"):
        convert_file(tensors, {}, model)


def test_esd_full_unet_deltas_and_low_rank_extraction():
    model = sd1_weights(SD1_FULL)
    edited = {canonical_to_diffusers_unet(k): v.clone() for k, v in model.items()}
    edited[canonical_to_diffusers_unet(RES)] += 0.1 * rand(320, 320, 3, 3, seed=7)
    edited[canonical_to_diffusers_unet(Q1)] += 0.1 * rand(320, 1, seed=8) @ rand(1, 320, seed=9)
    edited["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    assert detect_format(edited, {}) is esd
    deltas, report = convert_file(edited, {}, model)
    assert set(deltas) == {RES, Q1}  # unchanged weights dropped
    torch.testing.assert_close(deltas[RES], edited["down_blocks.0.resnets.1.conv1.weight"] - model[RES])
    assert any("ignored" in n for n in report.notes)
    low, report = convert_file(edited, {}, model, rank=1)
    torch.testing.assert_close(low[Q1].dense(), deltas[Q1].reshape(320, 320), rtol=1e-4, atol=1e-5)  # rank 1 exact
    assert any("worst relative error" in n for n in report.notes)


def test_esd_dense_conv_delta_applied_by_the_gated_hook():
    model = sd1_weights([RES])
    net = torch.nn.Module()
    net.input_blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(3)])
    net.input_blocks[2].add_module("0", torch.nn.Module())
    conv = torch.nn.Conv2d(320, 320, 3, padding=1, bias=False)
    getattr(net.input_blocks[2], "0").in_layers = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), conv)
    delta = 0.1 * rand(320, 320, 3, 3, seed=3)
    mem = Membrane({RES: delta})
    x = rand(2, 320, 4, 4, seed=4)
    base = conv(x)
    with MembraneHooks(net, build_stacks([mem], "linear", {RES: (320, 320, 3, 3)})) as hooks:
        hooks.rates = torch.tensor([[1.0], [0.0]])
        out = conv(x)
    w = conv.weight + delta
    torch.testing.assert_close(out[0:1], torch.nn.functional.conv2d(x[0:1], w, padding=1), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[1], base[1])
    assert model  # the model weights themselves are never touched by conversion


def test_strength_zero_is_identity_for_lora_hooks():
    up, down = pair(4, 3)
    net = torch.nn.Linear(3, 4)
    x = rand(2, 3)
    base = net(x)
    mem = Membrane({"0.weight": LowRankDelta(up, down)}, strength=0.0)
    with MembraneHooks(
        torch.nn.Sequential(net), build_stacks([mem], "linear", {"0.weight": (4, 3)}), module_name=lambda p: "0"
    ) as hooks:
        hooks.rates = torch.zeros(2, 1)
        assert torch.equal(net(x), base)


def test_kohya_dense_diff_layers_load_like_factors_and_keep_the_family_check():
    """The pack's own exact full-rank eraser files store `<stem>.diff`: the LoRA loader must read them."""
    up, down = pair(640, 768)
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    dense = up @ down
    tensors = {f"{stem}.diff": dense, "lora_unet_nowhere_attn2_to_v.diff": rand(8, 8)}
    assert detect_format(tensors, {}) is kohya
    deltas, report = convert_file(tensors, {}, SD1)
    assert torch.equal(deltas[K].float(), dense) and report.unmatched == ["lora_unet_nowhere_attn2_to_v"]
    # an SDXL-width diff (context 2048) on an SD1.x model is refused by family, naming both
    wrong = {f"{stem}.diff": rand(640, 2048)}
    with pytest.raises(FamilyMismatch, match="SDXL"):
        convert_file(wrong, {}, SD1)
