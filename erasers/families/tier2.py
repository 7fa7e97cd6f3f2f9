"""Issue #16's Tier 2, refused by name with what each would need (read from ComfyUI 0.29's comfy/ldm/).

Tier 2 asks for at least the closed form and token suppression, or a refusal naming the reason (AuraFlow is
served: erasers/families/aura.py). None of these is checked against the host yet, so every guard and edit
refuses them before anything runs; each reason says where the text enters the model, which is what a record
would have to describe.
"""

from .record import FamilyRecord

RECORDS = (
    FamilyRecord(
        "PixArt",
        "PixArt-α / PixArt-Σ",
        refused="real cross-attention (UCE's own setting), but each block's K and V are one fused Linear "
        "(cross_attn.kv_linear) fed by the caption MLP y_embedder.y_proj, and neither the fused edit point nor "
        "the host's T5 encoding (120 / 300 tokens, masked) is checked yet",
        notes=("needs: a fused-K/V edit point behind a PreMLP, checked against ComfyUI's PixArt T5 encoding",),
    ),
    FamilyRecord(
        "LTXV",
        "LTX-Video",
        refused="every block's cross-attention (attn2.to_k / .to_v) reads caption_projection(context) — a "
        "PixArt-style MLP or, in later versions, a connector in front of it — which no record describes yet",
        notes=("needs: a PreMLP record per caption-projection variant and ComfyUI's LTXV T5 encoding",),
    ),
    FamilyRecord(
        "HunyuanVideo",
        "HunyuanVideo",
        refused="the text passes txt_in, a token refiner (self-attention over the text tokens, modulated by "
        "the timestep and the pooled text), before the double blocks; the only fixed Linear is "
        "txt_in.input_embedder and the host's LLaVA-Llama template with its dropped prefix is not mapped yet",
        notes=("needs: txt_in.input_embedder as the edit point and the host's template / dropped-prefix rule",),
    ),
    FamilyRecord(
        "HunyuanVideo15",
        "HunyuanVideo 1.5",
        refused="as HunyuanVideo (a timestep-modulated token refiner in txt_in) plus a ByT5 glyph branch "
        "(byt5_in) that also carries the prompt's quoted text; an edit of one branch would leave the other",
        notes=("needs: edit points in txt_in and byt5_in, and the host's Qwen2.5-VL template",),
    ),
    FamilyRecord(
        "HunyuanImage21",
        "HunyuanImage 2.1",
        refused="HunyuanVideo's layout (token refiner in txt_in, ByT5 glyph branch byt5_in) on images; not "
        "mapped for the same reasons",
        notes=("needs: edit points in txt_in and byt5_in, and the host's Qwen2.5-VL template",),
    ),
    FamilyRecord(
        "Kandinsky5",
        "Kandinsky 5 video",
        refused="the text goes text_embeddings (Linear + LayerNorm) and then timestep-modulated text "
        "transformer blocks before the visual blocks' cross-attention, so the keys there change with the "
        "step; the only fixed Linear is text_embeddings.in_layer, in front of a LayerNorm no record describes",
        notes=("needs: a LayerNorm pre-map for text_embeddings and ComfyUI's Qwen2.5-VL encoding",),
    ),
    FamilyRecord(
        "Kandinsky5Image",
        "Kandinsky 5 image",
        refused="Kandinsky 5's text path (timestep-modulated text transformer blocks before cross-attention)",
        notes=("needs: a LayerNorm pre-map for text_embeddings and ComfyUI's Qwen2.5-VL encoding",),
    ),
)
