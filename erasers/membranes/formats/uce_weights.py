"""UCE weight files: partial state dicts of *replacement* cross-attention K/V weights.

UCE's scripts save only the edited ``…attn2.to_k.weight`` / ``…attn2.to_v.weight`` under diffusers names
(sometimes with a ``unet.`` prefix). They are turned into deltas W_file − W_model against the loaded
model, so a strength slider scales them and they stack with other patches.
"""

from __future__ import annotations

import re

from ._common import (
    CONTEXT_FAMILIES,
    ConversionReport,
    check_fit,
    group_factors,
    model_shapes,
    shape2d,
    strip_weight_prefix,
)

NAME = "uce_weights"
TITLE = "UCE replacement weights (…attn2.to_k/to_v.weight)"
_KV = re.compile(r"attn2\.to_[kv]\.weight$")


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    return not groups and bool(rest) and all(_KV.search(strip_weight_prefix(k)) for k in rest)


def file_family(tensors):
    for name, value in tensors.items():
        if name.endswith("to_k.weight"):
            return CONTEXT_FAMILIES.get(shape2d(value.shape)[1])
    return None


def convert(tensors, metadata, model_keys, source: str = "the UCE file", **_):
    from ._common import replacement_deltas

    report = ConversionReport(NAME, metadata=dict(metadata or {}), file_family=file_family(tensors))
    deltas = replacement_deltas(tensors, model_keys, report, source)
    if deltas or not report.matched:  # a file identical to the model is reported, not refused
        check_fit(deltas, model_shapes(model_keys), report, source)
    return deltas, report
