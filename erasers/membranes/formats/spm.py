"""Official SPM membranes (Lyu et al., CVPR 2024; ``Con6924/SPM`` ``save_weights``), spm.md §3.

Rank-1 kohya keys ``lora_unet_<diffusers path>`` on the 12 Linear/1×1-conv layers of every transformer
(``proj_in``, ``attn1/attn2 to_q/k/v/out_0``, ``ff_net_0_proj``, ``ff_net_2``, ``proj_out``), header
metadata ``prompts`` (comma-joined concepts), ``rank``, ``alpha``. The per-module ``alpha`` tensor is
used (identical to the metadata in every official file).
"""

from __future__ import annotations

import re

from ._common import ConversionReport, check_fit, file_family_from_context, group_factors, model_shapes
from .kohya import convert_groups

NAME = "spm"
TITLE = "SPM membrane (Con6924/SPM layout)"

#: the 12 target suffixes inside a transformer, spm.md §2.2 (selected by module path, never class name)
SPM_TARGET = re.compile(
    r"_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|"
    r"ff_net_2))$"
)
CONTAINER = re.compile(
    r"^lora_unet_((down|up)_blocks_\d+_attentions_\d+|mid_block_attentions_0|"
    r"(input|output)_blocks_\d+_1|middle_block_1)_"
)


def is_spm_stem(stem: str) -> bool:
    return bool(CONTAINER.match(stem) and SPM_TARGET.search(stem))


def concepts_from_metadata(metadata) -> list:
    """``prompts`` split on "," exactly as the reference does (spm.md §4.1 step 1), blanks dropped."""
    return [c.strip() for c in (metadata or {}).get("prompts", "").split(",") if c.strip()]


def recognise(tensors, metadata) -> bool:
    groups, rest = group_factors(tensors)
    if (
        not groups
        or rest
        or not all(stem.startswith("lora_unet_") and {"up", "down"} <= set(p) for stem, p in groups.items())
    ):
        return False
    if "prompts" in (metadata or {}):
        return True
    # no metadata: the layout alone (rank 1, transformer-internal layers only) identifies a membrane
    return all(is_spm_stem(s) and p["down"].shape[0] == 1 for s, p in groups.items())


def convert(tensors, metadata, model_keys, source: str = "the membrane", **_):
    shapes = model_shapes(model_keys)
    groups, _rest = group_factors(tensors)
    report = ConversionReport(NAME, metadata=dict(metadata or {}))
    report.file_family = file_family_from_context(groups)
    report.concepts = concepts_from_metadata(metadata)
    if not report.concepts:
        report.notes.append("no 'prompts' metadata: facilitated transport needs the concepts typed in")
    deltas = convert_groups(groups, shapes, report)
    odd = [s for s in groups if not is_spm_stem(s)]
    if odd:
        report.notes.append(f"{len(odd)} module(s) outside the official SPM targets, e.g. {odd[0]}")
    check_fit(deltas, shapes, report, source)
    return deltas, report


# (diffusers container, channels, blocks per transformer) per family — spm.md §3.2 / §3.3
_SD12_CONTAINERS = (
    [(f"down_blocks.{i}.attentions.{j}", c, 1) for i, c in ((0, 320), (1, 640), (2, 1280)) for j in (0, 1)]
    + [("mid_block.attentions.0", 1280, 1)]
    + [(f"up_blocks.{i}.attentions.{j}", c, 1) for i, c in ((1, 1280), (2, 640), (3, 320)) for j in (0, 1, 2)]
)
_SDXL_CONTAINERS = (
    [(f"down_blocks.1.attentions.{j}", 640, 2) for j in (0, 1)]
    + [(f"down_blocks.2.attentions.{j}", 1280, 10) for j in (0, 1)]
    + [("mid_block.attentions.0", 1280, 10)]
    + [(f"up_blocks.0.attentions.{j}", 1280, 10) for j in (0, 1, 2)]
    + [(f"up_blocks.1.attentions.{j}", 640, 2) for j in (0, 1, 2)]
)


def official_modules(family) -> dict:
    """diffusers module path → (in_features, out_features, is_1x1_conv) of every official SPM target."""
    from ...files.families import CONTEXT_DIM, Family

    containers = _SDXL_CONTAINERS if family == Family.SDXL else _SD12_CONTAINERS
    ctx = CONTEXT_DIM[family]
    conv = family == Family.SD1  # SD1 proj_in/out are 1×1 convs; SD2/SDXL use linear projections
    out = {}
    for container, c, depth in containers:
        out[f"{container}.proj_in"] = (c, c, conv)
        for k in range(depth):
            block = f"{container}.transformer_blocks.{k}"
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    reads_text = attn == "attn2" and proj in ("to_k", "to_v")
                    out[f"{block}.{attn}.{proj}"] = (ctx if reads_text else c, c, False)
            out[f"{block}.ff.net.0.proj"] = (c, 8 * c, False)
            out[f"{block}.ff.net.2"] = (4 * c, c, False)
        out[f"{container}.proj_out"] = (c, c, conv)
    return out
