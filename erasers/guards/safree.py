"""SAFREE: training-free embedding projection away from a concept subspace (Yoon et al., ICLR 2025).

suppression.md §1. Steps, each a small function named after the paper's symbols:
1. concept subspace C = [c_1 … c_K] from the keywords' pooled embeddings; P_C = C (CᵀC)⁺ Cᵀ  (§1.1)
2. masked-prompt test: copy i of the prompt has token i replaced by a mask id; its pooled embedding p_\\i
   has distance d_i = ‖(I − P_C) p_\\i‖ from the subspace; token i is flagged iff
   d_i ≥ (1 + α)·mean_{j≠i} d_j  (§1.2, α = 0.01)
3. flagged tokens: e_i′ = (I − P_C) P_M e_i with P_M the projection onto the masked prompts' span (§1.3);
   optionally the EOS/padding positions too (CLIP is causal: they carry the concept; the reference
   leaves them alone)
4. self-validating filter: β = 1 − mean_i cos(ẽ_i, e_i), t′ = round(γ·sigmoid(2k(10β − t₀))); the
   projected embeddings are used for steps i ≤ t′ of the reference 50 (§1.5). That window assumes the
   model commits to the concept early (SD's layout is set at high σ); ``svf_window="whole"`` keeps t′ as
   the per-prompt switch but projects over the whole schedule, for models that decide late (measured on
   the shapes world by erasers_dev/bench/guard_diagnostics.py: the shape is set in the last 10–20 %)

Host adapters provide encodings (``PromptEncoding``-like tensors); nothing here encodes text. A prompt
with no flagged token comes back as the *same tensor* (bit-identical conditioning).

Families: CLIP contexts (SD1/SD2: one 768/1024 segment; SDXL: the 2048-d context split 768 | 1280, one
subspace per encoder; pooled = the EOS-position hidden state of the same space). T5 contexts (SD3/Flux):
the concept basis is the mean over real tokens, every T5 token is projected ((I − P_C) e, §5.3) and the
pooled CLIP vector gets a norm-preserving projection.

Decoder-LLM contexts (``encoder="llm"``: Qwen-Image's Qwen2.5-VL, Z-Image's and Flux.2-klein's Qwen3,
Flux.2-dev's Mistral, Lumina 2's Gemma) are the pack's port; the paper has none. Their prompt sits inside a
chat template (or after a start token) and they have no CLS/EOS state that sums the sentence up, so:
* the pooled vector of a prompt, a masked copy or a keyword is the **mean over its own token rows** — the
  rows of the words the user typed, never the template's rows or padding — at unit norm (``llm_pool``);
* only the prompt's own rows are projected, with (I − P_C) (no P_M, as in the T5 port): the flagged rows,
  and with ``include_eos`` every later row of the prompt too (causal: a word's state reaches the rows after
  it, never the ones before). The template rows and padding are left as the host encoded them (their
  causal states still carry the concept, as CLIP's EOS does in the reference).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..config import ConfigError
from .base import SuppressionConfig, load_preset, log_gate, risk_score

log = logging.getLogger(__name__)

#: SVF sigmoid constants per preset (suppression.md §1.5: f_beta): (k, t0)
SVF_CONSTANTS = {"nudity": (2.5, 5.333), "artists": (3.5, 5.5)}
#: svf_window values and what they mean (SAFREEConfig.svf_window)
SVF_WINDOWS = {
    "paper": "the projection for steps i ≤ t′ of the 50 reference steps, from the start (§1.5)",
    "whole": "t′ as a switch: the projection for the whole schedule when t′ ≥ 1, none when t′ = 0",
}
#: CLIP id 0 is "!" — the reference's mask token for the masked-prompt test
CLIP_MASK_ID = 0
#: context segments (start, end) per family; SDXL's 2048 = CLIP-L 768 ⊕ CLIP-G 1280
SEGMENTS = {"sd1": ((0, 768),), "sd2": ((0, 1024),), "sdxl": ((0, 768), (768, 2048))}


@dataclass
class SAFREEConfig(SuppressionConfig):
    method = "safree"
    concepts_required = False

    #: keyword preset used when ``concepts`` is empty: "nudity", "artists", "nudity_extended"
    preset: str = "nudity"
    alpha: float = 0.01
    #: also project EOS/padding positions when any token is flagged (the reference does not)
    include_eos: bool = True
    #: self-validating filtering: use the projection only for the first t′ of 50 reference steps
    self_validating: bool = True
    #: where the self-validated projection acts (``SVF_WINDOWS``): "paper" = steps i ≤ t′ of the 50 reference
    #: steps (at most 22 % of the schedule, from its start); "whole" = t′ as a switch — the whole schedule
    #: when t′ ≥ 1, nothing when t′ = 0 — for models that decide the concept late in the schedule
    svf_window: str = "paper"
    gamma: float = 10.0
    svf_k: Optional[float] = None
    svf_t0: Optional[float] = None
    reference_steps: int = 50
    #: the joined keywords as the negative prompt (the reference always does this; here an explicit option)
    keywords_as_negative: bool = False

    def validate(self) -> None:
        super().validate()
        if not self.concepts:
            self.concepts = load_preset(self.preset)
        self._check_number("alpha", self.alpha, 0.0, None)
        self._check_number("gamma", self.gamma, 0.0, None)
        if int(self.reference_steps) < 1:
            raise ConfigError(f"safree: reference_steps must be ≥ 1, found {self.reference_steps}.")
        if self.svf_window not in SVF_WINDOWS:
            raise ConfigError(f"safree: svf_window must be one of {list(SVF_WINDOWS)}, found '{self.svf_window}'.")
        k_default, t0_default = SVF_CONSTANTS.get(self.preset, SVF_CONSTANTS["nudity"])
        if self.svf_k is None:
            self.svf_k = k_default
        if self.svf_t0 is None:
            self.svf_t0 = t0_default


# -- the paper's quantities -------------------------------------------------------------------------


def projection_matrix(columns: torch.Tensor) -> torch.Tensor:
    """P = C (CᵀC)⁺ Cᵀ for C = columns (D, K) (§1.1); float64 with a pseudo-inverse (keywords can be
    nearly collinear)."""
    c = columns.double()
    return c @ torch.linalg.pinv(c.T @ c) @ c.T


def residual_norm(vectors: torch.Tensor, p_c: torch.Tensor) -> torch.Tensor:
    """d = ‖(I − P_C) p‖ per row of ``vectors`` (n, D)."""
    v = vectors.double()
    return (v - v @ p_c.T).norm(dim=-1)


def flag_tokens(d: torch.Tensor, alpha: float, d_full: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token i is flagged iff d_i ≥ (1 + α)·mean_{j≠i} d_j (leave-one-out mean, §1.2).

    With a single token there is no other token to compare with; we then compare with the unmasked
    prompt's own distance ``d_full`` (removing the only word must move it away from the subspace).
    """
    n = d.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    if n == 1:
        if d_full is None:
            return torch.zeros(1, dtype=torch.bool)
        return d >= (1 + alpha) * d_full
    loo_mean = (d.sum() - d) / (n - 1)
    return d >= (1 + alpha) * loo_mean


def project_tokens(
    e: torch.Tensor, p_c: torch.Tensor, p_m: Optional[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """e_i′ = (I − P_C) P_M e_i on masked rows (P_M omitted when None), e_i elsewhere (§1.3)."""
    x = e.double()
    y = x @ p_m.T if p_m is not None else x
    y = y - y @ p_c.T
    out = torch.where(mask[:, None], y, x)
    return out.to(e.dtype)


def svf_beta(e: torch.Tensor, e_proj: torch.Tensor, valid: torch.Tensor) -> float:
    """β = 1 − mean cos(ẽ_i, e_i) over real token positions (§1.5)."""
    cos = torch.nn.functional.cosine_similarity(e_proj.double(), e.double(), dim=-1, eps=1e-12)
    return float(1.0 - cos[valid].mean())


def svf_t_prime(beta: float, gamma: float = 10.0, k: float = 2.5, t0: float = 5.333) -> int:
    """t′ = round(γ · sigmoid(2k · (10β − t₀))) (§1.5, the code's f_beta)."""
    z = 2.0 * k * (10.0 * beta - t0)
    return int(round(gamma / (1.0 + math.exp(-z))))


def project_pooled(y: torch.Tensor, concept_pooled: torch.Tensor) -> torch.Tensor:
    """Norm-preserving (I − P_C) y for a pooled vector (§5.3 item 1): the direction loses the concept,
    the magnitude the modulation expects stays."""
    p_c = projection_matrix(concept_pooled.T)
    x = y.double()
    r = x - x @ p_c.T
    scale = x.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (r * scale).to(y.dtype)


# -- the masked-prompt test inputs ------------------------------------------------------------------


def masked_copies(
    token_ids: Sequence[int], has_bos: bool = True, mask_id: int = CLIP_MASK_ID, max_tokens: int = 75
) -> tuple:
    """(positions, copies): copy i has word token i replaced by ``mask_id``; BOS/EOS are never masked."""
    ids = list(token_ids)
    first = 1 if has_bos else 0
    last = len(ids) - 1  # EOS
    positions = list(range(first, min(last, first + max_tokens)))
    copies = []
    for pos in positions:
        row = list(ids)
        row[pos] = mask_id
        copies.append(row)
    return positions, copies


def llm_pool(rows: torch.Tensor) -> torch.Tensor:
    """The pooled vector of a decoder-LLM encoding (the pack's port, no CLS/EOS state): the mean over the
    text's own token rows (L, D) → (D,), scaled to unit norm. The caller passes only those rows (template and
    padding cut off). Unit norm: CLIP's pooled vector is layer-normed, so the paper's distance
    d = ‖(I − P_C) p‖ is in effect the sine of p's angle to the concept subspace; an LLM's hidden states (a
    second-to-last layer, no final norm) are not normed, and without it d would follow the masked copy's
    norm rather than its direction."""
    if rows.shape[0] == 0:
        raise ConfigError("safree: a text with no token rows of its own has no pooled vector.")
    mean = rows.double().mean(0)
    return (mean / mean.norm().clamp_min(1e-12)).float()


def pool(hidden: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooled vectors from per-token states: "eos" = state at the last real position (CLIP's pooled
    output, before projection); "mean" = mean over real positions (T5, as in the Flux port §1.7)."""
    idx = torch.arange(hidden.shape[0])
    if mode == "eos":
        return hidden[idx, lengths - 1]
    if mode == "mean":
        t = torch.arange(hidden.shape[1])[None, :]
        m = (t < lengths[:, None]).to(hidden.dtype)[..., None]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    raise ConfigError(f"pooling must be 'eos' or 'mean', found '{mode}'.")


# -- the whole analysis -----------------------------------------------------------------------------


@dataclass
class SafreeResult:
    hidden: torch.Tensor  # (T, D) conditioning to use inside the filter window (the input tensor if unchanged)
    flagged: torch.Tensor  # (n,) bool per masked position
    positions: list  # context position of each masked token
    distances: torch.Tensor  # (n,) d_i
    beta: float = 0.0
    t_prime: int = 0
    #: fraction of the schedule that uses ``hidden`` (from t′; 1.0 without self-validation)
    filter_fraction: float = 0.0
    risk: float = 0.0
    changed: bool = False
    pooled: Optional[torch.Tensor] = None  # projected pooled vector (DiT families) or None
    info: dict = field(default_factory=dict)


def analyse(
    config: SAFREEConfig,
    prompt_hidden: torch.Tensor,
    prompt_length: int,
    positions: list,
    masked_hidden: torch.Tensor,
    masked_lengths: torch.Tensor,
    concept_hidden: torch.Tensor,
    concept_lengths: torch.Tensor,
    encoder: str = "clip",
    segments: Sequence = None,
    prompt_pooled: Optional[torch.Tensor] = None,
    concept_pooled: Optional[torch.Tensor] = None,
    token_range: Optional[tuple] = None,
) -> SafreeResult:
    """Run SAFREE on one prompt.

    prompt_hidden (T, D) — the context the denoiser sees; masked_hidden (n, T, D) — the prompt with token
    ``positions[i]`` masked; concept_hidden (K, T, D) — each keyword alone. ``encoder`` "clip" pools at the
    EOS and projects flagged tokens with P_M; "t5" mean-pools and projects every token of ``token_range``
    ((start, end) token slice; SD3's T5 part starts after the 77 CLIP positions); "llm" (decoder-LLM chat
    encoders, the pack's port) needs ``token_range`` = the prompt's own rows (``prompt_length`` = their
    count, the masked copies share them), takes concept_hidden as each keyword's own rows (K, L, D) zero-padded
    to a common L with ``concept_lengths`` rows each, pools with ``llm_pool`` and projects only rows of
    ``token_range``: the flagged ones and, with ``include_eos``, the later ones. ``segments`` splits the
    feature dimension into independently projected blocks (SDXL 768 | 1280). ``prompt_pooled`` /
    ``concept_pooled`` (DiTs): the pooled CLIP vector, projected norm-preservingly when anything is flagged.
    """
    T, D = prompt_hidden.shape
    segments = list(segments or [(0, D)])
    if encoder not in ("clip", "t5", "llm"):
        raise ConfigError(f"safree: encoder must be 'clip', 't5' or 'llm', found '{encoder}'.")
    mode = "eos" if encoder == "clip" else "mean"
    if token_range is not None:
        lo, hi = token_range
        sl = slice(lo, hi)
        prompt_tok, masked_tok = prompt_hidden[sl], masked_hidden[:, sl]
        concept_tok = concept_hidden if encoder == "llm" else concept_hidden[:, sl]
    else:
        lo, hi = 0, T
        prompt_tok, masked_tok, concept_tok = prompt_hidden, masked_hidden, concept_hidden
    if encoder == "llm":
        _check_llm_rows(token_range, T, prompt_length, positions, masked_lengths)
        p_full = llm_pool(prompt_tok)
        p_masked = torch.stack([llm_pool(m) for m in masked_tok]) if len(positions) else prompt_tok.new_zeros(0, D)
        c_pooled = torch.stack([llm_pool(c[: int(n)]) for c, n in zip(concept_tok, concept_lengths)])
    else:
        length = torch.tensor([prompt_length])
        p_full = pool(prompt_tok[None].float(), length, mode)[0]
        p_masked = pool(masked_tok.float(), masked_lengths, mode)
        c_pooled = pool(concept_tok.float(), concept_lengths, mode)

    risk = risk_score(prompt_tok, concept_tok, skip_first=(encoder == "clip"))
    n = len(positions)
    empty = SafreeResult(
        prompt_hidden,
        torch.zeros(n, dtype=torch.bool),
        list(positions),
        torch.zeros(n, dtype=torch.float64),
        risk=risk,
    )
    if not log_gate("SAFREE", risk, config.risk_gate):
        return empty

    # d_i² summed over segments: one subspace per encoder, detection on the joint pooled vector
    d = torch.zeros(n, dtype=torch.float64)
    d_full = torch.zeros(1, dtype=torch.float64)
    projections = []
    for a, b in segments:
        p_c = projection_matrix(c_pooled[:, a:b].T)
        p_m = projection_matrix(p_masked[:, a:b].T) if (encoder == "clip" and n > 0) else None
        projections.append((a, b, p_c, p_m))
        d = d + residual_norm(p_masked[:, a:b], p_c) ** 2
        d_full = d_full + residual_norm(p_full[None, a:b], p_c) ** 2
    d, d_full = d.sqrt(), d_full.sqrt()
    flagged = flag_tokens(d, config.alpha, d_full)
    result = SafreeResult(prompt_hidden, flagged, list(positions), d, risk=risk)
    if not bool(flagged.any()):
        log.info("SAFREE: no token of the prompt is flagged (α=%.3f); conditioning unchanged", config.alpha)
        return result

    # which rows are projected
    L = hi - lo
    rows = torch.zeros(L, dtype=torch.bool)
    if encoder == "clip":
        for pos, f in zip(positions, flagged.tolist()):
            if f and lo <= pos < hi:
                rows[pos - lo] = True
        if config.include_eos:
            rows[max(prompt_length - 1, 0) :] = True  # EOS and all padding: causal CLIP carries the concept there
    elif encoder == "llm":
        # the prompt's own rows only: the flagged ones, and with include_eos every later one (a causal decoder
        # carries a word into the rows after it); the template rows and padding are outside [lo, hi)
        marked = [pos - lo for pos, f in zip(positions, flagged.tolist()) if f]
        rows[marked] = True
        if config.include_eos:
            rows[min(marked) :] = True
    else:
        rows[:] = True  # T5 is bidirectional: every token carries the concept (§5.3)
    valid = torch.zeros(L, dtype=torch.bool)
    valid[:prompt_length] = True

    new_tok = prompt_tok.clone()
    full_proj = prompt_tok.clone()
    for a, b, p_c, p_m in projections:
        seg = prompt_tok[:, a:b]
        new_tok[:, a:b] = project_tokens(seg, p_c, p_m, rows)
        full_proj[:, a:b] = project_tokens(seg, p_c, p_m, torch.ones(L, dtype=torch.bool))
    beta = svf_beta(prompt_tok, full_proj, valid)
    t_prime = svf_t_prime(beta, config.gamma, config.svf_k, config.svf_t0)
    if config.self_validating and config.svf_window == "whole":
        if t_prime < 1:
            # the switch is off: the projection would barely change this prompt (β low), leave it alone
            log.info("SAFREE: β=%.3f gives t′=0: the self-validation switch is off; conditioning unchanged", beta)
            result.beta, result.t_prime = beta, t_prime
            result.info = {"flagged_positions": [p for p, f in zip(positions, flagged.tolist()) if f], "svf": "off"}
            return result
        fraction = 1.0
    elif config.self_validating:
        fraction = min(1.0, (t_prime + 1) / float(config.reference_steps))
    else:
        fraction = 1.0
    if config.strength != 1.0:
        # strength interpolates between the prompt (0) and the full projection (1)
        new_tok = prompt_tok + config.strength * (new_tok - prompt_tok)
    hidden = prompt_hidden.clone()
    hidden[lo:hi] = new_tok.to(hidden.dtype)
    pooled = None
    if prompt_pooled is not None and concept_pooled is not None:
        pooled = project_pooled(prompt_pooled, concept_pooled)
    result.hidden, result.beta, result.t_prime, result.filter_fraction = hidden, beta, t_prime, fraction
    result.changed, result.pooled = True, pooled
    result.info = {
        "flagged_positions": [p for p, f in zip(positions, flagged.tolist()) if f],
        "projected_rows": int(rows.sum()),
    }
    log.info(
        "SAFREE: flagged positions %s, β=%.3f, t′=%d → projected conditioning for the first %.0f%% of the schedule",
        result.info["flagged_positions"],
        beta,
        t_prime,
        100 * fraction,
    )
    return result


def _check_llm_rows(token_range, rows: int, prompt_length: int, positions, masked_lengths) -> None:
    """The "llm" layout the adapter promised: the prompt's own rows inside the context, every masked position
    one of them, every masked copy with the same rows (a masked word must not move the template)."""
    if token_range is None:
        raise ConfigError("safree: the 'llm' encoder needs token_range, the context rows of the prompt's own tokens.")
    lo, hi = token_range
    if not (0 <= lo < hi <= rows) or prompt_length != hi - lo:
        raise ConfigError(
            f"safree: the prompt's own rows [{lo}, {hi}) with length {prompt_length} do not fit a context of {rows} "
            "rows; expected 0 ≤ start < end ≤ rows and length = end − start."
        )
    outside = [p for p in positions if not lo <= p < hi]
    if outside:
        raise ConfigError(f"safree: masked positions {outside} are outside the prompt's own rows [{lo}, {hi}).")
    if any(int(n) != hi - lo for n in masked_lengths):
        raise ConfigError(
            f"safree: every masked copy must keep the prompt's {hi - lo} rows, found "
            f"{[int(n) for n in masked_lengths]}."
        )


def joined_keywords(config: SAFREEConfig) -> str:
    """The reference's negative prompt: the keywords joined with ', ' (§1.4)."""
    return ", ".join(config.concepts)
