"""HiDream-I1 (ComfyUI's ``HiDream`` / comfy/ldm/hidream): one caption projection per block, each fed by
its own text stream.

``HiDreamImageTransformer2DModel._forward``: the host CLIP returns the T5-XXL rows as the context, every
Llama-3.1-8B layer's hidden states as ``conditioning_llama3`` (B, 32, T, 4096; the start token's row
dropped) and CLIP-L ⊕ CLIP-G pooled (2048). Projection i (``caption_projection.i.linear``, no bias) reads
Llama layer ``llama_layers[i]`` for the 16 double + 32 single blocks, the last one reads T5; the pooled
vector enters through ``p_embedder.pooled_embedder.linear_1`` (the time embedding's adaLN input).

A closed form solves W′k = v per Linear with k the Linear's own input, so HiDream's edit is one solve per
*stream*: the projections that read the same encoder output share their keys (``caption_streams``). UCE,
SPEED and MACE-CFR solve each Linear on its own anyway, so per-stream is their exact port; RECE's
adversarial embedding c′ is derived per stream (one shared c′ cannot exist when the layers read different
embeddings) — the pack's port, stated in the README.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

from ..errors import FamilyMismatch
from ..files.families import Family
from .record import FamilyRecord

#: ComfyUI's model_detection default for HiDream-I1 (full, dev, fast): Llama layers 0…31, then 31 for the rest
LLAMA_LAYERS = tuple(range(32)) + (31,) * 16
T5_STREAM, POOLED_KEY = "t5", "p_embedder.pooled_embedder.linear_1.weight"
PROJECTION = re.compile(r"^caption_projection\.(\d+)\.linear\.weight$")

RECORDS = (
    FamilyRecord(
        "HiDream",
        "HiDream-I1",
        Family.HIDREAM,
        config_classes=("HiDream",),
        context_key="caption_projection.0.linear.weight",
        context_widths=(4096,),
        text_encoder="CLIP-L ⊕ CLIP-G (pooled 2048), T5-XXL (128 positions) as the context, Llama-3.1-8B every "
        "layer (conditioning_llama3, 128 positions, start token's row dropped); no template",
        text_tokens="per block: [image ‖ T5 ‖ Llama initial ‖ Llama layer i]; image first",
        # SLD: its extra pass is the host's own conditioning of the safety concept (T5 context, conditioning_llama3,
        # pooled) through the model, so no token layout is involved. Token suppression: the concept's T5 rows and
        # Llama rows, biased for the image queries in every block's joint attention (a model-wide override).
        # Concept guidance: the concept's T5 and per-layer Llama rows ride after the prompt's in the model's own
        # text streams (every per-token part of the forward carries them); the same override keeps them apart
        # SAFREE (the pack's port): one projection per text stream, T5 as on Flux.1 and each Llama layer in the
        # decoder-LLM layout, each with its own concept subspace and self-validation window
        guards=("sld", "token_suppression", "concept_guidance", "safree"),
        guard_layout="joint_image_first",
    ),
)


def llama_stream(layer: int) -> str:
    return f"llama.{int(layer)}"


def caption_streams(keys: Sequence[str], llama_layers: Optional[Sequence[int]] = None) -> dict:
    """canonical key → the text stream it reads: ``llama.<layer>`` for projection i < len(llama_layers),
    ``t5`` for the last projection and for the pooled embedder (``POOLED_KEY``, which reads CLIP's pooled
    vector: the T5 stream's encoder carries it, as Flux's txt_in and vector_in share one run)."""
    layers = tuple(LLAMA_LAYERS if llama_layers is None else llama_layers)
    indices = sorted(int(m.group(1)) for m in map(PROJECTION.match, keys) if m)
    if indices != list(range(len(layers) + 1)):
        raise FamilyMismatch(
            f"HiDream-I1 has one caption projection per block plus one for T5: expected caption_projection.0 … "
            f".{len(layers)} for {len(layers)} Llama-fed blocks, found {len(indices)} "
            f"({indices[:3]}…{indices[-3:]}). This is another HiDream variant; it is refused before anything is "
            "solved."
        )
    streams = {f"caption_projection.{i}.linear.weight": llama_stream(layer) for i, layer in enumerate(layers)}
    streams[f"caption_projection.{len(layers)}.linear.weight"] = T5_STREAM
    if POOLED_KEY in keys:
        streams[POOLED_KEY] = T5_STREAM
    return streams


def group_by_stream(streams: Mapping[str, str]) -> dict:
    """stream → its keys, in stream order (T5 first, then the Llama layers in ascending order)."""
    out: dict = {}
    for key, stream in sorted(streams.items(), key=lambda kv: (kv[1] != T5_STREAM, _layer(kv[1]), kv[0])):
        out.setdefault(stream, []).append(key)
    return out


def _layer(stream: str) -> int:
    return int(stream.split(".")[1]) if stream.startswith("llama.") else -1
