"""MMDiTs whose text enters through one input projection: SD3, Qwen-Image, Lumina 2 / Z-Image.

comfyui_host.md §3.2–3.3; the layer names are ComfyUI's (comfy/ldm/{qwen_image,lumina}).
"""

from ..files.families import Family
from .record import GUARDS, FamilyRecord, PreNorm

NO_NAG = (
    "concept guidance carries the concept's text stream through the model's own blocks, and this model's joint "
    "layers have no per-block replace hook (patches_replace['dit']); riding in the model's own caption instead (as "
    "on HiDream-I1) would be inexact here: the caption refiner attends over the whole caption (the concept would mix "
    "with the prompt), the image tokens' rotary positions start after the caption, and Z-Image pads the caption to "
    "a multiple of 32 with a learned token after its embedder"
)


RECORDS = (
    FamilyRecord(
        "SD3",
        "SD3/SD3.5",
        Family.SD3,
        context_key="context_embedder.weight",
        context_widths=(4096,),
        text_encoder="CLIP-L ⊕ CLIP-G (77 positions, zero-padded to 4096) then T5-XXL; pooled (2048)",
        text_tokens="joint attention; text tokens first (cat(context, x))",
        guards=GUARDS,
        guard_layout="joint_text_first",
    ),
    FamilyRecord(
        "QwenImage",
        "Qwen-Image",
        Family.QWEN_IMAGE,
        config_classes=("QwenImage",),
        context_key="txt_in.weight",
        context_widths=(3584,),
        # k = txt_norm(x) = x / √(mean(x²) + 1e-6) ⊙ g, then txt_in (QwenImageTransformer2DModel.forward)
        pre=PreNorm("txt_norm.weight", "txt_norm", 1e-6),
        text_encoder="Qwen2.5-VL-7B, last layer; chat template (system prompt, then <|im_start|>user\\n{}"
        "<|im_end|>\\n<|im_start|>assistant\\n); the host drops everything up to 'user\\n' and keeps the "
        "closing tokens; no padding for one prompt",
        text_tokens="joint attention over separate text/image projections (add_q/k/v_proj); text first",
        # SAFREE: the pack's decoder-LLM port (the prompt's own rows inside the host's template, suppression_clip)
        guards=("token_suppression", "sld", "safree", "concept_guidance"),
        guard_layout="joint_text_first",
    ),
    FamilyRecord(
        "Lumina2",
        "Lumina 2",
        Family.LUMINA2,
        config_classes=("Lumina2",),
        context_key="cap_embedder.1.weight",
        context_widths=(2304,),
        # cap_embedder = Sequential(RMSNorm(ε = norm_eps), Linear): k = x / √(mean(x²) + ε) ⊙ g
        pre=PreNorm("cap_embedder.0.weight", "cap_embedder.0", 1e-5),
        text_encoder="Gemma-2-2B, second-to-last layer, BOS kept, no template, attention mask",
        text_tokens="cap_embedder → context_refiner (text only) → joint layers, text first",
        # SAFREE: the pack's decoder-LLM port (the prompt's own rows inside the host's template, suppression_clip)
        guards=("token_suppression", "sld", "safree"),
        guard_refusals=(("concept_guidance", NO_NAG),),
        guard_layout="joint_model_level",
    ),
    FamilyRecord(
        "Lumina2",
        "Z-Image",
        Family.ZIMAGE,
        config_classes=("ZImage",),
        context_key="cap_embedder.1.weight",
        context_widths=(2560,),
        pre=PreNorm("cap_embedder.0.weight", "cap_embedder.0", 1e-5),
        text_encoder="Qwen3-4B, second-to-last layer; template <|im_start|>user\\n{}<|im_end|>\\n<|im_start|>"
        "assistant\\n kept whole; attention mask",
        text_tokens="cap_embedder → context_refiner (text only) → joint layers; text padded to a multiple of 32 "
        "with cap_pad_token",
        # SAFREE: the pack's decoder-LLM port (the prompt's own rows inside the host's template, suppression_clip)
        guards=("token_suppression", "sld", "safree"),
        guard_refusals=(("concept_guidance", NO_NAG),),
        guard_layout="joint_model_level",
    ),
)
