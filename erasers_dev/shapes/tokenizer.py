"""A word-level tokenizer for the shapes world, shaped like CLIP's: BOS … EOS, then padding.

Text is lower-cased, punctuation other than the comma is dropped, the comma is its own token. Unknown
words map to ``unk_id`` (they still occupy a position, so lengths stay honest).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]

_WORD = re.compile(r"[a-z0-9]+|,")


class ShapesTokenizer:
    """Word-level tokenizer with a fixed context length (positions incl. BOS/EOS)."""

    def __init__(self, words: Sequence[str], context_length: int = 16):
        if context_length < 2:
            raise ValueError(f"context_length must hold at least BOS and EOS (2), got {context_length}.")
        self.words = list(words)
        self.context_length = int(context_length)
        self.vocab: Dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + [",", *self.words])}
        if len(self.vocab) != len(SPECIALS) + 1 + len(self.words):
            raise ValueError("Tokenizer word list has duplicates or reserved tokens.")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.vocab[t] for t in SPECIALS)

    @classmethod
    def default(cls, context_length: int = 16) -> "ShapesTokenizer":
        from .world import vocabulary

        return cls(vocabulary(), context_length)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, text: str) -> List[str]:
        """Lower-case and split into word tokens; other punctuation is stripped."""
        return _WORD.findall((text or "").lower())

    def ids(self, text: str) -> List[int]:
        """Unpadded, untruncated ids including BOS and EOS."""
        return [self.bos_id] + [self.vocab.get(w, self.unk_id) for w in self.split(text)] + [self.eos_id]

    def encode(self, texts: Sequence[str], context_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, T) int64 padded with ``pad_id``, lengths (N,) real positions incl. BOS/EOS).

        Too-long prompts are truncated keeping EOS last (CLIP does the same); use ``ids`` to detect it.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of prompts, got a single string; wrap it in a list.")
        T = int(context_length or self.context_length)
        out = torch.full((len(texts), T), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.ids(text)
            if len(ids) > T:
                ids = ids[: T - 1] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids)
            lengths[i] = len(ids)
        return out, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, specials dropped."""
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.id_to_token.get(int(i), UNK) for i in ids if int(i) not in specials)

    def to_config(self) -> dict:
        return {"words": self.words, "context_length": self.context_length}

    @classmethod
    def from_config(cls, cfg: dict) -> "ShapesTokenizer":
        return cls(cfg["words"], cfg["context_length"])
