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


# --- the LoRA module names ComfyUI resolves for the newer DiT families ----------------------------------
# ComfyUI's LoRA loader (comfy/lora.py model_lora_keys_unet) builds, per model class, a table from every
# module name a LoRA file may use to the weight it patches; a name outside that table is skipped with a
# "lora key not loaded" warning. The pack must read the same names and write names from it, so the table is
# re-derived here from the model's canonical keys alone (host-free). Targets are canonical weight keys, or
# (key, (dim, start, length)) where a diffusers name addresses rows of a fused matrix. Only ".weight"
# targets are listed: erasure LoRAs patch weight matrices.

#: extra diffusers ↔ canonical names of Flux-style blocks that ComfyUI's Flux table reads besides the
#: EraseAnything ones above (LyCORIS LoKr spellings, q/k norms, Flux.2's fused single-block projections)
_FLUX_DOUBLE_EXTRA = {
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_SINGLE_EXTRA = {
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "attn.to_qkv_mlp_proj": "linear1",  # Flux.2
    "attn.to_out": "linear2",  # Flux.2
}
#: Flux top-level layers beyond ``_FLUX_TOP`` (ControlNet's input embedder)
_FLUX_TOP_EXTRA = {"controlnet_x_embedder": "pos_embed_input"}

# Lumina 2 / Z-Image: diffusers (ZImageTransformer2DModel) ↔ canonical (comfy/ldm/lumina) inside one block
_ZIMAGE_BLOCK = {
    "attention.norm_q": "attention.q_norm",
    "attention.norm_k": "attention.k_norm",
    "attention.to_out.0": "attention.out",
    "attention_norm1": "attention_norm1",
    "attention_norm2": "attention_norm2",
    "feed_forward.w1": "feed_forward.w1",
    "feed_forward.w2": "feed_forward.w2",
    "feed_forward.w3": "feed_forward.w3",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
_ZIMAGE_TOP = {
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "all_x_embedder.2-1": "x_embedder",
    "cap_embedder.0": "cap_embedder.0",
    "cap_embedder.1": "cap_embedder.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
}

# --- AuraFlow: diffusers' AuraFlowTransformer2DModel names → ComfyUI's MMDiT names --------------------------
# the image stream is "X" / w2*, the text stream "C" / w1* in ComfyUI's double layers; single layers keep w1*
_AURA_DOUBLE = {
    "attn.to_q": "attn.w2q",
    "attn.to_k": "attn.w2k",
    "attn.to_v": "attn.w2v",
    "attn.to_out.0": "attn.w2o",
    "attn.add_q_proj": "attn.w1q",
    "attn.add_k_proj": "attn.w1k",
    "attn.add_v_proj": "attn.w1v",
    "attn.to_add_out": "attn.w1o",
    "ff.linear_1": "mlpX.c_fc1",
    "ff.linear_2": "mlpX.c_fc2",
    "ff.out_projection": "mlpX.c_proj",
    "ff_context.linear_1": "mlpC.c_fc1",
    "ff_context.linear_2": "mlpC.c_fc2",
    "ff_context.out_projection": "mlpC.c_proj",
    "norm1.linear": "modX.1",
    "norm1_context.linear": "modC.1",
}
_AURA_SINGLE = {
    "attn.to_q": "attn.w1q",
    "attn.to_k": "attn.w1k",
    "attn.to_v": "attn.w1v",
    "attn.to_out.0": "attn.w1o",
    "norm1.linear": "modCX.1",
    "ff.linear_1": "mlp.c_fc1",
    "ff.linear_2": "mlp.c_fc2",
    "ff.out_projection": "mlp.c_proj",
}
_AURA_BASIC = {
    "context_embedder": "cond_seq_linear",
    "pos_embed.proj": "init_x_linear",
    "time_step_proj.linear_1": "t_embedder.mlp.0",
    "time_step_proj.linear_2": "t_embedder.mlp.2",
    "proj_out": "final_linear",
}


def aura_diffusers_names(shapes) -> dict:
    """Every diffusers module name ComfyUI's AuraFlow table maps → canonical weight key, for this model
    (diffusers numbers the single blocks from 0 after the joint ones). The final ``norm_out.linear`` is left
    out, as on Flux: ComfyUI swaps its shift/scale rows with a function the pack's patches cannot carry."""
    names = {}
    for i in range(_count(shapes, "double_layers")):
        for d, c in _AURA_DOUBLE.items():
            names[f"joint_transformer_blocks.{i}.{d}"] = f"double_layers.{i}.{c}.weight"
    for i in range(_count(shapes, "single_layers")):
        for d, c in _AURA_SINGLE.items():
            names[f"single_transformer_blocks.{i}.{d}"] = f"single_layers.{i}.{c}.weight"
    names.update({d: f"{c}.weight" for d, c in _AURA_BASIC.items()})
    return names


#: families whose LoRA names come from ``comfy_lora_names`` (by their ``Family`` value)
DIT_LORA_FAMILIES = ("chroma", "flux2", "qwen_image", "lumina2", "zimage", "wan", "hidream", "auraflow")


def _stem(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _count(shapes, prefix: str) -> int:
    """Number of numbered blocks ``prefix.<i>.`` among the keys (0 without any)."""
    found = [int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in shapes if k.startswith(prefix + ".")]
    return max(found) + 1 if found else 0


def flux_diffusers_names(shapes) -> dict:
    """Every diffusers module name ComfyUI's Flux table maps (Flux, Chroma, Flux.2) → target, for this model.

    H is the model's hidden size (``img_in`` output width): ComfyUI slices fused q/k/v (and the single
    blocks' q/k/v/MLP input) at multiples of it; the MLP input takes the rows after 3H that linear1 has.
    The final ``norm_out.linear`` is left out: ComfyUI reorders its rows (shift/scale) with a function the
    pack's patches cannot carry, so a LoRA on it is reported unmatched instead of being applied wrongly.
    """
    img_in = shapes.get("img_in.weight")
    hidden = int(img_in[0]) if img_in else 0
    names = {}
    for i in range(_count(shapes, "double_blocks")):
        for module in list(_FLUX_DOUBLE) + list(_FLUX_DOUBLE_EXTRA):
            if module in _FLUX_DOUBLE:
                target, start, length = _FLUX_DOUBLE[module]
            else:
                target, start, length = _FLUX_DOUBLE_EXTRA[module], None, None
            key = f"double_blocks.{i}.{target}.weight"
            names[f"transformer_blocks.{i}.{module}"] = (
                key if start is None else (key, (0, start * hidden, length * hidden))
            )
    for i in range(_count(shapes, "single_blocks")):
        for module in list(_FLUX_SINGLE) + list(_FLUX_SINGLE_EXTRA):
            if module in _FLUX_SINGLE:
                target, start, length = _FLUX_SINGLE[module]
            else:
                target, start, length = _FLUX_SINGLE_EXTRA[module], None, None
            key = f"single_blocks.{i}.{target}.weight"
            if start is not None:
                start, length = start * hidden, length * hidden
                if module == "proj_mlp" and key in shapes:
                    # the MLP input is every row after q/k/v: 4H only at mlp_ratio 4 (Flux.1, Chroma).
                    # ComfyUI slices 4H always, which overruns linear1 at other ratios; the pack uses the rows
                    # the model has (deliberately different from the host there, see the ComfyUI test)
                    length = int(shapes[key][0]) - start
            names[f"single_transformer_blocks.{i}.{module}"] = key if start is None else (key, (0, start, length))
    for module, target in {**_FLUX_TOP, **_FLUX_TOP_EXTRA}.items():
        names[module] = f"{target}.weight"
    return names


def zimage_diffusers_names(shapes) -> dict:
    """Every diffusers module name ComfyUI's Lumina 2 / Z-Image table maps → target, for this model.

    q/k/v address rows [0, H), [H, 2H), [2H, 3H) of the fused ``attention.qkv`` with H the model width
    (the host slices them so, also for grouped K/V heads).
    """
    qkv = next((v for k, v in shapes.items() if k.endswith("attention.qkv.weight")), None)
    hidden = int(qkv[1]) if qkv else 0
    names = {}
    for group in ("layers", "context_refiner", "noise_refiner"):
        for i in range(_count(shapes, group)):
            block = f"{group}.{i}"
            for j, proj in enumerate(("to_q", "to_k", "to_v")):
                names[f"{block}.attention.{proj}"] = (f"{block}.attention.qkv.weight", (0, j * hidden, hidden))
            for diff, canon in _ZIMAGE_BLOCK.items():
                names[f"{block}.{diff}"] = f"{block}.{canon}.weight"
    for diff, canon in _ZIMAGE_TOP.items():
        names[diff] = f"{canon}.weight"
    return names


def comfy_lora_names(shapes, family: str) -> dict:
    """LoRA module name → target (canonical weight key, or (key, offset)) as ComfyUI resolves it.

    ``family`` is a ``Family`` value in ``DIT_LORA_FAMILIES``. Every model gets ComfyUI's two generic
    spellings of its own keys (``lora_unet_<key with _>``, ``diffusion_model.<key>``); then per family:
    Flux-style (Chroma, Flux.2): diffusers names as ``transformer.<d>``, ``lycoris_<d_>``,
    ``lora_transformer_<d_>`` and bare ``<d>`` (DiffSynth), plus ``diffusion_model.single_blocks.<i>.linear1_qkv``
    (rows [0, 3H) of linear1); Qwen-Image: its own (diffusers-like) keys bare, as ``transformer.<k>`` and
    ``lycoris_<k_>``; HiDream: its own keys as ``transformer.<k>`` and ``lycoris_<k_>`` (SimpleTuner); AuraFlow:
    diffusers names as ``transformer.<d>``; Lumina 2 /
    Z-Image: diffusers names as ``diffusion_model.<d>``, ``transformer.<d>``,
    ``lycoris_<d_>`` and bare; Wan: the generic spellings only. Targets the model lacks are dropped.
    """
    family = getattr(family, "value", family)
    if family not in DIT_LORA_FAMILIES:
        raise ValueError(f"comfy_lora_names covers {', '.join(DIT_LORA_FAMILIES)}; found family '{family}'.")
    weights = sorted(k for k in shapes if k.endswith(".weight"))
    names = {}
    for key in weights:
        names[kohya_name(key)] = key
        names[f"diffusion_model.{_stem(key)}"] = key
    if family in ("chroma", "flux2"):
        for d, target in flux_diffusers_names(shapes).items():
            flat = d.replace(".", "_")
            for name in (f"transformer.{d}", f"lycoris_{flat}", f"lora_transformer_{flat}", d):
                names[name] = target
        hidden = int(shapes["img_in.weight"][0]) if "img_in.weight" in shapes else 0
        for key in weights:
            if ".linear1." in key:
                names["diffusion_model." + key.replace(".linear1.weight", ".linear1_qkv")] = (key, (0, 0, 3 * hidden))
    elif family == "qwen_image":
        for key in weights:
            stem = _stem(key)
            names[stem] = key
            names[f"transformer.{stem}"] = key
            names[f"lycoris_{stem.replace('.', '_')}"] = key
    elif family == "hidream":  # SimpleTuner's spellings of the model's own keys (comfy/lora.py, HiDream)
        for key in weights:
            stem = _stem(key)
            names[f"transformer.{stem}"] = key
            names[f"lycoris_{stem.replace('.', '_')}"] = key
    elif family == "auraflow":  # diffusers names as transformer.<d> (comfy/lora.py, AuraFlow)
        for d, target in aura_diffusers_names(shapes).items():
            names[f"transformer.{d}"] = target
    elif family in ("lumina2", "zimage"):
        for d, target in zimage_diffusers_names(shapes).items():
            for name in (f"diffusion_model.{d}", f"transformer.{d}", f"lycoris_{d.replace('.', '_')}", d):
                names[name] = target
    return {n: t for n, t in names.items() if (t[0] if isinstance(t, tuple) else t) in shapes}
