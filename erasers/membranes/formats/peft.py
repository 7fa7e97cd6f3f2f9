"""diffusers/PEFT LoRAs: ``unet.<diffusers path>.lora_A.weight`` / ``lora_B.weight`` (also the older
``…attn2.processor.to_k_lora.down.weight``), ``text_encoder[_2].…`` and ``transformer.…`` (Flux).

ComfyUI's own loader silently skips the modern ``unet.…lora_A`` spelling (comfyui_host.md §5.3); here
every name is mapped to the canonical key through the diffusers ↔ LDM tables.
"""

from __future__ import annotations

import json
import re

from ...files.keys import diffusers_unet_candidates
from ._common import (
    TEXT_PREFIX,
    ConversionReport,
    check_fit,
    file_family_from_context,
    group_factors,
    lowrank_from_factors,
    model_shapes,
    text_encoders,
)
from .eraseanything import convert_flux_groups

NAME = "peft"
TITLE = "diffusers/PEFT LoRA (unet.…lora_A/lora_B, text_encoder.…, transformer.…)"
PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_OLD_PROC = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)(_lora)?(\.0)?$")


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    return bool(groups) and not rest and all(s.startswith(PREFIXES) for s in groups)


def unet_module(stem: str) -> str:
    """Strip the ``unet.`` prefix and old attention-processor spellings down to the module path."""
    path = stem[len("unet.") :]
    match = _OLD_PROC.search(path)
    if match:
        out = ".0" if match.group(1) == "to_out" else ""
        path = path[: match.start()] + f".{match.group(1)}{out}"
    return path


def peft_scale(metadata) -> tuple:
    """lora_alpha / r from diffusers' adapter metadata when present (PEFT keeps α out of the tensors)."""
    for key, value in (metadata or {}).items():
        if "lora_adapter_metadata" not in key:
            continue
        try:
            data = json.loads(value)
        except (TypeError, ValueError):
            continue
        flat = {}
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for k, v in item.items():
                    (stack.append(v) if isinstance(v, dict) else flat.setdefault(k.rsplit(".", 1)[-1], v))
        if flat.get("r") and flat.get("lora_alpha"):
            return float(flat["lora_alpha"]), int(flat["r"])
    return None, None


def convert(tensors, metadata, model_keys, source: str = "the LoRA", **_):
    shapes = model_shapes(model_keys)
    groups, _rest = group_factors(tensors)
    report = ConversionReport(NAME, metadata=dict(metadata or {}))
    report.file_family = file_family_from_context(groups)
    alpha, rank = peft_scale(metadata)
    if alpha is not None:
        report.notes.append(f"scale lora_alpha/r = {alpha}/{rank} from the adapter metadata")
    encs = text_encoders(shapes)
    deltas = {}
    flux = {s: p for s, p in groups.items() if s.startswith("transformer.")}
    if flux:
        deltas.update(convert_flux_groups(flux, shapes, report))
    for stem in sorted(set(groups) - set(flux)):
        parts = groups[stem]
        if stem.startswith("unet."):
            candidates = diffusers_unet_candidates(unet_module(stem) + ".weight")
        else:
            enc = (
                "clip_g"
                if stem.startswith("text_encoder_2.")
                else ("clip_l" if "clip_l" in encs else (encs[0] if encs else "clip_l"))
            )
            candidates = [f"{TEXT_PREFIX}{enc}.{stem.split('.', 1)[1]}.weight"]
        key = next((c for c in candidates if c in shapes), None)
        if key is None or not {"up", "down"} <= set(parts):
            report.unmatched.append(stem)
            continue
        part_alpha = parts.get("alpha")
        if part_alpha is None and alpha is not None:
            part_alpha = alpha * parts["down"].shape[0] / rank
        deltas[key] = lowrank_from_factors(parts["up"], parts["down"], part_alpha)
        report.matched.append(key)
    check_fit(deltas, shapes, report, source)
    return deltas, report
