"""Encoding only up to the longest prompt is exact for causal CLIP (what UCE-2025 and SPEED read)."""

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from erasers.edits.eraser import compute_eraser
from erasers.edits.uce import UCEConfig
from erasers.files.families import Family
from erasers.text import encode_batched
from erasers_dev.testing import layer_weights
from erasers_diffusers.clip_text import ClipTextEncoder, Tower, WordHashTokenizer


def tiny_clip():
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    model = CLIPTextModel(config).eval()
    return ClipTextEncoder("sd1", [Tower(WordHashTokenizer(), model)], context_length=77)


def test_real_token_rows_equal_the_full_context_pass():
    enc = tiny_clip()
    prompts = ["a painting by Van Gogh", "cat", "", "a photo of a very small red bicycle"]
    full = enc.encode(prompts)
    trimmed = encode_batched(enc, prompts, real_tokens_only=True)
    assert trimmed.hidden.shape[1] < full.hidden.shape[1]
    assert torch.equal(trimmed.lengths, full.lengths)
    for i, n in enumerate(full.lengths.tolist()):
        assert torch.allclose(trimmed.hidden[i, :n], full.hidden[i, :n], atol=1e-5)
        assert torch.count_nonzero(trimmed.hidden[i, max(trimmed.lengths.tolist()) :]) == 0


def test_uce_2025_gives_the_same_eraser_with_and_without_trimming():
    enc = tiny_clip()
    weights = layer_weights(Family.UNET, context_dim=32)

    class FullOnly:  # the same encoder without the trimmed path
        family, context_length, context_dim = "sd1", 77, 32
        encode = staticmethod(enc.encode)

    config = UCEConfig(concepts=["Van Gogh", "Claude Monet"], preserve=["Rembrandt"], variant="2025")
    a = compute_eraser(config, enc, weights, family=Family.UNET)
    b = compute_eraser(config, FullOnly(), weights, family=Family.UNET)
    for key in a.deltas:
        assert torch.allclose(a.dense(key), b.dense(key), rtol=1e-4, atol=1e-6)
