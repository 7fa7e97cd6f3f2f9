"""Small deterministic stand-ins used by the tests and the benchmarks (no downloads, no host).

``ToyTextEncoder`` behaves like CLIP where the closed forms care: BOS + words + EOS + EOS-padding, causal
(each row depends on the tokens before it), the same SOT row for every prompt. ``layer_weights`` makes
random weights with the exact text-projection shapes of each family.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from erasers.files.families import Family
from erasers.text import PromptEncoding

# SD1.x attn2 layers: (LDM container, channels) — closed_form.md §1.4
SD1_ATTN2 = (
    [(f"input_blocks.{i}.1", c) for i, c in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))]
    + [("middle_block.1", 1280)]
    + [
        (f"output_blocks.{i}.1", c)
        for i, c in ((3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640), (9, 320), (10, 320), (11, 320))
    ]
)
# SDXL: (container, channels, depth) — comfyui_host.md §2.4
SDXL_ATTN2 = (
    [(f"input_blocks.{i}.1", 640, 2) for i in (4, 5)]
    + [(f"input_blocks.{i}.1", 1280, 10) for i in (7, 8)]
    + [("middle_block.1", 1280, 10)]
    + [(f"output_blocks.{i}.1", 1280, 10) for i in (0, 1, 2)]
    + [(f"output_blocks.{i}.1", 640, 2) for i in (3, 4, 5)]
)


def layer_shapes(family: Family, context_dim: int = None) -> dict:
    """Canonical key → shape for the text projections (plus the marker keys detection reads)."""
    shapes = {}
    if family in (Family.SD1, Family.SD2, Family.UNET):
        ctx = context_dim or (768 if family == Family.SD1 else 1024)
        for container, ch in SD1_ATTN2:
            for kv in "kv":
                shapes[f"{container}.transformer_blocks.0.attn2.to_{kv}.weight"] = (ch, ctx)
    elif family == Family.SDXL:
        for container, ch, depth in SDXL_ATTN2:
            for j in range(depth):
                for kv in "kv":
                    shapes[f"{container}.transformer_blocks.{j}.attn2.to_{kv}.weight"] = (ch, 2048)
        shapes["label_emb.0.0.weight"] = (1280, 2816)
    elif family == Family.FLUX:
        shapes.update(
            {
                "txt_in.weight": (3072, 4096),
                "vector_in.in_layer.weight": (3072, 768),
                "double_blocks.0.txt_attn.qkv.weight": (9216, 3072),
            }
        )
    elif family == Family.SD3:
        shapes.update(
            {
                "context_embedder.weight": (1536, 4096),
                "y_embedder.mlp.0.weight": (1536, 2048),
                "joint_blocks.0.context_block.attn.qkv.weight": (4608, 1536),
            }
        )
    return shapes


def layer_weights(
    family: Family, seed: int = 0, context_dim: int = None, dtype=torch.float32, shapes: dict = None
) -> dict:
    """Random weights (std 1/√in, like a trained projection) for ``layer_shapes(family)``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in (shapes or layer_shapes(family, context_dim)).items():
        out[key] = (torch.randn(shape, generator=gen) / math.sqrt(shape[-1])).to(dtype)
    return out


class ToyTextEncoder:
    """Deterministic causal 'CLIP': token embedding + position embedding, causal running mean, tanh mix."""

    BOS, EOS = 1, 2

    def __init__(
        self,
        dim: int = 768,
        context_length: int = 77,
        family: str = "sd1",
        vocab: int = 4096,
        seed: int = 0,
        pooled_dim: int = None,
        has_bos: bool = True,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.dim, self.context_length, self.family, self.vocab = dim, context_length, family, vocab
        self.context_dim = dim
        self.has_bos = has_bos
        self.token_table = torch.randn(vocab, dim, generator=gen)
        self.position_table = 0.3 * torch.randn(context_length, dim, generator=gen)
        self.mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
        self.pooled_proj = (torch.randn(dim, pooled_dim, generator=gen) / math.sqrt(dim)) if pooled_dim else None

    def token_id(self, word: str) -> int:
        return 3 + int(hashlib.md5(word.lower().encode()).hexdigest(), 16) % (self.vocab - 3)

    def tokenize(self, prompt: str) -> list:
        words = prompt.replace(",", " ").split()
        return ([self.BOS] if self.has_bos else []) + [self.token_id(w) for w in words] + [self.EOS]

    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        return self.encode_ids([self.tokenize(p) for p in prompts])

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> PromptEncoding:
        """Encode token-id lists directly (SAFREE's masked prompts replace single ids)."""
        ids = [list(r) for r in ids]
        prompts = ids
        padded = torch.full((len(prompts), self.context_length), self.EOS, dtype=torch.long)
        for i, row in enumerate(ids):
            row = row[: self.context_length]
            padded[i, : len(row)] = torch.tensor(row)
        x = self.token_table[padded] + self.position_table[: self.context_length]
        # causal: row t sees rows ≤ t only (running mean), like CLIP's causal mask
        steps = torch.arange(1, self.context_length + 1, dtype=torch.float32)[None, :, None]
        hidden = torch.tanh((x.cumsum(dim=1) / steps) @ self.mix) + 0.5 * x
        lengths = torch.tensor([min(len(r), self.context_length) for r in ids])
        pooled = None
        if self.pooled_proj is not None:
            pooled = hidden[torch.arange(len(prompts)), lengths - 1] @ self.pooled_proj
        return PromptEncoding(hidden=hidden, lengths=lengths, token_ids=ids, pooled=pooled, has_bos=self.has_bos)


def spm_tensors(family: Family, seed: int = 0, rank: int = 1, alpha: float = 1.0, scale: float = 0.05) -> dict:
    """A membrane in the official SPM layout (kohya names from diffusers paths) with random factors."""
    from erasers.membranes.formats.spm import official_modules

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, (inn, outn, conv) in official_modules(family).items():
        stem = "lora_unet_" + path.replace(".", "_")
        tail = (1, 1) if conv else ()
        out[f"{stem}.lora_down.weight"] = scale * torch.randn((rank, inn) + tail, generator=gen)
        out[f"{stem}.lora_up.weight"] = scale * torch.randn((outn, rank) + tail, generator=gen)
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def spm_model_shapes(family: Family) -> dict:
    """Canonical key → weight shape of every SPM target layer (plus the keys family detection reads)."""
    from erasers.files.keys import diffusers_to_canonical
    from erasers.membranes.formats.spm import official_modules

    shapes = {}
    for path, (inn, outn, conv) in official_modules(family).items():
        shapes[diffusers_to_canonical(path + ".weight")] = (outn, inn, 1, 1) if conv else (outn, inn)
    if family == Family.SDXL:
        shapes["label_emb.0.0.weight"] = (1280, 2816)
    return shapes
