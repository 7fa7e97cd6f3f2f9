"""Model families and where their text conditioning enters the denoiser.

Keys in the core are *canonical*: the host-neutral LDM / ComfyUI names below ``diffusion_model.``
(``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``, ``txt_in.weight``), so one eraser file and
one table serve ComfyUI, A1111 and (through ``keys.py``) diffusers.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..errors import FamilyMismatch, UnsupportedFamily


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"
    # families read from the host's model class (erasers/families/): their keys alone are ambiguous
    # (Chroma and Flux.2 carry Flux's txt_in/double_blocks) or carry no attn2
    CHROMA = "chroma"
    FLUX2 = "flux2"
    QWEN_IMAGE = "qwen_image"
    LUMINA2 = "lumina2"
    ZIMAGE = "zimage"
    WAN = "wan"
    #: HiDream-I1: ~49 bias-free caption projections, each fed by its own text stream (T5, Llama layers)
    HIDREAM = "hidream"
    #: AuraFlow: one bias-free text-input Linear (cond_seq_linear), register tokens before the text
    AURAFLOW = "auraflow"
    #: any other UNet with cross-attention (e.g. the pack's shapes-world model); context dim in the config
    UNET = "unet"

    @property
    def is_dit(self) -> bool:
        """A text-input projection (not per-block attn2 K/V) is where text enters: Flux/SD3 and the newer
        MMDiTs. Wan has real cross-attention K/V and is not one."""
        return self in (Family.SD3, Family.FLUX) or self in TEXT_ENTRY_LAYERS and self is not Family.WAN

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self]


FAMILY_LABELS = {
    Family.SD1: "SD1.x",
    Family.SD2: "SD2.x",
    Family.SDXL: "SDXL",
    Family.SD3: "SD3/SD3.5",
    Family.FLUX: "Flux",
    Family.UNET: "cross-attention UNet",
    Family.CHROMA: "Chroma",
    Family.FLUX2: "Flux.2",
    Family.QWEN_IMAGE: "Qwen-Image",
    Family.LUMINA2: "Lumina 2",
    Family.ZIMAGE: "Z-Image",
    Family.WAN: "Wan 2.1/2.2",
    Family.HIDREAM: "HiDream-I1",
    Family.AURAFLOW: "AuraFlow",
}

#: width of the per-token text context each family's projections read
CONTEXT_DIM = {Family.SD1: 768, Family.SD2: 1024, Family.SDXL: 2048, Family.SD3: 4096, Family.FLUX: 4096}

ATTN2_KV = re.compile(r"(^|\.)attn2\.to_([kv])\.weight$")

#: DiT text-input projections (canonical key → (role, reads)) — ``reads`` is "tokens" or "pooled"
DIT_TEXT_LAYERS = {
    Family.FLUX: {"txt_in.weight": "tokens", "vector_in.in_layer.weight": "pooled"},
    Family.SD3: {"context_embedder.weight": "tokens", "y_embedder.mlp.0.weight": "pooled"},
}

#: the edited Linear(s) of the families erasers/families/ describes (canonical key regex → layer kind); the
#: records there say what sits in front of them (txt_norm, cap_embedder's RMSNorm, Wan's text_embedding)
TEXT_ENTRY_LAYERS = {
    Family.CHROMA: {r"^txt_in\.weight$": "text_in"},
    Family.FLUX2: {r"^txt_in\.weight$": "text_in"},
    Family.QWEN_IMAGE: {r"^txt_in\.weight$": "text_in"},
    Family.LUMINA2: {r"^cap_embedder\.1\.weight$": "text_in"},
    Family.ZIMAGE: {r"^cap_embedder\.1\.weight$": "text_in"},
    Family.WAN: {r"^blocks\.\d+\.cross_attn\.k\.weight$": "k", r"^blocks\.\d+\.cross_attn\.v\.weight$": "v"},
    # each projection reads another encoder output (erasers/families/hidream.py: caption_streams)
    Family.HIDREAM: {
        r"^caption_projection\.\d+\.linear\.weight$": "text_in",
        r"^p_embedder\.pooled_embedder\.linear_1\.weight$": "pooled_in",  # pooled CLIP-L ⊕ CLIP-G
    },
    Family.AURAFLOW: {r"^cond_seq_linear\.weight$": "text_in"},
}


TEXT_ENTRY_RE = {f: [(re.compile(p), kind) for p, kind in layers.items()] for f, layers in TEXT_ENTRY_LAYERS.items()}


def _natural(key: str):
    # blocks.2 before blocks.10, so specs follow the model's block order
    return [int(part) if part.isdigit() else part for part in key.split(".")]


@dataclass(frozen=True)
class LayerSpec:
    """One projection matrix a closed-form method may edit."""

    key: str  # canonical weight key
    kind: str  # "k", "v" (UNet attn2) or "text_in" / "pooled_in" (DiT input projections)
    out_features: int
    in_features: int


def detect_family(shapes: Mapping[str, Sequence[int]]) -> Family:
    """Family from canonical keys and shapes alone (like ComfyUI's own detection, no file names).

    For files and diffusers; a host that has the model's class reads the family from it instead
    (erasers/families/). The marker keys are the ones ComfyUI's model_detection tests for.
    """
    if "txt_in.weight" in shapes and any(k.startswith("double_blocks.") for k in shapes):
        if any(k.startswith("distilled_guidance_layer.") for k in shapes):
            return Family.CHROMA
        if "double_stream_modulation_img.lin.weight" in shapes:
            return Family.FLUX2
        return Family.FLUX
    if "caption_projection.0.linear.weight" in shapes:  # model_detection's HiDream marker
        return Family.HIDREAM
    if "cond_seq_linear.weight" in shapes:  # model_detection's AuraFlow marker
        return Family.AURAFLOW
    if "txt_in.weight" in shapes and "txt_norm.weight" in shapes and "img_in.weight" in shapes:
        return Family.QWEN_IMAGE
    if "cap_embedder.1.weight" in shapes:
        return Family.ZIMAGE if tuple(shapes["cap_embedder.1.weight"])[0] == 3840 else Family.LUMINA2
    if "text_embedding.0.weight" in shapes and any(TEXT_ENTRY_RE[Family.WAN][0][0].match(k) for k in shapes):
        return Family.WAN
    if "context_embedder.weight" in shapes and any(k.startswith("joint_blocks.") for k in shapes):
        return Family.SD3
    dims = {tuple(s)[1] for k, s in shapes.items() if ATTN2_KV.search(k)}
    if not dims:
        raise UnsupportedFamily(
            "Expected a diffusion model with text cross-attention (attn2.to_k/to_v) or a Flux/SD3 text "
            f"input projection, found neither among {len(shapes)} weights. Concept erasers need a "
            "text-conditioned model (SD1.x, SD2.x, SDXL, SD3 or Flux)."
        )
    if len(dims) > 1:
        raise UnsupportedFamily(f"Cross-attention layers read contexts of different widths {sorted(dims)}.")
    dim = dims.pop()
    has_label_emb = any(k.startswith("label_emb.") for k in shapes)
    if dim == 768 and not has_label_emb:
        return Family.SD1
    if dim == 1024 and not has_label_emb:
        return Family.SD2
    if dim == 2048 and has_label_emb:
        return Family.SDXL
    return Family.UNET


def layer_specs(shapes: Mapping[str, Sequence[int]], family: Family) -> list:
    """Every text projection of the model, in canonical order (sorted by key)."""
    specs = []
    if family in TEXT_ENTRY_RE:
        for pattern, kind in TEXT_ENTRY_RE[family]:
            for key in sorted((k for k in shapes if pattern.match(k)), key=_natural):
                out_f, in_f = shapes[key][:2]
                specs.append(LayerSpec(key, kind, out_f, in_f))
        return sorted(specs, key=lambda s: _natural(s.key))
    if family.is_dit:
        for key, reads in DIT_TEXT_LAYERS[family].items():
            if key in shapes:
                out_f, in_f = shapes[key][:2]
                specs.append(LayerSpec(key, "text_in" if reads == "tokens" else "pooled_in", out_f, in_f))
    else:
        for key in sorted(shapes):
            match = ATTN2_KV.search(key)
            if match:
                out_f, in_f = shapes[key][:2]
                specs.append(LayerSpec(key, match.group(2), out_f, in_f))
    return specs


def check_encoder_family(
    model_family: Family, encoder_family: str, context_dim: int, expected_dim: int, where: str = "the CLIP input"
) -> None:
    """Refuse a text encoder from another family: its embeddings would not fit the model's projections."""
    if context_dim != expected_dim:
        raise FamilyMismatch(
            f"The model is {model_family.label} and its text projections read {expected_dim}-wide "
            f"embeddings, but {where} ({encoder_family}) produces {context_dim}-wide ones. Connect the "
            f"text encoder that was loaded with this model (same checkpoint)."
        )


def parse_family(value: Optional[str]) -> Optional[Family]:
    if value is None or value == "":
        return None
    try:
        return Family(value)
    except ValueError:
        raise UnsupportedFamily(
            f"Unknown model family '{value}'; expected one of {', '.join(f.value for f in Family)}."
        ) from None
