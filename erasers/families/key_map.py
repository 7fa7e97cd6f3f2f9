"""What text embeddings pass through before the edited Linear, as pure torch on the host's weights.

The closed forms solve for W in W k = v with k the *input of the edited Linear*. Where a norm or an MLP
sits between the text encoder and that Linear, the keys are that module's output on the encoder's
embeddings, not the embeddings themselves:

    RMSNorm (Flux.2 / Qwen-Image txt_norm, Lumina 2 / Z-Image cap_embedder.0):
        k = x / √(mean(x²) + ε) ⊙ g                      (torch.nn.functional.rms_norm)
    Wan text_embedding (before every block's cross_attn.k / .v):
        k = W₂ GELU_tanh(W₁ x + b₁) + b₂

Both act per token, so mapping every row of an encoding and then selecting rows (last word, all
positions) equals selecting then mapping. ``KeyMapEncoder`` applies the map to a host encoder's output;
everything after it (UCE, RECE, SPEED, MACE) is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import torch

from ..errors import FamilyMismatch, UnknownKeys
from .record import PreMLP, PreNorm


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """k = x / √(mean(x²) + ε) ⊙ g; ε None = the dtype's machine ε, as torch.nn.RMSNorm(eps=None)."""
    x = x.to(torch.float64)
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g.to(torch.float64)


def gelu_mlp(x, w1, b1, w2, b2) -> torch.Tensor:
    """k = W₂ GELU_tanh(W₁ x + b₁) + b₂ (Wan's text_embedding, nn.GELU(approximate='tanh'))."""
    f64 = torch.float64
    h = torch.nn.functional.linear(x.to(f64), w1.to(f64), None if b1 is None else b1.to(f64))
    h = torch.nn.functional.gelu(h, approximate="tanh")
    return torch.nn.functional.linear(h, w2.to(f64), None if b2 is None else b2.to(f64))


def pre_keys(pre) -> list:
    """The canonical weight keys the map reads (the adapter fetches them with their patches applied)."""
    if isinstance(pre, PreNorm):
        return [pre.weight]
    if isinstance(pre, PreMLP):
        return [f"{pre.first}.weight", f"{pre.first}.bias", f"{pre.second}.weight", f"{pre.second}.bias"]
    return []


def build_key_map(pre, weights: Mapping[str, torch.Tensor], eps: Optional[float] = None) -> Optional[Callable]:
    """x → k for ``pre`` from the model's weights (canonical key → tensor); None when there is nothing.

    A ``PreNorm`` whose weight the model lacks (Flux.2 checkpoints without txt_norm) maps nothing.
    """
    if pre is None:
        return None
    if isinstance(pre, PreNorm):
        if pre.weight not in weights:
            return None
        g = weights[pre.weight].detach().to("cpu", torch.float64)
        eps = pre.default_eps if eps is None else eps
        return lambda x: rms_norm(x, g, eps)
    if isinstance(pre, PreMLP):
        missing = [k for k in pre_keys(pre) if k.endswith(".weight") and k not in weights]
        if missing:
            raise UnknownKeys(f"The model has no {missing}; expected Wan's text_embedding MLP in front of cross_attn.")
        t = {k: (weights[k].detach().to("cpu", torch.float64) if k in weights else None) for k in pre_keys(pre)}
        w1, b1, w2, b2 = (t[k] for k in pre_keys(pre))
        return lambda x: gelu_mlp(x, w1, b1, w2, b2)
    raise TypeError(f"Unknown pre-projection {pre!r}")


def map_width(pre, weights: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Input width the map expects (the text encoder's width), or None without a map."""
    if isinstance(pre, PreNorm) and pre.weight in weights:
        return int(weights[pre.weight].shape[0])
    if isinstance(pre, PreMLP) and f"{pre.first}.weight" in weights:
        return int(weights[f"{pre.first}.weight"].shape[1])
    return None


class KeyMapEncoder:
    """A ``TextEncoder`` whose ``hidden`` rows are the edited Linear's keys k = f(x) (float32, CPU).

    ``width_in``: the text-encoder width the map reads; an encoder of another width is refused with the
    family's name before anything is solved.
    """

    def __init__(self, encoder, key_map: Callable, width_in: int, width_out: int, label: str = "the model"):
        self._encoder = encoder
        self._map = key_map
        self.width_in, self.context_dim = int(width_in), int(width_out)
        self.label = label
        self.family = getattr(encoder, "family", "?")
        self.context_length = encoder.context_length

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def _mapped(self, encoding):
        width = encoding.hidden.shape[-1]
        if width != self.width_in:
            raise FamilyMismatch(
                f"{self.label} reads {self.width_in}-wide text embeddings, but the text encoder ({self.family}) "
                f"produces {width}-wide ones. Connect the text encoder that was loaded with this model."
            )
        hidden = self._map(encoding.hidden).to(torch.float32)
        return dataclasses.replace(encoding, hidden=hidden)

    def encode(self, prompts):
        return self._mapped(self._encoder.encode(prompts))

    @property
    def encode_real_tokens(self):
        inner = getattr(self._encoder, "encode_real_tokens", None)
        return None if inner is None else (lambda prompts: self._mapped(inner(prompts)))
