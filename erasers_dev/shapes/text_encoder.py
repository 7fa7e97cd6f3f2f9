"""A small CLIP-like text encoder: causal pre-LN transformer, learned positions, final LayerNorm.

Like CLIP's text tower, each position attends only to itself and earlier positions, so the hidden
state of a word token summarises the prompt up to that word, and the padding after EOS sees the whole
prompt. The last hidden states (after the final LayerNorm) are the UNet's cross-attention context; the
EOS state is the pooled vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TextEncoderConfig:
    vocab_size: int = 39
    context_length: int = 16
    width: int = 128
    layers: int = 3
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}).")

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.ln_2(x))


class ShapesTextEncoder(nn.Module):
    """ids (N, T) → (hidden (N, T, width), pooled (N, width) taken at the EOS position)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"Got {ids.shape[1]} positions, the encoder holds {self.config.context_length}.")
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        hidden = self.final_layer_norm(x)
        eos = (lengths.to(ids.device) - 1).clamp(min=0)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), eos]
        return hidden, pooled
