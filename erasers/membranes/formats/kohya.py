"""kohya / LECO LoRA files: ``lora_unet_<module>`` and ``lora_te[12]_<module>`` with lora_up/lora_down/alpha.

UNet modules may be spelled with LDM names (kohya's SDXL trainer) or diffusers names (LECO, sliders,
SPM); both are resolved against the model's own keys, never by undoing the ``_`` join.
A layer may instead carry a dense ``<stem>.diff`` (the stock key ComfyUI's LoRA loader reads as a full
weight difference): this pack's own eraser files use it for full-rank closed-form edits saved exactly.
"""

from __future__ import annotations

from ._common import (
    ConversionReport,
    check_fit,
    file_family_from_context,
    group_factors,
    is_text_stem,
    kohya_text_table,
    kohya_unet_table,
    lowrank_from_factors,
    model_shapes,
)

NAME = "kohya"
TITLE = "kohya/LECO LoRA (lora_unet_…, lora_te_…)"


STEM_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFF_SUFFIX = ".diff"


def split_diffs(tensors):
    """Dense ``<stem>.diff`` entries (stem → tensor) and the remaining tensors."""
    diffs = {
        k[: -len(DIFF_SUFFIX)]: v
        for k, v in tensors.items()
        if k.endswith(DIFF_SUFFIX) and k.startswith(STEM_PREFIXES)
    }
    rest = {k: v for k, v in tensors.items() if not (k.endswith(DIFF_SUFFIX) and k[: -len(DIFF_SUFFIX)] in diffs)}
    return diffs, rest


def recognise(tensors, metadata) -> bool:
    diffs, factors = split_diffs(tensors)
    groups, rest = group_factors(factors)
    if not (groups or diffs) or rest:
        return False
    return all(stem.startswith(STEM_PREFIXES) and {"up", "down"} <= set(p) for stem, p in groups.items())


def convert_groups(groups, shapes, report: ConversionReport, diffs=None) -> dict:
    """kohya-named factor groups (and dense diffs) → LayerDeltas; unmatched stems go to the report."""
    unet, text = kohya_unet_table(shapes), kohya_text_table(shapes)
    deltas = {}
    for stem in sorted(diffs or {}):
        key = (text if is_text_stem(stem) else unet).get(stem)
        if key is None:
            report.unmatched.append(stem)
            continue
        deltas[key] = diffs[stem].float()
        report.matched.append(key)
    for stem in sorted(groups):
        parts = groups[stem]
        key = (text if is_text_stem(stem) else unet).get(stem)
        if key is None or "up" not in parts or "down" not in parts:
            report.unmatched.append(stem)
            continue
        deltas[key] = lowrank_from_factors(parts["up"], parts["down"], parts.get("alpha"))
        report.matched.append(key)
    if any(is_text_stem(s) for s in report.unmatched) and not text:
        report.notes.append("text-encoder keys were not applied (no text encoder given)")
    return deltas


def convert(tensors, metadata, model_keys, source: str = "the file", **_):
    shapes = model_shapes(model_keys)
    diffs, factors = split_diffs(tensors)
    groups, _rest = group_factors(factors)
    report = ConversionReport(NAME, metadata=dict(metadata or {}))
    # a dense diff's input width is the context width too, like a down factor's
    report.file_family = file_family_from_context({**{s: {"down": d} for s, d in diffs.items()}, **groups})
    deltas = convert_groups(groups, shapes, report, diffs)
    check_fit(deltas, shapes, report, source)
    return deltas, report
