"""Single-file SD1.x / SD2.x / SDXL checkpoints (``.safetensors`` only): projections and text encoders.

Only what an erasure needs is read: the UNet's cross-attention K/V weights (canonical keys = the names
below ``model.diffusion_model.``), the shapes of every UNet weight (family detection) and the text
encoder tower(s), rebuilt as transformers CLIP models from the checkpoint's own weights:

  SD1.x  ``cond_stage_model.transformer.text_model.*``  (CLIP-L, HF names)       → last hidden state
  SD2.x  ``cond_stage_model.model.*``                    (OpenCLIP-H)             → penultimate layer + final LN
  SDXL   ``conditioner.embedders.0.transformer.*``       (CLIP-L, HF names)       → penultimate layer
         ``conditioner.embedders.1.model.*``             (OpenCLIP-G)             → penultimate layer, pooled
The tokenizer is not in the file; ``erasers_diffusers.tokenizer`` finds one locally.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from erasers.config import check_path
from erasers.edits.eraser import check_weights_finite
from erasers.errors import BadEraserFile, UnsupportedFamily
from erasers.files.eraser_file import check_safetensors
from erasers.files.families import ATTN2_KV, Family, detect_family

from .clip_text import ClipTextEncoder, Tower, clip_tokenizer, fix_meta_buffers
from .tokenizer import find_tokenizer_dir

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_G = "conditioner.embedders.1.model."

_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.*)$")
#: OpenCLIP residual-block names → transformers CLIP encoder-layer names (in_proj is split separately)
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


@dataclass
class Checkpoint:
    path: str
    family: Family
    weights: dict  # canonical key → float32 tensor (text projections only)
    shapes: dict  # canonical key → shape (every UNet weight)
    encoder: object  # ClipTextEncoder


def openclip_to_hf(state: dict) -> dict:
    """OpenCLIP text-tower names (below ``model.``) → ``CLIPTextModel(WithProjection)`` names."""
    out = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()  # stored (d, p) for x @ P; Linear wants (p, d)
        elif m := _RESBLOCK.match(key):
            layer, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias: q, k, v stacked along dim 0
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                stem, leaf = rest.rsplit(".", 1)
                if stem in _OPENCLIP_LAYER:
                    out[f"{layer}{_OPENCLIP_LAYER[stem]}.{leaf}"] = value
    return out


def clip_config(state: dict, act: str, drop_last: bool = False, eos_token_id: int = 49407):
    """A ``CLIPTextConfig`` read off the weights' shapes (so fine-tunes of odd sizes still load)."""
    from transformers import CLIPTextConfig

    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    proj = state.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers - 1 if drop_last else layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=act,
        projection_dim=proj.shape[0] if proj is not None else width,
        bos_token_id=eos_token_id - 1,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_clip(
    state: dict,
    act: str,
    with_projection: bool = False,
    drop_last: bool = False,
    where: str = "text encoder",
    eos_token_id: int = 49407,
):
    """A float32 transformers CLIP text model holding exactly ``state`` (missing/extra keys refused)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_config(state, act, drop_last, eos_token_id)  # the pooled output is read at the EOS
    if drop_last:
        last = f"text_model.encoder.layers.{config.num_hidden_layers}."
        state = {k: v for k, v in state.items() if not k.startswith(last)}
    if not with_projection:
        state = {k: v for k, v in state.items() if k != "text_projection.weight"}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in expected):  # transformers ≥ 5 dropped the prefix here
        state = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in state.items()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise BadEraserFile(
            f"The checkpoint's {where} does not have the layout of a CLIP text model: missing "
            f"{missing[:6]}, unexpected {unexpected[:6]}. Is it a complete SD checkpoint?"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    fix_meta_buffers(model)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise BadEraserFile(f"The checkpoint's {where} could not be fully loaded.")
    return model.eval()


def _read(handle, keys, prefix: str) -> dict:
    return {k[len(prefix) :]: handle.get_tensor(k) for k in keys if k.startswith(prefix)}


def load_checkpoint(path: str, tokenizer_dir: Optional[str] = None, comfyui_path: Optional[str] = None) -> Checkpoint:
    """Projections, family and text encoder(s) of a single-file checkpoint."""
    from safetensors import SafetensorError

    path = check_path("path", path)
    check_safetensors(path)
    name = os.path.basename(path)
    folder = find_tokenizer_dir(tokenizer_dir=tokenizer_dir, comfyui_path=comfyui_path)  # fail before reading
    try:
        return _load(path, name, folder)
    except (SafetensorError, OSError) as exc:
        raise BadEraserFile(
            f"'{name}' could not be read as .safetensors ({exc}). The file may be truncated: "
            f"re-download or re-save it."
        ) from exc


def _load(path: str, name: str, folder: str) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
        unet_keys = [k for k in keys if k.startswith(UNET_PREFIX)]
        if not unet_keys:
            raise UnsupportedFamily(
                f"'{name}' has no '{UNET_PREFIX}*' weights: expected a single-file SD1.x/SD2.x/SDXL checkpoint "
                f"(UNet + text encoder). For a UNet-only or diffusers-layout file, use --diffusers DIR."
            )
        shapes = {k[len(UNET_PREFIX) :]: tuple(handle.get_slice(k).get_shape()) for k in unet_keys}
        family = detect_family(shapes)
        weights = {k[len(UNET_PREFIX) :]: handle.get_tensor(k).float() for k in unet_keys if ATTN2_KV.search(k)}
        if family == Family.SD1 or (family == Family.UNET and any(k.startswith(SD1_CLIP) for k in keys)):
            state = _read(handle, keys, SD1_CLIP)
            if state and not next(iter(state)).startswith("text_model."):
                state = {"text_model." + k: v for k, v in state.items()}  # very old exports omit it
            specs = [("CLIP-L (cond_stage_model.transformer)", state, "quick_gelu", False, False, "last", None)]
        elif family == Family.SD2:
            state = openclip_to_hf(_read(handle, keys, SD2_OPENCLIP))
            # SD2 reads the penultimate layer *with* the final layer norm: drop the last block, keep the LN
            specs = [("OpenCLIP-H (cond_stage_model.model)", state, "gelu", False, True, "last", "!")]
        elif family == Family.SDXL:
            specs = [
                (
                    "CLIP-L (conditioner.embedders.0)",
                    _read(handle, keys, SDXL_CLIP_L),
                    "quick_gelu",
                    False,
                    False,
                    "penultimate",
                    None,
                ),
                (
                    "OpenCLIP-G (conditioner.embedders.1)",
                    openclip_to_hf(_read(handle, keys, SDXL_OPENCLIP_G)),
                    "gelu",
                    True,
                    False,
                    "penultimate",
                    "!",
                ),
            ]
        else:
            raise UnsupportedFamily(
                f"'{name}' is a {family.label} model; single files are read for SD1.x, "
                f"SD2.x and SDXL. Use --diffusers DIR for other models."
            )
    for where, state, *_ in specs:
        if not state:
            raise BadEraserFile(
                f"'{name}' is {family.label} but holds no {where} weights. Expected a full "
                f"checkpoint with its text encoder; for a UNet-only file use --diffusers DIR."
            )
    # NaN/Inf in the file would come out of the solve as NaN deltas blamed on λ: name the file and layer here
    check_weights_finite(weights, f"UNet in '{name}'")
    for where, state, *_ in specs:
        check_weights_finite(state, f"{where} in '{name}'")
    towers = []
    for n, (where, state, act, projection, drop_last, layer, pad) in enumerate(specs):
        tokenizer = clip_tokenizer(folder, pad_token=pad)
        model = build_clip(
            state,
            act,
            with_projection=projection,
            drop_last=drop_last,
            where=f"{where} in '{name}'",
            eos_token_id=tokenizer.eos_token_id,
        )
        towers.append(Tower(tokenizer, model, layer, pooled=projection))
    encoder = ClipTextEncoder(family.value, towers)
    log.info("Read %s (%s): %d text projections, %d text tower(s)", name, family.label, len(weights), len(towers))
    return Checkpoint(path, family, weights, shapes, encoder)
