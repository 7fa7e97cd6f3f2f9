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


# --- whole-UNet names (resnets, samplers, embeddings) -------------------------------------------------
# diffusers ResnetBlock2D ↔ LDM ResBlock inner names (the two codebases name the same layers differently)
_RESNET_DIFF_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_LDM_TO_DIFF = {v: k for k, v in _RESNET_DIFF_TO_LDM.items()}
_UNET_TOP_DIFF_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_TOP_LDM_TO_DIFF = {v: k for k, v in _UNET_TOP_DIFF_TO_LDM.items()}
_RES_DOWN = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)$")
_RES_UP = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)$")
_RES_MID = re.compile(r"^mid_block\.resnets\.(\d+)\.(\w+)\.(.*)$")
_DOWNSAMPLER = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$")
_UPSAMPLER = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$")
_LDM_RES = re.compile(
    r"^(input_blocks|output_blocks)\.(\d+)\.0\.(in_layers\.0|in_layers\.2|emb_layers\.1|"
    r"out_layers\.0|out_layers\.3|skip_connection)\.(.*)$"
)
_LDM_MID_RES = re.compile(
    r"^middle_block\.([02])\.(in_layers\.0|in_layers\.2|emb_layers\.1|out_layers\.0|"
    r"out_layers\.3|skip_connection)\.(.*)$"
)
_LDM_DOWNSAMPLE = re.compile(r"^input_blocks\.(\d+)\.0\.op\.(.*)$")
_LDM_UPSAMPLE = re.compile(r"^output_blocks\.(\d+)\.([12])\.conv\.(.*)$")


def diffusers_unet_candidates(name: str, layers_per_block: int = 2) -> list:
    """Every canonical name a diffusers UNet parameter may have; the model's own keys pick the real one.

    Two candidates arise only for up-samplers (``output_blocks.N.1.conv`` when the block has no attention,
    ``.2.conv`` when it has), which the name alone cannot tell.
    """
    step = layers_per_block + 1
    if (mapped := diffusers_to_canonical(name, layers_per_block)) is not None:
        return [mapped]
    for diff, ldm in _UNET_TOP_DIFF_TO_LDM.items():
        if name.startswith(diff + "."):
            return [ldm + name[len(diff) :]]
    if m := _RES_DOWN.match(name):
        i, j, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        return (
            [f"input_blocks.{1 + i * step + j}.0.{_RESNET_DIFF_TO_LDM[inner]}.{rest}"]
            if inner in _RESNET_DIFF_TO_LDM
            else []
        )
    if m := _RES_UP.match(name):
        i, j, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        return (
            [f"output_blocks.{i * step + j}.0.{_RESNET_DIFF_TO_LDM[inner]}.{rest}"]
            if inner in _RESNET_DIFF_TO_LDM
            else []
        )
    if m := _RES_MID.match(name):
        k, inner, rest = int(m.group(1)), m.group(2), m.group(3)
        return [f"middle_block.{2 * k}.{_RESNET_DIFF_TO_LDM[inner]}.{rest}"] if inner in _RESNET_DIFF_TO_LDM else []
    if m := _DOWNSAMPLER.match(name):
        return [f"input_blocks.{(int(m.group(1)) + 1) * step}.0.op.{m.group(2)}"]
    if m := _UPSAMPLER.match(name):
        n = int(m.group(1)) * step + step - 1
        return [f"output_blocks.{n}.{sub}.conv.{m.group(2)}" for sub in (2, 1)]
    return []


def canonical_to_diffusers_unet(name: str, layers_per_block: int = 2) -> Optional[str]:
    """Canonical (LDM) UNet name → diffusers name, for every parameter (not only attention blocks)."""
    step = layers_per_block + 1
    for ldm, diff in _UNET_TOP_LDM_TO_DIFF.items():
        if name.startswith(ldm + "."):
            return diff + name[len(ldm) :]
    if m := _LDM_UPSAMPLE.match(name):
        return f"up_blocks.{int(m.group(1)) // step}.upsamplers.0.conv.{m.group(3)}"
    if (mapped := canonical_to_diffusers(name, layers_per_block)) is not None:
        return mapped
    if m := _LDM_RES.match(name):
        which, n, inner, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if which == "input_blocks":
            i, j = divmod(n - 1, step)
            return f"down_blocks.{i}.resnets.{j}.{_RESNET_LDM_TO_DIFF[inner]}.{rest}"
        i, j = divmod(n, step)
        return f"up_blocks.{i}.resnets.{j}.{_RESNET_LDM_TO_DIFF[inner]}.{rest}"
    if m := _LDM_MID_RES.match(name):
        return f"mid_block.resnets.{int(m.group(1)) // 2}.{_RESNET_LDM_TO_DIFF[m.group(2)]}.{m.group(3)}"
    if m := _LDM_DOWNSAMPLE.match(name):
        return f"down_blocks.{int(m.group(1)) // step - 1}.downsamplers.0.conv.{m.group(2)}"
    return None


def kohya_names_for(canonical_key: str, layers_per_block: int = 2) -> list:
    """Both kohya spellings of one model weight: LDM-style and diffusers-style (what SPM files use)."""
    names = [kohya_name(canonical_key)]
    diff = canonical_to_diffusers_unet(canonical_key, layers_per_block)
    if diff is not None:
        names.append(kohya_name(diff))
    return names


# --- Flux: diffusers module names → canonical key, with the fused-row offset ---------------------------
# offsets are (dim, start, length) in units of the hidden size H, like ComfyUI's partial-tensor patch keys
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 1),
    "attn.to_k": ("img_attn.qkv", 1, 1),
    "attn.to_v": ("img_attn.qkv", 2, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 1),
    "attn.to_out.0": ("img_attn.proj", None, None),
    "attn.to_add_out": ("txt_attn.proj", None, None),
    "ff.net.0.proj": ("img_mlp.0", None, None),
    "ff.net.2": ("img_mlp.2", None, None),
    "ff_context.net.0.proj": ("txt_mlp.0", None, None),
    "ff_context.net.2": ("txt_mlp.2", None, None),
    "norm1.linear": ("img_mod.lin", None, None),
    "norm1_context.linear": ("txt_mod.lin", None, None),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 1),
    "attn.to_k": ("linear1", 1, 1),
    "attn.to_v": ("linear1", 2, 1),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", None, None),
    "norm.linear": ("modulation.lin", None, None),
}
_FLUX_TOP = {
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.*)$")


def flux_diffusers_to_canonical(module: str, hidden: int = 3072):
    """``transformer_blocks.3.attn.add_k_proj`` → (``double_blocks.3.txt_attn.qkv.weight``, (0, H, H)).

    Returns (canonical weight key, offset or None), or None for names outside the table. Fused q/k/v
    (and the single blocks' q/k/v/mlp) share one matrix in the canonical layout, so a diffusers LoRA on
    ``to_k`` touches only rows [H, 2H) of it.
    """
    if m := _FLUX_BLOCK.match(module):
        table = _FLUX_DOUBLE if m.group(1) == "transformer_blocks" else _FLUX_SINGLE
        prefix = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
        entry = table.get(m.group(3))
        if entry is None:
            return None
        target, start, length = entry
        key = f"{prefix}.{m.group(2)}.{target}.weight"
        return key, (None if start is None else (0, start * hidden, length * hidden))
    if module in _FLUX_TOP:
        return f"{_FLUX_TOP[module]}.weight", None
    return None
