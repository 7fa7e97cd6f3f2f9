"""EraseAnything Flux LoRAs (Gao et al., ICML 2025) and any diffusers/PEFT Flux transformer LoRA.

Keys: ``transformer.transformer_blocks.{i}.attn.add_k_proj.lora_A.weight`` … (diffusers names). The
canonical Flux layout fuses q/k/v, so ``add_k_proj`` lands on rows [H, 2H) of
``double_blocks.{i}.txt_attn.qkv.weight``: the delta is stored under the partial key
``(key, (0, H, H))``, the same form ComfyUI's ``add_patches`` takes.
"""

from __future__ import annotations

import re

from ...files.families import Family
from ...files.keys import flux_diffusers_to_canonical
from ._common import ConversionReport, check_fit, group_factors, lowrank_from_factors, model_shapes

NAME = "eraseanything"
TITLE = "EraseAnything / diffusers Flux LoRA (transformer.transformer_blocks.…)"
_FLUX_STEM = re.compile(r"^(transformer\.)?(single_)?transformer_blocks\.\d+\.")


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    return (
        bool(groups)
        and not rest
        and all(_FLUX_STEM.match(s) or s.startswith("transformer.") for s in groups)
        and any(_FLUX_STEM.match(s) for s in groups)
    )


def flux_hidden(shapes) -> int:
    qkv = shapes.get("double_blocks.0.img_attn.qkv.weight")
    return qkv[0] // 3 if qkv else 3072


def convert_flux_groups(groups, shapes, report) -> dict:
    hidden = flux_hidden(shapes)
    deltas = {}
    for stem in sorted(groups):
        parts = groups[stem]
        module = stem[len("transformer.") :] if stem.startswith("transformer.") else stem
        mapped = flux_diffusers_to_canonical(module, hidden)
        if mapped is None or mapped[0] not in shapes or not {"up", "down"} <= set(parts):
            report.unmatched.append(stem)
            continue
        key = mapped[0] if mapped[1] is None else mapped
        deltas[key] = lowrank_from_factors(parts["up"], parts["down"], parts.get("alpha"))
        report.matched.append(key)
    return deltas


def convert(tensors, metadata, model_keys, source: str = "the LoRA", **_):
    shapes = model_shapes(model_keys)
    groups, _rest = group_factors(tensors)
    report = ConversionReport(NAME, metadata=dict(metadata or {}), file_family=Family.FLUX)
    deltas = convert_flux_groups(groups, shapes, report)
    check_fit(deltas, shapes, report, source)
    return deltas, report
