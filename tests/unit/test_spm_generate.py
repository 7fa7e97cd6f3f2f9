"""``python -m erasers generate --spm FILE …`` end to end on a tiny random-weight diffusers model saved to disk."""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from test_spm_diffusers import write_membrane  # noqa: E402

from erasers_diffusers import tokenizer as tk  # noqa: E402
from erasers_diffusers.cli import main  # noqa: E402

WORDS = ("a", "photo", "of", "snoopy", "bowl", "soup")
CONCEPT, UNRELATED = "a photo of snoopy", "a bowl of soup"


def word_merges(words) -> list:
    """BPE merges that assemble each word letter by letter into one ``word</w>`` token."""
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = parts[0]
        for part in parts[1:]:
            if f"{prefix} {part}" not in merges:
                merges.append(f"{prefix} {part}")
            prefix += part
    return merges


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A StableDiffusionPipeline built from configs (random weights, no download), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny_sd")
    vocab, merges = tk.vocab_from_bpe(["#version: 0.2"] + word_merges(WORDS))
    tk.write_vocab(str(root / "vocab"), vocab, merges)
    tokenizer = transformers.CLIPTokenizer(
        str(root / "vocab" / "vocab.json"),
        str(root / "vocab" / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    assert tokenizer(CONCEPT).input_ids == [vocab["<|startoftext|>"]] + [
        vocab[w + "</w>"] for w in CONCEPT.split()
    ] + [vocab["<|endoftext|>"]]
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(root / "model"))
    write_membrane(unet, root / "snoopy.safetensors", scale=0.5)  # official layout, prompts = "snoopy"
    return root


def generate(root, out, prompt, *extra):
    argv = [
        "generate",
        "--model",
        str(root / "model"),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--size",
        "32",
        "--device",
        "cpu",
        "--seed",
        "7",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 1
    from PIL import Image

    return np.asarray(Image.open(files[0])).astype(np.int16)


def test_generate_with_a_membrane_end_to_end(model_dir, tmp_path, capsys):
    spm = ["--spm", str(model_dir / "snoopy.safetensors")]
    base = generate(model_dir, tmp_path / "base", CONCEPT)
    erased = generate(model_dir, tmp_path / "erased", CONCEPT, *spm)
    printed = capsys.readouterr().out
    assert "spm: " in printed and f"rates for '{CONCEPT}': 1.000" in printed  # its token is in the prompt: m = 1
    assert base.shape == erased.shape == (32, 32, 3)
    assert np.abs(erased - base).max() > 0, "the membrane did not change the concept prompt's image"
    # the same membrane with transport off at the full rate gives the same image as m = 1 with transport on
    static = generate(model_dir, tmp_path / "static", CONCEPT, *spm, "--no-transport")
    assert np.array_equal(static, erased)
