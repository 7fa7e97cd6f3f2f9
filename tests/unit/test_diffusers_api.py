"""The diffusers adapter on tiny UNets built from configs (CPU, no downloads)."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from erasers.edits.eraser import compute_eraser  # noqa: E402
from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.errors import EraserAlreadyApplied, FamilyMismatch  # noqa: E402
from erasers.files.families import Family  # noqa: E402
from erasers.files.keys import canonical_to_diffusers  # noqa: E402
from erasers_dev.testing import ToyTextEncoder, layer_weights  # noqa: E402
from erasers_dev.tiny_diffusers import tiny_pipe, tiny_unet  # noqa: E402
from erasers_diffusers import api as api  # noqa: E402
from erasers_diffusers.tokenizer import vocab_from_bpe, write_vocab  # noqa: E402


def stub_pipe(layers_per_block=2, dtype=torch.float32):
    return tiny_pipe(layers_per_block, dtype=dtype)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("per_block", [1, 2])
def test_canonical_names_cover_every_attn2_kv(per_block):
    pipe = stub_pipe(per_block)
    attn2 = {n for n, _ in pipe.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    params = api.projection_params(pipe)
    assert {name for name, _ in params.values()} == attn2
    assert len(params) == len(attn2)  # one canonical name per weight, no collisions
    for canonical, (name, _) in params.items():
        assert canonical_to_diffusers(canonical, per_block) == name
    step = per_block + 1
    # LDM numbering: down block i, attention j → input block 1 + i·step + j; up block i → output i·step + j
    assert f"input_blocks.{per_block}.1.transformer_blocks.0.attn2.to_k.weight" in params
    assert ("input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in params) == (per_block == 2)
    assert f"output_blocks.{step}.1.transformer_blocks.0.attn2.to_v.weight" in params
    assert "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in params
    assert api.pipeline_family(pipe) == Family.UNET


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_adds_strength_delta_and_remove_restores_bits(dtype):
    pipe = stub_pipe(dtype=dtype)
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square", "blue circle"]))
    before = snapshot(pipe.unet)
    params = api.projection_params(pipe)
    handle = api.apply_eraser(pipe, eraser, strength=0.7)
    after = snapshot(pipe.unet)
    edited = {params[k][0]: k for k in eraser.deltas}
    assert edited and set(edited) == {n for n in before if ".attn2.to_k." in n or ".attn2.to_v." in n}
    for name in before:
        if name in edited:
            expected = (before[name].float() + 0.7 * eraser.dense(edited[name])).to(dtype)
            assert torch.equal(after[name], expected), name
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name
    api.remove_eraser(pipe, handle)
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, before[name]) and p.dtype == before[name].dtype, name


def test_strength_zero_and_context_manager_leave_bits():
    pipe = stub_pipe()
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["green triangle"]))
    before = snapshot(pipe.unet)
    with api.erased(pipe, eraser, strength=0.0):
        for name, p in pipe.unet.named_parameters():
            assert torch.equal(p, before[name]), name
    with api.erased(pipe, eraser, strength=1.0):
        assert any(not torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, before[name]), name


def test_double_apply_raises_and_changes_nothing():
    pipe = stub_pipe()
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["square"]))
    handle = api.apply_eraser(pipe, eraser)
    once = snapshot(pipe.unet)
    with pytest.raises(EraserAlreadyApplied):
        api.apply_eraser(pipe, eraser)
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, once[name])
    api.remove_eraser(pipe, handle)
    api.remove_eraser(pipe, api.apply_eraser(pipe, eraser))  # usable again after removal


def test_wrong_family_eraser_refused_before_writing(tmp_path):
    pipe = stub_pipe()
    sd1 = layer_weights(Family.SD1)
    eraser = compute_eraser(UCEConfig(concepts=["Van Gogh"]), ToyTextEncoder(dim=768), sd1)
    path = api.save_eraser(eraser, str(tmp_path / "sd1.safetensors"))
    before = snapshot(pipe.unet)
    with pytest.raises(FamilyMismatch, match="SD1.x"):
        api.apply_eraser(pipe, eraser)
    with pytest.raises(FamilyMismatch):
        api.load_eraser(path, pipe)
    for name, p in pipe.unet.named_parameters():
        assert torch.equal(p, before[name])
    assert getattr(pipe.unet, api.HANDLE_ATTR, None) is None


def test_saved_eraser_loads_back_onto_pipeline(tmp_path):
    pipe = stub_pipe(layers_per_block=1)
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["yellow star"]))
    loaded = api.load_eraser(api.save_eraser(eraser, str(tmp_path / "e.safetensors")), pipe)
    assert loaded.keys() == eraser.keys()
    for key in eraser.keys():
        assert torch.allclose(loaded.dense(key), eraser.dense(key), rtol=1e-5, atol=1e-7)


# -- CLIP towers the way diffusers pipelines hold them ------------------------------------------------


def tiny_tokenizer(tmp_path, pad_token=None):
    from erasers_diffusers.clip_text import clip_tokenizer

    merges = ["#version: 0.2", "r e", "re d</w>", "s q", "sq u", "a r", "ar e</w>", "squ are</w>"]
    folder = write_vocab(str(tmp_path / "tok"), *vocab_from_bpe(merges))
    return clip_tokenizer(folder, pad_token=pad_token)


def tiny_clip(tokenizer, width, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(width)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=8,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def test_sd1_style_encoder_is_last_hidden_state(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    model = tiny_clip(tok, 32)
    pipe = SimpleNamespace(unet=tiny_unet(context=32), tokenizer=tok, text_encoder=model)
    enc = api.DiffusersTextEncoder(pipe)
    out = enc.encode(["red square", "", "red square"])
    assert out.hidden.shape == (3, 77, 32)
    assert out.lengths.tolist() == [4, 2, 4]
    assert out.token_ids[0][0] == tok.bos_token_id and out.token_ids[0][-1] == tok.eos_token_id
    ids = tok(["red square"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    assert torch.allclose(out.hidden[0], ref[0], atol=1e-6)
    assert torch.equal(out.hidden[0], out.hidden[2])
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square"]))
    assert len(eraser.deltas) == 12  # 2 down + 1 mid + 3 up attention blocks × to_k/to_v


def test_sdxl_style_encoder_concatenates_penultimate_layers(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    tok2 = tiny_tokenizer(tmp_path, pad_token="!")
    te, te2 = tiny_clip(tok, 16), tiny_clip(tok2, 24, projection=True)
    pipe = SimpleNamespace(
        unet=tiny_unet(context=40), tokenizer=tok, text_encoder=te, tokenizer_2=tok2, text_encoder_2=te2
    )
    out = api.DiffusersTextEncoder(pipe).encode(["red square"])
    assert out.hidden.shape == (1, 77, 40) and out.pooled.shape == (1, 8)
    with torch.no_grad():
        ids = tok(["red square"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        ids2 = tok2(["red square"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        first = te(ids, output_hidden_states=True).hidden_states[-2]
        second = te2(ids2, output_hidden_states=True)
    assert torch.allclose(out.hidden[0, :, :16], first[0], atol=1e-6)
    assert torch.allclose(out.hidden[0, :, 16:], second.hidden_states[-2][0], atol=1e-6)
    assert torch.allclose(out.pooled[0], second.text_embeds[0], atol=1e-6)


def test_flux_transformer_text_projections_apply_and_restore():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        axes_dims_rope=[2, 2, 4],
    )
    encoder = ToyTextEncoder(dim=32, family="flux", pooled_dim=24, has_bos=False, context_length=16)
    pipe = SimpleNamespace(transformer=transformer, text_encoder_adapter=lambda: encoder)
    params = api.projection_params(pipe)
    assert {k: n for k, (n, _) in params.items()} == {
        "txt_in.weight": "context_embedder.weight",
        "vector_in.in_layer.weight": "time_text_embed.text_embedder.linear_1.weight",
    }
    assert api.pipeline_family(pipe) == Family.FLUX
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square"]))
    assert set(eraser.deltas) == set(params)
    before = snapshot(transformer)
    with api.erased(pipe, eraser, strength=1.0):
        changed = {n for n, p in transformer.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {n for n, _ in params.values()}
    for name, p in transformer.named_parameters():
        assert torch.equal(p, before[name])
