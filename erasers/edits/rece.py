"""RECE — Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), closed_form.md §4.

Start from a UCE edit (paper-era variant, §4.3 start configs), then for ``epochs`` rounds:
  1. derive, per concept, the embedding c′ that makes the *edited* model reproduce the original model's
     K/V outputs (§4.1, ``close_regzero``):
        c′ = (λ_r I + Σ_l W_lᵀW_l)⁻¹ (Σ_l W_lᵀW_l⁰) c        for all T token rows of the bare concept
  2. erase the c′ rows towards the anchor rows (aligned by position) with the §4.2 closed form, whose
     targets *and* λ2 anchor use the current weights W_cur:
        W_new = (λ2 W_cur + η_e Σ W_cur c* c′ᵀ + λ1 Σ_P W_cur p pᵀ)(λ2 I + η_e Σ c′c′ᵀ + λ1 Σ_P p pᵀ)⁻¹
              = W_cur (I + η_e (C* − C′)ᵀ C′ G⁻¹)

Efficiency: every step is W ← W·T with one d×d matrix T shared by all layers reading the same context
(UCE start included), so W_l = W_l⁰ (I + D) for one shared D. Hence
    Σ_l W_lᵀW_l = (I+D)ᵀ S₀ (I+D),  Σ_l W_lᵀW_l⁰ = (I+D)ᵀ S₀,   S₀ = Σ_l W_l⁰ᵀW_l⁰,
and since C′ = C Rᵀ, the grams C′ᵀC′ = R (CᵀC) Rᵀ and C*ᵀC′ = (C*ᵀC) Rᵀ come from grams computed once:
each round costs a few d×d products and solves, independent of the number of concepts. D is kept as
exact factors X·Y (concatenated per round) while its rank is below d, densely otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch

from ..config import ARTISTS, ConfigError, EraserConfig
from ..lowrank import LowRankDelta, compress
from ..text import PromptEncoding, TextEncoder
from . import uce
from .closed_form import same_length, shared_factors
from .encoding import Gram, Need, encode_needs

log = logging.getLogger(__name__)

#: §4.3: λ_r and epochs per concept type (nudity 3 epochs; "unsafe" has its own preset with 2)
REGULAR_SCALE = {"nudity": 0.1, "art": 1e-3, "object": 0.1}
EPOCHS = {"nudity": 3, "art": 1, "object": 1}
#: §4.3 UCE start: nudity preserve scale 1.0, art 0.1, objects UCE-2023's own max(0.1, 1/#retain)
UCE_PRESERVE_SCALE = {"nudity": 1.0, "art": 0.1, "object": None}


@dataclass
class RECEConfig(EraserConfig):
    method: ClassVar[str] = "rece"

    #: rounds of (derive c′, erase c′); None → per concept type (§4.3: nudity 3, art 1, objects 1)
    epochs: Optional[int] = None
    #: λ_r of the c′ derivation; None → per concept type (0.1 nudity/easy objects, 1e-3 art)
    regular_scale: Optional[float] = None
    #: λ2 (``lamb``) of the §4.2 edit
    lam: float = 0.1
    #: η_e of the §4.2 edit
    erase_scale: float = 1.0
    #: λ1 (``preserve_scale``) of the §4.2 edit
    preserve_scale: float = 0.1
    #: the UCE start (paper-era variant): λ and preserve scale (None → per concept type, §4.3)
    uce_lam: float = 0.5
    uce_preserve_scale: Optional[float] = None

    PRESETS: ClassVar[dict] = {
        "nudity": {"concept_type": "nudity", "epochs": 3, "regular_scale": 0.1, "uce_preserve_scale": 1.0},
        "unsafe": {"concept_type": "nudity", "epochs": 2, "regular_scale": 0.1, "uce_preserve_scale": 1.0},
        # §4.2/§4.3: artists are erased towards "art" preserving '' and every other artist of the UCE list (all
        # token rows); from_preset fills in erasers/data/artists_sd.txt minus the erased names
        "art": {
            "concept_type": "art",
            "epochs": 1,
            "regular_scale": 1e-3,
            "uce_preserve_scale": 0.1,
            "preserve": ARTISTS,
        },
        "object-easy": {"concept_type": "object", "epochs": 1, "regular_scale": 0.1},
        "object-hard": {"concept_type": "object", "epochs": 1, "regular_scale": 1e-3},
    }

    def validate(self) -> None:
        super().validate()
        if self.epochs is not None and (int(self.epochs) != self.epochs or not 0 <= self.epochs <= 10):
            raise ConfigError(
                f"rece: epochs must be a whole number from 0 to 10 (published 1–3), found {self.epochs!r}."
            )
        self._check_positive(
            lam=self.lam, erase_scale=self.erase_scale, preserve_scale=self.preserve_scale, uce_lam=self.uce_lam
        )
        if self.regular_scale is not None:
            self._check_positive(regular_scale=self.regular_scale)
        if self.uce_preserve_scale is not None:
            self._check_positive(uce_preserve_scale=self.uce_preserve_scale)
        if self.lam == 0 and self.preserve_scale == 0:
            raise ConfigError(
                "rece: lam (λ2) and preserve_scale (λ1) are both 0, so the edit is singular; "
                "give λ2 > 0 (published 0.1)."
            )

    def default_anchor(self) -> str:
        return "art" if self.concept_type == "art" else ""

    def effective_epochs(self) -> int:
        return int(self.epochs if self.epochs is not None else EPOCHS[self.concept_type])

    def effective_regular_scale(self) -> float:
        return float(self.regular_scale if self.regular_scale is not None else REGULAR_SCALE[self.concept_type])

    def uce_start(self) -> uce.UCEConfig:
        """The UCE edit RECE starts from (§4.3): paper-era code, towards the same anchors."""
        scale = (
            self.uce_preserve_scale if self.uce_preserve_scale is not None else UCE_PRESERVE_SCALE[self.concept_type]
        )
        # no anchors → UCE-2023's own default: "art" for styles, " " (the SOT-carrying empty prompt) otherwise
        return uce.UCEConfig(
            concepts=list(self.concepts),
            anchors=list(self.anchors),
            preserve=list(self.preserve),
            concept_type=self.concept_type,
            variant="2023",
            lam=self.uce_lam,
            erase_scale=1.0,
            preserve_scale=scale,
        )


# -- the math --------------------------------------------------------------------------------------


def weight_grams(current, original):
    """(Σ_l W_lᵀW_l, Σ_l W_lᵀW_l⁰) over paired lists of current and original weights (float64)."""
    gram_cur = sum(w.to(torch.float64).T @ w.to(torch.float64) for w in current)
    gram_cross = sum(w.to(torch.float64).T @ w0.to(torch.float64) for w, w0 in zip(current, original))
    return gram_cur, gram_cross


def adversarial_map(gram_cur: torch.Tensor, gram_cross: torch.Tensor, lam_r: float) -> torch.Tensor:
    """R with c′ = R c: R = (λ_r I + Σ W_lᵀW_l)⁻¹ Σ W_lᵀW_l⁰ (§4.1), by a solve."""
    d = gram_cur.shape[0]
    mat = lam_r * torch.eye(d, dtype=torch.float64) + gram_cur.to(torch.float64)
    return torch.linalg.solve(mat, gram_cross.to(torch.float64))


def derive_adversarial_embedding(
    c: torch.Tensor, gram_cur: torch.Tensor, gram_cross: torch.Tensor, lam_r: float
) -> torch.Tensor:
    """§4.1 close_regzero: argmin_c′ Σ_l ‖W_l c′ − W_l⁰ c‖² + λ_r ‖c′‖² for every row of ``c`` (…, d)."""
    r = adversarial_map(gram_cur, gram_cross, lam_r)
    return c.to(torch.float64) @ r.T


def solve_spd(mat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """mat⁻¹ rhs for a symmetric positive definite ``mat`` (Cholesky; general solve if it is not)."""
    factor, info = torch.linalg.cholesky_ex(mat)
    return torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(mat, rhs)


def compose(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """(I + XY)(I + AB) = I + [X, A + X(YA)] [Y; B] — exact factors of a product of shared updates."""
    return torch.cat([x, a + x @ (y @ a)], dim=1), torch.cat([y, b], dim=0)


def erase_step_factors(
    c_prime: Optional[torch.Tensor],
    c_star: torch.Tensor,
    grams: tuple,
    r_map: Optional[torch.Tensor],
    lam: float,
    eta_e: float,
    eta_p: float,
):
    """§4.2 for the derived rows C′: (A, B) with W_new = W_cur (I + A B).

    G = λ2 I + η_e C′ᵀC′ + λ1 PᵀP;   AB = η_e (C* − C′)ᵀ C′ G⁻¹.
    With fewer rows than d the factors are kept exact from the rows C′ (A = η_e (C* − C′)ᵀ, B = C′G⁻¹);
    otherwise (``r_map`` given, C′ = C Rᵀ) AB is formed as one d×d matrix from C′ᵀC′ = R CᵀC Rᵀ and
    C*ᵀC′ = C*ᵀC Rᵀ, grams of the fixed rows computed once.
    """
    gram_cc, gram_sc, gram_pp = grams
    d = gram_pp.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    if r_map is None:
        mat = lam * eye + eta_e * (c_prime.T @ c_prime) + eta_p * gram_pp
        return eta_e * (c_star - c_prime).T, solve_spd(mat, c_prime.T).T  # G symmetric
    g_pp = r_map @ gram_cc @ r_map.T
    g_sp = gram_sc @ r_map.T
    mat = lam * eye + eta_e * g_pp + eta_p * gram_pp
    # AB = η_e K G⁻¹ with G symmetric ⇒ (AB)ᵀ = G⁻¹ η_e Kᵀ
    return eye, solve_spd(mat, eta_e * (g_sp - g_pp).T).T


def current_grams(s0: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """(Σ W_lᵀW_l, Σ W_lᵀW_l⁰) = (MᵀS₀M, MᵀS₀) for W_l = W_l⁰M, M = I + XY (low-rank products when r < d)."""
    d, r = x.shape
    if r < d:
        s0x = s0 @ x
        cross = s0 + y.T @ s0x.T  # MᵀS₀ = S₀ + YᵀXᵀS₀
        return cross + (cross @ x) @ y, cross
    m = torch.eye(d, dtype=torch.float64) + x @ y
    cross = m.T @ s0
    return cross @ m, cross


def row_grams(keys: torch.Tensor, others: torch.Tensor, chunk: int = 4096):
    """(KᵀK, OᵀK) in float64 over chunks of rows (thousands of token rows; float32 grams lose ~1e-6
    relative, which the RECE rounds amplify — measured ×10 over 3 rounds)."""
    d = keys.shape[1]
    out = torch.zeros(2 * d, d, dtype=torch.float64)
    for start in range(0, keys.shape[0], chunk):
        k = keys[start : start + chunk].to(torch.float64)
        out += torch.cat([k, others[start : start + chunk].to(torch.float64)], dim=1).T @ k
    return out[:d], out[d:]


def uce_start_factors(
    uce_cfg: uce.UCEConfig, enc_c: PromptEncoding, enc_g: PromptEncoding, enc_p: PromptEncoding, pooled: bool
):
    """(X, Y) with W = W⁰(I + XY) after the paper-era UCE edit RECE starts from (§3.2, §4.3).

    Same closed form as ``uce.stream_factors``; with at least d erased rows (many concepts × all their token
    rows) it is formed densely from grams instead of factored, since it has full rank anyway.
    """
    if pooled:
        keys, targets = enc_c.pooled, enc_g.pooled
    else:
        keys, targets = uce.aligned_token_rows(enc_c, enc_g)
    keys, targets = keys.double(), targets.double()
    gram_pp = preserve_gram(enc_p, pooled)
    d = keys.shape[1]
    eta_e, eta_p = uce_cfg.erase_scale, uce_cfg.effective_preserve_scale(len(enc_p))
    if keys.shape[0] < d:
        return shared_factors(keys, targets, uce_cfg.lam, eta_e, None, eta_p, preserve_gram=gram_pp)
    gram_kk, gram_tk = row_grams(keys, targets)
    mat = uce_cfg.lam * torch.eye(d, dtype=torch.float64) + eta_e * gram_kk + eta_p * gram_pp
    # ΔW = W⁰ η_e (C* − C)ᵀ C G⁻¹ (closed_form.py); G symmetric
    return torch.eye(d, dtype=torch.float64), solve_spd(mat, eta_e * (gram_tk - gram_kk).T).T


def preserve_gram(enc, pooled: bool) -> torch.Tensor:
    """PᵀP (float64) of a preserve set read at every token row (or its pooled vectors): from a ``Gram``
    accumulated while encoding, or from a ``PromptEncoding``'s rows."""
    if isinstance(enc, Gram):
        rows = enc.pooled.double() if pooled else None
        return rows.T @ rows if pooled else enc.gram
    rows = stream_rows(enc, pooled).reshape(-1, enc.hidden.shape[-1] if not pooled else enc.pooled.shape[-1])
    return rows.double().T @ rows.double()


def stream_rows(enc: PromptEncoding, pooled: bool) -> torch.Tensor:
    """(N, T, d) rows of a stream: every token row, or the pooled vector as a single 'row'."""
    return enc.pooled[:, None, :] if pooled else enc.hidden


# -- the method ------------------------------------------------------------------------------------


def stream_delta(config: RECEConfig, uce_cfg, encodings: dict, weights0: list, pooled: bool):
    """Shared (X, Y) with W_l = W_l⁰ (I + XY) after the UCE start and all RECE rounds."""
    enc_c, enc_a, enc_p, enc_uc, enc_ug, enc_up = (encodings[k] for k in ("c", "a", "p", "uc", "ug", "up"))
    x, y = uce_start_factors(uce_cfg, enc_uc, enc_ug, enc_up, pooled)
    epochs = config.effective_epochs()
    if epochs == 0:
        return x, y
    d = x.shape[0]
    # S₀ = Σ W⁰ᵀW⁰ once; float32 products summed in float64 (a sum of squares of weights: well scaled)
    stacked = torch.cat([w.to(torch.float32) for w in weights0])
    s0 = (stacked.T @ stacked).to(torch.float64)
    c, c_star = same_length(stream_rows(enc_c, pooled), stream_rows(enc_a, pooled))
    c, c_star = c.reshape(-1, d), c_star.reshape(-1, d)  # aligned by position
    if c.shape[0] < d:  # the rows themselves are used; the concept grams are not needed
        c, c_star = c.to(torch.float64), c_star.to(torch.float64)
        gram_cc = gram_sc = None
    else:
        gram_cc, gram_sc = row_grams(c, c_star)
    gram_pp = preserve_gram(enc_p, pooled)
    lam_r = config.effective_regular_scale()
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(epochs):
        gram_cur, cross = current_grams(s0, x, y)  # W_cur = W⁰ (I + XY) for every layer of this stream
        if c.shape[0] < d:  # §4.1 for the rows only: C′ = ((λ_r I + MᵀS₀M)⁻¹ MᵀS₀ Cᵀ)ᵀ
            c_prime = solve_spd(lam_r * eye + gram_cur, cross @ c.T).T
            a, b = erase_step_factors(
                c_prime,
                c_star,
                (gram_cc, gram_sc, gram_pp),
                None,
                config.lam,
                config.erase_scale,
                config.preserve_scale,
            )
        else:
            r_map = adversarial_map(gram_cur, cross, lam_r)
            a, b = erase_step_factors(
                None, c_star, (gram_cc, gram_sc, gram_pp), r_map, config.lam, config.erase_scale, config.preserve_scale
            )
        x, y = compose(x, y, a, b)
        if x.shape[1] >= d:  # as dense as it gets: keep D itself
            x, y = eye.clone(), x @ y
    return x, y


def encode_inputs(config: RECEConfig, encoder: TextEncoder, progress=None) -> dict:
    """Every encoding RECE needs: its concepts/anchors/preserve set and those of its UCE start.

    Each distinct prompt is encoded once (``encoding.encode_needs``): the UCE start erases the same concepts
    and preserves the same list ('' + the user's) as the RECE rounds, so "uc"/"up" are the very objects
    "c"/"p". Every row of every prompt is used (c′ has all T rows; the preserve set all 77 positions of each
    prompt), so nothing is shortened; the preserve sets enter only as PᵀP, accumulated while encoding.
    """
    uce_cfg = config.uce_start()
    uce_concepts, uce_guides = uce.erase_pairs(uce_cfg)
    needs = {
        "c": Need(config.concepts, "all"),
        "a": Need(config.anchors_for_concepts(config.default_anchor()), "all"),
        # §4.2 preserve set: the empty prompt plus the user's list, all token rows
        "p": Need([""] + list(config.preserve), "gram"),
        "uc": Need(uce_concepts, "all"),
        "ug": Need(uce_guides, "all"),
        "up": Need(uce.retain_prompts(uce_cfg), "gram"),
    }
    # the same prompt list asked for twice is one need (one PromptEncoding / one gram)
    unique = {}
    for name, need in needs.items():
        unique.setdefault(need, name)
    encoded = encode_needs(encoder, {name: need for need, name in unique.items()}, progress=progress)
    return {name: encoded[unique[need]] for name, need in needs.items()}


def erase(config: RECEConfig, encoder: TextEncoder, weights: Mapping[str, torch.Tensor], specs, progress=None) -> dict:
    """ΔW for every layer in ``specs`` (canonical key → W₀ in ``weights``)."""
    uce_cfg = config.uce_start()
    encodings = encode_inputs(config, encoder, progress)
    deltas = {}
    for pooled in (False, True):
        group = [s for s in specs if (s.kind == "pooled_in") == pooled]
        if not group:
            continue
        x, y = stream_delta(config, uce_cfg, encodings, [weights[s.key] for s in group], pooled)
        d = x.shape[0]
        if x.shape[1] < d:
            shared, _ = compress(LowRankDelta(x, y))
            up, down = shared.up, shared.down
        else:
            # full rank: ΔW = W⁰ D exactly, with W⁰ itself as the up factor
            log.info(
                "RECE: the shared %d×%d update has full rank; storing ΔW = W₀·D (rank %d). "
                "Set rank_cap to store a truncated version.",
                d,
                d,
                d,
            )
            up, down = None, (x @ y).float()
        for s in group:
            w0 = weights[s.key].to(torch.float32)
            deltas[s.key] = LowRankDelta(w0.clone() if up is None else w0 @ up.float(), down.float())
    return deltas
