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

    @property
    def supported(self) -> bool:
        return self.family is not None or self.sniff
