"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024), both published variants.

Closed form (closed_form.md §3.1, with TIME's regulariser):
    W = (λW₀ + η_e Σ_E W₀c*_i c_iᵀ + η_p Σ_P W₀c_j c_jᵀ)(λI + η_e Σ_E c_i c_iᵀ + η_p Σ_P c_j c_jᵀ)⁻¹
Variants (§3.2, §3.3):
  "2023" — paper-era code: erase keys are the concept rows from its last word to the end, aligned
           position by position with the guide rows from *its* last word (token-range alignment); the
           empty prompt is always preserved with all positions; guide " " (→ SOT) or "art";
           η_p = max(0.1, 1/#retain) unless given.
  "2025" — rewrite: one key per concept, its last word token; preserve only what the user lists, also by
           last token; η_p = 1.
Flux/SD3: the same closed form on the text-input projection (T5 tokens) and, for the pooled-text
embedder, on pooled vectors (§3.4). Targets are W₀c*, so the Linear's bias cancels out of ΔW — the
reference's bias double-count bug cannot happen here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch

from ..config import ConfigError, EraserConfig
from ..lowrank import LowRankDelta, compress
from ..text import PromptEncoding, TextEncoder, encode_batched
from .closed_form import same_length, shared_factors

ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


@dataclass
class UCEConfig(EraserConfig):
    method: ClassVar[str] = "uce"

    #: "2025" is the maintained official code; "2023" the paper-era code (see module docstring)
    variant: str = "2025"
    lam: float = 0.5
    erase_scale: float = 1.0
    #: None → the variant's published default (2023: max(0.1, 1/#retain); 2025: 1.0)
    preserve_scale: Optional[float] = None
    #: add the 5 published prompt templates per concept and per guide
    expand_prompts: bool = False

    def validate(self) -> None:
        super().validate()
        if self.variant not in ("2023", "2025"):
            raise ConfigError(
                f"uce: variant must be '2023' (all token positions) or '2025' (last token), found '{self.variant}'."
            )
        self._check_positive(lam=self.lam, erase_scale=self.erase_scale)
        if self.preserve_scale is not None:
            self._check_positive(preserve_scale=self.preserve_scale)

    def default_anchor(self) -> str:
        return "art" if self.concept_type == "art" else ("" if self.variant == "2025" else " ")

    def effective_preserve_scale(self, n_retain: int) -> float:
        if self.preserve_scale is not None:
            return float(self.preserve_scale)
        return max(0.1, 1.0 / max(n_retain, 1)) if self.variant == "2023" else 1.0


def expand(prompts: list, concept_type: str) -> list:
    templates = ART_TEMPLATES if concept_type == "art" else OBJECT_TEMPLATES
    return [t.format(p).strip() for p in prompts for t in templates]


def erase_pairs(config: UCEConfig):
    """(concept prompts, guide prompts) after broadcasting and optional template expansion."""
    concepts = list(config.concepts)
    guides = config.anchors_for_concepts(config.default_anchor())
    if config.expand_prompts:
        concepts = concepts + expand(concepts, config.concept_type)
        guides = guides + expand(guides, config.concept_type)
    return concepts, guides


def last_token_rows(enc: PromptEncoding) -> torch.Tensor:
    """(N, d): the last-word row of each prompt (the SOT for the empty prompt)."""
    return enc.hidden[torch.arange(len(enc)), enc.last_subject_index]


def aligned_token_rows(concepts: PromptEncoding, guides: PromptEncoding):
    """2023 token-range alignment (§3.2): rows [k_old : T − (F − k_old)] ↔ guide rows [k_new : T − (F − k_new)]."""
    keys, targets = [], []
    c_hidden, g_hidden = same_length(concepts.hidden, guides.hidden)
    length = c_hidden.shape[1]
    for i in range(len(concepts)):
        k_old = int(concepts.last_subject_index[i])
        k_new = int(guides.last_subject_index[i])
        far = max(k_old, k_new)
        keys.append(c_hidden[i, k_old : length - (far - k_old)])
        targets.append(g_hidden[i, k_new : length - (far - k_new)])
    return torch.cat(keys), torch.cat(targets)


def stream_factors(
    config: UCEConfig, enc_c: PromptEncoding, enc_g: PromptEncoding, enc_p: Optional[PromptEncoding], pooled: bool
):
    """(A, B) with ΔW = W₀AB for every layer of one input stream (tokens or pooled vectors)."""
    if pooled:
        keys, targets = enc_c.pooled, enc_g.pooled
        preserve = enc_p.pooled if enc_p is not None else None
        n_retain = len(enc_p) if enc_p is not None else 0
    elif config.variant == "2025":
        keys, targets = last_token_rows(enc_c), last_token_rows(enc_g)
        preserve = last_token_rows(enc_p) if enc_p is not None else None
        n_retain = len(enc_p) if enc_p is not None else 0
    else:
        keys, targets = aligned_token_rows(enc_c, enc_g)
        preserve = enc_p.hidden.reshape(-1, enc_p.hidden.shape[-1]) if enc_p is not None else None
        n_retain = len(enc_p) if enc_p is not None else 0
    eta_p = config.effective_preserve_scale(n_retain)
    a, b = ridge_factors(keys, targets, config.lam, config.erase_scale, preserve, eta_p)
    # minimal rank once for the shared d×d part, instead of once per layer
    shared, _ = compress(LowRankDelta(a, b))
    return shared.up.to(torch.float64), shared.down


def ridge_factors(keys, targets, lam: float, eta_e: float, preserve=None, eta_p: float = 1.0):
    """``closed_form.shared_factors`` (A, B), by an r×r system when the r erased + preserved rows are far
    fewer than d (DiT widths: 100 concepts at d = 15360), else by its d×d Cholesky solve.

    Push-through: with K = [√η_e C; √η_p P] (r×d), (λI + KᵀK)⁻¹Cᵀ = (Cᵀ − Kᵀ(λI + KKᵀ)⁻¹KCᵀ)/λ, so the
    d×d system (d³/3 flops, 1.9 GB at d = 15360) becomes an r×r one (r²d). Needs λ > 0.
    """
    c = keys.to(torch.float64)
    p = preserve.to(torch.float64) if preserve is not None and preserve.numel() else c[:0]
    r, d = c.shape[0] + p.shape[0], c.shape[1]
    if lam <= 0 or 2 * r > d:
        return shared_factors(keys, targets, lam, eta_e, preserve, eta_p)
    k = torch.cat([eta_e**0.5 * c, eta_p**0.5 * p])
    small = lam * torch.eye(r, dtype=torch.float64) + k @ k.T
    kc = k @ c.T
    factor, info = torch.linalg.cholesky_ex(small)
    inner = torch.cholesky_solve(kc, factor) if int(info) == 0 else torch.linalg.solve(small, kc)
    b_t = (c.T - k.T @ inner) / lam
    return eta_e * (targets.to(torch.float64) - c).T, b_t.T


def retain_prompts(config: UCEConfig) -> list:
    # 2023 always preserves the empty prompt (all positions); 2025 only what the user lists
    return ([""] if config.variant == "2023" else []) + list(config.preserve)


def erase(config: UCEConfig, encoder: TextEncoder, weights: Mapping[str, torch.Tensor], specs, progress=None) -> dict:
    """ΔW for every layer in ``specs`` (canonical key → W₀ in ``weights``)."""
    concepts, guides = erase_pairs(config)
    last_only = config.variant == "2025"  # 2025 reads the last-word rows only (and pooled vectors)
    enc_c = encode_batched(encoder, concepts, progress=progress, real_tokens_only=last_only)
    enc_g = encode_batched(encoder, guides, real_tokens_only=last_only)
    retain = retain_prompts(config)
    enc_p = encode_batched(encoder, retain, real_tokens_only=last_only) if retain else None
    factors = {}
    deltas = {}
    for spec in specs:
        pooled = spec.kind == "pooled_in"
        if pooled not in factors:
            a, b = stream_factors(config, enc_c, enc_g, enc_p, pooled)
            factors[pooled] = (a.float(), b.float())
        a, b = factors[pooled]
        # the solve ran in float64; projecting W₀ onto the small d×n factor needs only float32
        deltas[spec.key] = LowRankDelta(weights[spec.key].float() @ a, b)
    return deltas
