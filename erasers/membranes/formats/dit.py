"""LoRAs for the newer DiTs (Chroma, Flux.2, Qwen-Image, Lumina 2 / Z-Image, Wan) in ComfyUI's own names.

ComfyUI reads a LoRA for these models by the module names of ``comfy.lora.model_lora_keys_unet`` for the
model's class; ``erasers.files.keys.comfy_lora_names`` re-derives that table from the model's keys, and
this converter reads exactly those names: ``lora_unet_<key_>`` and ``diffusion_model.<key>`` everywhere,
diffusers names (``transformer.…``, ``lycoris_…``, ``lora_transformer_…``, bare) where ComfyUI maps them,
Wan-Fun's ``lora_unet__…``. Factors (kohya / PEFT / LoRA-linear spellings, optional ``alpha``) and dense
``<name>.diff`` are read; anything else (LoHa, LoKr, DoRA scales, bias diffs) is not this format.

The same file names mean different layers on different families (``transformer_blocks.0.attn.to_k`` is a
Qwen-Image Linear but rows [H, 2H) of a fused Flux matrix), so this format is chosen by the *model*:
``convert_file`` asks ``applies`` first when the model is one of these families.
"""

from __future__ import annotations

from ...files.families import Family
from ...files.keys import DIT_LORA_FAMILIES, comfy_lora_names
from ._common import ConversionReport, check_fit, group_factors, lowrank_from_factors, model_family, model_shapes

NAME = "dit"
TITLE = "ComfyUI DiT LoRA names (Chroma, Flux.2, Qwen-Image, Lumina 2 / Z-Image, Wan)"

FAMILIES = tuple(Family(v) for v in DIT_LORA_FAMILIES)
DIFF_SUFFIX = ".diff"
#: spellings no other format of the pack reads, so a file in them is this format even without a model
OWN_PREFIXES = ("diffusion_model.", "lycoris_", "lora_transformer_")
#: Wan-Fun LoRAs write a double underscore after lora_unet (ComfyUI's lora_convert strips one)
WAN_FUN = "lora_unet__"


def split(tensors):
    """(factor groups, dense diffs, keys that are neither) of a file."""
    diffs = {k[: -len(DIFF_SUFFIX)]: v for k, v in tensors.items() if k.endswith(DIFF_SUFFIX)}
    groups, rest = group_factors({k: v for k, v in tensors.items() if not k.endswith(DIFF_SUFFIX)})
    return groups, diffs, rest


def _only_factors(tensors) -> bool:
    groups, diffs, rest = split(tensors)
    return bool(groups or diffs) and not rest and all({"up", "down"} <= set(p) for p in groups.values())


def recognise(tensors, metadata) -> bool:
    """Without a model: factors or diffs only, every name in a spelling only this format reads."""
    groups, diffs, _ = split(tensors)
    return _only_factors(tensors) and all(s.startswith(OWN_PREFIXES) for s in list(groups) + list(diffs))


def applies(tensors, metadata, shapes) -> bool:
    """With the model: the model is one of these families and the file holds only factors / diffs."""
    return model_family(shapes) in FAMILIES and _only_factors(tensors)


def convert(tensors, metadata, model_keys, source: str = "the LoRA", **_):
    shapes = model_shapes(model_keys)
    family = model_family(shapes)
    report = ConversionReport(NAME, metadata=dict(metadata or {}), file_family=None)
    if family not in FAMILIES:
        report.unmatched = sorted(tensors)
        raise_unmatched(report, family, source)
    if family is Family.WAN and any(k.startswith(WAN_FUN) for k in tensors):
        tensors = {("lora_unet_" + k[len(WAN_FUN) :] if k.startswith(WAN_FUN) else k): v for k, v in tensors.items()}
        report.notes.append("Wan-Fun names (lora_unet__…) read as lora_unet_…")
    table = comfy_lora_names(shapes, family)
    groups, diffs, _rest = split(tensors)
    deltas = {}
    for stem in sorted(diffs):
        target = table.get(stem)
        if target is None:
            report.unmatched.append(stem)
            continue
        deltas[target] = diffs[stem].float()
        report.matched.append(target)
    for stem in sorted(groups):
        target = table.get(stem)
        if target is None or target in deltas:  # one layer twice (two spellings): the first one read counts
            report.unmatched.append(stem)
            continue
        parts = groups[stem]
        deltas[target] = lowrank_from_factors(parts["up"], parts["down"], parts.get("alpha"))
        report.matched.append(target)
    if not deltas:
        raise_unmatched(report, family, source)
    check_fit(deltas, shapes, report, source)
    return deltas, report


def raise_unmatched(report: ConversionReport, family, source: str):
    from ...errors import UnknownKeys

    label = family.label if family is not None else "unknown family"
    more = " …" if len(report.unmatched) > 8 else ""
    raise UnknownKeys(
        f"{source} matches no layer of this {label} model: none of its names is one ComfyUI's LoRA loader "
        f"resolves for {label}. Unmatched keys: {report.unmatched[:8]}{more}. Expected names such as "
        "lora_unet_<layer with _>, diffusion_model.<layer> or the family's diffusers names (transformer.…); "
        "the file was made for another model."
    )
