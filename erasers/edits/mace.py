"""MACE — Mass Concept Erasure (Lu et al., CVPR 2024): the closed-form cross-attention refinement only.

closed_form.md §6.1. Each concept is put into ``n_templates`` prompts; the keys e^f are the rows of the
tokens that *co-occur* with the concept (common prefix incl. SOT, common suffix incl. EOS, and the
padding, aligned as in ``find_matching_indices``), the concept's own tokens excluded; the values are
W·(the same positions of the prompt with the concept replaced by its mapping). Preservation: a general
prior (all token rows of ``erasers/data/general_prompts.txt``, a stand-in for the MS-COCO caption cache
that cannot ship) and a domain prior (all token rows of the user's preserve prompts) with weight ω:

    W′ = (λW + Σ W e^g e^fᵀ + s(Σ_gen W e eᵀ + ω Σ_dom W e eᵀ)) (λI + Σ e^f e^fᵀ + s(Σ_gen e eᵀ + ω Σ_dom e eᵀ))⁻¹
       = W (I + (E_g − E_f)ᵀE_f Mat⁻¹)                      — one d×d update shared by every layer

s = ``train_preserve_scale`` is applied **once**. The reference code multiplies its cache by s twice
(s² in the ≤ 1000-concept branch, §6.1/§10); that is a bug and is not reproduced. Note the balance this
gives: the reference's effective weight is s²·(~616k COCO captions) while ours is s·(~200 captions), so
at the published s = 1e-4 the total general-prior weight is of the same order (within a few ×).

With λ = 0 the system relies on a full-rank preservation gram; when it is not (numerically), a small λ is
used instead and a warning is logged. For DiT families the pooled-text embedder is edited with the pooled
vectors of the same prompt pairs (the concept prompt's pooled vector → the mapped prompt's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Optional

import torch

from ..config import ConfigError, EraserConfig
from ..lowrank import LowRankDelta, compress
from ..text import TextEncoder, encode_batched
from .closed_form import same_length

log = logging.getLogger(__name__)

GENERAL_PROMPTS_FILE = Path(__file__).parents[1] / "data" / "general_prompts.txt"

#: 31 templates; the first ``n_templates`` (30) are used, as MACE's prompt_len
OBJECT_TEMPLATES = (
    "{} in a photo",
    "A snapshot of {}",
    "A photograph showcasing {}",
    "An image of {}",
    "{} in the picture",
    "A close-up shot of {}",
    "A candid photo of {}",
    "{} standing outdoors",
    "A portrait of {}",
    "{} captured on camera",
    "A picture featuring {}",
    "{} in a natural setting",
    "A detailed photo of {}",
    "{} in a studio shot",
    "An everyday scene with {}",
    "A high-resolution photo of {}",
    "{} seen from the side",
    "A blurry photo of {}",
    "{} in bright daylight",
    "A vintage photograph of {}",
    "{} at night",
    "A wide shot of {}",
    "{} in the city",
    "A cropped photo of {}",
    "A professional photo of {}",
    "{} near a window",
    "A color photo of {}",
    "{} in a magazine photo",
    "A black and white photo of {}",
    "{} on a sunny day",
    "A snapshot featuring {}",
)
STYLE_TEMPLATES = (
    "An artwork by {}",
    "Art piece by {}",
    "A painting by {}",
    "A famous work by {}",
    "A landscape by {}",
    "A portrait painted by {}",
    "A still life by {}",
    "A sketch by {}",
    "An illustration by {}",
    "A drawing in the style of {}",
    "A picture in the style of {}",
    "Artwork in the manner of {}",
    "A canvas painted by {}",
    "A masterpiece by {}",
    "A study by {}",
    "A street scene painted by {}",
    "A seascape by {}",
    "A city view by {}",
    "A painting of flowers by {}",
    "A self-portrait by {}",
    "An early work by {}",
    "A late work by {}",
    "A mural by {}",
    "A print by {}",
    "A watercolor by {}",
    "An oil painting by {}",
    "A scene painted by {}",
    "A figure study by {}",
    "An abstract piece by {}",
    "A painting of a garden by {}",
    "A small painting by {}",
)
#: concept type → the mapping e^g (object: the user's anchor; "" when none is given)
MAPPINGS = {"celebrity": "a person", "art": "art", "nudity": "a person wearing clothes", "object": ""}
#: §6.1 table, celebrities: ω per number of concepts (50 from the SPEED paper); the nearest row at or above n
CELEBRITY_OMEGA = ((1, 8e3), (5, 5e4), (10, 8e4), (50, 1.2e5), (100, 2e5))


@dataclass
class MACEConfig(EraserConfig):
    method: ClassVar[str] = "mace"
    CONCEPT_TYPES: ClassVar[tuple] = ("object", "art", "nudity", "celebrity")

    #: λ (``lamb``); None → per concept type (§6.1: 0, objects 1e2)
    lam: Optional[float] = None
    #: s (``train_preserve_scale``), applied once; None → per type (1e-4; nudity 7e-7; objects 0)
    train_preserve_scale: Optional[float] = None
    #: ω (``preserve_weight``) on the preserve prompts; None → per type (celebrities by count, art 8e4, else 0)
    preserve_weight: Optional[float] = None
    #: prompts per concept (MACE prompt_len = 30, at most 31)
    n_templates: int = 30
    #: add the general prior (erasers/data/general_prompts.txt)
    general_prior: bool = True

    PRESETS: ClassVar[dict] = {
        "celebrity-1": {"concept_type": "celebrity", "lam": 0.0, "train_preserve_scale": 1e-4, "preserve_weight": 8e3},
        "celebrity-5": {"concept_type": "celebrity", "lam": 0.0, "train_preserve_scale": 1e-4, "preserve_weight": 5e4},
        "celebrity-10": {
            "concept_type": "celebrity",
            "lam": 0.0,
            "train_preserve_scale": 1e-4,
            "preserve_weight": 8e4,
        },
        "celebrity-100": {
            "concept_type": "celebrity",
            "lam": 0.0,
            "train_preserve_scale": 1e-4,
            "preserve_weight": 2e5,
        },
        "art-100": {"concept_type": "art", "lam": 0.0, "train_preserve_scale": 1e-4, "preserve_weight": 8e4},
        "explicit": {"concept_type": "nudity", "lam": 0.0, "train_preserve_scale": 7e-7, "preserve_weight": 0.0},
        "cifar-ship": {
            "concept_type": "object",
            "lam": 1e3,
            "train_preserve_scale": 0.0,
            "preserve_weight": 0.0,
            "anchors": ["ground"],
        },
        "cifar-automobile": {
            "concept_type": "object",
            "lam": 1e2,
            "train_preserve_scale": 0.0,
            "preserve_weight": 0.0,
            "anchors": ["sky"],
        },
        "cifar-bird": {
            "concept_type": "object",
            "lam": 1e1,
            "train_preserve_scale": 0.0,
            "preserve_weight": 0.0,
            "anchors": ["street"],
        },
    }

    def validate(self) -> None:
        super().validate()
        for name in ("lam", "train_preserve_scale", "preserve_weight"):
            if getattr(self, name) is not None:
                self._check_positive(**{name: getattr(self, name)})
        if int(self.n_templates) != self.n_templates or not 1 <= self.n_templates <= len(OBJECT_TEMPLATES):
            raise ConfigError(
                f"mace: n_templates must be a whole number from 1 to {len(OBJECT_TEMPLATES)} "
                f"(published 30), found {self.n_templates!r}."
            )
        if (
            self.effective_lam() == 0
            and (self.effective_scale() == 0 or not self.general_prior)
            and not (self.preserve and self.effective_scale() * self.effective_omega() > 0)
        ):
            raise ConfigError(
                "mace: λ = 0 without any preservation term leaves the system singular; give λ > 0 "
                "(objects: 10–1000) or a train_preserve_scale > 0 with the general prior on."
            )

    def default_anchor(self) -> str:
        return MAPPINGS[self.concept_type]

    def effective_lam(self) -> float:
        return float(self.lam if self.lam is not None else (1e2 if self.concept_type == "object" else 0.0))

    def effective_scale(self) -> float:
        if self.train_preserve_scale is not None:
            return float(self.train_preserve_scale)
        return {"celebrity": 1e-4, "art": 1e-4, "nudity": 7e-7, "object": 0.0}[self.concept_type]

    def effective_omega(self) -> float:
        if self.preserve_weight is not None:
            return float(self.preserve_weight)
        if self.concept_type == "celebrity":
            n = len(self.concepts)
            return next((w for count, w in CELEBRITY_OMEGA if n <= count), CELEBRITY_OMEGA[-1][1])
        return 8e4 if self.concept_type == "art" else 0.0

    def templates(self) -> tuple:
        return (STYLE_TEMPLATES if self.concept_type == "art" else OBJECT_TEMPLATES)[: int(self.n_templates)]


def load_general_prompts(path: Path = GENERAL_PROMPTS_FILE) -> list:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def fill(template: str, phrase: str) -> str:
    return " ".join(template.format(phrase).split())  # an empty mapping leaves no double space


def find_matching_indices(old_ids, new_ids, length: int):
    """Aligned positions of the tokens two prompts share around the replaced phrase (§6.1).

    Common prefix (incl. SOT) + common suffix (incl. EOS) of the unpadded ids, then both padding runs up to
    ``length``, aligned and cut to equal length. Returns (old positions, new positions).
    """
    n_old, n_new = len(old_ids), len(new_ids)
    prefix = 0
    while prefix < min(n_old, n_new) and old_ids[prefix] == new_ids[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n_old, n_new) - prefix and old_ids[n_old - 1 - suffix] == new_ids[n_new - 1 - suffix]:
        suffix += 1
    pad = max(0, min(length - n_old, length - n_new))
    old = list(range(prefix)) + list(range(n_old - suffix, n_old)) + list(range(n_old, n_old + pad))
    new = list(range(prefix)) + list(range(n_new - suffix, n_new)) + list(range(n_new, n_new + pad))
    return old, new


def erase_grams(config: MACEConfig, encoder: TextEncoder, progress=None):
    """Per stream: (Σ e^f e^fᵀ, Σ e^g e^fᵀ, rows) over all templates and concepts (float64).

    ``rows`` = (E_f, E_g) while there are fewer rows than d (then ΔW is kept as exact low-rank factors),
    else None.
    """
    mappings = config.anchors_for_concepts(config.default_anchor())
    grams = {}
    mapped_cache = {}

    def add(stream, keys, targets):
        keys, targets = keys.to(torch.float64), targets.to(torch.float64)
        d = keys.shape[1]
        both = torch.cat([keys, targets], dim=1).T @ keys  # one product for both grams
        ff, gf, rows = grams.get(stream, (0.0, 0.0, (keys[:0], targets[:0])))
        if rows is not None:
            rows = (torch.cat([rows[0], keys]), torch.cat([rows[1], targets]))
            rows = rows if rows[0].shape[0] < d else None
        grams[stream] = (ff + both[:d], gf + both[d:], rows)

    for i, (concept, mapping) in enumerate(zip(config.concepts, mappings)):
        old_prompts = [fill(t, concept) for t in config.templates()]
        new_prompts = [fill(t, mapping) for t in config.templates()]
        if mapping not in mapped_cache:  # one mapping usually serves every concept
            mapped_cache[mapping] = encode_batched(encoder, new_prompts)
        enc_old, enc_new = encode_batched(encoder, old_prompts), mapped_cache[mapping]
        old_hidden, new_hidden = same_length(enc_old.hidden, enc_new.hidden)
        length = old_hidden.shape[1]
        keys, targets = [], []
        for j in range(len(old_prompts)):
            old_idx, new_idx = find_matching_indices(enc_old.token_ids[j], enc_new.token_ids[j], length)
            keys.append(old_hidden[j, old_idx])
            targets.append(new_hidden[j, new_idx])
        add("tokens", torch.cat(keys), torch.cat(targets))
        if enc_old.pooled is not None:
            add("pooled", enc_old.pooled, enc_new.pooled)
        if progress is not None:
            progress(i + 1, len(config.concepts))
    return grams


def preservation_gram(encoder: TextEncoder, prompts: list, stream: str):
    """Σ e eᵀ over all token rows (or pooled vectors) of ``prompts``, float64; None when empty."""
    if not prompts:
        return None
    total = 0.0
    for start in range(0, len(prompts), 64):
        enc = encode_batched(encoder, prompts[start : start + 64])
        rows = enc.pooled if stream == "pooled" else enc.hidden.reshape(-1, enc.hidden.shape[-1])
        rows = rows.float()
        total = total + (rows.T @ rows).double()
    return total


def system_matrix(gram_ff: torch.Tensor, preserve: Optional[torch.Tensor], lam: float) -> torch.Tensor:
    """Mat = λI + Σ e^f e^fᵀ + s(Σ_gen + ω Σ_dom); a small λ replaces λ = 0 when Mat is (nearly) singular."""
    d = gram_ff.shape[0]
    mat = gram_ff + (preserve if preserve is not None else 0.0)
    eye = torch.eye(d, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(mat + lam * eye)
    diag = torch.diagonal(factor) if int(info) == 0 else None
    if diag is None or float(diag.min() ** 2) < 1e-12 * float(diag.max() ** 2):
        fallback = max(lam, 1e-6 * float(torch.diagonal(mat).mean()))
        log.warning(
            "MACE: the system (λ = %g) is singular or nearly so (the preservation gram is not full "
            "rank); using λ = %.3g instead. Add preserve prompts or raise lam to silence this.",
            lam,
            fallback,
        )
        lam = fallback
    return mat + lam * eye


def shared_update(
    gram_ff: torch.Tensor, gram_gf: torch.Tensor, preserve: Optional[torch.Tensor], lam: float, rows=None
):
    """(X, Y) with W′ = W (I + XY):  XY = (E_g − E_f)ᵀ E_f Mat⁻¹ = (Σ e^g e^fᵀ − Σ e^f e^fᵀ) Mat⁻¹.

    With the rows at hand (fewer than d) the factors are exact, X = (E_g − E_f)ᵀ, Y = E_f Mat⁻¹; otherwise
    X = I and Y is the dense d×d matrix. Mat is symmetric, so Y = (Mat⁻¹ ·)ᵀ by one solve.
    """
    mat = system_matrix(gram_ff, preserve, lam)
    if rows is not None:
        e_f, e_g = rows
        return (e_g - e_f).T, torch.linalg.solve(mat, e_f.T).T
    return torch.eye(mat.shape[0], dtype=torch.float64), torch.linalg.solve(mat, (gram_gf - gram_ff).T).T


def erase(config: MACEConfig, encoder: TextEncoder, weights: Mapping[str, torch.Tensor], specs, progress=None) -> dict:
    """ΔW for every layer in ``specs`` (canonical key → W₀ in ``weights``)."""
    lam, scale, omega = config.effective_lam(), config.effective_scale(), config.effective_omega()
    if config.preserve and scale * omega == 0:
        log.warning(
            "MACE: preserve prompts are ignored with train_preserve_scale·preserve_weight = 0 "
            "(concept type '%s'); set preserve_weight > 0 to use them.",
            config.concept_type,
        )
    grams = erase_grams(config, encoder, progress)
    general = load_general_prompts() if config.general_prior and scale > 0 else []
    deltas = {}
    for stream in ("tokens", "pooled"):
        group = [s for s in specs if (s.kind == "pooled_in") == (stream == "pooled")]
        if not group:
            continue
        gram_ff, gram_gf, rows = grams[stream]
        preserve = None
        if scale > 0:
            g_gen = preservation_gram(encoder, general, stream)
            g_dom = preservation_gram(encoder, list(config.preserve), stream) if omega > 0 else None
            parts = [g for g in (g_gen, None if g_dom is None else omega * g_dom) if g is not None]
            preserve = scale * sum(parts) if parts else None
        x, y = shared_update(gram_ff, gram_gf, preserve, lam, rows)
        if rows is not None:
            shared, _ = compress(LowRankDelta(x, y))
            for s in group:
                w0 = weights[s.key].to(torch.float32)
                deltas[s.key] = LowRankDelta(w0 @ shared.up, shared.down)
        else:
            # thousands of co-occurring rows: the shared update has full rank, ΔW = W₀·D with W₀ as up
            down = y.float()
            for s in group:
                deltas[s.key] = LowRankDelta(weights[s.key].to(torch.float32).clone(), down)
    return deltas
