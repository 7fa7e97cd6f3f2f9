"""Wan 2.1 / 2.2 text-to-video (comfy/ldm/wan/model.py ``WanModel``).

Real cross-attention, as in UCE's own setting, but the K/V Linears of every block read
``text_embedding(umt5(prompt))``, not the encoder output: the keys are pushed through the host's
text_embedding MLP first (``PreMLP``). ``norm_k`` (RMSNorm) after ``cross_attn.k`` is per token, so
W′c = W c* at the K Linear gives the same normed key too.
"""

from ..files.families import Family
from .record import FamilyRecord, PreMLP

WAN_TEXT = "cross-attention: blocks.i.cross_attn.k / .v read text_embedding(context) (512 positions)"
UMT5 = "UMT5-XXL, no start token, ends with </s>, padded to 512 with 0; padded rows zeroed (attention mask)"

_T2V = dict(
    family=Family.WAN,
    context_key="text_embedding.0.weight",
    context_widths=(4096,),
    pre=PreMLP("text_embedding.0", "text_embedding.2"),
    text_encoder=UMT5,
    text_tokens=WAN_TEXT,
    # SAFREE: UMT5's T5 layout; the projection is linear, so the zeroed padding rows stay zero. Concept
    # guidance: real cross-attention, so the concept context goes through each block's own k/v (as on UNets)
    guards=("token_suppression", "sld", "safree", "concept_guidance"),
    guard_layout="cross_attention_blocks",
)

RECORDS = (
    FamilyRecord("WAN21", "Wan 2.1 text-to-video", config_classes=("WAN21_T2V",), **_T2V),
    FamilyRecord("WAN22", "Wan 2.2 text-to-video", config_classes=("WAN22_T2V",), **_T2V),
)
