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

from ..erasers import families as family_table
from ..erasers.config import ConfigError
from ..erasers.edits.eraser import Eraser, compute_eraser, compute_eraser_by_stream, fingerprint
from ..erasers.edits.methods import check_family, get_method
from ..erasers.errors import ConceptTooLong, FamilyMismatch, UnknownKeys, UnsupportedFamily
from ..erasers.families.key_map import KeyMapEncoder, build_key_map, map_width, pre_keys
from ..erasers.files.families import Family, detect_family, layer_specs
from ..erasers.text import PromptEncoding, shared_head_tail, split_concepts
from . import text_streams

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
        self.keys = tuple(sorted(self._host_tokenize("")))
        family, width = TOKEN_KEY_FAMILIES.get(self.keys, (None, None))
        self.family = family.value if family is not None else type(clip.cond_stage_model).__name__
        self._context_dim = width
        # any other layout (Chroma's T5 alone, Qwen/Mistral/Gemma chat encoders, UMT5): one prompt per host
        # call, exactly as CLIPTextEncode encodes it (see ``_encode_generic``)
        self.generic = family is None
        if self.generic:
            self.t5, self.t5_length, self.context_length = False, None, 10**9
            self._empty = None
            return
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

    def _host_tokenize(self, prompt: str) -> dict:
        """Weights syntax off (concepts are literal) where the tokenizer lets the caller choose: the chat
        tokenizers (Qwen-Image, Flux.2, Z-Image) set ``disable_weights`` themselves and refuse it twice."""
        try:
            return self.clip.tokenize(prompt, disable_weights=True)
        except TypeError:
            return self.clip.tokenize(prompt)

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
        if self.generic:
            return self._encode_generic(prompts)
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

    # -- layouts without a fixed chunk: T5 alone, chat-template LLM encoders, UMT5 -----------------------

    def _flat_ids(self, tokens: dict) -> list:
        if len(tokens) != 1:
            raise FamilyMismatch(
                f"The text encoder ({self.family}) tokenizes into {sorted(tokens)}; the pack encodes concepts for "
                "one text encoder per model unless the family table names the layout."
            )
        (sections,) = tokens.values()
        if len(sections) != 1:
            raise ConceptTooLong(f"A concept must fit in one section of the {self.family} tokenizer.")
        return [t[0] for t in sections[0]]

    def _pad_id(self) -> Optional[int]:
        (key,) = self.keys
        pad = getattr(self._sub_tokenizer(key), "pad_token", None)
        return None if pad is None else int(pad)

    def _strip_pad(self, ids: list) -> list:
        pad = self._pad_id()
        end = len(ids)
        while pad is not None and end > 0 and ids[end - 1] == pad:
            end -= 1
        return ids[:end]

    def _template(self) -> tuple:
        """(P, S): how many tokens the host puts before and after every prompt (chat-template prefix and
        suffix, a closing </s>; padding stripped), from the empty prompt against a one-word probe."""
        if self._empty is None:
            empty = self._strip_pad(self._flat_ids(self._host_tokenize("")))
            probe = self._strip_pad(self._flat_ids(self._host_tokenize("x")))
            self._empty = shared_head_tail(empty, probe)
        return self._empty

    def _prompt_span(self, ids: list) -> tuple:
        """(start, stop) of the prompt's own tokens in the host's token list."""
        head, tail = self._template()
        return head, max(len(self._strip_pad(ids)) - tail, head)

    def _encode_generic(self, prompts: list) -> PromptEncoding:
        """Each prompt as the host encodes it (template, what the encoder drops, padding and mask), one call
        each: rows of a bidirectional T5 depend on padding, so prompts are never padded into a batch.

        The host may drop a template prefix (Qwen-Image keeps only what follows 'user\\n'); the rows kept
        are the *last* ones, so the prompt's last token sits at stop − 1 − (tokens − rows).
        """
        rows, lengths, token_ids, before = [], [], [], []
        for prompt in prompts:
            tokens = self._host_tokenize(prompt)
            ids = self._flat_ids(tokens)
            cond = self.clip.encode_from_tokens(tokens)
            hidden = cond[0].float().cpu()
            dropped = len(ids) - hidden.shape[0]
            if dropped < 0:
                raise FamilyMismatch(
                    f"The text encoder ({self.family}) returned {hidden.shape[0]} rows for {len(ids)} tokens; the "
                    "pack cannot tell which row holds which token. This encoder is not supported yet."
                )
            start, stop = self._prompt_span(ids)
            last = max(stop - 1 - dropped, 0)
            rows.append(hidden)
            # lengths − 2 = the last word (PromptEncoding.last_subject_index): the row after it is the closing
            # token (</s>, <|im_end|>) the way EOS follows the last word in CLIP
            lengths.append(last + 2 if stop > start else min(2, hidden.shape[0]))
            # row i ↔ token_ids[i], as for CLIP (MACE aligns prompts by these ids): the ids of the rows kept
            token_ids.append(self._strip_pad(ids)[dropped:])
            before.append(start - dropped)
        # rows before the prompt (BOS, a kept template prefix) play the role of CLIP's start token
        return PromptEncoding.from_rows(rows, lengths, token_ids, before)

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


def model_record(model):
    """The family-table record of a ModelPatcher's model class (``type(model.model)`` and its
    ``model_config`` class), refused by name when the table does not know it; None for stand-ins without
    a ``model`` (unit-test fakes), whose family comes from the keys."""
    base = getattr(model, "model", None)
    if base is None:
        return None
    config = getattr(base, "model_config", None)
    return family_table.lookup(type(base).__name__, type(config).__name__ if config is not None else "")


def model_family(model, shapes: Optional[dict] = None) -> Family:
    """The family from the model's class; legacy UNet classes (one class, several widths) by their keys."""
    record = model_record(model)
    if record is not None and not record.sniff:
        return record.family
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in canonical_state(model).items()}
    return detect_family(shapes)


def live_eps(model, module_path: str) -> Optional[float]:
    """ε of the host's norm module (the record names it); None where the module keeps none (dtype ε)."""
    module = getattr(getattr(model, "model", None), "diffusion_model", None)
    for part in module_path.split("."):
        if module is None:
            return None
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
    eps = getattr(module, "eps", None)
    return None if eps is None else float(eps)


def text_entry_encoder(model, record, encoder, shapes: dict, family: Family):
    """The encoder the closed form reads: the host CLIP's embeddings, pushed through whatever the family
    puts in front of the edited Linear (txt_norm, cap_embedder's RMSNorm, Wan's text_embedding). A CLIP of
    the wrong width is refused here, naming the family, before anything is solved."""
    if record is None or record.sniff or not record.context_key:
        return encoder
    expected = int(shapes[record.context_key][1])
    width = int(encoder.context_dim)
    if width != expected:
        raise FamilyMismatch(
            f"The model is {record.label} ({record.host_class}); its {record.context_key.rsplit('.', 1)[0]} reads "
            f"{expected}-wide text embeddings, but the CLIP input ({encoder.family}) produces {width}-wide ones. "
            f"Connect the text encoder loaded with this model ({record.text_encoder.split(';')[0]})."
        )
    keys = [k for k in pre_keys(record.pre) if k in shapes]
    if not keys:
        return encoder
    weights = canonical_base_weights(model, keys)
    eps = live_eps(model, record.pre.module) if hasattr(record.pre, "module") else None
    key_map = build_key_map(record.pre, weights, eps)
    if key_map is None:
        return encoder
    edited = [s for s in layer_specs(shapes, family)]
    return KeyMapEncoder(encoder, key_map, map_width(record.pre, weights), edited[0].in_features, record.label)


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
    family = model_family(model, shapes)
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
    record = model_record(model)  # an unknown class is refused here, before its weights or the CLIP are read
    state = canonical_state(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = model_family(model, shapes)
    method = get_method(config.method)
    check_family(method, family)
    if record is not None and not record.sniff and method.name not in record.methods:
        raise UnsupportedFamily(
            f"{method.title} does not apply to {record.label}; the family supports {', '.join(record.methods)}."
        )
    if family is Family.HIDREAM:  # one text stream per caption projection: one solve per stream
        llama_layers = getattr(getattr(model.model, "diffusion_model", None), "llama_layers", None)
        streams = family_table.hidream.caption_streams(list(shapes), llama_layers)
        encoders = text_streams.hidream_encoders(clip, streams.values(), ComfyCLIPEncoder)
        weights = canonical_base_weights(model, list(streams))
        return compute_eraser_by_stream(config, encoders, weights, streams, family)
    keys = [s.key for s in layer_specs(shapes, family) if s.kind in method.kinds]
    weights = canonical_base_weights(model, keys)
    encoder = text_entry_encoder(model, record, ComfyCLIPEncoder(clip), shapes, family)
    return compute_eraser(config, encoder, weights, family=family, progress=progress)
