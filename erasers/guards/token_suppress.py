"""Token-level attention suppression: image queries pay less attention to the prompt tokens of a concept.

suppression.md §4.1–4.2. A concept token j (found by exact token match of a keyword, or by embedding
similarity to the keywords' tokens) gets a logit bias log c_j in every image→text attention:

    A′_ij = c_j·exp(S_ij) / Σ_k c_k·exp(S_ik)

i.e. the post-softmax rescale by c_j followed by renormalisation. The odds of attending to a suppressed
token versus the kept ones drop by exactly c (c = 0 drops the column). CLIP is causal, so the EOS and
padding positions carry the concept as well; ``include_eos`` suppresses them too. T5 (SD3/Flux) is
bidirectional: every token is contaminated, so token suppression there is weaker (combine with concept
guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .base import SuppressionConfig

#: large finite negative used for dropped columns in low-precision masks (−inf in float32 is fine too,
#: but a row with every column dropped would then give NaN)
DROP_BIAS = -1e4


@dataclass
class TokenSuppressConfig(SuppressionConfig):
    method = "token_suppress"

    #: attention multiplier c for concept tokens at strength 1 (0 = drop the columns)
    factor: float = 0.0
    #: also suppress EOS and padding positions when a concept token is found (CLIP carries it there)
    include_eos: bool = True
    #: cosine similarity of a prompt token to a keyword token that marks it as a concept token
    similarity: float = 0.9

    def validate(self) -> None:
        super().validate()
        self._check_number("factor", self.factor, 0.0, 1.0)
        self._check_number("similarity", self.similarity, 0.0, 1.0)

    @property
    def effective_factor(self) -> float:
        """c_eff = 1 − strength·(1 − c): strength 0 → 1 (nothing changes), strength 1 → c."""
        return max(0.0, 1.0 - min(self.strength, 1.0) * (1.0 - self.factor))


def match_token_ids(prompt_ids: Sequence[int], concept_ids: Sequence[Sequence[int]]) -> list:
    """Positions of every occurrence of each concept's id sequence (BOS/EOS already stripped) in the prompt."""
    ids = list(prompt_ids)
    hits = set()
    for seq in concept_ids:
        seq = list(seq)
        if not seq:
            continue
        for start in range(0, len(ids) - len(seq) + 1):
            if ids[start : start + len(seq)] == seq:
                hits.update(range(start, start + len(seq)))
    return sorted(hits)


def similar_tokens(
    prompt_hidden: torch.Tensor, concept_tokens: torch.Tensor, threshold: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(T,) bool: prompt positions whose state has cosine ≥ threshold with any keyword token state."""
    p = torch.nn.functional.normalize(prompt_hidden.float(), dim=-1)
    c = torch.nn.functional.normalize(concept_tokens.float(), dim=-1)
    hit = (p @ c.T).amax(dim=-1) >= threshold
    if valid is not None:
        hit = hit & valid
    return hit


def concept_mask(
    length: int,
    positions: Sequence[int],
    prompt_length: Optional[int] = None,
    include_eos: bool = False,
    similar: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(length,) bool mask of the suppressed positions: matches ∪ similar ∪ (EOS/padding if any hit)."""
    mask = torch.zeros(length, dtype=torch.bool)
    for p in positions:
        if 0 <= p < length:
            mask[p] = True
    if similar is not None:
        mask[: similar.shape[0]] |= similar[:length]
    if include_eos and prompt_length is not None and bool(mask.any()):
        mask[max(prompt_length - 1, 0) :] = True
    return mask


def logit_bias(mask: torch.Tensor, factor: float, dtype=torch.float32) -> torch.Tensor:
    """(T,) additive bias: log c on masked columns (``DROP_BIAS`` for c = 0), 0 elsewhere."""
    value = math.log(factor) if factor > 0 else DROP_BIAS
    return torch.where(mask, torch.tensor(value, dtype=dtype), torch.tensor(0.0, dtype=dtype))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Multi-head attention on (B, L, H·D) tensors with an optional additive bias broadcastable to
    (B, H, Lq, Lk); returns (B, Lq, H·D)."""
    b, lq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
        if mask.ndim == 1:  # (Lk,): one bias per key column
            mask = mask[None, None, None, :]
        elif mask.ndim == 2:  # (B, Lk)
            mask = mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, inner)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Explicit softmax(QKᵀ/√d + bias) (B, H, Lq, Lk), for tests and attention maps."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1)


def bias_mask(bias: torch.Tensor, dtype) -> torch.Tensor:
    """(B, T) per-row column bias → (B, 1, 1, T) additive attention mask (broadcast over heads and
    queries), the layout every ComfyUI attention function and SDPA accept."""
    return bias.to(dtype)[:, None, None, :]


def suppressed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor, attention_fn=None
) -> torch.Tensor:
    """Attention with a per-row column bias (B, T), through ``attention_fn(q, k, v, heads, mask=…)``.

    Adding log c_j to the logits of key j *is* the post-softmax rescale by c_j plus renormalisation
    (module docstring), so the host's own optimized attention does the work with an additive mask: no
    hand-written attention, one kernel call for the whole batch. Rows whose bias is 0 (the negative branch)
    get the same logits as without the mask. ``attention_fn`` defaults to plain SDPA (``attention``).
    """
    fn = attention_fn or (lambda q_, k_, v_, h, mask=None: attention(q_, k_, v_, h, mask))
    return fn(q, k, v, heads, mask=bias_mask(bias, q.dtype))
