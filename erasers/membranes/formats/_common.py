"""Shared pieces of the format converters: factor grouping, the result report, family checks.

A converter turns a file's tensors into ``LayerDeltas``: canonical key → delta, where the key is a
canonical weight name (``input_blocks.1.1.proj_in.weight``), a ``(name, (dim, start, length))`` pair for a
slice of a fused matrix (ComfyUI's partial-tensor patch key), or ``te.<encoder>.<HF path>.weight`` for a
text-encoder weight (encoder ``clip_l`` / ``clip_g`` / ``clip_h``). A delta is a ``LowRankDelta`` with
the α/r scale folded into ``up`` (2-D even for convolutions: reshape on apply), or a dense tensor.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ...errors import FamilyMismatch, UnknownKeys
from ...files.families import Family, detect_family
from ...lowrank import LowRankDelta

log = logging.getLogger(__name__)

LayerDeltas = dict

#: (suffix, role) of every low-rank factor spelling the converters read
FACTOR_SUFFIXES = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".alpha", "alpha"),
)
TEXT_PREFIX = "te."
CONTEXT_FAMILIES = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}


@dataclass
class ConversionReport:
    """What a converter did with a file: which format, what matched, what did not and why."""

    format: str
    matched: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    concepts: list = field(default_factory=list)
    file_family: Optional[Family] = None
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.format}: {len(self.matched)} layer(s) matched"
        if self.unmatched:
            more = " …" if len(self.unmatched) > 6 else ""
            text += f", {len(self.unmatched)} key(s) unmatched: {self.unmatched[:6]}{more}"
        return text + "".join(f"; {n}" for n in self.notes)


def group_factors(tensors: Mapping[str, torch.Tensor]):
    """stem → {"up", "down", "alpha"} plus the keys that are not low-rank factors."""
    groups, rest = {}, []
    for key, value in tensors.items():
        for suffix, role in FACTOR_SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            rest.append(key)
    return groups, rest


def lowrank_from_factors(up: torch.Tensor, down: torch.Tensor, alpha=None) -> LowRankDelta:
    """(α/r)·U·D as 2-D factors; conv factors are flattened (1×1 and k×k alike: reshape on apply)."""
    rank = down.shape[0]
    scale = float(alpha) / rank if alpha is not None else 1.0
    up2 = up.reshape(up.shape[0], -1).float()
    down2 = down.reshape(rank, -1).float()
    if up2.shape[1] != rank:
        raise UnknownKeys(f"lora_up has {up2.shape[1]} columns but lora_down has rank {rank}: the file is damaged.")
    return LowRankDelta(up2 * scale, down2)


def shape2d(shape) -> tuple:
    shape = tuple(shape)
    return (shape[0], int(math.prod(shape[1:])) if len(shape) > 1 else 1)


def delta_shape2d(delta) -> tuple:
    return delta.shape if isinstance(delta, LowRankDelta) else shape2d(delta.shape)


def target_shape(key, shapes: Mapping[str, tuple]) -> Optional[tuple]:
    """2-D shape a delta under ``key`` must have (a row slice for partial keys)."""
    name, offset = key if isinstance(key, tuple) else (key, None)
    if name not in shapes:
        return None
    out, inn = shape2d(shapes[name])
    if offset is not None:
        out = offset[2]
    return (out, inn)


def model_shapes(model_keys: Mapping) -> dict:
    """Accept shapes or tensors as the mapping's values."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in model_keys.items()}


def model_family(shapes: Mapping[str, tuple]) -> Optional[Family]:
    try:
        return detect_family({k: v for k, v in shapes.items() if not k.startswith(TEXT_PREFIX)})
    except ValueError:
        return None


def file_family_from_context(groups: Mapping[str, dict]) -> Optional[Family]:
    """The family a UNet LoRA was trained on, read off the width its attn2 to_k factors take in."""
    for stem, parts in groups.items():
        flat = stem.replace(".", "_")
        if re.search(r"attn2_to_k$", flat) and "down" in parts:
            return CONTEXT_FAMILIES.get(shape2d(parts["down"].shape)[1], Family.UNET)
    return None


def check_fit(deltas: Mapping, shapes: Mapping[str, tuple], report: ConversionReport, source: str) -> None:
    """Refuse a file that belongs to another family, naming both; refuse a file that matched nothing."""
    fam_model = model_family(shapes)
    fam_file = report.file_family
    if fam_model is not None and fam_file is not None and fam_file != fam_model:
        raise FamilyMismatch(
            f"{source} is a {fam_file.label} {report.format} file but the model is {fam_model.label}: its layers "
            f"do not fit. Use a {fam_model.label} version of it (SD1.x, SD2.x and SDXL files are not "
            f"interchangeable)."
        )
    bad = [
        (k, delta_shape2d(d), target_shape(k, shapes))
        for k, d in deltas.items()
        if target_shape(k, shapes) is not None and delta_shape2d(d) != target_shape(k, shapes)
    ]
    if bad:
        fams = f" (file: {fam_file.label}, model: {fam_model.label if fam_model else 'unknown'})" if fam_file else ""
        raise FamilyMismatch(
            f"{source} does not fit this model{fams}: {len(bad)} layer(s) have other shapes, e.g. "
            f"{bad[0][0]} expects {bad[0][2]} but the file has {bad[0][1]}. The file was made for another "
            f"model family or architecture variant."
        )
    if not deltas:
        raise UnknownKeys(
            f"{source} ({report.format}) matches no layer of this model "
            f"({fam_model.label if fam_model else 'unknown family'}). Unmatched keys: "
            f"{report.unmatched[:8]}{' …' if len(report.unmatched) > 8 else ''}."
        )
    if report.unmatched:
        log.warning(
            "%s: %d key(s) match no layer of the model and are ignored: %s",
            source,
            len(report.unmatched),
            report.unmatched[:10],
        )


def kohya_unet_table(shapes: Mapping[str, tuple]) -> dict:
    """``lora_unet_<name>`` (LDM and diffusers spellings) → canonical weight key, for the model's own keys."""
    from ...files.keys import kohya_names_for

    table = {}
    for key in shapes:
        if key.endswith(".weight") and not key.startswith(TEXT_PREFIX):
            for name in kohya_names_for(key):
                table.setdefault(name, key)
    return table


def text_encoders(shapes: Mapping[str, tuple]) -> list:
    return sorted({k.split(".")[1] for k in shapes if k.startswith(TEXT_PREFIX)})


def kohya_text_table(shapes: Mapping[str, tuple]) -> dict:
    """``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` → canonical text key (``te.<enc>.<HF path>``)."""
    encs = text_encoders(shapes)
    prefixes = (
        {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}
        if {"clip_l", "clip_g"} <= set(encs)
        else {enc: "lora_te_" for enc in encs}
    )
    table = {}
    for key in shapes:
        if key.startswith(TEXT_PREFIX) and key.endswith(".weight"):
            enc, path = key[len(TEXT_PREFIX) :].split(".", 1)
            if enc in prefixes:
                flat = path[: -len(".weight")].replace(".", "_")
                table[prefixes[enc] + flat] = key
                if prefixes[enc] == "lora_te_":  # some trainers write lora_te1_ for a lone encoder too
                    table.setdefault("lora_te1_" + flat, key)
    return table


def is_text_stem(stem: str) -> bool:
    return stem.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2."))


WEIGHT_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")
UNET_NAME = re.compile(
    r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|conv_norm_out|time_embedding|"
    r"add_embedding|input_blocks|middle_block|output_blocks|time_embed|out|label_emb)\."
)


def strip_weight_prefix(name: str) -> str:
    for prefix in WEIGHT_FILE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def resolve_weight_name(name: str, shapes: Mapping[str, tuple]) -> Optional[str]:
    """A full-weight file's key (LDM or diffusers spelling, any common prefix) → canonical key or None."""
    from ...files.keys import diffusers_unet_candidates

    bare = strip_weight_prefix(name)
    if bare in shapes:
        return bare
    return next((c for c in diffusers_unet_candidates(bare) if c in shapes), None)


def replacement_deltas(tensors, model_keys, report: ConversionReport, source: str) -> dict:
    """Replacement weights → W_file − W_model (float32, CPU), for files that store edited weights."""
    if not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in model_keys.values()):
        raise UnknownKeys(
            f"{source} holds replacement weights ({report.format}); converting it needs the model's "
            f"weights, not only its key names."
        )
    shapes = model_shapes(model_keys)
    deltas = {}
    for name in sorted(tensors):
        key = resolve_weight_name(name, shapes)
        if key is None:
            report.unmatched.append(name)
            continue
        new = tensors[name]
        if shape2d(new.shape) != shape2d(shapes[key]):
            deltas[key] = new.float()  # shape mismatch: check_fit reports it with both families
            continue
        delta = new.detach().to("cpu", torch.float32) - model_keys[key].detach().to("cpu", torch.float32)
        report.matched.append(key)
        if torch.count_nonzero(delta):
            deltas[key] = delta.reshape(shapes[key])
    if report.matched and not deltas:
        report.notes.append("every weight equals the model's: the file changes nothing")
    return deltas
