"""A small CNN that reads shape, colour, style and background off a shapes-world image.

It is the judge of every shapes benchmark (did the eraser remove the circle? is the red still red?),
trained on the same generator as the text-to-image model, with noise and blur added so that it also
reads the slightly imperfect images a diffusion model produces.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

logger = logging.getLogger(__name__)

FORMAT_CLASSIFIER = "concept-erasers/shapes-classifier"
DEFAULT_CLASSIFIER = Path(__file__).resolve().parent / "weights" / "shapes_classifier.safetensors"
HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES, "background": world.BACKGROUNDS}


class ShapesClassifier(nn.Module):
    """images (N, 3, H, W) in [-1, 1] → dict of logits, one entry per head in ``HEADS``."""

    def __init__(self, width: int = 32, heads: Optional[Dict[str, list]] = None):
        super().__init__()
        self.width = width
        self.head_names = {k: list(v) for k, v in (heads or HEADS).items()}
        w = width
        # a thin full-resolution stem (cheap on CPU), then wider layers at 8 and 4 px
        self.features = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1),
            nn.GroupNorm(4, w // 2),
            nn.SiLU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in self.head_names.items()})

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images01: torch.Tensor, batch_size: int = 512) -> Dict[str, torch.Tensor]:
        """Class indices per head for images in [0, 1] (what the pipeline returns)."""
        was_training = self.training
        self.eval()
        outs = [self(images01[i : i + batch_size] * 2 - 1) for i in range(0, len(images01), batch_size)]
        self.train(was_training)
        return {k: torch.cat([o[k] for o in outs]).argmax(-1) for k in self.head_names}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, a random blur and a small brightness shift: the ways generated images deviate."""
    n = x.shape[0]
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3), groups=3)
    a = torch.rand(n, 1, 1, 1, generator=gen) * 0.7
    x = x * (1 - a) + blurred * a
    x = x + torch.randn(x.shape, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) * 0.12)
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * 0.05
    return x.clamp(-1, 1)


def train_classifier(
    steps: int = 1500,
    batch_size: int = 64,
    seed: int = 0,
    size: int = 16,
    lr: float = 2e-3,
    width: int = 32,
    log_every: int = 100,
) -> tuple:
    """Train on fresh generator batches; returns (model in eval mode, held-out accuracy per head)."""
    torch.manual_seed(seed)
    model = ShapesClassifier(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    data_gen = torch.Generator().manual_seed(seed + 1)
    aug_gen = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, _, labels = world.sample_batch(batch_size, data_gen, size)
        logits = model(_augment(x, aug_gen))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in model.head_names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            logger.info(
                "classifier step %d/%d loss %.4f (%.2fs/step)", step, steps, loss.item(), (time.time() - t0) / step
            )
    model.eval()
    return model, classifier_accuracy(model, seed=seed + 1000, size=size)


@torch.no_grad()
def classifier_accuracy(
    model: ShapesClassifier, n: int = 2000, seed: int = 1000, size: int = 16, augment: bool = True
) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    x, _, labels = world.sample_batch(n, gen, size)
    if augment:
        x = _augment(x, gen)
    pred = model.predict((x + 1) / 2)
    return {k: (pred[k] == labels[k]).float().mean().item() for k in model.head_names}


def save_classifier(model: ShapesClassifier, path: Union[str, Path], extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT_CLASSIFIER,
        "width": str(model.width),
        "heads": json.dumps(model.head_names),
        "extra": json.dumps(extra or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path: Union[str, Path] = DEFAULT_CLASSIFIER) -> ShapesClassifier:
    from safetensors.torch import load_file

    from .model import read_metadata

    meta = read_metadata(path, FORMAT_CLASSIFIER)
    model = ShapesClassifier(int(meta["width"]), json.loads(meta["heads"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.extra = json.loads(meta.get("extra", "{}"))
    return model.eval().requires_grad_(False)
