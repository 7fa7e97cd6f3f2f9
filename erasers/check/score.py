"""Zero-shot concept scores from image and text embeddings in one space (CLIP): pure math.

For each image embedding v and the texts [concept, neutral_1 … neutral_M], the share the concept gets of
softmax(τ · cos(v, t)) is its score; the image "has the concept" when that share is at least
``THRESHOLD``, i.e. the concept beats all neutral prompts together. τ = 100 is CLIP's trained logit
scale (exp of its 4.6052 log-scale).
"""

from __future__ import annotations

import torch

#: neutral prompts the concept competes against
NEUTRAL_PROMPTS = ("a photo", "an image of something", "a picture of an everyday scene")
LOGIT_SCALE = 100.0
THRESHOLD = 0.5


def zero_shot_scores(
    image_embeds: torch.Tensor, concept_embed: torch.Tensor, neutral_embeds: torch.Tensor, scale: float = LOGIT_SCALE
) -> torch.Tensor:
    """(N,) share of the concept in softmax(scale·cos) over [concept, neutrals] per image (N, e)."""
    if image_embeds.shape[-1] != concept_embed.shape[-1] or neutral_embeds.shape[-1] != concept_embed.shape[-1]:
        raise ValueError(
            f"Image embeddings are {image_embeds.shape[-1]} wide but the text embeddings "
            f"{concept_embed.shape[-1]} / {neutral_embeds.shape[-1]}: the text tower does not match the vision model."
        )
    v = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    texts = torch.cat(
        [concept_embed.float().reshape(1, -1), neutral_embeds.float().reshape(-1, concept_embed.shape[-1])]
    )
    t = torch.nn.functional.normalize(texts, dim=-1)
    return torch.softmax(scale * v @ t.T, dim=-1)[:, 0]
