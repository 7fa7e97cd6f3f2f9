"""kohya / LECO LoRA files: ``lora_unet_<module>`` and ``lora_te[12]_<module>`` with lora_up/lora_down/alpha.

UNet modules may be spelled with LDM names (kohya's SDXL trainer) or diffusers names (LECO, sliders,
SPM); both are resolved against the model's own keys, never by undoing the ``_`` join.
"""
from __future__ import annotations

from ._common import (ConversionReport, check_fit, file_family_from_context, group_factors, is_text_stem,
                      kohya_text_table, kohya_unet_table, lowrank_from_factors, model_shapes)

NAME = "kohya"
TITLE = "kohya/LECO LoRA (lora_unet_…, lora_te_…)"


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    if not groups or rest:
        return False
    return all(stem.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and {"up", "down"} <= set(p)
               for stem, p in groups.items())


def convert_groups(groups, shapes, report: ConversionReport) -> dict:
    """kohya-named factor groups → LayerDeltas; unmatched stems go to the report."""
    unet, text = kohya_unet_table(shapes), kohya_text_table(shapes)
    deltas = {}
    for stem in sorted(groups):
        parts = groups[stem]
        key = (text if is_text_stem(stem) else unet).get(stem)
        if key is None or "up" not in parts or "down" not in parts:
            report.unmatched.append(stem)
            continue
        deltas[key] = lowrank_from_factors(parts["up"], parts["down"], parts.get("alpha"))
        report.matched.append(key)
    if any(is_text_stem(s) for s in report.unmatched) and not kohya_text_table(shapes):
        report.notes.append("text-encoder keys were not applied (no text encoder given)")
    return deltas


def convert(tensors, metadata, model_keys, source: str = "the file", **_):
    shapes = model_shapes(model_keys)
    groups, _rest = group_factors(tensors)
    report = ConversionReport(NAME, metadata=dict(metadata or {}))
    report.file_family = file_family_from_context(groups)
    deltas = convert_groups(groups, shapes, report)
    check_fit(deltas, shapes, report, source)
    return deltas, report
