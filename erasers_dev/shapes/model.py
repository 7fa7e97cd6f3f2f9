"""The shapes text-to-image model: configs, builders, the sampling pipeline and the weight file format.

Anatomy as in Stable Diffusion, scaled down: a CLIP-like causal text encoder whose last hidden states
are the context of every cross-attention (``attn2``) of a diffusers ``UNet2DConditionModel``;
ε-prediction, a DDIM sampler, classifier-free guidance. Differences, on purpose: pixel space (no VAE),
16 px, and the cosine ("squaredcos_cap_v2") noise schedule, which suits tiny pixel models better than
SD's latent-space ``scaled_linear`` betas.

Weight file: one ``.safetensors`` with ``unet.*`` and ``text_encoder.*`` tensors; its metadata holds the
configs as JSON (``format`` = ``concept-erasers/shapes-t2i``), so nothing else is needed to load it.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from erasers.text import PromptEncoding

from .text_encoder import ShapesTextEncoder, TextEncoderConfig
from .tokenizer import ShapesTokenizer

logger = logging.getLogger(__name__)

FORMAT_T2I = "concept-erasers/shapes-t2i"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_T2I = WEIGHTS_DIR / "shapes_t2i.safetensors"
DEFAULT_GUIDANCE = 4.0


@dataclass
class UNetConfig:
    sample_size: int = 16
    block_out_channels: Tuple[int, ...] = (32, 64, 64)
    down_block_types: Tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: Tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 4  # diffusers' legacy name: this is the number of heads
    norm_num_groups: int = 8
    cross_attention_dim: int = 128

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    set_alpha_to_one: bool = False
    timestep_spacing: str = "trailing"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ShapesModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.unet.cross_attention_dim != self.text_encoder.width:
            raise ValueError(
                f"UNet cross_attention_dim ({self.unet.cross_attention_dim}) must equal the text "
                f"encoder width ({self.text_encoder.width})."
            )


def build_unet(cfg: UNetConfig):
    """A diffusers ``UNet2DConditionModel`` in pixel space (3 → 3 channels)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=3,
        out_channels=3,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
    )


def build_scheduler(cfg: SchedulerConfig):
    """DDIM with the training noise schedule; its ``add_noise`` is used for training too."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**cfg.to_dict())


def build_text_encoder(cfg: TextEncoderConfig) -> ShapesTextEncoder:
    return ShapesTextEncoder(cfg)


def default_config(tokenizer: Optional[ShapesTokenizer] = None) -> ShapesModelConfig:
    tokenizer = tokenizer or ShapesTokenizer.default()
    return ShapesModelConfig(
        text_encoder=TextEncoderConfig(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length)
    )


# -------------------------------------------------------------------------------------------- adapter


class ShapesTextEncoderAdapter:
    """``erasers.text.TextEncoder`` for the shapes model (family ``"shapes"``)."""

    family = "shapes"

    def __init__(self, text_encoder: ShapesTextEncoder, tokenizer: ShapesTokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        """One batch pass. ``token_ids`` are untruncated (so ``check_fits`` can refuse long prompts)."""
        prompts = list(prompts)
        ids, lengths = self.tokenizer.encode(prompts)
        device = next(self.text_encoder.parameters()).device
        hidden, pooled = self.text_encoder(ids.to(device), lengths)
        return PromptEncoding(
            hidden=hidden.float().cpu(),
            lengths=lengths,
            token_ids=[self.tokenizer.ids(p) for p in prompts],
            pooled=pooled.float().cpu(),
            has_bos=True,
        )


# ------------------------------------------------------------------------------------------- pipeline


class ShapesPipeline:
    """Text → 16 px images. Attributes as in diffusers: ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``."""

    def __init__(
        self, unet, text_encoder: ShapesTextEncoder, tokenizer: ShapesTokenizer, scheduler, config: ShapesModelConfig
    ):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        return self.config.unet.sample_size

    def to(self, device) -> "ShapesPipeline":
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    def clone(self) -> "ShapesPipeline":
        """Deep copy: edit the clone, never the cached default."""
        return copy.deepcopy(self)

    def text_encoder_adapter(self) -> ShapesTextEncoderAdapter:
        return ShapesTextEncoderAdapter(self.text_encoder, self.tokenizer)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's context (N, T, d) for a list of prompts."""
        ids, lengths = self.tokenizer.encode(list(prompts))
        return self.text_encoder(ids.to(self.device), lengths)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        negative_prompts: Optional[Sequence[str]] = None,
        steps: int = 20,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = 0,
        return_tensors: bool = True,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_embeds: Optional[torch.Tensor] = None,
        batch_size: int = 256,
    ):
        """Sample one image per prompt; images (N, 3, H, W) in [0, 1], or PIL images.

        ``prompt_embeds`` / ``negative_embeds`` (N, T, d) replace the text encoder's output (for erasers
        that edit the context). Noise comes from ``torch.Generator().manual_seed(seed)`` for the whole
        batch, so the same prompts and seed give the same images.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        cond = prompt_embeds if prompt_embeds is not None else self.encode_prompts(prompts)
        n = cond.shape[0]
        if negative_embeds is not None:
            uncond = negative_embeds
        else:
            negs = list(negative_prompts) if negative_prompts is not None else [""] * n
            if len(negs) == 1 and n > 1:
                negs = negs * n
            if len(negs) != n:
                raise ValueError(f"Got {len(negs)} negative prompts for {n} prompts; give one or one per prompt.")
            uncond = self.encode_prompts(negs)
        size = self.image_size
        gen = torch.Generator().manual_seed(int(seed))
        latents = torch.randn(n, 3, size, size, generator=gen).to(self.device)
        out = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            out.append(
                self._denoise(latents[sl], cond[sl].to(self.device), uncond[sl].to(self.device), steps, guidance)
            )
        images = ((torch.cat(out) + 1) / 2).clamp(0, 1).cpu()
        return images if return_tensors else to_pil_images(images)

    def _denoise(self, x, cond, uncond, steps: int, guidance: float) -> torch.Tensor:
        scheduler = copy.deepcopy(self.scheduler)  # set_timesteps mutates it; keep the pipeline reentrant
        scheduler.set_timesteps(steps)
        use_cfg = guidance != 1.0
        context = torch.cat([uncond, cond]) if use_cfg else cond
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            eps = self.unet(inp, t, encoder_hidden_states=context).sample
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
        return x


def to_pil_images(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def to_pil_grid(images: torch.Tensor, nrow: int = 8, scale: int = 4, pad: int = 1):
    """(N, 3, H, W) in [0, 1] → one PIL image, ``nrow`` per row, upscaled ``scale``× (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            images[i]
        )
    img = to_pil_images(canvas[None])[0]
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


# ------------------------------------------------------------------------------------------- file IO


def save_pipeline(
    pipe: ShapesPipeline, path: Union[str, Path], extra: Optional[dict] = None, dtype: torch.dtype = torch.float16
) -> None:
    """Write one safetensors file (tensors stored as ``dtype``) with the configs in its metadata."""
    from safetensors.torch import save_file

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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: Union[str, Path], expected_format: str) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weight file at {path}. Train one with `python -m erasers shapes train`.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != expected_format:
        raise ValueError(
            f"{path} is not a '{expected_format}' file (its metadata format is "
            f"{meta.get('format')!r}). Pass the file written by `python -m erasers shapes train`."
        )
    return meta


def _load_prefixed(module: torch.nn.Module, tensors: dict, prefix: str, path) -> None:
    sub = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path}: {prefix[:-1]} weights do not match the config; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    module.load_state_dict(sub, strict=True)


def load_pipeline(path: Union[str, Path] = DEFAULT_T2I, device: str = "cpu") -> ShapesPipeline:
    """Load a shapes text-to-image file (weights come back as float32, eval mode)."""
    from safetensors.torch import load_file

    meta = read_metadata(path, FORMAT_T2I)
    cfg = ShapesModelConfig(
        unet=UNetConfig.from_dict(json.loads(meta["unet_config"])),
        text_encoder=TextEncoderConfig(**json.loads(meta["text_encoder_config"])),
        scheduler=SchedulerConfig(**json.loads(meta["scheduler_config"])),
    )
    tokenizer = ShapesTokenizer.from_config(json.loads(meta["tokenizer"]))
    unet, text_encoder = build_unet(cfg.unet), build_text_encoder(cfg.text_encoder)
    tensors = load_file(str(path))
    _load_prefixed(unet, tensors, "unet.", path)
    _load_prefixed(text_encoder, tensors, "text_encoder.", path)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    pipe = ShapesPipeline(unet, text_encoder, tokenizer, build_scheduler(cfg.scheduler), cfg)
    pipe.extra = json.loads(meta.get("extra", "{}"))
    return pipe.to(device)


def record_fidelity(path: Union[str, Path], result: dict) -> None:
    """Rewrite ``path`` with the canonical fidelity figures of ``evaluate()`` in its metadata."""
    from safetensors.torch import load_file, save_file

    meta = read_metadata(path, FORMAT_T2I)
    c = result["canonical"]
    extra = json.loads(meta.get("extra", "{}"))
    extra["fidelity"] = {
        **result["settings"],
        **{
            k: c[k]
            for k in ("n", "shape_accuracy", "colour_accuracy", "both_accuracy", "shape_confusion", "colour_confusion")
        },
    }
    if "paraphrase" in result:
        p = result["paraphrase"]
        extra["paraphrase_fidelity"] = {k: p[k] for k in ("n", "shape_accuracy", "colour_accuracy", "both_accuracy")}
    meta["extra"] = json.dumps(extra)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata=meta)
    load_default.cache_clear()


@functools.lru_cache(maxsize=1)
def load_default() -> ShapesPipeline:
    """The shipped model, loaded once and cached. It is shared: call ``.clone()`` before editing weights."""
    return load_pipeline(DEFAULT_T2I)


def text_encoder_adapter(pipe: Optional[ShapesPipeline] = None) -> ShapesTextEncoderAdapter:
    """The ``erasers.text.TextEncoder`` of ``pipe`` (default: the shipped model)."""
    return (pipe or load_default()).text_encoder_adapter()


def random_pipeline(seed: int = 0, config: Optional[ShapesModelConfig] = None) -> ShapesPipeline:
    """A freshly initialised (untrained) pipeline; for tests and as the start of training."""
    tokenizer = ShapesTokenizer.default()
    cfg = config or default_config(tokenizer)
    torch.manual_seed(seed)
    return ShapesPipeline(
        build_unet(cfg.unet), build_text_encoder(cfg.text_encoder), tokenizer, build_scheduler(cfg.scheduler), cfg
    )


def tiny_config(tokenizer: Optional[ShapesTokenizer] = None) -> ShapesModelConfig:
    """The shapes-world anatomy at toy width (8 px, two UNet levels, a one-layer encoder of width 16):
    a random pipeline built from it runs a sampling step in milliseconds, for tests of the plumbing."""
    tok = tokenizer or ShapesTokenizer.default()
    return ShapesModelConfig(
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
        ),
        text_encoder=TextEncoderConfig(
            vocab_size=tok.vocab_size, context_length=tok.context_length, width=16, layers=1, heads=2
        ),
    )
