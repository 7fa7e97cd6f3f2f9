"""Text-encoder keys of erasure LoRAs (kohya lora_te_…, PEFT text_encoder.…) applied on a diffusers pipeline."""

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from test_spm_diffusers import tiny_unet  # noqa: E402

from erasers_diffusers.apply import DiffusersMembranes, load_for_unet, membrane_from_file  # noqa: E402

LAYERS = {  # kohya stem → HF module path of the tiny CLIP text model
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": "text_model.encoder.layers.1.mlp.fc2",
}


def tiny_pipe():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    return SimpleNamespace(unet=tiny_unet(), text_encoder=transformers.CLIPTextModel(config).eval())


def submodule(encoder, path):
    """transformers 5 has no ``text_model`` wrapper inside CLIPTextModel; LoRA files still spell it."""
    return encoder.get_submodule(path if hasattr(encoder, "text_model") else path[len("text_model.") :])


def write_lora(pipe, path, peft=False):
    g = torch.Generator().manual_seed(3)
    tensors, dense = {}, {}
    for stem, module in LAYERS.items():
        w = submodule(pipe.text_encoder, module).weight
        up, down = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
        if peft:
            tensors[f"text_encoder.{module}.lora_B.weight"], tensors[f"text_encoder.{module}.lora_A.weight"] = up, down
            dense[module] = up @ down
        else:
            tensors[stem + ".lora_up.weight"], tensors[stem + ".lora_down.weight"] = up, down
            tensors[stem + ".alpha"] = torch.tensor(1.0)
            dense[module] = 0.5 * up @ down  # α/r = 1/2
    unet_stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = pipe.unet.get_submodule(unet_stem).weight
    if peft:
        tensors[f"unet.{unet_stem}.lora_B.weight"] = torch.randn(w.shape[0], 1, generator=g)
        tensors[f"unet.{unet_stem}.lora_A.weight"] = torch.randn(1, w.shape[1], generator=g)
        tensors["text_encoder.text_model.encoder.layers.7.mlp.fc1.lora_A.weight"] = torch.randn(1, 16, generator=g)
        tensors["text_encoder.text_model.encoder.layers.7.mlp.fc1.lora_B.weight"] = torch.randn(32, 1, generator=g)
    else:
        stem = "lora_unet_" + unet_stem.replace(".", "_")
        tensors[stem + ".lora_up.weight"] = torch.randn(w.shape[0], 1, generator=g)
        tensors[stem + ".lora_down.weight"] = torch.randn(1, w.shape[1], generator=g)
        tensors["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_up.weight"] = torch.randn(32, 1, generator=g)
        tensors["lora_te_text_model_encoder_layers_7_mlp_fc1.lora_down.weight"] = torch.randn(1, 16, generator=g)
    save_file(tensors, str(path))
    return dense


def encode(pipe):
    ids = torch.tensor([[1, 5, 9, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


@pytest.mark.parametrize("peft", [False, True], ids=["kohya", "peft"])
def test_text_keys_applied_equal_the_direct_delta_and_remove_exactly(tmp_path, peft):
    pipe = tiny_pipe()
    path = tmp_path / "lora.safetensors"
    dense = write_lora(pipe, path, peft)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    base = encode(pipe)
    deltas, report = load_for_unet(pipe.unet, str(path), pipe=pipe)
    for module, delta in dense.items():
        torch.testing.assert_close(deltas[f"te.clip_l.{module}.weight"].dense(), delta)
    assert len(report.unmatched) == 1 and "layers_7" in report.unmatched[0].replace(".", "_")  # listed, not applied
    merged = copy.deepcopy(pipe.text_encoder)
    for module, delta in dense.items():
        submodule(merged, module).weight.data += delta
    mem, _ = membrane_from_file(pipe.unet, str(path), 0.7, transport=False, kind="lora", pipe=pipe)
    with DiffusersMembranes(pipe, loras=[mem]):
        out = encode(pipe)
    merged_07 = copy.deepcopy(pipe.text_encoder)
    for module, delta in dense.items():
        submodule(merged_07, module).weight.data += 0.7 * delta
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0]])
        torch.testing.assert_close(out, merged_07(ids)[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, base, atol=1e-3)
    assert torch.equal(encode(pipe), base)  # removed bit for bit
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.state_dict().items())


def test_text_keys_at_strength_zero_are_the_identity(tmp_path):
    pipe = tiny_pipe()
    write_lora(pipe, tmp_path / "lora.safetensors")
    base = encode(pipe)
    mem, _ = membrane_from_file(
        pipe.unet, str(tmp_path / "lora.safetensors"), 0.0, transport=False, kind="lora", pipe=pipe
    )
    with DiffusersMembranes(pipe, loras=[mem]):
        assert torch.equal(encode(pipe), base)


def test_text_keys_without_the_pipeline_are_reported_not_applied(tmp_path):
    pipe = tiny_pipe()
    write_lora(pipe, tmp_path / "lora.safetensors")
    deltas, report = load_for_unet(pipe.unet, str(tmp_path / "lora.safetensors"))
    assert not any(isinstance(k, str) and k.startswith("te.") for k in deltas)
    assert sum(s.startswith("lora_te_") for s in report.unmatched) == 3
    assert any("text-encoder" in n for n in report.notes)
