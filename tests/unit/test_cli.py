"""``python -m erasers`` on tiny single-file checkpoints written by the tests (CPU, no downloads)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from erasers.edits.eraser import compute_eraser  # noqa: E402
from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.files.eraser_file import load_eraser, save_eraser  # noqa: E402
from erasers.files.families import Family  # noqa: E402
from erasers_dev.testing import ToyTextEncoder, layer_shapes, layer_weights  # noqa: E402
from erasers_diffusers import cli  # noqa: E402
from erasers_diffusers.checkpoint import load_checkpoint  # noqa: E402
from erasers_diffusers.tokenizer import vocab_from_bpe, write_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MERGES = ["#version: 0.2", "r e", "re d</w>", "s q", "sq u", "a r", "ar e</w>", "squ are</w>", "o r", "g o"]


@pytest.fixture(autouse=True)
def no_tokenizer_anywhere(monkeypatch, tmp_path):
    """Tests see only the tokenizers they pass: no ComfyUI, no HF cache, no installed BPE packages."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("erasers_diffusers.tokenizer.BPE_PACKAGES", ())


@pytest.fixture
def tokenizer_dir(tmp_path):
    return write_vocab(str(tmp_path / "tokenizer"), *vocab_from_bpe(MERGES))


def tiny_clip(width=32, projection=False, act="quick_gelu", seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = len(vocab_from_bpe(MERGES)[0])
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=16,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def hf_state(model) -> dict:
    """LDM files store CLIP-L under its transformers names *with* the ``text_model.`` prefix."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.detach().clone()
        for k, v in model.state_dict().items()
    }


def write_sd1_checkpoint(path, context=32):
    """SD1-layout single file: UNet projections (full SD1 channel counts, narrow context) + tiny CLIP."""
    clip = tiny_clip(context)
    tensors = {
        "model.diffusion_model." + k: v for k, v in layer_weights(Family.UNET, seed=1, context_dim=context).items()
    }
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    tensors.update({"cond_stage_model.transformer." + k: v for k, v in hf_state(clip).items()})
    tensors["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return clip


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_erase_single_file_then_info(tmp_path, tokenizer_dir, capsys):
    ckpt = tmp_path / "tiny_sd1.safetensors"
    write_sd1_checkpoint(ckpt)
    out_file = tmp_path / "out" / "red.safetensors"
    code, out, err = run(
        capsys,
        "erase",
        "--checkpoint",
        ckpt,
        "--method",
        "uce",
        "--concept",
        "red square",
        "--concept",
        "go",
        "--anchor",
        "square",
        "--preserve",
        "are",
        "--param",
        "lam=0.7",
        "--param",
        "variant=2023",
        "--tokenizer",
        tokenizer_dir,
        "--out",
        out_file,
    )
    assert code == 0, err
    assert "wrote" in out and out_file.exists()
    eraser = load_eraser(str(out_file))
    assert eraser.concepts == ["red square", "go"] and eraser.config["anchors"] == ["square"]
    assert eraser.config["lam"] == 0.7 and eraser.config["variant"] == "2023"  # a str, not the number 2023
    assert set(eraser.keys()) == {
        k for k in layer_shapes(Family.UNET, 32) if k.endswith(("to_k.weight", "to_v.weight"))
    }

    code, out, err = run(capsys, "info", out_file)
    assert code == 0, err
    for fragment in ("method:      uce", "red square, go", "32 layers", "16× to_k", "16× to_v", "'square'", "are"):
        assert fragment in out, out
    code, out, _ = run(capsys, "info", "--json", out_file)
    data = json.loads(out)
    assert data["family"] == "unet" and len(data["layers"]) == 32


def test_checkpoint_text_encoder_is_the_files_own(tmp_path, tokenizer_dir):
    ckpt = tmp_path / "tiny_sd1.safetensors"
    clip = write_sd1_checkpoint(ckpt)
    loaded = load_checkpoint(str(ckpt), tokenizer_dir=tokenizer_dir)
    enc = loaded.encoder.encode(["red square"])
    ids = enc.token_ids[0] + [enc.token_ids[0][-1]] * (77 - len(enc.token_ids[0]))
    with torch.no_grad():
        ref = clip(torch.tensor([ids])).last_hidden_state
    assert torch.allclose(enc.hidden, ref, atol=1e-6)
    assert loaded.family == Family.UNET and len(loaded.weights) == 32


def openclip_state(model) -> dict:
    """transformers CLIP-with-projection → OpenCLIP names (the inverse of what the loader converts)."""
    hf = hf_state(model)
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(1.0),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{dst}{a}.{kind}"] = hf[f"{src}{b}.{kind}"]
    return out


def test_sdxl_single_file_concatenates_both_towers(tmp_path, tokenizer_dir):
    from safetensors.torch import save_file

    clip_l, clip_g = tiny_clip(1024, seed=1), tiny_clip(1024, projection=True, act="gelu", seed=2)
    tensors = {
        "model.diffusion_model." + k: torch.randn(s) * 0.02
        for k, s in list(layer_shapes(Family.SDXL).items())[:4] + [("label_emb.0.0.weight", (8, 8))]
    }
    tensors.update({"conditioner.embedders.0.transformer." + k: v for k, v in hf_state(clip_l).items()})
    tensors.update({"conditioner.embedders.1.model." + k: v for k, v in openclip_state(clip_g).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "xl.safetensors"))
    loaded = load_checkpoint(str(tmp_path / "xl.safetensors"), tokenizer_dir=tokenizer_dir)
    assert loaded.family == Family.SDXL
    enc = loaded.encoder.encode(["red square"])
    row = enc.token_ids[0]
    with torch.no_grad():
        ids_l = torch.tensor([row + [row[-1]] * (77 - len(row))])
        ids_g = torch.tensor([row + [0] * (77 - len(row))])  # the G tower pads with "!" (id 0)
        ref_l = clip_l(ids_l, output_hidden_states=True).hidden_states[-2]
        ref_g = clip_g(ids_g, output_hidden_states=True)
    assert enc.hidden.shape == (1, 77, 2048)
    assert torch.allclose(enc.hidden[..., :1024], ref_l, atol=1e-5)
    assert torch.allclose(enc.hidden[..., 1024:], ref_g.hidden_states[-2], atol=1e-5)
    assert torch.allclose(enc.pooled, ref_g.text_embeds, atol=1e-5)


def test_error_paths_exit_2_with_one_line(tmp_path, tokenizer_dir, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    write_sd1_checkpoint(ckpt)
    out = tmp_path / "o.safetensors"
    base = ["erase", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "--out", out]

    assert_clean_error(*run(capsys, *base, "--concept", "   ")[::2], "Expected at least one concept")

    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    assert_clean_error(
        *run(capsys, "erase", "--checkpoint", pickled, "--concept", "x", "--tokenizer", tokenizer_dir, "--out", out)[
            ::2
        ],
        "pickled",
        "safetensors",
    )

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_clean_error(
        *run(capsys, "erase", "--checkpoint", truncated, "--concept", "x", "--tokenizer", tokenizer_dir, "--out", out)[
            ::2
        ],
        "truncated",
    )

    assert_clean_error(
        *run(capsys, "erase", "--checkpoint", ckpt, "--concept", "x", "--out", out)[::2],
        "--tokenizer DIR",
        "COMFYUI_PATH",
        "diffusers",
    )
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_clean_error(
        *run(capsys, *base[:3], "--tokenizer", empty, "--out", out, "--concept", "x")[::2], "vocab.json and merges.txt"
    )

    assert_clean_error(*run(capsys, *base, "--concept", "x", "--param", "nonsense=1")[::2], "nonsense")
    long_concept = " ".join(["red square"] * 40)
    assert_clean_error(*run(capsys, *base, "--concept", long_concept)[::2], "tokens")
    assert not out.exists()  # nothing written on any error

    assert_clean_error(*run(capsys, "info", truncated)[::2], "truncated")
    assert_clean_error(*run(capsys, "info", pickled)[::2], "pickled")


def test_info_on_a_saved_sd1_eraser_and_module_entry_point(tmp_path):
    eraser = compute_eraser(
        UCEConfig(concepts=["Van Gogh"], concept_type="art"), ToyTextEncoder(dim=768), layer_weights(Family.SD1)
    )
    path = save_eraser(eraser, str(tmp_path / "vangogh.safetensors"))
    done = subprocess.run([sys.executable, "-m", "erasers", "info", path], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "SD1.x" in done.stdout and "Van Gogh" in done.stdout and "32 layers" in done.stdout
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 4)
    done = subprocess.run(
        [sys.executable, "-m", "erasers", "info", str(tmp_path / "bad.safetensors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "too short" in done.stderr


def test_help_and_bench_registry(capsys):
    for sub in ([], ["erase"], ["info"], ["bench"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(sub + ["--help"])
        assert exit_info.value.code == 0
    assert "closed-form" in capsys.readouterr().out
    calls = []
    cli.register_bench("probe", lambda argv: calls.append(argv) or 0)
    try:
        assert cli.main(["bench", "probe", "--quick", "x"]) == 0 and calls == [["--quick", "x"]]
    finally:
        cli.BENCHES.pop("probe")
    code, _, err = run(capsys, "bench", "nope")
    assert_clean_error(code, err, "closed-form")


def test_param_values_follow_the_config_field_types():
    config = cli.build_config(
        "uce", ["a"], [], [], "object", None, ["lam=2", "variant=2023", "expand_prompts=true", "preserve_scale=none"]
    )
    assert config.lam == 2.0 and isinstance(config.lam, float)
    assert config.variant == "2023" and config.expand_prompts is True and config.preserve_scale is None


def test_erase_from_a_diffusers_folder_matches_the_api(tmp_path, tokenizer_dir, capsys):
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from erasers_diffusers import api as diffusers_api
    from erasers_diffusers.clip_text import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    clip, tok = tiny_clip(32), clip_tokenizer(tokenizer_dir)
    folder = tmp_path / "tiny-sd"
    unet.save_pretrained(folder / "unet")
    clip.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "vae": [None, None],
            }
        )
    )
    out_file = tmp_path / "d.safetensors"
    code, out, err = run(capsys, "erase", "--diffusers", folder, "--concept", "red square", "--out", out_file)
    assert code == 0, err
    from_cli = load_eraser(str(out_file))
    direct = diffusers_api.compute_eraser_for_pipeline(
        SimpleNamespace(unet=unet, text_encoder=clip, tokenizer=tok), UCEConfig(concepts=["red square"])
    )
    assert from_cli.keys() == direct.keys() and len(direct.keys()) == 8  # 1 down + 1 mid + 2 up blocks × k/v
    for key in direct.keys():
        assert torch.allclose(from_cli.dense(key), direct.dense(key), rtol=1e-4, atol=1e-6), key
    fresh = tmp_path / "d2.safetensors"
    code, _, err = run(capsys, "erase", "--diffusers", tmp_path / "nowhere", "--concept", "x", "--out", fresh)
    assert_clean_error(code, err, "model_index.json")


def test_sd2_single_file_reads_penultimate_layer_with_final_norm(tmp_path, tokenizer_dir):
    from safetensors.torch import save_file

    clip_h = tiny_clip(1024, projection=True, act="gelu", seed=3)
    tensors = {
        "model.diffusion_model." + k: torch.randn(s) * 0.02 for k, s in list(layer_shapes(Family.SD2).items())[:4]
    }
    tensors.update({"cond_stage_model.model." + k: v for k, v in openclip_state(clip_h).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "sd2.safetensors"))
    loaded = load_checkpoint(str(tmp_path / "sd2.safetensors"), tokenizer_dir=tokenizer_dir)
    assert loaded.family == Family.SD2
    enc = loaded.encoder.encode(["red square"])
    row = enc.token_ids[0]
    with torch.no_grad():
        out = clip_h(torch.tensor([row + [0] * (77 - len(row))]), output_hidden_states=True)
        ref = clip_h.text_model.final_layer_norm(out.hidden_states[-2])
    assert enc.hidden.shape == (1, 77, 1024) and enc.pooled is None
    assert torch.allclose(enc.hidden, ref, atol=1e-5)


def test_erase_exact_and_file_tolerance_options(tmp_path, tokenizer_dir, capsys):
    """RECE's full-rank deltas: truncated within --file-tolerance by default, dense and exact with --exact."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny_sd1.safetensors"
    write_sd1_checkpoint(ckpt)
    files = {}
    for name, extra in (("exact", ["--exact"]), ("loose", ["--file-tolerance", "0.3"])):
        files[name] = tmp_path / f"{name}.safetensors"
        code, _, err = run(
            capsys,
            "erase",
            "--checkpoint",
            ckpt,
            "--method",
            "rece",
            "--concept",
            "red square",
            "--concept",
            "blue circle",
            "--tokenizer",
            tokenizer_dir,
            "--out",
            files[name],
            *extra,
        )
        assert code == 0, err
    exact, loose = load_eraser(str(files["exact"])), load_eraser(str(files["loose"]))
    assert exact.reconstruction_error == 0.0
    assert all(
        k.endswith((".diff", ".alpha", "lora_up.weight", "lora_down.weight")) for k in load_file(files["exact"])
    )
    assert 0.0 < loose.reconstruction_error <= 0.3  # truncated, and the error is recorded
    for key in exact.keys():
        full = exact.dense(key, torch.float64)
        assert float((loose.dense(key, torch.float64) - full).norm() / full.norm()) <= 0.3 + 1e-6


def test_output_never_replaces_the_input_or_an_existing_file(tmp_path, tokenizer_dir, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    write_sd1_checkpoint(ckpt)
    model_bytes = ckpt.read_bytes()
    base = ["erase", "--checkpoint", ckpt, "--tokenizer", tokenizer_dir, "--concept", "red square"]

    # --out is the checkpoint (directly, without the suffix, through a symlink): refused even with --force
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    for target in (ckpt, tmp_path / "tiny", link):
        for force in ((), ("--force",)):
            assert_clean_error(*run(capsys, *base, "--out", target, *force)[::2], "is the input file")
    assert ckpt.read_bytes() == model_bytes

    # an existing output is left alone without --force, replaced atomically with it
    out = tmp_path / "e.safetensors"
    out.write_bytes(b"keep me")
    assert_clean_error(*run(capsys, *base, "--out", out)[::2], "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    code, _, err = run(capsys, *base, "--out", out, "--force")
    assert code == 0, err
    assert load_eraser(str(out)).concepts == ["red square"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

    # an existing folder: the file is named after the method and concept
    folder = tmp_path / "erasers"
    folder.mkdir()
    code, _, err = run(capsys, *base, "--out", folder)
    assert code == 0, err
    assert [p.name for p in folder.iterdir()] == ["uce-red_square.safetensors"]
    assert ckpt.read_bytes() == model_bytes
