"""What the suppression nodes need from a ComfyUI model and CLIP: the family, encodings, token ids.

Only the host objects' public API is used (``clip.tokenize`` / ``encode_from_tokens``, the model's class
and ``model_sampling``); nothing is imported from ComfyUI at module level.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..erasers.errors import UnsupportedFamily

log = logging.getLogger(__name__)

CLIP_EOS = 49407
T5_EOS = 1
T5_PAD = 0
#: SD3's context: 77 CLIP positions (L ⊕ G padded to 4096) before the T5 tokens
SD3_CLIP_POSITIONS = 77


def model_family(model) -> str:
    """'sd1', 'sd2', 'sdxl', 'sd3' or 'flux' from the ModelPatcher's model class; anything else is refused."""
    import comfy.model_base as mb

    base = model.model
    name = type(base).__name__
    if type(base) is mb.Flux:
        return "flux"
    if isinstance(base, (mb.Flux, mb.SD3)) and type(base) is not mb.SD3:
        # Chroma, Flux.2, LongCat… subclass Flux but their blocks differ (Chroma: no pooled vector input and
        # no per-block modulation): the Flux hooks would reach internals they lack and fail mid-sampling
        raise UnsupportedFamily(
            f"The connected model is {name}, a variant of {type(base).__mro__[1].__name__} whose blocks differ "
            f"from the ones this node is built for; the suppression nodes do not support {name} yet, so they "
            "refuse it before sampling. Supported: SD1.x, SD2.x, SDXL, SD3, Flux.1."
        )
    if type(base) is mb.SD3:
        return "sd3"
    if isinstance(base, mb.SDXL):
        return "sdxl"
    if type(base) in (mb.BaseModel, getattr(mb, "SD21UNCLIP", mb.BaseModel)):
        ctx = (getattr(base.model_config, "unet_config", {}) or {}).get("context_dim")
        if ctx == 768:
            return "sd1"
        if ctx == 1024:
            return "sd2"
    raise UnsupportedFamily(
        f"This node serves SD1.x, SD2.x, SDXL, SD3 and Flux models; the connected model is {name}, whose text "
        f"conditioning layout it does not know. Connect one of the supported models."
    )


def refuse(method: str, family: str, families: dict) -> None:
    """Refuse a family by name with the reason (``families``: family → None if served, else the reason)."""
    reason = families.get(family, "its conditioning layout is not supported")
    if reason is not None:
        raise UnsupportedFamily(f"{method} cannot serve {family} models: {reason}")


def parameterisation(model) -> str:
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, ms.CONST):
        return "flow"
    if isinstance(sampling, ms.V_PREDICTION):
        return "v"
    return "eps"


def context_key(family: str) -> str:
    """The tokenizer key whose ids are the context positions the detectors work on."""
    return {"flux": "t5xxl", "sd3": "t5xxl"}.get(family, "l")


def token_offset(family: str) -> int:
    return SD3_CLIP_POSITIONS if family == "sd3" else 0


def is_t5(family: str) -> bool:
    return family in ("flux", "sd3")


def ids_of(tokens: dict, key: str) -> list:
    """Ids of the first chunk of ``tokens[key]`` (ComfyUI tokens are (id, weight[, word_id]) tuples)."""
    if key not in tokens:
        key = next(iter(tokens))
    return [int(t[0]) for t in tokens[key][0]]


def real_length(ids: list, family: str) -> int:
    """Number of real positions, EOS included (BOS too for CLIP)."""
    eos = T5_EOS if is_t5(family) else CLIP_EOS
    return ids.index(eos) + 1 if eos in ids else len(ids)


def encode(clip, text_or_tokens):
    """(context (1, T, D) float32 CPU, pooled (1, P) or None) for a text or a ComfyUI token dict."""
    tokens = clip.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond.float().cpu(), (pooled.float().cpu() if pooled is not None else None)


def encode_many(clip, texts) -> tuple:
    """(contexts (K, T, D) cut to the shortest T, pooled (K, P) or None, lengths (K,), token ids)."""
    ctxs, pooled, lengths, ids = [], [], [], []
    family_key = None
    for text in texts:
        tokens = clip.tokenize(text)
        family_key = family_key or ("t5xxl" if "t5xxl" in tokens else next(iter(tokens)))
        c, p = encode(clip, tokens)
        ctxs.append(c[0])
        pooled.append(p[0] if p is not None else None)
        row = ids_of(tokens, family_key)
        ids.append(row)
        lengths.append(real_length(row, "flux" if family_key == "t5xxl" else "sd1"))
    length = min(c.shape[0] for c in ctxs)
    stacked = torch.stack([c[:length] for c in ctxs])
    pooled_t = torch.stack(pooled) if all(p is not None for p in pooled) else None
    return stacked, pooled_t, torch.tensor(lengths), ids


def concept_token_states(contexts: torch.Tensor, lengths: torch.Tensor, family: str) -> torch.Tensor:
    """The keywords' word-token states (no BOS/EOS/padding) in context space: (N, D)."""
    rows = []
    off = token_offset(family)
    first = 0 if is_t5(family) else 1
    for k in range(contexts.shape[0]):
        n = int(lengths[k])
        rows.append(contexts[k, off + first : off + n - 1])
    out = torch.cat(rows) if rows else contexts.new_zeros(0, contexts.shape[-1])
    if out.shape[0] == 0:
        out = contexts[:, off].clone()
    return out


def masked_token_dicts(clip, prompt: str, family: str, mask_id: int, max_tokens: int = 75) -> tuple:
    """(tokens, positions in context space, copies): ComfyUI token dicts with word i replaced by ``mask_id``
    in every CLIP key (SD1/SD2/SDXL) or in the T5 key (SD3/Flux)."""
    tokens = clip.tokenize(prompt)
    key = context_key(family)
    ids = ids_of(tokens, key)
    n_real = real_length(ids, family)
    first = 0 if is_t5(family) else 1
    positions = list(range(first, min(n_real - 1, first + max_tokens)))
    keys = [key] if is_t5(family) else [k for k in tokens if k != "t5xxl"]
    copies = []
    for pos in positions:
        t = copy.deepcopy(tokens)
        for k in keys:
            chunk = list(t[k][0])
            if pos < len(chunk):
                entry = list(chunk[pos])
                entry[0] = mask_id
                chunk[pos] = tuple(entry)
            t[k][0] = chunk
        copies.append(t)
    if len(tokens[key]) > 1:
        log.warning("The prompt is longer than one 75-token chunk; only the first chunk is analysed.")
    off = token_offset(family)
    return tokens, [p + off for p in positions], copies, n_real
