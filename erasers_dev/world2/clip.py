"""The contrastive stage: a CLIP-like text encoder trained against an image encoder, then frozen.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision", fig. 3):
image and text towers map a batch of N (image, caption) pairs to L2-normalised embeddings I, T; the
logits are ``exp(t) · I Tᵀ`` with a learned temperature t (initialised to log(1/0.07), clamped so the
scale stays ≤ 100); the loss is the mean of the cross-entropies over rows and over columns with the
diagonal as the target (InfoNCE both ways). The text tower is ``ShapesTextEncoder`` (causal, pre-LN),
its pooled vector is the EOS state, projected linearly without bias, as in CLIP.

After this stage the text encoder is frozen and the UNet is trained on its last hidden states, so the
conditioning has the structure a contrastive objective gives it (concepts separated by what tells
*images* apart), not the structure a jointly trained diffusion encoder drifts into.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasers_dev.shapes.text_encoder import ShapesTextEncoder, TextEncoderConfig

from . import world

logger = logging.getLogger(__name__)

#: CLIP's initial temperature 0.07 and its clamp of the logit scale at 100
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def info_nce(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (fig. 3): embeddings (N, D), any norm; pair i matches pair i."""
    i = F.normalize(image_embeds, dim=-1)
    t = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * i @ t.T
    target = torch.arange(len(i), device=i.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ImageEncoder(nn.Module):
    """images (N, 3, H, W) in [-1, 1] → (N, embed). Stride-2 convolutions down to 4 px, global mean."""

    def __init__(self, width: int = 32, embed: int = 128):
        super().__init__()
        w = width
        self.width, self.embed = width, embed
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, embed),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class ContrastiveModel(nn.Module):
    """Both towers, the text projection and the temperature; ``text_encoder`` is what the UNet reads."""

    def __init__(self, text_config: TextEncoderConfig, image_width: int = 32, embed: int = 128):
        super().__init__()
        self.text_encoder = ShapesTextEncoder(text_config)
        self.text_projection = nn.Linear(text_config.width, embed, bias=False)
        self.image_encoder = ImageEncoder(image_width, embed)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_encoder(ids, lengths)[1])

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return info_nce(self.image_encoder(images), self.encode_text(ids, lengths), self.logit_scale)


@dataclass
class ClipConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    image_width: int = 32
    embed: int = 128
    log_every: int = 100


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_clip(cfg: ClipConfig, text_config: TextEncoderConfig, tokenizer, seed: int, image_size: int = 32) -> tuple:
    """Train both towers on fresh world batches; returns (model in eval mode, info dict)."""
    torch.manual_seed(seed)
    model = ContrastiveModel(text_config, cfg.image_width, cfg.embed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    data_gen = torch.Generator().manual_seed(seed + 11)
    t0 = time.time()
    losses = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        images, captions, _ = world.sample_batch(cfg.batch_size, data_gen, image_size)
        ids, lengths = tokenizer.encode(captions)
        # the pooled EOS state of a causal encoder never sees the padding after it: skip those positions
        loss = model(images, ids[:, : int(lengths.max())], lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = losses[-cfg.log_every :]
            logger.info(
                "clip step %d/%d InfoNCE %.3f (chance %.3f) scale %.1f %.2fs/step",
                step + 1,
                cfg.steps,
                sum(recent) / len(recent),
                math.log(cfg.batch_size),
                model.logit_scale.exp().item(),
                (time.time() - t0) / (step + 1),
            )
    model.eval().requires_grad_(False)
    info = {
        **asdict(cfg),
        "seconds": round(time.time() - t0, 1),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "retrieval": retrieval_accuracy(model, tokenizer, seed + 1000, image_size, n=min(256, cfg.batch_size * 2)),
    }
    return model, info


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveModel, tokenizer, seed: int, image_size: int, n: int = 256) -> dict:
    """Top-1 image→caption and caption→image retrieval in a fresh batch of ``n`` (chance 1/n)."""
    images, captions, _ = world.sample_batch(n, torch.Generator().manual_seed(seed), image_size)
    ids, lengths = tokenizer.encode(captions)
    ids = ids[:, : int(lengths.max())]
    i = F.normalize(model.image_encoder(images), dim=-1)
    t = F.normalize(model.encode_text(ids, lengths), dim=-1)
    sim = i @ t.T
    target = torch.arange(n)
    return {
        "n": n,
        "image_to_text": (sim.argmax(1) == target).float().mean().item(),
        "text_to_image": (sim.argmax(0) == target).float().mean().item(),
    }


def save_clip(model: ContrastiveModel, path, extra: Optional[dict] = None, overwrite: bool = False) -> None:
    """Both towers (for SAFREE-like methods and the bench's image-text checks), float32; written atomically,
    an existing file only replaced with ``overwrite``."""
    import json

    from erasers.files.writing import save_safetensors_atomic

    meta = {
        "format": "concept-erasers/world2-clip",
        "text_encoder_config": json.dumps(model.text_encoder.config.to_dict()),
        "image_width": str(model.image_encoder.width),
        "embed": str(model.image_encoder.embed),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors_atomic(tensors, str(path), metadata=meta, overwrite=overwrite)


def load_clip(path) -> ContrastiveModel:
    import json

    from safetensors.torch import load_file

    from .model import read_metadata

    meta = read_metadata(path, "concept-erasers/world2-clip")
    model = ContrastiveModel(
        TextEncoderConfig(**json.loads(meta["text_encoder_config"])), int(meta["image_width"]), int(meta["embed"])
    )
    model.load_state_dict(load_file(str(path)), strict=True)
    model.extra = json.loads(meta.get("extra", "{}"))
    return model.eval().requires_grad_(False)
