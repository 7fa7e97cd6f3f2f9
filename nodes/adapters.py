"""ComfyUI objects → the core's interfaces. No ComfyUI import at module level (unit tests use fakes).

- ``ComfyCLIPEncoder``: a ComfyUI ``CLIP`` as an ``erasers.text.TextEncoder`` (many prompts, one pass).
- ``model_family`` / ``canonical_base_weights``: read a ``ModelPatcher`` without changing it, including
  the patches already on it (a LoRA applied before us is part of the base the edit is solved for).
- ``apply_eraser``: a clone of the model with the eraser as scalable "diff" patches.

Keys inside a ModelPatcher are ``diffusion_model.`` + the core's canonical key (comfyui_host.md §2.4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Callable, Optional, Sequence

import torch

from ..erasers.config import ConfigError
from ..erasers.edits.eraser import Eraser, compute_eraser, fingerprint
from ..erasers.edits.methods import check_family, get_method
from ..erasers.errors import ConceptTooLong, UnknownKeys
from ..erasers.files.families import Family, detect_family, layer_specs
from ..erasers.text import PromptEncoding, split_concepts

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."

#: token-dict keys → (family, context width); the keys are what each ComfyUI tokenizer emits (§4.2)
TOKEN_KEY_FAMILIES = {
    ("l",): (Family.SD1, 768),
    ("h",): (Family.SD2, 1024),
    ("g", "l"): (Family.SDXL, 2048),
    ("l", "t5xxl"): (Family.FLUX, 4096),
    ("g", "l", "t5xxl"): (Family.SD3, 4096),
}
#: fallback end-of-text ids when the sub-tokenizer does not expose ``end_token``
DEFAULT_END = {"t5xxl": 1}
CLIP_END = 49407


class ComfyCLIPEncoder:
    """``TextEncoder`` over a ComfyUI ``CLIP``: every prompt is one chunk, all chunks go in one tokens dict.

    ``clip.encode_from_tokens`` encodes the sections of a tokens dict as one batch and concatenates them
    along the token axis, so N prompts come back as (1, T·N, d) and are reshaped to (N, T, d).
    """

    def __init__(self, clip):
        self.clip = clip
        self.keys = tuple(sorted(clip.tokenize("", disable_weights=True)))
        family, width = TOKEN_KEY_FAMILIES.get(self.keys, (None, None))
        self.family = family.value if family is not None else type(clip.cond_stage_model).__name__
        self._context_dim = width
        # T5 has no start token and no 77-token chunking: its section length is the tokenizer's minimum
        self.t5 = "t5xxl" in self.keys
        self.t5_length = self._t5_length() if self.t5 else None
        # the positions token_ids/lengths refer to: T5 for Flux, CLIP for SD1/SD2/SDXL and SD3 (CLIP first)
        self.context_length = self.t5_length if self.keys == ("l", "t5xxl") else 77

    @property
    def context_dim(self) -> int:
        if self._context_dim is None:  # unknown tokenizer layout: ask the encoder once
            self._context_dim = int(self.encode([""]).hidden.shape[-1])
        return self._context_dim

    @property
    def needs_pooled(self) -> bool:
        return self.t5  # Flux/SD3 have a pooled-text input projection; UNet families do not

    def _sub_tokenizer(self, key: str):
        tok = self.clip.tokenizer
        return getattr(tok, f"clip_{key}", None) or getattr(tok, key, None)

    def _t5_length(self) -> int:
        return int(getattr(self._sub_tokenizer("t5xxl"), "min_length", None) or 256)

    def _end_token(self, key: str) -> int:
        end = getattr(self._sub_tokenizer(key), "end_token", None)
        return int(end) if end is not None else DEFAULT_END.get(key, CLIP_END)

    def _pad_token(self, key: str) -> int:
        pad = getattr(self._sub_tokenizer(key), "pad_token", None)
        return int(pad) if pad is not None else 0

    def _tokenize(self, prompt: str) -> dict:
        """One prompt → {key: one section of (token, 1.0)}; weights syntax is off, concepts are literal."""
        tokens = self.clip.tokenize(prompt, disable_weights=True)
        out = {}
        for key in self.keys:
            sections = tokens[key]
            if len(sections) != 1:
                raise ConceptTooLong(
                    f"The concept '{prompt[:60]}' needs {len(sections)} chunks of the '{key}' text encoder, but "
                    f"a concept must fit in one chunk ({len(sections[0]) if sections else 77} tokens). Shorten it "
                    f"or split it into several concepts."
                )
            section = [(t[0], 1.0) for t in sections[0]]
            if key == "t5xxl":
                section = self._fit_t5(prompt, section)
            out[key] = section
        return out

    def _fit_t5(self, prompt: str, section: list) -> list:
        # every section of one batch must have the same length; T5 pads only up to its minimum
        if len(section) > self.t5_length:
            raise ConceptTooLong(
                f"The concept '{prompt[:60]}' has {len(section)} T5 tokens, but erasure encodes concepts in "
                f"{self.t5_length} positions. Shorten it or split it into several concepts."
            )
        return section + [(self._pad_token("t5xxl"), 1.0)] * (self.t5_length - len(section))

    def _ids(self, section: list, key: str) -> list:
        """Unpadded ids: start token (if any) up to and including the first end token."""
        ids = [int(t) for t, _ in section if isinstance(t, int)]
        end = self._end_token(key)
        return ids[: ids.index(end) + 1] if end in ids else ids

    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        prompts = list(prompts)
        per_prompt = [self._tokenize(p) for p in prompts]
        tokens = {key: [pp[key] for pp in per_prompt] for key in self.keys}
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        n = len(prompts)
        if self.keys == ("g", "l", "t5xxl"):
            # SD3 puts all CLIP sections first, then all T5 sections: (1, 77·N + L·N, 4096)
            clip_len = len(tokens["l"][0])
            clip_part = cond[0, : clip_len * n].reshape(n, clip_len, -1)
            t5_part = cond[0, clip_len * n :].reshape(n, -1, cond.shape[-1])
            hidden = torch.cat([clip_part, t5_part], dim=1)
        else:
            hidden = cond[0].reshape(n, -1, cond.shape[-1])
        id_key = "t5xxl" if self.keys == ("l", "t5xxl") else ("l" if "l" in self.keys else self.keys[0])
        token_ids = [self._ids(pp[id_key], id_key) for pp in per_prompt]
        lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
        pooled_all = None
        if self.needs_pooled:
            pooled_all = pooled.float().cpu() if n == 1 else self._pooled_each(per_prompt)
        return PromptEncoding(
            hidden=hidden.float().cpu(),
            lengths=lengths,
            token_ids=token_ids,
            pooled=pooled_all,
            has_bos=id_key != "t5xxl",
        )

    def _pooled_each(self, per_prompt: list) -> torch.Tensor:
        # encode_token_weights returns only the first section's pooled vector, so pooled vectors of a
        # batch need one call per prompt (only Flux/SD3, whose pooled-text layer a method may edit)
        rows = []
        for pp in per_prompt:
            _, pooled = self.clip.encode_from_tokens({k: [v] for k, v in pp.items()}, return_pooled=True)
            rows.append(pooled.float().cpu().reshape(1, -1))
        return torch.cat(rows)


# -- the model side ---------------------------------------------------------------------------------


def canonical_state(model) -> dict:
    """Canonical key → tensor (references, nothing copied) of a ModelPatcher's diffusion model."""
    sd = model.model_state_dict(filter_prefix=PREFIX)
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}


def model_family(model) -> Family:
    return detect_family({k: tuple(v.shape) for k, v in canonical_state(model).items()})


def host_calculate_weight(patches: list, weight: torch.Tensor, key: str) -> torch.Tensor:
    import comfy.lora  # host module: applies every patch format ComfyUI knows (LoRA, diff, LoKr, …)

    return comfy.lora.calculate_weight(patches, weight, key)


def canonical_base_weights(model, keys: Sequence[str]) -> dict:
    """Canonical key → float32 CPU copy of the weight *as the model would use it* (its patches applied).

    Never reads ``module.weight`` (with lowvram / dynamic VRAM it is not the patched weight) and never
    writes to the model: the original comes from ``get_key_patches`` (backup-aware), patches are applied
    to a copy (comfyui_host.md §1.3 "Implication").
    """
    try:
        entries = model.get_key_patches(PREFIX)
    except AttributeError:
        entries = None
    out = {}
    if entries is None:
        state = canonical_state(model)
        return {k: state[k].detach().to("cpu", torch.float32, copy=True) for k in keys}
    for key in keys:
        entry = entries[PREFIX + key]
        weight, convert = entry[0]
        w = convert(weight.detach().to("cpu", torch.float32, copy=True), inplace=True)
        if len(entry) > 1:
            w = host_calculate_weight(entry[1:], w, PREFIX + key)
        out[key] = w.detach().to("cpu", torch.float32)
    return out


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # fp8/quantised storage would round most of a small edit away; calculate_weight adds the diff in
    # float32 anyway, so such weights get a float16 diff instead
    return (
        weight_dtype
        if weight_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        else torch.float16
    )


def apply_eraser(model, eraser: Eraser, strength: float):
    """A clone of ``model`` with ``strength``·ΔW as "diff" patches. Checks first: nothing is patched on error."""
    strength = check_strength(strength)
    state = canonical_state(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = detect_family(shapes)
    known = all(k in shapes for k in eraser.deltas)
    fp = None
    if known and eraser.source and eraser.base_fingerprint:
        fp = fingerprint(canonical_base_weights(model, eraser.keys()))
    eraser.check_model(shapes, family, fp)
    m = model.clone()
    if strength == 0:
        return m  # no patch at all: sampling is bit-identical to the input model
    patches = {PREFIX + k: ("diff", (d.dense(delta_dtype(state[k].dtype)),)) for k, d in eraser.deltas.items()}
    applied = m.add_patches(patches, float(strength))
    if len(applied) != len(patches):
        # the clone is dropped, the input model never had a patch: a partial erasure is refused, not logged
        missing = sorted(set(patches) - set(applied))
        raise UnknownKeys(
            f"The model accepted only {len(applied)} of the eraser's {len(patches)} layers; not patched: "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}. The eraser was made for another model."
        )
    return m


def check_strength(strength) -> float:
    """A finite number (a linked input can bring NaN or a string past the widget's range check)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ConfigError(f"strength must be a finite number, found {strength!r}.")
    return float(strength)


# -- the node's work, host-free enough to unit-test ------------------------------------------------

RESERVED_PARAMS = ("method", "concepts", "anchors", "preserve", "concept_type", "rank_cap")


def parse_params(text: str) -> dict:
    """The node's free-form parameters: a JSON object, or ``name=value`` pairs (comma/newline separated)."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f'params is not valid JSON ({exc}). Expected e.g. {{"lam": 0.5}}.') from exc
        if not isinstance(data, dict):
            raise ConfigError('params must be a JSON object, e.g. {"lam": 0.5}.')
        return data
    data = {}
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"params: expected name=value, found '{part.strip()}'. Example: lam=0.5, variant=2023")
        name, value = (s.strip() for s in part.split("=", 1))
        try:
            data[name] = json.loads(value)
        except json.JSONDecodeError:
            data[name] = value
    return data


def build_config(
    method: str,
    concepts: str,
    anchors: str = "",
    preserve: str = "",
    concept_type: str = "object",
    params: str = "",
    rank_cap: int = 0,
):
    extra = parse_params(params)
    clash = sorted(set(extra) & set(RESERVED_PARAMS))
    if clash:
        raise ConfigError(f"params sets {clash}, which have their own inputs on the node; set them there.")
    data = {
        "concepts": split_concepts(concepts),
        "anchors": split_concepts(anchors),
        "preserve": split_concepts(preserve),
        "concept_type": concept_type,
        "rank_cap": int(rank_cap) if rank_cap else None,
        **extra,
    }
    config_class = get_method(method).config_class
    for f in dataclasses.fields(config_class):
        # "variant=2023" parses as a number; a text field keeps the text
        if f.name in extra and isinstance(f.default, str) and isinstance(extra[f.name], (int, float)):
            data[f.name] = str(extra[f.name])
    return config_class.from_dict(data)


def compute_on_model(model, clip, config, progress: Optional[Callable] = None) -> Eraser:
    """Solve ``config`` on the model's current weights with embeddings from its own CLIP."""
    state = canonical_state(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = detect_family(shapes)
    method = get_method(config.method)
    check_family(method, family)
    keys = [s.key for s in layer_specs(shapes, family) if s.kind in method.kinds]
    weights = canonical_base_weights(model, keys)
    return compute_eraser(config, ComfyCLIPEncoder(clip), weights, family=family, progress=progress)
