"""The webui's text encoder as an ``erasers.text.TextEncoder``.

Hidden states come from ``sd_model.get_learned_conditioning(prompts)`` — the exact path generation takes,
so CLIP skip, emphasis, textual-inversion embeddings and (on SDXL) the CLIP-L ⊕ bigG concatenation match
what the UNet's cross-attention sees (a1111_host.md §A4.4). Token ids come from the webui's own prompt
tokenizer wrapper (``tokenize`` + ``id_start`` / ``id_end``). One call encodes the whole batch.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .core import core_module

FAMILY_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def model_family(sd_model) -> str:
    """Family name from the webui model's flags (A1111 and Forge keep ``is_sdxl`` / ``is_sd2`` / ``is_sd1``)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    return "sd1"


def find_tokenizer(sd_model):
    """The object whose ``tokenize(texts)`` gives token ids without BOS/EOS (first CLIP tower on SDXL)."""
    candidates = [getattr(sd_model, "cond_stage_model", None)]
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None and getattr(conditioner, "embedders", None):
        candidates.append(conditioner.embedders[0])
    for name in ("text_processing_engine", "text_processing_engine_l"):  # Forge 2
        candidates.append(getattr(sd_model, name, None))
    forge_objects = getattr(sd_model, "forge_objects", None)
    clip = getattr(forge_objects, "clip", None) if forge_objects is not None else None
    if clip is not None:
        candidates.append(getattr(clip, "cond_stage_model", None))
    for candidate in candidates:
        if candidate is not None and callable(getattr(candidate, "tokenize", None)):
            return candidate
    return None


class WebuiTextEncoder:
    """``TextEncoder`` over a webui model (A1111, Forge 1, Forge 2)."""

    context_length = 77

    def __init__(self, sd_model, autocast=None):
        self.sd_model = sd_model
        self.family = model_family(sd_model)
        self.context_dim = FAMILY_DIMS.get(self.family)
        self._autocast = autocast or contextlib.nullcontext
        self._tokenizer = find_tokenizer(sd_model)

    def _token_ids(self, prompts: list) -> list:
        tok = self._tokenizer
        if tok is None:
            raise RuntimeError(
                "Concept Erasers: found no prompt tokenizer on this model (cond_stage_model, "
                "conditioner.embedders[0] or text_processing_engine)."
            )
        ids = tok.tokenize(list(prompts))
        start = getattr(tok, "id_start", 49406)  # CLIP's <|startoftext|>
        end = getattr(tok, "id_end", 49407)
        return [[int(start)] + [int(i) for i in row] + [int(end)] for row in ids]

    def encode(self, prompts: Sequence[str]):
        text = core_module("text")
        prompts = list(prompts)
        with torch.no_grad(), self._autocast():
            cond = self.sd_model.get_learned_conditioning(prompts)
        hidden = cond["crossattn"] if isinstance(cond, dict) else cond
        hidden = hidden.detach().to("cpu", torch.float32)
        token_ids = self._token_ids(prompts)
        lengths = torch.tensor([min(len(ids), hidden.shape[1]) for ids in token_ids], dtype=torch.long)
        # the pooled CLIP vector is not needed by the UNet methods (SDXL's ``vector`` also holds size conds)
        return text.PromptEncoding(hidden=hidden, lengths=lengths, token_ids=token_ids, pooled=None, has_bos=True)
