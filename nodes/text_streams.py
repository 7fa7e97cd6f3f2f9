"""Each text stream of a multi-encoder ComfyUI CLIP as a one-key CLIP (HiDream-I1's closed form).

HiDream's CLIP encodes a prompt with CLIP-L, CLIP-G, T5-XXL and Llama 3.1 at once; its caption projections
read T5's rows or one Llama layer's rows each (erasers/families/hidream.py). ``StreamCLIP`` shows the
closed-form encoder (``adapters.ComfyCLIPEncoder``) one of those streams as if it were the CLIP's only
output — the tokens of that sub-tokenizer, the rows of that stream — so its template/dropped-row logic
applies unchanged; the host CLIP still encodes each prompt once (``HostEncodes``), whole, as
CLIPTextEncode would. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from ..erasers.errors import FamilyMismatch
from ..erasers.families import hidream
from .caches import BoundedCache

HIDREAM_KEYS = ("g", "l", "llama", "t5xxl")


class HostEncodes:
    """The host CLIP's full output per prompt (``encode_from_tokens(…, return_dict=True)``), for the most recent
    ``keep`` prompts. Each stream's solve encodes its prompts in turn, so a concept list with a short preserve
    list is encoded once for all streams; a longer list is re-encoded per stream rather than held: one prompt's
    32 Llama layers are 64 MB at full width, so a published preserve list (1,733 artists) would need ~110 GB."""

    def __init__(self, clip, keep: int = 64):
        self.clip, self._full, self._out = clip, BoundedCache(4 * keep), BoundedCache(keep)

    def tokens(self, prompt: str) -> dict:
        if prompt not in self._full:
            try:
                self._full[prompt] = self.clip.tokenize(prompt, disable_weights=True)
            except TypeError:  # a tokenizer without the weights switch
                self._full[prompt] = self.clip.tokenize(prompt)
        return self._full[prompt]

    def output(self, prompt: str) -> dict:
        if prompt not in self._out:
            self._out[prompt] = self.clip.encode_from_tokens(self.tokens(prompt), return_pooled=True, return_dict=True)
        return self._out[prompt]


class StreamCLIP:
    """A CLIP whose tokens are ``key``'s section and whose encoding is ``select(host output)``."""

    def __init__(self, host: HostEncodes, key: str, select: Callable[[dict], torch.Tensor], label: str):
        self.host, self.key, self.select, self.label = host, key, select, label
        self.tokenizer = host.clip.tokenizer
        self.cond_stage_model = host.clip.cond_stage_model
        self._prompt_of = {}

    def tokenize(self, text, **kwargs):
        section = {self.key: self.host.tokens(text)[self.key]}
        self._prompt_of[id(section)] = (text, section)  # encode_from_tokens gets this very dict back
        return section

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        text, _ = self._prompt_of[id(tokens)]
        out = self.host.output(text)
        cond = self.select(out)
        return (cond, out.get("pooled_output")) if return_pooled else cond


class WithPooled:
    """An encoder whose encodings also carry the host's pooled vector per prompt (the stream that feeds the
    pooled embedder: HiDream's T5 stream runs with p_embedder, as Flux's txt_in runs with vector_in)."""

    needs_pooled = True

    def __init__(self, inner, host: HostEncodes):
        self._inner, self._host = inner, host

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, prompts):
        prompts = list(prompts)
        enc = self._inner.encode(prompts)
        pooled = torch.cat([self._host.output(p)["pooled_output"].float().cpu().reshape(1, -1) for p in prompts])
        return dataclasses.replace(enc, pooled=pooled)


def hidream_encoders(clip, streams: Iterable[str], make_encoder) -> dict:
    """stream name → closed-form encoder (``make_encoder(one_key_clip)``, the adapter's ComfyCLIPEncoder).
    A CLIP that is not HiDream's (CLIP-L, CLIP-G, T5-XXL, Llama) is refused before anything is encoded."""
    host = HostEncodes(clip)
    keys = tuple(sorted(host.tokens("")))  # kept: the encoders' template probe tokenizes "" again
    if keys != HIDREAM_KEYS:
        raise FamilyMismatch(
            f"The model is HiDream-I1, which reads CLIP-L, CLIP-G, T5-XXL and Llama 3.1 (tokenizer keys "
            f"{list(HIDREAM_KEYS)}), but the CLIP input tokenizes into {list(keys)}. Connect HiDream's text "
            "encoders (QuadrupleCLIPLoader, type hidream)."
        )
    out = {}
    for stream in sorted(set(streams)):
        if stream == hidream.T5_STREAM:
            one = StreamCLIP(host, "t5xxl", lambda o: o["cond"], "T5-XXL")
            out[stream] = WithPooled(make_encoder(one), host)
        else:
            layer = int(stream.split(".")[1])
            one = StreamCLIP(host, "llama", lambda o, j=layer: _llama_layer(o, j), f"Llama layer {layer}")
            out[stream] = make_encoder(one)
    return out


def _llama_layer(out: dict, layer: int) -> torch.Tensor:
    stacked = out.get("conditioning_llama3")
    if stacked is None or stacked.ndim != 4 or layer >= stacked.shape[1]:
        shape = None if stacked is None else tuple(stacked.shape)
        raise FamilyMismatch(
            f"HiDream's projection reads Llama layer {layer}, but the CLIP returned conditioning_llama3 of shape "
            f"{shape} (expected (1, layers > {layer}, tokens, width)). Connect HiDream's text encoders."
        )
    return stacked[:, layer]
