"""ComfyUI glue for gated membranes and erasure LoRAs (no comfy import at module level: unit-testable).

State lives in ``transformer_options[MEMBRANES_KEY]`` as a ``MembraneSet``: an immutable, deep-copy-free
list of entries, so chained loader nodes append without touching their input model. Two wrappers,
registered once under ``WRAPPER_KEY``, read it at sampling time:
- OUTER_SAMPLE (before the UNet is loaded): finds each positive conditioning's prompt text, encodes it
  with the CLIP given to the node and caches the membrane rates for that conditioning;
- DIFFUSION_MODEL (every model call): looks up the rate of each batch item from its positive row
  (``cond_or_uncond`` says which chunk is positive; the same rate goes to the item's uncond row) and
  installs removable forward hooks that add ΔW(m)·x per row for exactly that call.
"""

from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch

from ..erasers.files.eraser_file import read_safetensors
from ..erasers.membranes.formats import convert_file
from ..erasers.membranes.hooks import MembraneHooks
from ..erasers.membranes.spm import Membrane, RateCache, build_stacks
from ..erasers.text import PromptEncoding
from .caches import BoundedCache, tensor_key

log = logging.getLogger(__name__)

MEMBRANES_KEY = "erasers_membranes"
WRAPPER_KEY = "erasers_membranes"
TEXT_INPUTS = ("text", "text_g", "text_l", "prompt", "positive")


class ComfyTextEncoder:
    """The pack's TextEncoder protocol over a ComfyUI CLIP: a plain encode (no weights, last layer as the
    CLIP is set), token ids of the first tokenizer up to its end token."""

    def __init__(self, clip):
        self.clip = clip
        self.family = "comfy"
        self.context_length = 77

    def _ids(self, tokens) -> list:
        key = "l" if "l" in tokens else next(iter(tokens))
        ids = [int(t[0]) for chunk in tokens[key] for t in chunk]
        tok = getattr(self.clip.tokenizer, f"clip_{key}", None)
        end = getattr(tok, "end_token", 49407)
        return ids[: ids.index(end) + 1] if end in ids else ids

    def encode(self, prompts) -> PromptEncoding:
        hidden, ids = [], []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            hidden.append(self.clip.encode_from_tokens(tokens).float().cpu()[0])
            ids.append(self._ids(tokens))
        length = min(h.shape[0] for h in hidden)
        return PromptEncoding(
            hidden=torch.stack([h[:length] for h in hidden]),
            lengths=torch.tensor([len(i) for i in ids]),
            token_ids=ids,
        )

    def conditioning(self, prompt: str) -> torch.Tensor:
        """What CLIPTextEncode hands the sampler for this text (to recognise it later)."""
        return self.clip.encode_from_tokens(self.clip.tokenize(prompt)).float().cpu()[0]


def prompt_texts(prompt_graph) -> list:
    """Literal prompt strings of the workflow (hidden PROMPT input): the candidates a conditioning came from."""
    texts = []
    for node in (prompt_graph or {}).values():
        for name, value in (node.get("inputs") or {}).items():
            if name in TEXT_INPUTS and isinstance(value, str) and value not in texts:
                texts.append(value)
    return texts


class MembraneSet:
    """Immutable list of (Membrane, encoder, candidate texts) plus the combination rule.

    ComfyUI deep-copies model_options on every clone: ``__deepcopy__`` returns self (nothing in it is
    ever mutated except caches, which are safe to share between clones of the same chain).
    """

    def __init__(self, entries=(), combination: str = "official"):
        self.entries = tuple(entries)
        self.combination = combination
        self._stacks = None
        # exact content of a positive cond → (cond on CPU, rates); bounded, a session queues many prompts
        self._rates = BoundedCache(64)
        self._fallback = None
        self._last = None

    def __deepcopy__(self, memo):
        return self

    def with_entry(self, membrane: Membrane, encoder, texts, combination: Optional[str]) -> "MembraneSet":
        """Append; ``combination`` None marks a gated LoRA (always linear), otherwise a membrane whose rule
        becomes the rule of every membrane in the chain (the last loader's choice wins)."""
        kind = "lora" if combination is None else "membrane"
        return MembraneSet(
            self.entries + ((membrane, encoder, tuple(texts), kind),),
            self.combination if combination is None else combination,
        )

    @property
    def membranes(self) -> list:
        return [e[0] for e in self.entries]

    def stacks(self, shapes) -> list:
        """[(membrane indices, combination, {module: LayerStack})]: membranes together, LoRAs linearly."""
        if self._stacks is None:
            self._stacks = []
            for kind, rule in (("membrane", self.combination), ("lora", "linear")):
                idx = [i for i, e in enumerate(self.entries) if e[3] == kind]
                if idx:
                    self._stacks.append((idx, rule, build_stacks([self.entries[i][0] for i in idx], rule, shapes)))
        return self._stacks

    # -- rates ----------------------------------------------------------------------------------------
    def encoder(self):
        return next((e[1] for e in self.entries if e[1] is not None), None)

    def rate_cache(self) -> RateCache:
        if self._fallback is None:
            self._fallback = RateCache(self.membranes, self.encoder())
        return self._fallback

    def prepare(self, positive_conds) -> None:
        """Outside the UNet forward: rates for each positive conditioning tensor (text found by matching)."""
        if not any(m.gate.transport for m in self.membranes):
            return
        encoder = self.encoder()
        texts = [t for e in self.entries for t in e[2]]
        known = {}
        for cond in positive_conds:
            cpu = cond.detach().float().cpu()[0]
            text = self._match_text(cpu, texts, encoder, known)
            if text is None:
                # the gate cannot read this prompt, so it cannot know the prompt is harmless: fail closed
                log.warning(
                    "Facilitated transport: the positive conditioning does not come from a prompt text in "
                    "this workflow, so the gate cannot score it; the membranes are applied fully open."
                )
                rates = self.full_rates()
            else:
                rates = self.rate_cache().rates([text])[0]
            self._rates[tensor_key(cpu)] = (cpu, rates)

    @staticmethod
    def _match_text(cpu, texts, encoder, known) -> Optional[str]:
        for text in texts:
            if text not in known:
                known[text] = encoder.conditioning(text)
            ref = known[text]
            if ref.shape == cpu.shape and torch.allclose(ref, cpu, rtol=1e-3, atol=1e-3):
                return text
        return None

    def full_rates(self) -> torch.Tensor:
        """Every membrane at its strength (the gate wide open): the rate for a prompt the gate cannot read."""
        return torch.tensor([m.strength for m in self.membranes], dtype=torch.float32)

    def row_rates(self, context: torch.Tensor, cond_or_uncond) -> torch.Tensor:
        """(B, n) rates: each item's positive row decides; its uncond row gets the same rate."""
        chunks = max(len(cond_or_uncond or [0]), 1)
        per = context.shape[0] // chunks
        if not any(m.gate.transport for m in self.membranes):
            return torch.tensor([m.strength for m in self.membranes]).repeat(context.shape[0], 1)
        items = None
        for ci, kind in enumerate(cond_or_uncond or [0]):
            if kind == 0:
                items = torch.stack([self._lookup(context[ci * per + j]) for j in range(per)])
                break
        if items is None:
            items = (
                self._last
                if self._last is not None and self._last.shape[0] == per
                else torch.stack([self._lookup(context[j]) for j in range(per)])
            )
        self._last = items
        return items.repeat(chunks, 1)

    def _lookup(self, row: torch.Tensor) -> torch.Tensor:
        cpu = row.detach().float().cpu()
        for ref, rates in self._rates.values():
            t = ref.shape[0]
            if cpu.shape[0] >= t and torch.allclose(cpu[:t], ref, rtol=1e-3, atol=1e-3):
                return rates
        # not prepared before sampling (its text is unknown): fail closed, as in prepare()
        rates = self.full_rates()
        self._rates[tensor_key(cpu)] = (cpu, rates)
        return rates


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    mset = guider.model_options.get("transformer_options", {}).get(MEMBRANES_KEY)
    if mset is not None:
        conds = [c.get("cross_attn") for c in (guider.conds or {}).get("positive", []) or []]
        mset.prepare([c for c in conds if c is not None])
    return executor(*args, **kwargs)


_SHAPES = weakref.WeakKeyDictionary()


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    mset = transformer_options.get(MEMBRANES_KEY)
    if mset is None or not mset.entries or context is None:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    model = executor.class_obj
    shapes = _SHAPES.get(model)
    if shapes is None:
        # kept beside the host's model, never set on it
        shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        _SHAPES[model] = shapes
    rates = mset.row_rates(context, transformer_options.get("cond_or_uncond"))
    installed = []
    try:
        for idx, _rule, stacks in mset.stacks(shapes):
            hooks = MembraneHooks(model, stacks)
            installed.append(hooks)
            hooks.rates = rates[:, idx]
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        for hooks in installed:
            hooks.remove()


def attach(model_patcher, membrane: Membrane, encoder, texts, combination: Optional[str]):
    """Clone-side registration: append to the chain's MembraneSet and (re)install the two wrappers."""
    import comfy.patcher_extension as ext

    options = model_patcher.model_options.setdefault("transformer_options", {})
    current = options.get(MEMBRANES_KEY) or MembraneSet()
    options[MEMBRANES_KEY] = current.with_entry(membrane, encoder, texts, combination)
    for kind, fn in (
        (ext.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
        (ext.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper),
    ):
        model_patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        model_patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return model_patcher


def clip_model_keys(clip) -> dict:
    """``te.<encoder>.<HF path>`` → weight of a ComfyUI CLIP, whose state dict spells each text encoder
    ``<encoder>.transformer.<HF path>`` (clip_l / clip_g / clip_h, as ComfyUI's own LoRA key map reads it)."""
    keys = {}
    for key, value in clip.cond_stage_model.state_dict().items():
        encoder, sep, path = key.partition(".transformer.")
        if sep and encoder.startswith("clip_") and "." not in encoder:
            keys[f"te.{encoder}.{path}"] = value
    return keys


_FILE_CACHE = {}


def load_file(path: str):
    """(tensors, metadata), cached by path and mtime (membranes are small; loaders run often)."""
    import os

    # the file's identity and exact modification time: a replaced or rewritten file is read again
    info = os.stat(path)
    stamp = (os.path.realpath(path), info.st_size, info.st_mtime_ns, info.st_ino)
    if stamp not in _FILE_CACHE:
        _FILE_CACHE.clear()
        _FILE_CACHE[stamp] = read_safetensors(path)
    return _FILE_CACHE[stamp]


def convert_for_model(model_patcher, path: str, fmt=None, clip=None):
    """The file's deltas against this ComfyUI model's diffusion_model keys, plus the text encoders' keys
    (``te.<encoder>.…``) when a CLIP is given; text keys without a CLIP are reported unmatched."""
    import os

    tensors, metadata = load_file(path)
    diffusion = model_patcher.model.diffusion_model
    if fmt in ("uce_weights", "esd") or fmt is None:
        model_keys = dict(diffusion.state_dict())
    else:
        model_keys = {k: tuple(v.shape) for k, v in diffusion.state_dict().items()}
    if clip is not None:
        model_keys.update(clip_model_keys(clip))
    return convert_file(tensors, metadata, model_keys, source=os.path.basename(path), fmt=fmt)
