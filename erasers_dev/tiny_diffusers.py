"""Tiny diffusers stand-ins for tests and benches: a UNet built from a config with random weights (CPU, no
downloads) and a pipeline-like object the diffusers API accepts (``.unet`` + ``text_encoder_adapter()``).

The UNet has the SD layout the canonical key tables expect (cross-attention down / mid / up blocks), 16
edited attn2 to_k / to_v layers at ``layers_per_block=2``, and about 0.3 M parameters, so building one
takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from .testing import ToyTextEncoder


def tiny_unet(layers_per_block: int = 2, context: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet if dtype == torch.float32 else unet.to(dtype)


def tiny_pipe(layers_per_block: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``.unet`` + a deterministic toy CLIP (``text_encoder_adapter()``), enough for compute / apply / remove."""
    encoder = ToyTextEncoder(dim=32, family="unet", vocab=512)
    return SimpleNamespace(
        unet=tiny_unet(layers_per_block, dtype=dtype, seed=seed), text_encoder_adapter=lambda: encoder
    )


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
