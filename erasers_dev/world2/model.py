"""World 2's text-to-image model: the shapes anatomy (CLIP-like causal text encoder → cross-attention of a
diffusers ``UNet2DConditionModel``, ε-prediction, DDIM, classifier-free guidance) at 32 px, with a text
encoder trained contrastively first and frozen (``clip.py``), as Stable Diffusion reads a frozen CLIP.

The pipeline is ``erasers_dev.shapes.ShapesPipeline`` (same attributes ``unet``, ``text_encoder``,
``tokenizer``, ``scheduler``), so every eraser and bench helper written for the shapes world applies.
Weight file: one ``.safetensors`` with ``unet.*`` and ``text_encoder.*`` tensors and the configs in its
metadata (``format`` = ``concept-erasers/world2-t2i``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from erasers_dev.shapes.model import (
    SchedulerConfig,
    ShapesModelConfig,
    ShapesPipeline,
    ShapesTextEncoderAdapter,
    UNetConfig,
    _load_prefixed,
    build_scheduler,
    build_text_encoder,
    build_unet,
)
from erasers_dev.shapes.text_encoder import TextEncoderConfig

from .tokenizer import World2Tokenizer

FORMAT_T2I = "concept-erasers/world2-t2i"
T2I_NAME = "world2_t2i.safetensors"
#: the shipped world: text-to-image, contrastive encoder and judges (``python -m erasers world2 train``)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_GUIDANCE = 4.0

_D, _CD, _CU, _U = "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"


class World2TextEncoderAdapter(ShapesTextEncoderAdapter):
    """``erasers.text.TextEncoder`` for the world-2 model."""

    family = "world2"


class World2Pipeline(ShapesPipeline):
    """Text → 32 px images; see ``ShapesPipeline`` for the call signature."""

    def text_encoder_adapter(self) -> World2TextEncoderAdapter:
        return World2TextEncoderAdapter(self.text_encoder, self.tokenizer)


def default_config(tokenizer: Optional[World2Tokenizer] = None) -> ShapesModelConfig:
    """The shipped anatomy. Cross-attention sits at 8 px (down, mid, up) only: at 16 px the self-attention
    over 256 positions doubled the step time on CPU (1.5 s vs 0.8 s at batch 32, one thread) — measured."""
    tok = tokenizer or World2Tokenizer.default()
    return ShapesModelConfig(
        unet=UNetConfig(
            sample_size=32,
            block_out_channels=(32, 64, 96),
            down_block_types=(_D, _D, _CD),
            up_block_types=(_CU, _U, _U),
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=8,
            cross_attention_dim=128,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=tok.vocab_size, context_length=tok.context_length, width=128, layers=4, heads=4
        ),
    )


def tiny_config(tokenizer: Optional[World2Tokenizer] = None, image_size: int = 16) -> ShapesModelConfig:
    """Toy widths for tests: runs a training step in milliseconds."""
    tok = tokenizer or World2Tokenizer.default()
    return ShapesModelConfig(
        unet=UNetConfig(
            sample_size=image_size,
            block_out_channels=(8, 16),
            down_block_types=(_D, _CD),
            up_block_types=(_CU, _U),
            norm_num_groups=4,
            attention_head_dim=2,
            cross_attention_dim=32,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=tok.vocab_size, context_length=tok.context_length, width=32, layers=1, heads=2
        ),
    )


def build_pipeline(config: ShapesModelConfig, tokenizer: World2Tokenizer, text_encoder=None) -> World2Pipeline:
    """A pipeline with a fresh UNet (seed it with ``torch.manual_seed`` first) and the given or a fresh encoder."""
    return World2Pipeline(
        build_unet(config.unet),
        text_encoder if text_encoder is not None else build_text_encoder(config.text_encoder),
        tokenizer,
        build_scheduler(config.scheduler),
        config,
    )


def read_metadata(path: Union[str, Path], expected_format: str) -> dict:
    """The safetensors metadata of a world-2 file, refusing files of another format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weight file at {path}. Train one with `python -m erasers world2 train`.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != expected_format:
        raise ValueError(
            f"{path} is not a '{expected_format}' file (its metadata format is {meta.get('format')!r}). "
            f"Pass a file written by `python -m erasers world2 train`."
        )
    return meta


def save_pipeline(
    pipe: World2Pipeline,
    path: Union[str, Path],
    extra: Optional[dict] = None,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> None:
    """One safetensors file (tensors as ``dtype``) with the configs in its metadata; written atomically,
    an existing file only replaced with ``overwrite``."""
    from erasers.files.writing import save_safetensors_atomic

    tensors = {f"unet.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in pipe.unet.state_dict().items()}
    tensors.update(
        {
            f"text_encoder.{k}": v.detach().to("cpu", dtype).contiguous()
            for k, v in pipe.text_encoder.state_dict().items()
        }
    )
    meta = {
        "format": FORMAT_T2I,
        "unet_config": json.dumps(pipe.config.unet.to_dict()),
        "text_encoder_config": json.dumps(pipe.config.text_encoder.to_dict()),
        "scheduler_config": json.dumps(pipe.config.scheduler.to_dict()),
        "tokenizer": json.dumps(pipe.tokenizer.to_config()),
        "extra": json.dumps(extra or {}),
    }
    save_safetensors_atomic(tensors, str(path), metadata=meta, overwrite=overwrite)


def load_pipeline(path: Union[str, Path], device: str = "cpu") -> World2Pipeline:
    """Load a world-2 text-to-image file (float32, eval mode, no gradients)."""
    from safetensors.torch import load_file

    meta = read_metadata(path, FORMAT_T2I)
    cfg = ShapesModelConfig(
        unet=UNetConfig.from_dict(json.loads(meta["unet_config"])),
        text_encoder=TextEncoderConfig(**json.loads(meta["text_encoder_config"])),
        scheduler=SchedulerConfig(**json.loads(meta["scheduler_config"])),
    )
    pipe = build_pipeline(cfg, World2Tokenizer.from_config(json.loads(meta["tokenizer"])))
    tensors = load_file(str(path))
    _load_prefixed(pipe.unet, tensors, "unet.", path)
    _load_prefixed(pipe.text_encoder, tensors, "text_encoder.", path)
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    pipe.extra = json.loads(meta.get("extra", "{}"))
    return pipe.to(device)
