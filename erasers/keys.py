"""Name tables: canonical (LDM) keys ↔ diffusers names ↔ kohya LoRA names.

diffusers' ``UNet2DConditionModel`` and the LDM UNet differ only in how attention containers are
numbered: ``down_blocks.i.attentions.j`` ↔ ``input_blocks.(1 + i·(R+1) + j).1``,
``mid_block.attentions.0`` ↔ ``middle_block.1``, ``up_blocks.i.attentions.j`` ↔
``output_blocks.(i·(R+1) + j).1`` where R is ``layers_per_block`` (2 for SD1/2/XL). The part inside
(``transformer_blocks.N.attn2.to_k``) is identical.
"""
from __future__ import annotations

import re
from typing import Optional

_DIFF_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")
_DIFF_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)$")
_DIFF_MID = re.compile(r"^mid_block\.attentions\.0\.(.*)$")
_LDM_IN = re.compile(r"^input_blocks\.(\d+)\.1\.(.*)$")
_LDM_OUT = re.compile(r"^output_blocks\.(\d+)\.1\.(.*)$")
_LDM_MID = re.compile(r"^middle_block\.1\.(.*)$")

#: DiT names: diffusers ↔ canonical (ComfyUI) for the layers the pack edits
DIT_DIFFUSERS_TO_CANONICAL = {
    "context_embedder.weight": "txt_in.weight",  # Flux (the SD3 transformer keeps the name, see below)
    "time_text_embed.text_embedder.linear_1.weight": "vector_in.in_layer.weight",
}
SD3_DIFFUSERS_TO_CANONICAL = {
    "context_embedder.weight": "context_embedder.weight",
    "time_text_embed.text_embedder.linear_1.weight": "y_embedder.mlp.0.weight",
}


def diffusers_to_canonical(name: str, layers_per_block: int = 2) -> Optional[str]:
    """A diffusers UNet parameter name → canonical LDM name (None for names outside attention blocks)."""
    step = layers_per_block + 1
    if m := _DIFF_DOWN.match(name):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"input_blocks.{1 + i * step + j}.1.{rest}"
    if m := _DIFF_UP.match(name):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"output_blocks.{i * step + j}.1.{rest}"
    if m := _DIFF_MID.match(name):
        return f"middle_block.1.{m.group(1)}"
    return None


def canonical_to_diffusers(name: str, layers_per_block: int = 2) -> Optional[str]:
    step = layers_per_block + 1
    if m := _LDM_IN.match(name):
        n, rest = int(m.group(1)), m.group(2)
        i, j = divmod(n - 1, step)
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    if m := _LDM_OUT.match(name):
        n, rest = int(m.group(1)), m.group(2)
        i, j = divmod(n, step)
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    if m := _LDM_MID.match(name):
        return f"mid_block.attentions.0.{m.group(1)}"
    return None


def kohya_name(canonical_key: str) -> str:
    """``input_blocks.1.1.….attn2.to_k.weight`` → ``lora_unet_input_blocks_1_1_…_attn2_to_k``.

    LDM-style kohya names are what kohya's SDXL/Flux/SD3 trainers write, and what ComfyUI (for every
    model) and A1111 (through its compvis mapping) resolve, so one spelling serves all hosts.
    """
    stem = canonical_key[: -len(".weight")] if canonical_key.endswith(".weight") else canonical_key
    return "lora_unet_" + stem.replace(".", "_")


def kohya_to_canonical(kohya: str, canonical_keys) -> Optional[str]:
    """Reverse of ``kohya_name`` against the model's own keys (underscores are ambiguous on their own)."""
    table = {kohya_name(k): k for k in canonical_keys}
    return table.get(kohya)
