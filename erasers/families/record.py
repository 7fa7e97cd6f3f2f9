"""A family record: how one host model class takes text, described by names and shapes only.

The core never sees a host object: a record names the host's class by its string name (ComfyUI's
``type(model.model).__name__`` and ``model.model.model_config``'s class name), and says where text
enters the denoiser in canonical keys (the ComfyUI names below ``diffusion_model.``). A host adapter maps
its live object to a record with ``erasers.families.lookup`` and reads the few numbers that are not in
the weights (a norm's ε) from the live module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..files.families import Family

CLOSED_FORM = ("uce", "rece", "speed", "mace")

#: the sampling-time guards (erasers/guards/), by the name a record's ``guards`` uses
GUARDS = ("token_suppression", "sld", "safree", "concept_guidance")
GUARD_LABELS = {
    "token_suppression": "Token suppression",
    "sld": "Safe Latent Diffusion",
    "safree": "SAFREE",
    "concept_guidance": "Concept guidance",
}
#: where a guard acts on a family's text tokens (documentation of ``FamilyRecord.guard_layout``)
GUARD_LAYOUTS = (
    "cross_attention",
    "joint_text_first",
    "joint_model_level",
    "cross_attention_blocks",
    "joint_image_first",
)


@dataclass(frozen=True)
class PreNorm:
    """An RMSNorm between the text encoder and the edited Linear: k = x / √(mean(x²) + ε) ⊙ g."""

    weight: str  # canonical key of g
    #: where the host keeps ε (module attribute path below the diffusion model); None in the module = the
    #: dtype's machine ε (torch.nn.RMSNorm's default)
    module: str
    default_eps: Optional[float] = None


@dataclass(frozen=True)
class PreMLP:
    """Wan's text_embedding: k = W₂ GELU_tanh(W₁x + b₁) + b₂ before every block's cross_attn.k / .v."""

    first: str  # canonical key prefix of the first Linear ("text_embedding.0")
    second: str  # of the second ("text_embedding.2")


@dataclass(frozen=True)
class FamilyRecord:
    """One host model class (or a refusal of it, by name, with what would be needed)."""

    host_class: str
    label: str
    #: the family an eraser for it carries; None = refused (``refused`` says why)
    family: Optional[Family] = None
    #: model_config class names accepted with this model class (empty: any); others are refused by name
    config_classes: tuple = ()
    #: the family comes from the keys (legacy UNets: one class serves SD1/SD2/… told apart by width)
    sniff: bool = False
    #: canonical key whose input width is the text-encoder width the model expects
    context_key: str = ""
    #: typical widths of that input (documentation; the live model's weight shape is what is checked)
    context_widths: tuple = ()
    #: what the keys of the edited Linear pass through after the text encoder
    pre: Optional[object] = None
    #: how the host encodes a prompt (encoder, template, what it drops, padding/mask)
    text_encoder: str = ""
    #: where text tokens sit in the denoiser's attention
    text_tokens: str = ""
    methods: tuple = CLOSED_FORM
    refused: str = ""
    #: what the methods that the family has no support for would need (shown with the refusal)
    notes: tuple = field(default_factory=tuple)
    #: the sampling-time guards that serve this class (names from ``GUARDS``)
    guards: tuple = ()
    #: (guard, reason) for each guard that refuses this class; a guard in neither tuple is refused as
    #: "not checked on this family"
    guard_refusals: tuple = ()
    #: how the guards reach the text tokens (``GUARD_LAYOUTS``): "cross_attention" (UNet attn2),
    #: "joint_text_first" (a joint attention per patches_replace["dit"] block, text keys first),
    #: "joint_model_level" (joint layers reached only through the model-wide attention override, text
    #: first and padded), "cross_attention_blocks" (per-block cross-attention to the text, Wan),
    #: "joint_image_first" (every block's joint attention through the model-wide override, image first, then
    #: several text streams: HiDream)
    guard_layout: str = ""

    @property
    def supported(self) -> bool:
        return self.family is not None or self.sniff

    def guard_reason(self, guard: str) -> Optional[str]:
        """None when ``guard`` serves this class, else why it refuses it (for the error message)."""
        if guard not in GUARDS:
            raise ValueError(f"unknown guard {guard!r}; the guards are {', '.join(GUARDS)}")
        if self.refused:
            return self.refused
        if guard in self.guards:
            return None
        for name, reason in self.guard_refusals:
            if name == guard:
                return reason
        return "it has not been checked with this guard yet"
