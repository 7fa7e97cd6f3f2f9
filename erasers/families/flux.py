"""Flux and its descendants in ComfyUI (comfy/model_base.py: Chroma, Flux2, LongCatImage subclass Flux).

All share Flux's ``txt_in`` Linear (comfyui_host.md §3.1) with text tokens *first* in the joint sequence,
but their text encoders and blocks differ, which is why the family is the class and not the keys.
"""

from ..files.families import Family
from .record import GUARDS, FamilyRecord, PreNorm

JOINT_TEXT_FIRST = "joint attention; text tokens first (img = cat(txt, img)), double then single blocks"


def distilled(label: str, instead: str) -> str:
    return (
        f"{label} is guidance-distilled: the sampler runs no unconditional branch, and SLD guides relative to it "
        f"(true CFG). Use {instead} instead"
    )


RECORDS = (
    FamilyRecord(
        "Flux",
        "Flux.1",
        Family.FLUX,
        context_key="txt_in.weight",
        context_widths=(4096,),
        text_encoder="CLIP-L (pooled → vector_in) + T5-XXL (tokens → txt_in), T5 padded to ≥ 256",
        text_tokens=JOINT_TEXT_FIRST,
        guards=tuple(g for g in GUARDS if g != "sld"),
        guard_refusals=(("sld", distilled("Flux.1", "concept guidance or token suppression")),),
        guard_layout="joint_text_first",
    ),
    FamilyRecord(
        "Chroma",
        "Chroma",
        Family.CHROMA,
        context_key="txt_in.weight",
        context_widths=(4096,),
        text_encoder="T5-XXL alone (PixArt tokenizer: no start token, ends with </s>, no padding); no pooled "
        "vector, so no vector_in",
        text_tokens=JOINT_TEXT_FIRST + "; no per-block modulation (distilled_guidance_layer)",
        # SAFREE: T5's layout (no start token, ends with </s>), masked with T5's pad id; no pooled vector to project
        # concept guidance: the concept's text stream through the host's own blocks (DitDispatch.host_block_guidance)
        guards=("token_suppression", "sld", "safree", "concept_guidance"),
        guard_layout="joint_text_first",
    ),
    FamilyRecord(
        "Flux2",
        "Flux.2",
        Family.FLUX2,
        context_key="txt_in.weight",
        # dev: Mistral-3-24B layers 10/20/30 stacked (3·5120); klein: Qwen3-4B / 8B layers 9/18/27 (3·2560, 3·4096)
        context_widths=(15360, 7680, 12288),
        # k = txt_norm(x) when the checkpoint has txt_norm (ComfyUI's FluxParams.txt_norm), else k = x
        pre=PreNorm("txt_norm.weight", "txt_norm"),
        text_encoder="Mistral-3-24B (dev, [SYSTEM_PROMPT]…[INST]{}[/INST]) or Qwen3 (klein, chat template with "
        "an empty <think> block); hidden states of three layers stacked per token; the template is kept; the "
        "model left-pads the context to 512 with zeros",
        text_tokens=JOINT_TEXT_FIRST + "; global modulation",
        # SAFREE: the pack's decoder-LLM port (the prompt's own rows inside the host's template, suppression_clip)
        guards=("token_suppression", "safree", "concept_guidance"),
        guard_refusals=(("sld", distilled("Flux.2", "token suppression")),),
        guard_layout="joint_text_first",
    ),
    FamilyRecord(
        "LongCatImage",
        "LongCat-Image",
        refused="its text path has not been checked against the pack's closed forms yet",
        notes=("needs: the Qwen2.5-VL template LongCat uses and a test on ComfyUI's LongCatImage class",),
    ),
    FamilyRecord(
        "ChromaRadiance",
        "Chroma Radiance",
        refused="the pixel-space Chroma variant has not been tested with the pack yet",
        notes=("needs: a test on ComfyUI's ChromaRadiance class (its txt_in is Chroma's)",),
    ),
)
