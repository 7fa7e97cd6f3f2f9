"""SPEED — Scalable, Precise, Efficient concept Erasure (Li et al., ICLR 2026), closed_form.md §5.

Per edited matrix W (value projections by default), with C1 the concept rows, C* the anchor rows (the
last word token; nudity: every row after the SOT, aligned by position; retain prompts are read at the same
rows, as the reference reads its default retain prompt '') and n the number of concepts:

    Σ_tt = C1ᵀC1 / n,  Σ_at = C*ᵀC1 / n                                   (averaged over concepts, §5.1)
    Δ_erase = W (Σ_at − Σ_tt)(I + Σ_tt)⁻¹                                  (prior-free update, for IPF)
    IPF: keep retain rows whose influence ‖Δ_erase c‖ is above the mean (per layer)
    DPA: N_A samples c + ε v_min per kept row (ε ~ N(0,1), v_min = W's least-sensitive right singular
         direction within its row space), keeping those with influence above the mean
    K0 = mean c cᵀ over the refined set;  P = projector on the eigenvectors of K0 with eigenvalue < τ
    M = (Σ_tt P + α I)⁻¹
    Δ = W (Σ_at − Σ_tt) P [I − M K2 (K2ᵀ P M K2 + λ I)⁻¹ K2ᵀ P] M          (IEC, paper Eq. 10)

K2 = the SOT row of '' plus 3 k-means centroids of its EOS/pad rows. Δ is the minimiser of
(1/n)‖Δ C1ᵀ − W (C* − C1)ᵀ‖² + α‖Δ‖² over Δ = XP with ΔK2 = 0 (§9.3; λ = 0).

Implementation: Σ_at − Σ_tt = (C* − C1)ᵀC1/n, so Δ = [W (C* − C1)ᵀ] · Y with Y an r×d matrix (r = number
of concept rows): exact low-rank factors. P = I − QQᵀ is kept through Q (the retained directions), K0's
eigenproblem is solved in the span of the retain rows (it has no other non-zero eigenvalues), and every
(αI + low-rank)⁻¹ is applied by solves of the small Woodbury system (or one d×d solve when r ≥ d). No
explicit inverse anywhere.

Differences from the reference code, on purpose: float64; ``torch.linalg.eigh``/solves instead of
``svd``/``inverse``; the DPA mean is taken over the whole augmented batch (the code averages per chunk
of ≤ 128 shuffled rows, which makes the result depend on the shuffle); with λ = 0, invariants that
already lie in the retained span (P·k ≈ 0, so Δk = 0 holds anyway) are dropped from the IEC system
instead of making it singular.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import torch

from .config import ConfigError, EraserConfig
from .lowrank import LowRankDelta, compress
from .text import PromptEncoding, TextEncoder, encode_batched

log = logging.getLogger(__name__)

PARAMS = {"V": ("v",), "K": ("k",), "KV": ("k", "v")}
#: Gram sizes above this find v_min by block inverse iteration instead of a full eigendecomposition
#: (a 768² float64 eigh costs ~0.5 s per layer on a 2-core CPU; the iteration a few ms)
EIGH_MAX = 256


@dataclass
class SPEEDConfig(EraserConfig):
    method: ClassVar[str] = "speed"

    #: which UNet projections: "V" (published default), "K" or "KV". DiT text-input layers are always edited
    params: str = "V"
    #: N_A, DPA samples per kept retain row (0 disables DPA)
    aug_num: int = 10
    #: τ, eigenvalue threshold of the retain covariance (null space = eigenvalues below τ)
    threshold: float = 0.1
    #: α (``retain_scale``); None → 0.7 for nudity, 1.0 otherwise (§5.3)
    retain_scale: Optional[float] = None
    #: λ of the IEC system (``lamb``); None → 0.5 for nudity, 0 otherwise (§5.3)
    lamb: Optional[float] = None
    #: IPF, influence-based prior filtering
    prior_filter: bool = True
    #: k-means centroids of the null prompt's EOS/pad rows used as invariants
    n_centroids: int = 3
    seed: int = 0

    PRESETS: ClassVar[dict] = {
        "few": {"concept_type": "object", "params": "V", "aug_num": 10, "threshold": 1e-1, "retain_scale": 1.0,
                "lamb": 0.0, "prior_filter": True, "anchors": [""]},
        "styles": {"concept_type": "art", "params": "V", "aug_num": 10, "threshold": 1e-1, "retain_scale": 1.0,
                   "lamb": 0.0, "prior_filter": True, "anchors": ["art"]},
        "multi": {"concept_type": "object", "params": "V", "aug_num": 10, "threshold": 1e-4, "retain_scale": 0.05,
                  "lamb": 0.0, "prior_filter": False, "anchors": ["person"]},
        "nudity": {"concept_type": "nudity", "params": "V", "aug_num": 10, "threshold": 1e-1, "retain_scale": 0.7,
                   "lamb": 0.5, "prior_filter": True, "anchors": [""]},
    }

    def validate(self) -> None:
        super().validate()
        self.params = str(self.params).upper()
        if self.params not in PARAMS:
            raise ConfigError(f"speed: params must be 'V' (published), 'K' or 'KV', found '{self.params}'.")
        if int(self.aug_num) != self.aug_num or self.aug_num < 0:
            raise ConfigError(f"speed: aug_num must be a whole number ≥ 0 (published 10), found {self.aug_num!r}.")
        if int(self.n_centroids) != self.n_centroids or self.n_centroids < 0:
            raise ConfigError(f"speed: n_centroids must be a whole number ≥ 0 (published 3), "
                              f"found {self.n_centroids!r}.")
        self._check_positive(threshold=self.threshold)
        if self.retain_scale is not None:
            self._check_positive(retain_scale=self.retain_scale)
            if self.retain_scale == 0:
                raise ConfigError("speed: retain_scale (α) must be > 0, else M = (Σ_tt P + αI)⁻¹ is singular; "
                                  "published 1.0 (celebrities 0.05, nudity 0.7).")
        if self.lamb is not None:
            self._check_positive(lamb=self.lamb)

    def default_anchor(self) -> str:
        return "art" if self.concept_type == "art" else ""

    def effective_alpha(self) -> float:
        return float(self.retain_scale if self.retain_scale is not None
                     else (0.7 if self.concept_type == "nudity" else 1.0))

    def effective_lamb(self) -> float:
        return float(self.lamb if self.lamb is not None else (0.5 if self.concept_type == "nudity" else 0.0))

    def kinds(self) -> tuple:
        return PARAMS[self.params] + ("text_in", "pooled_in")


# -- small pure functions ----------------------------------------------------------------------------

def solve_shifted(alpha: float, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(αI + U Vᵀ)⁻¹ X by a solve: Woodbury (r×r system) when U has fewer than d columns, else d×d."""
    d, r = u.shape
    if r < d:
        small = alpha * torch.eye(r, dtype=u.dtype) + v.T @ u
        return (x - u @ torch.linalg.solve(small, v.T @ x)) / alpha
    return torch.linalg.solve(alpha * torch.eye(d, dtype=u.dtype) + u @ v.T, x)


def least_sensitive_direction(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """v_min: unit right singular vector of W with the smallest of its min(out, d) singular values (§5.2 DPA).

    ``w`` is (out, d) or a batch (L, out, d) of equal-shape layers (one batched factorisation for all).
    For out < d it is found from W Wᵀ (u_min, then v = Wᵀu/‖Wᵀu‖), so it lies in W's row space; otherwise
    from WᵀW. Grams larger than ``EIGH_MAX`` use a seeded block inverse iteration (16 vectors, 10 Cholesky
    solves) with a Rayleigh–Ritz step instead of a full eigendecomposition: the same direction up to the
    iteration's convergence (tested against the SVD), at a small fraction of the cost.
    """
    single = w.dim() == 2
    w = w[None] if single else w
    out, d = w.shape[-2:]
    # the Gram in float32 (half the cost; v_min only sets the direction of DPA's noise), solved in float64
    w32 = w.to(torch.float32)
    gram = (w32 @ w32.transpose(-1, -2) if out < d else w32.transpose(-1, -2) @ w32).to(torch.float64)
    w = w.to(torch.float64)
    wt = w.transpose(-1, -2)
    n = gram.shape[-1]
    if n <= EIGH_MAX:
        vec = torch.linalg.eigh(gram)[1][..., :, :1]
    else:
        gen = torch.Generator().manual_seed(seed)
        eye = torch.eye(n, dtype=torch.float64)
        shift = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1)[:, None, None]
        factor = torch.linalg.cholesky(gram + shift * eye)
        block = torch.randn(n, 16, generator=gen, dtype=torch.float64).expand(len(w), n, 16).contiguous()
        for _ in range(10):
            block = torch.linalg.qr(torch.cholesky_solve(block, factor))[0]
        ritz = torch.linalg.eigh(block.transpose(-1, -2) @ gram @ block)[1][..., :, :1]
        vec = block @ ritz
    if out < d:
        vec = wt @ vec
    vec = (vec / vec.norm(dim=-2, keepdim=True))[..., 0]
    return vec[0] if single else vec


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Deterministic Lloyd k-means (Euclidean) with k-means++ seeding drawn from a ``seed``-ed generator.

    (The reference uses ``kmeans_pytorch`` with a random-rows init; k-means++ avoids its bad local minima.)
    """
    x = x.to(torch.float64)
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(x.shape[0], (1,), generator=gen)]
    while centroids.shape[0] < k:
        dist2 = torch.cdist(x, centroids).min(dim=1).values ** 2
        weights = dist2 if float(dist2.sum()) > 0 else torch.ones_like(dist2)
        centroids = torch.cat([centroids, x[torch.multinomial(weights, 1, generator=gen)]])
    assign = None
    for _ in range(iters):
        new_assign = torch.cdist(x, centroids).argmin(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(k):
            members = x[assign == j]
            if len(members):  # an empty cluster keeps its centroid
                centroids[j] = members.mean(dim=0)
    return centroids


def retained_basis(samples: torch.Tensor, span: torch.Tensor, tau: float) -> torch.Tensor:
    """Q (d×k): eigenvectors of K0 = mean s sᵀ with eigenvalue ≥ τ; the null-space projector is I − QQᵀ.

    ``span`` (m×d) contains every sample in its row span; when m < d, K0 is diagonalised inside that span
    (exactly the same non-zero eigenpairs, at O(d m²) cost), otherwise directly.
    """
    samples = samples.to(torch.float64)
    n, d = samples.shape
    if n == 0:
        return samples.new_zeros(d, 0)
    if span.shape[0] < d:
        basis = torch.linalg.qr(span.to(torch.float64).T)[0]  # d×m orthonormal, contains the samples
        z = samples @ basis
        lam, vec = torch.linalg.eigh(z.T @ z / n)
        return basis @ vec[:, lam >= tau]
    lam, vec = torch.linalg.eigh(samples.T @ samples / n)
    return vec[:, lam >= tau]


def project_out(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P X with P = I − QQᵀ (columns of X)."""
    return x - q @ (q.T @ x)


def refine_retain(w: torch.Tensor, erase_map, retain: torch.Tensor, v_min: torch.Tensor, aug_num: int,
                  prior_filter: bool, gen: torch.Generator):
    """IPF + DPA (§5.2 steps 3–4): (refined rows, rows spanning them). ``erase_map(X)`` = F X, Δ_erase = W F."""
    influence = (w @ erase_map(retain.T)).norm(dim=0)
    # "above the mean"; ≥ so that a single retain row (one preserve prompt, a pooled vector) is kept
    kept = retain[influence >= influence.mean()] if prior_filter else retain
    if aug_num == 0 or len(kept) == 0:
        return kept, kept
    eps = torch.randn(len(kept), aug_num, generator=gen, dtype=torch.float64)
    aug = (kept[:, None, :] + eps[..., None] * v_min).reshape(-1, kept.shape[1])
    # Δ_erase(c + εv) = Δ_erase c + ε Δ_erase v
    base = w @ erase_map(kept.T)
    along = w @ erase_map(v_min[:, None])
    aug_influence = (base.repeat_interleave(aug_num, dim=1) + along * eps.reshape(1, -1)).norm(dim=0)
    aug = aug[aug_influence > aug_influence.mean()]
    return torch.cat([kept, aug]), torch.cat([kept, v_min[None]])


def speed_down(c1: torch.Tensor, n: int, q: torch.Tensor, k2: torch.Tensor, alpha: float,
               lamb: float) -> torch.Tensor:
    """Y (r×d) with Δ = W (C* − C1)ᵀ Y:  Y = (1/n) C1 P [I − M K2 S⁻¹ K2ᵀ P] M,  S = K2ᵀPMK2 + λI.

    M = (Σ_tt P + αI)⁻¹ with Σ_tt P = U Vᵀ, U = C1ᵀ/n, V = P C1ᵀ (Mᵀ = (αI + V Uᵀ)⁻¹).
    """
    u = c1.T / n
    v = project_out(q, c1.T)  # P C1ᵀ (P symmetric)
    em = solve_shifted(alpha, v, u, v / n).T  # (1/n) C1 P M  =  ((Mᵀ) P C1ᵀ / n)ᵀ
    if k2.shape[1] == 0:
        return em
    pk2 = project_out(q, k2)
    if lamb == 0:
        # Δ = XP, so ΔK2 = 0 only constrains the part of K2 outside the retained span: use an orthonormal
        # basis of range(P K2) (keeps S invertible; same optimum)
        uu, s, _ = torch.linalg.svd(pk2, full_matrices=False)
        k2 = uu[:, s > 1e-10 * max(float(s.max()) if s.numel() else 0.0, 1e-300)]
        if k2.shape[1] == 0:
            return em
        pk2 = project_out(q, k2)
    m_k2 = solve_shifted(alpha, u, v, k2)  # M K2
    k2_pm = solve_shifted(alpha, v, u, pk2).T  # K2ᵀ P M = (Mᵀ P K2)ᵀ
    s_mat = pk2.T @ m_k2 + lamb * torch.eye(k2.shape[1], dtype=torch.float64)
    return em - (em @ k2) @ torch.linalg.solve(s_mat, k2_pm)


# -- rows of each stream ---------------------------------------------------------------------------

def concept_rows(config: SPEEDConfig, enc_c: PromptEncoding, enc_a: PromptEncoding, pooled: bool):
    """(C1, C*, n): last word rows, or (nudity) every row after the SOT aligned by position."""
    n = len(enc_c)
    if pooled:
        return enc_c.pooled.double(), enc_a.pooled.double(), n
    if config.concept_type == "nudity":
        start = 1 if enc_c.has_bos else 0
        d = enc_c.hidden.shape[-1]
        return (enc_c.hidden[:, start:].reshape(-1, d).double(), enc_a.hidden[:, start:].reshape(-1, d).double(), n)
    idx = torch.arange(n)
    return (enc_c.hidden[idx, enc_c.last_subject_index].double(),
            enc_a.hidden[idx, enc_a.last_subject_index].double(), n)


def retain_rows(enc_r: Optional[PromptEncoding], enc_null: PromptEncoding, pooled: bool,
                all_rows: bool = False) -> torch.Tensor:
    """Retained rows at the same positions as the concept rows: last words, or (``all_rows``, the nudity
    alignment) every row after the SOT — as the reference does for its retain [''] — so that the EOS/pad
    rows of retained prompts, which a causal encoder fills with their content, are protected too."""
    if pooled:
        return (enc_r if enc_r is not None else enc_null).pooled.double()
    if enc_r is None or all_rows:  # the reference's retain [''] : its rows after the SOT
        enc = enc_null if enc_r is None else enc_r
        start = 1 if enc.has_bos else 0
        return enc.hidden[:, start:].reshape(-1, enc.hidden.shape[-1]).double()
    return enc_r.hidden[torch.arange(len(enc_r)), enc_r.last_subject_index].double()


def invariants(enc_null: PromptEncoding, pooled: bool, n_centroids: int, seed: int) -> torch.Tensor:
    """K2 (d×k): SOT row of '' (where there is one) + k-means centroids of its EOS/pad rows; pooled: p('')."""
    if pooled:
        return enc_null.pooled.double().T
    rows = enc_null.hidden[0].double()
    cols = [rows[:1]] if enc_null.has_bos else []
    rest = rows[1:] if enc_null.has_bos else rows
    if n_centroids:
        cols.append(kmeans(rest, n_centroids, seed))
    return torch.cat(cols).T if cols else rows.new_zeros(rows.shape[1], 0)


# -- the method ------------------------------------------------------------------------------------

def erase(config: SPEEDConfig, encoder: TextEncoder, weights: Mapping[str, torch.Tensor], specs,
          progress=None) -> dict:
    """ΔW for the selected layers in ``specs`` (canonical key → W₀ in ``weights``)."""
    specs = [s for s in specs if s.kind in config.kinds()]
    last_only = config.concept_type != "nudity"  # nudity aligns every row; otherwise last words only
    enc_c = encode_batched(encoder, config.concepts, progress=progress, real_tokens_only=last_only)
    enc_a = encode_batched(encoder, config.anchors_for_concepts(config.default_anchor()), real_tokens_only=last_only)
    enc_null = encode_batched(encoder, [""])  # invariants need its EOS/padding rows
    enc_r = encode_batched(encoder, config.preserve, real_tokens_only=last_only) if config.preserve else None
    if enc_r is None:
        log.info("SPEED: no preserve list given; retaining the empty prompt's rows as the reference does. "
                 "List concepts to keep (e.g. other artists or people) for a more precise null space.")
    deltas = {}
    for pooled in (False, True):
        group = [s for s in specs if (s.kind == "pooled_in") == pooled]
        if not group:
            continue
        c1, c_star, n = concept_rows(config, enc_c, enc_a, pooled)
        retain = retain_rows(enc_r, enc_null, pooled, all_rows=not last_only)
        k2 = invariants(enc_null, pooled, config.n_centroids, config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        v_mins = {}
        for shape in sorted({(s.out_features, s.in_features) for s in group}):  # one batch per shape
            same = [s.key for s in group if (s.out_features, s.in_features) == shape]
            batch = least_sensitive_direction(torch.stack([weights[k].to(torch.float64) for k in same]), config.seed)
            v_mins.update(zip(same, batch))
        for s in group:
            delta, _ = layer_delta(weights[s.key], c1, c_star, n, retain, k2, config, gen, v_mins[s.key])
            deltas[s.key] = compress(delta)[0]
    return deltas


def layer_delta(w: torch.Tensor, c1: torch.Tensor, c_star: torch.Tensor, n: int, retain: torch.Tensor,
                k2: torch.Tensor, config: SPEEDConfig, gen: torch.Generator, v_min: Optional[torch.Tensor] = None):
    """(ΔW as exact float64 factors, Q of the retained directions) for one matrix W (§5.2 steps 1–8)."""
    w = w.to(torch.float64)
    c1, c_star, retain, k2 = (t.to(torch.float64) for t in (c1, c_star, retain, k2))
    diff_t = (c_star - c1).T  # (C* − C1)ᵀ: Σ_at − Σ_tt = diff_t C1 / n

    def erase_map(x):
        # F X = (Σ_at − Σ_tt)(I + Σ_tt)⁻¹ X with I + Σ_tt = I + (C1ᵀ/n) C1; Δ_erase = W F
        return diff_t @ (c1 @ solve_shifted(1.0, c1.T / n, c1.T, x)) / n

    v_min = least_sensitive_direction(w, config.seed) if v_min is None else v_min.to(torch.float64)
    samples, span = refine_retain(w, erase_map, retain, v_min, int(config.aug_num), config.prior_filter, gen)
    q = retained_basis(samples, span, config.threshold)
    down = speed_down(c1, n, q, k2, config.effective_alpha(), config.effective_lamb())
    return LowRankDelta(w @ diff_t, down), q
