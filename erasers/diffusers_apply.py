"""Membranes and erasure LoRAs on a diffusers pipeline: removable forward hooks on the UNet's modules.

Nothing is written to the weights: ``remove()`` takes the hooks off and the UNet is bit-identical to
before. Rates are set per prompt (``set_prompts``) and expanded to batch rows in a forward pre-hook on
the UNet, following diffusers' layout: each prompt repeated ``num_images_per_prompt`` times, and with
classifier-free guidance ``cat([uncond rows, cond rows])`` — both halves get the prompt's rate.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch

from .eraser_file import read_safetensors
from .formats import convert_file
from .hooks import MembraneHooks
from .keys import canonical_to_diffusers_unet, diffusers_unet_candidates
from .spm import GATE_ALWAYS, GATE_FT, Gate, Membrane, RateCache, build_stacks
from .text import PromptEncoding

log = logging.getLogger(__name__)


class HFTextEncoder:
    """TextEncoder over a transformers CLIP: a plain 77-token encode, last hidden state (spm.md §4.1)."""

    def __init__(self, tokenizer, text_encoder, family: str = "sd1"):
        self.tokenizer, self.text_encoder, self.family = tokenizer, text_encoder, family
        self.context_length = tokenizer.model_max_length
        self.context_dim = text_encoder.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts) -> PromptEncoding:
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_length,
                               truncation=True, return_tensors="pt")
        ids = batch.input_ids
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(ids.to(device))[0].float().cpu()
        eos = self.tokenizer.eos_token_id
        rows = []
        for row in ids.tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
        return PromptEncoding(hidden=hidden, lengths=torch.tensor([len(r) for r in rows]), token_ids=rows)


def unet_canonical_names(unet) -> dict:
    """diffusers parameter name → canonical (LDM) name for a diffusers UNet2DConditionModel."""
    lpb = getattr(unet.config, "layers_per_block", 2)
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    names = {}
    params = dict(unet.named_parameters())
    for name in params:
        cands = diffusers_unet_candidates(name, lpb)
        if len(cands) == 2:  # an up-sampler: its index depends on whether the block has attention
            i = name.split(".")[1]
            cands = cands[:1] if any(p.startswith(f"up_blocks.{i}.attentions.") for p in params) else cands[1:]
        if cands:
            names[name] = cands[0]
    return names


class DiffusersMembranes:
    """Gated membranes/LoRAs hooked into ``pipe.unet``; use as a context manager or call ``remove()``."""

    def __init__(self, pipe, membranes: Sequence[Membrane] = (), combination: str = "official", encoder=None,
                 loras: Sequence[Membrane] = ()):
        """``membranes`` combine by ``combination``; ``loras`` (gated erasure LoRAs) always linearly."""
        self.unet = pipe.unet
        self.membranes = list(membranes) + list(loras)
        split = len(membranes)
        to_canon = unet_canonical_names(self.unet)
        self.shapes = {to_canon[n]: tuple(p.shape) for n, p in self.unet.named_parameters() if n in to_canon}
        to_diff = {c[: -len(".weight")]: d[: -len(".weight")] for d, c in to_canon.items() if c.endswith(".weight")}
        needs_text = any(m.gate.transport for m in self.membranes)
        if needs_text and encoder is None:
            encoder = HFTextEncoder(pipe.tokenizer, pipe.text_encoder)
        self.cache = RateCache(self.membranes, encoder)
        self.groups = []
        for rule, idx in ((combination, list(range(split))), ("linear", list(range(split, len(self.membranes))))):
            if idx:
                stacks = build_stacks([self.membranes[i] for i in idx], rule, self.shapes)
                hooks = MembraneHooks(self.unet, stacks, module_name=to_diff.get)
                if hooks.missing:
                    log.warning("%d layer(s) not found in the UNet: %s", len(hooks.missing), hooks.missing[:5])
                self.groups.append((idx, hooks))
        self.prompt_rates: Optional[torch.Tensor] = None
        self.images_per_prompt = 1
        self._pre = self.unet.register_forward_pre_hook(self._expand, with_kwargs=True)

    def set_prompts(self, prompts: Sequence[str], num_images_per_prompt: int = 1) -> torch.Tensor:
        self.prompt_rates = self.cache.rates(list(prompts))
        self.images_per_prompt = num_images_per_prompt
        return self.prompt_rates

    def _expand(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        rates = self.prompt_rates if self.prompt_rates is not None else self.cache.rates([""])
        rows = rates.repeat_interleave(self.images_per_prompt, dim=0)
        if sample.shape[0] % rows.shape[0]:
            raise RuntimeError(f"UNet batch {sample.shape[0]} is not a multiple of {rows.shape[0]} prompt rows; "
                               f"call set_prompts() with the prompts of this call.")
        rows = rows.repeat(sample.shape[0] // rows.shape[0], 1)  # CFG: [uncond; cond] share the prompt's rate
        for idx, hooks in self.groups:
            hooks.rates = rows[:, idx]

    def remove(self) -> None:
        self._pre.remove()
        for _, hooks in self.groups:
            hooks.remove()
        self.groups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def load_for_unet(unet, path: str, fmt: Optional[str] = None, **options):
    """A file's LayerDeltas against a diffusers UNet (canonical keys) and the conversion report."""
    to_canon = unet_canonical_names(unet)
    model_keys = {to_canon[n]: p.detach() for n, p in unet.named_parameters() if n in to_canon}
    tensors, metadata = read_safetensors(path)
    return convert_file(tensors, metadata, model_keys, source=os.path.basename(path), fmt=fmt, **options)


def membrane_from_file(unet, path: str, strength: float = 1.0, transport: bool = True, concepts=None,
                       fmt: Optional[str] = None, kind: str = "spm") -> tuple:
    """(Membrane, report); ``kind`` "spm" reads the SPM layout, "lora" detects any erasure format."""
    deltas, report = load_for_unet(unet, path, fmt=fmt or ("spm" if kind == "spm" else None))
    names = list(concepts or report.concepts)
    gate = Gate(GATE_FT if transport else GATE_ALWAYS, names)
    text_keys = [k for k in deltas if (k[0] if isinstance(k, tuple) else k).startswith("te.")]
    if text_keys:
        log.warning("%s: %d text-encoder layer(s) are not applied by the UNet hooks.", path, len(text_keys))
    return Membrane(deltas, gate, float(strength), name=f"{kind}:{os.path.basename(path)}"), report


__all__ = ["DiffusersMembranes", "HFTextEncoder", "membrane_from_file", "load_for_unet", "unet_canonical_names",
           "canonical_to_diffusers_unet"]
