"""World 2's word-level tokenizer: the shapes tokenizer (CLIP-shaped BOS … EOS, then padding) on world 2's
~190 words, with a 40-position context so the longest held-out description fits untruncated."""

from __future__ import annotations

from erasers_dev.shapes.tokenizer import ShapesTokenizer

CONTEXT_LENGTH = 40


class World2Tokenizer(ShapesTokenizer):
    """Word-level tokenizer over ``world.vocabulary()``; unknown words map to ``unk_id``."""

    @classmethod
    def default(cls, context_length: int = CONTEXT_LENGTH) -> "World2Tokenizer":
        from .world import vocabulary

        return cls(vocabulary(), context_length)
