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
explicit inverse anywhere. Layers are processed together (``layer_deltas``): everything independent of W
once, v_min and U = W (C* − C1)ᵀ batched per layer shape, Y batched over all layers; the per-layer
``layer_delta`` is the reference it is tested against.

Precision: the solves run in float64; v_min's inverse iteration in float32 with a float64 Rayleigh–Ritz
step (‖W v‖ within 1e-3 of σ_min, tested) and U in float32 (W is float32 and U is stored in float32;
UCE projects W₀ the same way), so the result matches an all-float64 computation to ~1e-7 relative.

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

from ..config import ARTISTS, ConfigError, EraserConfig
from ..lowrank import LowRankDelta, compress
from ..text import PromptEncoding, TextEncoder
from .encoding import Need, encode_needs

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
        "few": {
            "concept_type": "object",
            "params": "V",
            "aug_num": 10,
            "threshold": 1e-1,
            "retain_scale": 1.0,
            "lamb": 0.0,
            "prior_filter": True,
            "anchors": [""],
        },
        "styles": {
            "concept_type": "art",
            "params": "V",
            "aug_num": 10,
            "threshold": 1e-1,
            "retain_scale": 1.0,
            "lamb": 0.0,
            "prior_filter": True,
            "anchors": ["art"],
            # the published style setting retains the other artists of the UCE list (closed_form.md §5.4):
            # from_preset fills in erasers/data/artists_sd.txt minus the erased names; a given preserve wins
            "preserve": ARTISTS,
        },
        "multi": {
            "concept_type": "object",
            "params": "V",
            "aug_num": 10,
            "threshold": 1e-4,
            "retain_scale": 0.05,
            "lamb": 0.0,
            "prior_filter": False,
            "anchors": ["person"],
        },
        "nudity": {
            "concept_type": "nudity",
            "params": "V",
            "aug_num": 10,
            "threshold": 1e-1,
            "retain_scale": 0.7,
            "lamb": 0.5,
            "prior_filter": True,
            "anchors": [""],
        },
    }

    def validate(self) -> None:
        super().validate()
        self.params = str(self.params).upper()
        if self.params not in PARAMS:
            raise ConfigError(f"speed: params must be 'V' (published), 'K' or 'KV', found '{self.params}'.")
        if int(self.aug_num) != self.aug_num or self.aug_num < 0:
            raise ConfigError(f"speed: aug_num must be a whole number ≥ 0 (published 10), found {self.aug_num!r}.")
        if int(self.n_centroids) != self.n_centroids or self.n_centroids < 0:
            raise ConfigError(
                f"speed: n_centroids must be a whole number ≥ 0 (published 3), found {self.n_centroids!r}."
            )
        self._check_positive(threshold=self.threshold)
        if self.retain_scale is not None:
            self._check_positive(retain_scale=self.retain_scale)
            if self.retain_scale == 0:
                raise ConfigError(
                    "speed: retain_scale (α) must be > 0, else M = (Σ_tt P + αI)⁻¹ is singular; "
                    "published 1.0 (celebrities 0.05, nudity 0.7)."
                )
        if self.lamb is not None:
            self._check_positive(lamb=self.lamb)

    def default_anchor(self) -> str:
        return "art" if self.concept_type == "art" else ""

    def effective_alpha(self) -> float:
        return float(
            self.retain_scale if self.retain_scale is not None else (0.7 if self.concept_type == "nudity" else 1.0)
        )

    def effective_lamb(self) -> float:
        return float(self.lamb if self.lamb is not None else (0.5 if self.concept_type == "nudity" else 0.0))

    def kinds(self) -> tuple:
        return PARAMS[self.params] + ("text_in", "pooled_in")


# -- small pure functions ----------------------------------------------------------------------------


def solve_shifted(
    alpha: float, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, core: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(αI + U Vᵀ)⁻¹ X by a solve: Woodbury (r×r system αI + VᵀU, which may be passed precomputed as
    ``core``) when U has fewer than d columns, else d×d. Leading batch dimensions broadcast."""
    d, r = u.shape[-2:]
    if r < d:
        small = alpha * torch.eye(r, dtype=u.dtype) + v.mT @ u if core is None else core
        return (x - u @ torch.linalg.solve(small, v.mT @ x)) / alpha
    return torch.linalg.solve(alpha * torch.eye(d, dtype=u.dtype) + u @ v.mT, x)


def erase_core(c1: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """Z = C1 (I + Σ_tt)⁻¹ X / n (r×cols), I + Σ_tt = I + (C1ᵀ/n) C1; F X = (C* − C1)ᵀ Z (see ``erase_map``)."""
    return c1 @ solve_shifted(1.0, c1.T / n, c1.T, x) / n


def erase_map(c1: torch.Tensor, diff_t: torch.Tensor, n: int, x: torch.Tensor) -> torch.Tensor:
    """F X with F = (Σ_at − Σ_tt)(I + Σ_tt)⁻¹ = (C* − C1)ᵀ C1 (I + Σ_tt)⁻¹ / n: the prior-free update
    Δ_erase = W F (§5.2 step 1, used by IPF and DPA). F does not depend on W."""
    return diff_t @ erase_core(c1, n, x)


def least_sensitive_direction(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """v_min: unit right singular vector of W with the smallest of its min(out, d) singular values (§5.2 DPA).

    ``w`` is (out, d) or a batch (L, out, d) of equal-shape layers (one batched factorisation for all).
    For out < d it is found from W Wᵀ (u_min, then v = Wᵀu/‖Wᵀu‖), so it lies in W's row space; otherwise
    from WᵀW. Grams larger than ``EIGH_MAX`` use a seeded block inverse iteration (16 vectors, 10 Cholesky
    solves) with a Rayleigh–Ritz step instead of a full eigendecomposition: the same direction up to the
    iteration's convergence (tested against the SVD), at a small fraction of the cost.

    Precision: the Gram is formed in float32 (as the weights usually are) and the iteration runs in
    float32 — v_min only sets the direction of DPA's noise, and the float64 Rayleigh–Ritz step at the end
    puts ‖W v‖ within 1e-3 of σ_min (tested; measured ~1e-4 on SD1.5 shapes). A Gram that float32 cannot
    factor falls back to float64.
    """
    single = w.dim() == 2
    w = w[None] if single else w
    out, d = w.shape[-2:]
    w32 = w.to(torch.float32)
    gram32 = w32 @ w32.transpose(-1, -2) if out < d else w32.transpose(-1, -2) @ w32
    gram = gram32.to(torch.float64)
    n = gram.shape[-1]
    if n <= EIGH_MAX:
        vec = torch.linalg.eigh(gram)[1][..., :, :1]
    else:
        vec = inverse_iteration_min(gram32, gram, seed)
    if out < d:
        vec = w.to(torch.float64).transpose(-1, -2) @ vec
    vec = (vec / vec.norm(dim=-2, keepdim=True))[..., 0]
    return vec[0] if single else vec


def inverse_iteration_min(
    gram32: torch.Tensor, gram: torch.Tensor, seed: int, size: int = 16, steps: int = 10
) -> torch.Tensor:
    """(L, n, 1) float64: the lowest eigenvector of each Gram by block inverse iteration + Rayleigh–Ritz.

    The Cholesky factor and the iterations run in float32 (half the cost of float64 on a CPU); a Gram
    whose float32 factorisation fails is iterated in float64 instead. The Ritz step uses the float64 Gram.
    """
    n = gram.shape[-1]
    shift = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1)[:, None, None]
    eye = torch.eye(n, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram32 + (shift * eye).to(torch.float32))
    if bool((info != 0).any()):
        factor = torch.linalg.cholesky(gram + shift * eye)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(n, size, generator=gen, dtype=torch.float64).to(factor.dtype)
    block = block.expand(len(gram), n, size).contiguous()
    for _ in range(steps):
        block = torch.linalg.qr(torch.cholesky_solve(block, factor))[0]
    block = block.to(torch.float64)
    ritz = torch.linalg.eigh(block.transpose(-1, -2) @ gram @ block)[1][..., :, :1]
    return block @ ritz


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
    """P X with P = I − QQᵀ (columns of X; Q may carry a batch dimension and zero columns)."""
    return x - q @ (q.mT @ x)


def refine_retain(
    w: torch.Tensor,
    erase_map,
    retain: torch.Tensor,
    v_min: torch.Tensor,
    aug_num: int,
    prior_filter: bool,
    gen: torch.Generator,
):
    """IPF + DPA (§5.2 steps 3–4): (refined rows, rows spanning them). ``erase_map(X)`` = F X, Δ_erase = W F."""
    return refine_projected(
        retain, w @ erase_map(retain.T), w @ erase_map(v_min[:, None]), v_min, aug_num, prior_filter, gen
    )


def refine_projected(
    retain: torch.Tensor,
    w_f_retain: torch.Tensor,
    w_f_v: torch.Tensor,
    v_min: torch.Tensor,
    aug_num: int,
    prior_filter: bool,
    gen: torch.Generator,
):
    """IPF + DPA from the prior-free update already applied: ``w_f_retain`` = Δ_erase Rᵀ (out×m),
    ``w_f_v`` = Δ_erase v_min (out×1). Draws ``len(kept) × aug_num`` normals from ``gen``."""
    influence = w_f_retain.norm(dim=0)
    # "above the mean"; ≥ so that a single retain row (one preserve prompt, a pooled vector) is kept
    mask = influence >= influence.mean() if prior_filter else torch.ones_like(influence, dtype=torch.bool)
    kept = retain[mask]
    if aug_num == 0 or len(kept) == 0:
        return kept, kept
    eps = torch.randn(len(kept), aug_num, generator=gen, dtype=torch.float64)
    aug = (kept[:, None, :] + eps[..., None] * v_min).reshape(-1, kept.shape[1])
    # Δ_erase(c + εv) = Δ_erase c + ε Δ_erase v
    base = w_f_retain[:, mask]
    aug_influence = (base.repeat_interleave(aug_num, dim=1) + w_f_v * eps.reshape(1, -1)).norm(dim=0)
    aug = aug[aug_influence > aug_influence.mean()]
    return torch.cat([kept, aug]), torch.cat([kept, v_min[None]])


def speed_down(c1: torch.Tensor, n: int, q: torch.Tensor, k2: torch.Tensor, alpha: float, lamb: float) -> torch.Tensor:
    """Y (r×d) with Δ = W (C* − C1)ᵀ Y:  Y = (1/n) C1 P [I − M K2 S⁻¹ K2ᵀ P] M,  S = K2ᵀPMK2 + λI.

    M = (Σ_tt P + αI)⁻¹ with Σ_tt P = U Vᵀ, U = C1ᵀ/n, V = P C1ᵀ (Mᵀ = (αI + V Uᵀ)⁻¹).
    ``q`` may be a batch (L, d, k) of layers' retained bases (zero columns allowed: they leave P unchanged);
    then Y is (L, r, d).
    """
    u = c1.T / n
    v = project_out(q, c1.T)  # P C1ᵀ (P symmetric)
    r, d = c1.shape
    # Woodbury core αI + C1 P C1ᵀ / n: symmetric, so the same r×r system serves M and Mᵀ (formed once)
    if r < d:
        core = alpha * torch.eye(r, dtype=torch.float64) + u.T @ v
        # (1/n) C1 P M = core⁻¹ C1 P / n  (push-through: A(BA + αI)⁻¹ = (AB + αI)⁻¹A, A = C1P, B = C1ᵀ/n)
        em = torch.linalg.solve(core, v.mT) / n
    else:
        core = None
        em = solve_shifted(alpha, v, u, v / n).mT  # (1/n) C1 P M  =  ((Mᵀ) P C1ᵀ / n)ᵀ
    if k2.shape[1] == 0:
        return em
    if q.dim() == 3:  # the invariants' rank test below is per layer
        return torch.stack(
            [iec_down(em[i], u, v[i], q[i], k2, alpha, lamb, None if core is None else core[i]) for i in range(len(q))]
        )
    return iec_down(em, u, v, q, k2, alpha, lamb, core)


def iec_down(
    em: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor,
    k2: torch.Tensor,
    alpha: float,
    lamb: float,
    core: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """IEC (Eq. 10): em − em K2 S⁻¹ K2ᵀ P M with em = (1/n) C1 P M, S = K2ᵀPMK2 + λI (one layer)."""
    pk2 = project_out(q, k2)
    if lamb == 0:
        # Δ = XP, so ΔK2 = 0 only constrains the part of K2 outside the retained span: use an orthonormal
        # basis of range(P K2) (keeps S invertible; same optimum)
        uu, s, _ = torch.linalg.svd(pk2, full_matrices=False)
        k2 = uu[:, s > 1e-10 * max(float(s.max()) if s.numel() else 0.0, 1e-300)]
        if k2.shape[1] == 0:
            return em
        pk2 = project_out(q, k2)
    m_k2 = solve_shifted(alpha, u, v, k2, core)  # M K2
    k2_pm = solve_shifted(alpha, v, u, pk2, core).T  # K2ᵀ P M = (Mᵀ P K2)ᵀ
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
    return (
        enc_c.hidden[idx, enc_c.last_subject_index].double(),
        enc_a.hidden[idx, enc_a.last_subject_index].double(),
        n,
    )


def retain_rows(
    enc_r: Optional[PromptEncoding], enc_null: PromptEncoding, pooled: bool, all_rows: bool = False
) -> torch.Tensor:
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


def encode_inputs(config: SPEEDConfig, encoder: TextEncoder, progress=None) -> dict:
    """Concepts "c", anchors "a", the null prompt "null" and the retained prompts "r" (when listed), each
    distinct prompt encoded once. Outside nudity every stream is read at its last word only, so those
    prompts are encoded up to their EOS (exact for causal CLIP; ``encoding.py``); the null prompt needs its
    EOS/padding rows (the invariants' k-means), nudity every row after the SOT."""
    rows = "all" if config.concept_type == "nudity" else "real"
    needs = {
        "c": Need(config.concepts, rows),
        "a": Need(config.anchors_for_concepts(config.default_anchor()), rows),
        "null": Need([""], "all"),
    }
    if config.preserve:
        needs["r"] = Need(config.preserve, rows)
    return encode_needs(encoder, needs, progress=progress)


def erase(
    config: SPEEDConfig, encoder: TextEncoder, weights: Mapping[str, torch.Tensor], specs, progress=None
) -> dict:
    """ΔW for the selected layers in ``specs`` (canonical key → W₀ in ``weights``)."""
    specs = [s for s in specs if s.kind in config.kinds()]
    encodings = encode_inputs(config, encoder, progress)
    enc_c, enc_a, enc_null, enc_r = (encodings.get(k) for k in ("c", "a", "null", "r"))
    if enc_r is None:
        log.info(
            "SPEED: no preserve list given; retaining the empty prompt's rows as the reference does. "
            "List concepts to keep (e.g. other artists or people) for a more precise null space."
        )
    deltas = {}
    for pooled in (False, True):
        group = [s for s in specs if (s.kind == "pooled_in") == pooled]
        if not group:
            continue
        c1, c_star, n = concept_rows(config, enc_c, enc_a, pooled)
        retain = retain_rows(enc_r, enc_null, pooled, all_rows=config.concept_type == "nudity")
        k2 = invariants(enc_null, pooled, config.n_centroids, config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        results = layer_deltas([weights[s.key] for s in group], c1, c_star, n, retain, k2, config, gen)
        for s, (delta, _) in zip(group, results):
            # U·Y is already exact; re-factor only when it has more rows than ΔW can have rank (nudity: 76
            # rows per concept), which a QR + SVD per layer would otherwise cost on every edit
            deltas[s.key] = compress(delta)[0] if delta.rank > min(delta.shape) else delta
    return deltas


def layer_delta(
    w: torch.Tensor,
    c1: torch.Tensor,
    c_star: torch.Tensor,
    n: int,
    retain: torch.Tensor,
    k2: torch.Tensor,
    config: SPEEDConfig,
    gen: torch.Generator,
    v_min: Optional[torch.Tensor] = None,
):
    """(ΔW as exact float64 factors, Q of the retained directions) for one matrix W (§5.2 steps 1–8).

    The per-layer reference; ``erase`` runs ``layer_deltas``, which computes the same thing batched.
    """
    w = w.to(torch.float64)
    c1, c_star, retain, k2 = (t.to(torch.float64) for t in (c1, c_star, retain, k2))
    diff_t = (c_star - c1).T  # (C* − C1)ᵀ: Σ_at − Σ_tt = diff_t C1 / n

    def f_map(x):  # Δ_erase = W F
        return erase_map(c1, diff_t, n, x)

    v_min = least_sensitive_direction(w, config.seed) if v_min is None else v_min.to(torch.float64)
    samples, span = refine_retain(w, f_map, retain, v_min, int(config.aug_num), config.prior_filter, gen)
    q = retained_basis(samples, span, config.threshold)
    down = speed_down(c1, n, q, k2, config.effective_alpha(), config.effective_lamb())
    return LowRankDelta(w @ diff_t, down), q


def layer_deltas(
    ws,
    c1: torch.Tensor,
    c_star: torch.Tensor,
    n: int,
    retain: torch.Tensor,
    k2: torch.Tensor,
    config: SPEEDConfig,
    gen: torch.Generator,
) -> list:
    """``[layer_delta(w, …) for w in ws]`` (sharing ``gen`` in that order), batched across layers.

    What does not depend on W is computed once; v_min and U = W (C* − C1)ᵀ (the delta's up factor) are
    batched over layers of equal shape, and Δ_erase X = W F X is taken as U Z (Z = ``erase_core``, r×cols)
    instead of W (F X), r instead of d inner products per entry; Y is batched over all layers, their
    retained bases Q zero-padded to one width (a zero column leaves P = I − QQᵀ unchanged). DPA's random
    draws are still taken layer by layer in order, so the result equals the per-layer path (tested) up to
    U's float32 rounding (~1e-7 relative, the precision the factors are stored in anyway).
    """
    c1, c_star, retain, k2 = (t.to(torch.float64) for t in (c1, c_star, retain, k2))
    diff_t = (c_star - c1).T
    z_retain = erase_core(c1, n, retain.T)  # Δ_erase Rᵀ = U Z_R for every layer
    count = len(ws)
    v_min, w_f_retain, w_f_v, ups = ([None] * count for _ in range(4))
    by_shape = {}
    for i, w in enumerate(ws):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for idx in by_shape.values():
        stack = torch.stack([ws[i] for i in idx])
        mins = least_sensitive_direction(stack, config.seed)  # (B, d)
        # U = W (C* − C1)ᵀ (B, out, r) in float32, as UCE projects W₀: W is float32 and U is stored so
        up = stack.to(torch.float32) @ diff_t.to(torch.float32)
        z_v = erase_core(c1, n, mins.T).T[:, :, None]  # (B, r, 1): Δ_erase v_min = U z_v
        up64 = up.to(torch.float64)
        for j, (i, wfr, wfv) in enumerate(zip(idx, up64 @ z_retain, up64 @ z_v)):
            v_min[i], w_f_retain[i], w_f_v[i], ups[i] = mins[j], wfr, wfv, up[j]
    aug_num = int(config.aug_num)
    if not config.prior_filter and aug_num == 0:  # no W-dependent refinement: one Q for all layers
        qs = [retained_basis(retain, retain, config.threshold)] * count
    else:
        qs = []
        for i in range(count):  # in order: DPA draws from ``gen`` layer by layer, as layer_delta does
            samples, span = refine_projected(
                retain, w_f_retain[i], w_f_v[i], v_min[i], aug_num, config.prior_filter, gen
            )
            qs.append(retained_basis(samples, span, config.threshold))
    width = max(q.shape[1] for q in qs)
    padded = torch.stack([torch.nn.functional.pad(q, (0, width - q.shape[1])) for q in qs])
    downs = speed_down(c1, n, padded, k2, config.effective_alpha(), config.effective_lamb())
    return [(LowRankDelta(ups[i], downs[i]), qs[i]) for i in range(count)]
