"""A ``TextEncoder`` over one or two CLIP text towers (transformers modules), the way diffusers uses them.

Used by the diffusers adapter, single-file checkpoints and the benchmark. One batched forward pass per
call; identical prompts (e.g. the same anchor repeated for every concept) are encoded once.

Per family (matching what the denoiser is conditioned on):
  SD1.x / SD2.x — ``last_hidden_state`` of the one tower (diffusers' SD2 tower already ends one layer
                  early, i.e. it *is* the penultimate layer with the final layer norm);
  SDXL          — hidden_states[-2] of CLIP-L (768) and OpenCLIP-G (1280), concatenated to 2048, and
                  the G tower's projected pooled output.
Lengths come from the first tokenizer (real tokens incl. BOS/EOS); token ids are unpadded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from erasers.text import PromptEncoding

log = logging.getLogger(__name__)


@dataclass
class Tower:
    """One tokenizer + text model and which of its outputs the denoiser reads."""

    tokenizer: object  # HF-style: tokenizer(list)["input_ids"], .pad_token_id / .eos_token_id
    model: torch.nn.Module
    #: "last" → last_hidden_state, "penultimate" → hidden_states[-2] (no final layer norm)
    layer: str = "last"
    #: take the pooled vector from this tower (``text_embeds`` or ``pooler_output``)
    pooled: bool = False


def token_ids(tokenizer, prompts: Sequence[str]) -> list:
    """Unpadded ids with BOS/EOS; never truncated, so an over-long concept can be detected."""
    verbosity = logging.getLogger("transformers.tokenization_utils_base")
    level = verbosity.level
    verbosity.setLevel(logging.ERROR)  # the "sequence longer than max length" warning is ours to give
    try:
        return [list(map(int, ids)) for ids in tokenizer(list(prompts))["input_ids"]]
    finally:
        verbosity.setLevel(level)


def pad_ids(ids: list, length: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """(N, length) ids: truncated rows keep their EOS last, like CLIP tokenizers with truncation."""
    out = torch.full((len(ids), length), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        if len(row) > length:
            row = row[: length - 1] + [eos_id]
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class ClipTextEncoder:
    """``TextEncoder`` over CLIP towers; hidden states are float32 on CPU."""

    def __init__(self, family: str, towers: Sequence[Tower], context_length: int = 77):
        self.family = family
        self.towers = list(towers)
        self.context_length = context_length
        self.context_dim = sum(self._width(t) for t in self.towers)

    @staticmethod
    def _width(tower: Tower) -> int:
        return int(tower.model.config.hidden_size)

    @torch.no_grad()
    def _run(self, tower: Tower, ids: torch.Tensor):
        param = next(tower.model.parameters())
        out = tower.model(ids.to(param.device), output_hidden_states=tower.layer != "last")
        hidden = out.last_hidden_state if tower.layer == "last" else out.hidden_states[-2]
        pooled = None
        if tower.pooled:
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out.pooler_output
            pooled = pooled.float().cpu()
        return hidden.float().cpu(), pooled

    def encode_real_tokens(self, prompts: Sequence[str]) -> PromptEncoding:
        """Like ``encode`` but padded only to the longest prompt: CLIP is causal with absolute
        positions, so every row up to a prompt's EOS is exactly what the full 77-row pass gives."""
        return self.encode(prompts, trim=True)

    def encode(self, prompts: Sequence[str], trim: bool = False) -> PromptEncoding:
        prompts = list(prompts)
        unique = list(dict.fromkeys(prompts))  # encode each distinct prompt once, in order
        index = torch.tensor([unique.index(p) for p in prompts])
        hidden, pooled, first_ids = [], None, None
        for n, tower in enumerate(self.towers):
            ids = token_ids(tower.tokenizer, unique)
            if n == 0:
                first_ids = ids
            eos = tower.tokenizer.eos_token_id
            pad = tower.tokenizer.pad_token_id if tower.tokenizer.pad_token_id is not None else eos
            length = min(max(len(r) for r in ids), self.context_length) if trim else self.context_length
            h, p = self._run(tower, pad_ids(ids, length, pad, eos))
            hidden.append(h)
            if p is not None:
                pooled = p
        lengths = torch.tensor([min(len(r), self.context_length) for r in first_ids])
        return PromptEncoding(
            hidden=torch.cat(hidden, dim=-1)[index],
            lengths=lengths[index],
            token_ids=[first_ids[i] for i in index.tolist()],
            pooled=pooled[index] if pooled is not None else None,
            has_bos=True,
        )


class WordHashTokenizer:
    """Stand-in for a CLIP tokenizer when none is installed (benchmarks only): one id per word.

    Deterministic (md5 of the lower-cased word); BOS/EOS ids as CLIP's. The embeddings it leads to are
    meaningless, but the shapes and the amount of work per prompt are those of the real thing.
    """

    bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 49407

    def __init__(self, vocab_size: int = 49408):
        self.vocab_size = vocab_size

    def word_id(self, word: str) -> int:
        import hashlib

        return int(hashlib.md5(word.lower().encode()).hexdigest(), 16) % (self.vocab_size - 2)

    def __call__(self, prompts: Sequence[str]):
        rows = [
            [self.bos_token_id] + [self.word_id(w) for w in p.replace(",", " ").split()] + [self.eos_token_id]
            for p in prompts
        ]
        return {"input_ids": rows}


def clip_tokenizer(directory: str, pad_token: Optional[str] = None, context_length: int = 77):
    """A transformers ``CLIPTokenizer`` from a folder holding ``vocab.json`` and ``merges.txt``."""
    import os

    from transformers import CLIPTokenizer

    kwargs = {"model_max_length": context_length}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), **kwargs)


def fix_meta_buffers(model: torch.nn.Module) -> None:
    """Recreate the non-persistent ``position_ids`` buffers of a CLIP model built on the meta device
    (loading a state dict with ``assign=True`` fills parameters, not these)."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
