"""Facilitated Transport (Lyu et al., CVPR 2024, SPM): how open a membrane is for a given prompt.

Exactly as the reference inference code (spm.md §4.1):
    s(c, p) = max( cos(flat E(p), flat E(c)),  |tok(p) ∩ tok(c)| / |tok(c)| )       (step 4)
    m(p)    = max over the membrane's concepts c of s(c, p)                          (step 5)
E is the full padded text-encoder output (all T×d values, BOS and padding included); tok is the *set* of
token ids without BOS/EOS/pad. No threshold, temperature or softmax. Pure functions on PromptEncoding.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..text import PromptEncoding

METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni")


def special_token_ids(*encodings: PromptEncoding) -> set:
    """BOS (when the encoder has one) and EOS of every sequence: the ids FT ignores.

    ``token_ids`` are unpadded, so padding never appears; CLIP pads with EOS anyway.
    """
    special = set()
    for enc in encodings:
        for row in enc.token_ids:
            if row:
                special.add(int(row[-1]))
                if enc.has_bos:
                    special.add(int(row[0]))
    return special


def token_overlap(prompt_ids: Iterable[int], concept_ids: Iterable[int], special: set) -> float:
    """|tok(p) ∩ tok(c)| / |tok(c)| over id *sets*; 0 for a concept with no real token (the reference
    divides by zero there)."""
    concept = {int(t) for t in concept_ids} - special
    if not concept:
        return 0.0
    prompt = {int(t) for t in prompt_ids} - special
    return len(prompt & concept) / len(concept)


def flat_cosine_matrix(prompts: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """cos(flat E(p), flat E(c)) for every pair: (N, T, d) × (K, T, d) → (N, K), in float64.

    Differing sequence lengths (a host that concatenates 77-token chunks) are compared over the
    shorter length.
    """
    t = min(prompts.shape[1], concepts.shape[1])
    p = prompts[:, :t].reshape(prompts.shape[0], -1).double()
    c = concepts[:, :t].reshape(concepts.shape[0], -1).double()
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-30)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return p @ c.T


def concept_scores(
    prompts: PromptEncoding, concepts: PromptEncoding, metric: str = "clipcos_tokenuni", special: Optional[set] = None
) -> torch.Tensor:
    """s(c, p) for every prompt × concept: (N, K) float64."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, found '{metric}'.")
    special = special_token_ids(prompts, concepts) if special is None else special
    cos = flat_cosine_matrix(prompts.hidden, concepts.hidden)
    overlap = torch.tensor(
        [[token_overlap(p, c, special) for c in concepts.token_ids] for p in prompts.token_ids], dtype=torch.float64
    ).reshape(cos.shape)
    if metric == "clipcos":
        return cos
    if metric == "tokenuni":
        return overlap
    return torch.maximum(cos, overlap)


def permeability(
    prompts: PromptEncoding,
    concepts: PromptEncoding,
    groups: Optional[list] = None,
    metric: str = "clipcos_tokenuni",
    special: Optional[set] = None,
) -> torch.Tensor:
    """m per prompt and membrane: max of s(c, p) over each membrane's concepts.

    ``groups`` gives how many of ``concepts`` (in order) belong to each membrane; None = one membrane.
    Returns (N, M) float64.
    """
    scores = concept_scores(prompts, concepts, metric, special)
    groups = groups or [scores.shape[1]]
    if sum(groups) != scores.shape[1] or min(groups) < 1:
        raise ValueError(f"groups {groups} must be positive counts summing to {scores.shape[1]} concepts.")
    return torch.stack([part.max(dim=1).values for part in scores.split(groups, dim=1)], dim=1)
