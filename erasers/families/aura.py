"""AuraFlow (ComfyUI's ``AuraFlow`` / comfy/ldm/aura/mmdit.py ``MMDiT``): issue #16's first Tier-2 family served.

Text enters through one bias-free Linear, ``cond_seq_linear`` (Pile-T5-XL hidden states, 2048 wide →
the model width); the model then puts its 8 learned ``register_tokens`` in front: every joint attention, in
the double layers (``cat(c, x)``) and the single layers (``cx``), is [8 registers ‖ T text ‖ image]. No
rotary or positional encoding touches the text, and no mask reaches the model: the rows ComfyUI's Pile-T5
zeroes after </s> (``zero_out_masked``) are keys of zeros, which ``cond_seq_linear`` (no bias) keeps zero.

The closed form edits ``cond_seq_linear`` (the text-input projection, as Flux's ``txt_in``); token
suppression biases the image queries' text columns [8, 8 + T) through the dit replace hooks; concept guidance
carries the concept's own [registers ‖ text] stream beside the prompt's through every layer; SAFREE works in the
T5 layout with Pile-T5's ids.
"""

from ..files.families import Family
from .record import FamilyRecord

#: the register tokens the model puts before the text in every joint attention (MMDiT.register_tokens)
REGISTER_TOKENS = 8

RECORDS = (
    FamilyRecord(
        "AuraFlow",
        "AuraFlow",
        Family.AURAFLOW,
        config_classes=("AuraFlow",),
        context_key="cond_seq_linear.weight",
        context_widths=(2048,),
        text_encoder="Pile-T5-XL (pile_t5xl), last layer; no start token, ends with </s> (2), padded to 256 with 1; "
        "rows after </s> zeroed; no mask reaches the model",
        text_tokens="joint attention [8 register tokens ‖ text ‖ image] in double and single layers",
        # SLD: its pass is the host's own conditioning of the safety concept through the model (CFG model)
        # concept guidance: the concept's stream ([the model's 8 registers ‖ cond_seq_linear(concept)], as the model
        # makes a prompt's) rides beside the prompt's in every layer's one pass (suppression_hooks.inline_guidance)
        # SAFREE: the T5 layout (no start token, mean-pooled, every row projected) with Pile-T5's ids: </s> = 2, the
        # masked copies' id its padding (1); the rows zeroed after </s> stay zero (the projection is linear)
        guards=("token_suppression", "sld", "concept_guidance", "safree"),
        guard_layout="joint_text_first",
    ),
)
