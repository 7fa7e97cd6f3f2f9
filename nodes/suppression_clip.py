"""What the suppression nodes need from a ComfyUI model and CLIP: the family, encodings, token ids.

Only the host objects' public API is used (``clip.tokenize`` / ``encode_from_tokens``, the model's class
and ``model_sampling``); nothing is imported from ComfyUI at module level.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Optional

import torch

from ..erasers import families
from ..erasers.errors import FamilyMismatch, UnsupportedFamily
from ..erasers.guards import joint
from ..erasers.guards.token_suppress import match_token_ids
from ..erasers.text import shared_head_tail

log = logging.getLogger(__name__)

CLIP_EOS = 49407
T5_EOS = 1
T5_PAD = 0
#: AuraFlow's Pile-T5 (comfy/text_encoders/aura_t5.py PT5XlModel special tokens): </s> = 2, padding = 1
PILE_T5_EOS, PILE_T5_PAD = 2, 1
#: SD3's context: 77 CLIP positions (L ⊕ G padded to 4096) before the T5 tokens
SD3_CLIP_POSITIONS = 77


#: families whose guards are found through the family table (erasers/families/): their prompt sits in a
#: chat template or padding that the CLIP/T5 helpers below (written for SD1.x–SDXL, SD3, Flux.1) do not know
TABLE_FAMILIES = ("chroma", "flux2", "qwen_image", "lumina2", "zimage", "wan", "hidream", "auraflow")


def host_classes(model) -> tuple:
    """(model class name, model_config class name or '') of a ModelPatcher's model."""
    base = model.model
    config = getattr(base, "model_config", None)
    return type(base).__name__, (type(config).__name__ if config is not None else "")


def model_family(model, guard: Optional[str] = None) -> str:
    """The family a guard acts on: 'sd1', 'sd2', 'sdxl', 'sd3', 'flux' (the legacy helpers below) or one of
    ``TABLE_FAMILIES`` (the family table's record). With ``guard`` (a name of erasers.families.GUARDS), a
    family that guard does not serve is refused by name with the reason, before anything is sampled."""
    name, config = host_classes(model)
    legacy = _legacy_family(model.model)
    if guard is not None:
        record = families.lookup_guard(name, config, guard)
    elif legacy is None:
        record = families.lookup(name, config)
    if legacy is not None:
        return legacy
    family = getattr(record.family, "value", None)
    if family not in TABLE_FAMILIES:
        raise UnsupportedFamily(
            f"The connected model is {record.label} ({name}); the guards' family test does not serve this class "
            f"(its width-sniffed UNet family is read for SD1.x/SD2.x/SDXL only). Guards serve: "
            f"{', '.join(families.guard_classes(guard or 'token_suppression'))}."
        )
    return family


def _legacy_family(base) -> Optional[str]:
    """'sd1', 'sd2', 'sdxl', 'sd3' or 'flux' for the classes the legacy helpers were written for; else None."""
    import comfy.model_base as mb

    if type(base) is mb.Flux:
        return "flux"
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
            f"The connected model is a {type(base).__name__} UNet with a {ctx}-wide context; the guards serve "
            "SD1.x (768) and SD2.x (1024) UNets of this class. Connect one of the supported models."
        )
    return None


def refuse(method: str, family: str, families_: dict) -> None:
    """Refuse a family by name with the reason (``families_``: family → None if served, else the reason).
    A family the dict does not name is one of ``TABLE_FAMILIES``, already checked by ``model_family``."""
    if family in TABLE_FAMILIES and family not in families_:
        return
    reason = families_.get(family, "its conditioning layout is not supported")
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


#: the tokenizer key whose ids are the context positions the detectors work on (CLIP-L's "l" otherwise)
CONTEXT_KEYS = {
    "flux": "t5xxl",
    "sd3": "t5xxl",
    "chroma": "t5xxl",
    "wan": "umt5xxl",
    "hidream": "t5xxl",
    "auraflow": "pile_t5xl",
}


def context_key(family: str) -> str:
    return CONTEXT_KEYS.get(family, "l")


def end_id(family: str) -> int:
    """The id that ends a prompt's real tokens: T5's </s> (Pile-T5's on AuraFlow), CLIP's EOS."""
    return PILE_T5_EOS if family == "auraflow" else T5_EOS if is_t5(family) else CLIP_EOS


def pad_id(family: str) -> int:
    """T5's padding id (Pile-T5's on AuraFlow): SAFREE masks a T5 prompt's token with it."""
    return PILE_T5_PAD if family == "auraflow" else T5_PAD


def token_offset(family: str) -> int:
    return SD3_CLIP_POSITIONS if family == "sd3" else 0


def is_t5(family: str) -> bool:
    """A T5-style encoder: no start token, so nothing to skip at position 0 (Chroma's T5, Wan's UMT5 too)."""
    # HiDream's context is its T5 rows; AuraFlow's Pile-T5 has no start token either
    return family in ("flux", "sd3", "chroma", "wan", "hidream", "auraflow")


def ids_of(tokens: dict, key: str) -> list:
    """Ids of the first chunk of ``tokens[key]`` (ComfyUI tokens are (id, weight[, word_id]) tuples)."""
    if key not in tokens:
        key = next(iter(tokens))
    return [int(t[0]) for t in tokens[key][0]]


def real_length(ids: list, family: str) -> int:
    """Number of real positions, EOS included (BOS too for CLIP)."""
    eos = end_id(family)
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
        row_family = {"t5xxl": "flux", "pile_t5xl": "auraflow"}.get(family_key, "sd1")
        lengths.append(real_length(row, row_family))
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
    if key not in tokens:  # SD2.x: ComfyUI's SD2 tokenizer keys its one CLIP (OpenCLIP-H) as "h"
        key = next(k for k in tokens if k != "t5xxl")
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


# -- the family-table families: the user's words inside the host's template, padding and dropped head -------


def text_tokens(clip, text: str) -> tuple:
    """(tokens, ids, start, end) of a text as the host tokenizes it: [start, end) are the text's own tokens,
    found against the host's tokenization of the empty text (erasers.guards.joint.word_span: the template
    head and tail and the padding are what both share). The newer families' CLIPs have one tokenizer key."""
    tokens = clip.tokenize(text)
    key = next(iter(tokens))
    ids = ids_of(tokens, key)
    start, end = joint.word_span(ids, ids_of(clip.tokenize(""), key))
    return tokens, ids, start, end


def concept_words(clip, concepts, family: str) -> tuple:
    """(concept contexts (K, T, D) for the risk gate, the concepts' word-token states (N, D) for the
    similarity test, the concepts' word-id sequences for exact matches in a prompt).

    SD1.x–Flux.1: the CLIP/T5 helpers (BOS/EOS/padding by id). The family-table families: each concept's own
    tokens inside the host's template (``text_tokens``), mapped to context rows past any head the encoder
    drops (Qwen-Image). A BPE tokenizer spells a word differently after a space, so both spellings are kept
    for the exact match."""
    if family not in TABLE_FAMILIES:
        concept_ctx, _, lengths, concept_ids = encode_many(clip, concepts)
        first = 0 if is_t5(family) else 1
        words = [row[first : real_length(row, family) - 1] for row in concept_ids]
        return concept_ctx, concept_token_states(concept_ctx, lengths, family), words
    contexts, states, words = [], [], []
    for concept in concepts:
        tokens, ids, start, end = text_tokens(clip, concept)
        ctx = encode(clip, tokens)[0][0]
        drop = joint.dropped_head(len(ids), ctx.shape[0])
        contexts.append(ctx)
        states.append(ctx[max(start - drop, 0) : max(end - drop, 0)])
        for spelling in (concept, " " + concept):
            _, sp_ids, sp_start, sp_end = text_tokens(clip, spelling)
            seq = sp_ids[sp_start:sp_end]
            if seq and seq not in words:
                words.append(seq)
    length = min(c.shape[0] for c in contexts)
    concept_ctx = torch.stack([c[:length] for c in contexts])
    rows = torch.cat(states) if states else concept_ctx.new_zeros(0, concept_ctx.shape[-1])
    if rows.shape[0] == 0:
        raise ValueError(
            f"None of the concepts {list(concepts)!r} adds a token of its own to the {family} tokenizer's template; "
            "give concepts as words."
        )
    return concept_ctx, rows, words


def prompt_positions(clip, prompt: str, words, family: str) -> tuple:
    """(prompt encoding (T, D), the concept's context positions in it, the prompt length for EOS/padding)
    for a prompt typed into the node; (None, [], None) when it is empty.

    The length is one past the last position the EOS rule keeps: positions from ``length − 1`` on (EOS and
    padding; on the templated families the template tail and padding after the user's words) are
    suppressed with ``include_eos`` once a concept token is found."""
    if not prompt.strip():
        if family in TABLE_FAMILIES and not is_t5(family):
            log.warning(
                "Token suppression on %s: no prompt was typed into the node, so the concept's tokens are found only "
                "by their similarity to the concept encoded alone. %s's decoder-LLM encoder gives a word a "
                "different state in every context, so that test can miss the concept; type the positive prompt "
                "into the node for exact token matches.",
                family,
                family,
            )
        return None, [], None
    if family not in TABLE_FAMILIES:
        tokens = clip.tokenize(prompt)
        ids = ids_of(tokens, context_key(family))
        positions = [p + token_offset(family) for p in match_token_ids(ids, words)]
        prompt_ref = encode(clip, tokens)[0][0]
        return prompt_ref, positions, real_length(ids, family) + token_offset(family)
    tokens, ids, start, end = text_tokens(clip, prompt)
    prompt_ref = encode(clip, tokens)[0][0]
    drop = joint.dropped_head(len(ids), prompt_ref.shape[0])
    positions = [start + p - drop for p in match_token_ids(ids[start:end], words) if start + p - drop >= 0]
    return prompt_ref, positions, end - drop + 1


# -- SAFREE on the decoder-LLM families: the prompt's own rows inside the host's chat template ---------------

#: the families whose text encoder is a decoder LLM behind a chat template or a start token (SAFREE's "llm" port)
LLM_FAMILIES = ("flux2", "qwen_image", "lumina2", "zimage")
#: of those, the ones whose host encoder drops leading template rows (QwenImageTEModel keeps what follows the
#: 2nd <|im_start|> and 'user\n'); the others return one row per token
DROPS_HEAD = ("qwen_image",)
#: the text whose single token masks a word in SAFREE's masked-prompt test: the reference masks with CLIP's
#: id 0, "!"; here the host tokenizer's own id for "!" (Qwen's vocabulary also gives it id 0)
MASK_TEXT = "!"


@dataclasses.dataclass(frozen=True)
class ChatLayout:
    """How the host tokenizes any prompt for one decoder-LLM family, found from the empty prompt and a
    one-word probe (``erasers.text.shared_head_tail``): template ids before and after the words, the pad id
    (stripped from either end: Flux.2-klein pads to 512 on the right, Mistral pads on the left) and the id
    that masks a word."""

    family: str
    key: str
    head: tuple
    tail: tuple
    pad: Optional[int]
    mask_id: int


@dataclasses.dataclass
class ChatText:
    """One text as the host encodes it: ``context`` (T, D) with the text's own tokens at token positions
    [start, end) and at context rows [start − drop, end − drop) (``rows``)."""

    tokens: dict
    ids: list
    start: int
    end: int
    drop: int
    context: torch.Tensor

    @property
    def rows(self) -> tuple:
        return self.start - self.drop, self.end - self.drop


def _layout_error(family: str, what: str) -> FamilyMismatch:
    return FamilyMismatch(
        f"SAFREE on {family}: {what} SAFREE must know which context rows hold the prompt's own words, so it "
        "stops before sampling. Connect the text encoder loaded with this model and type plain text (no chat "
        "template of your own), or use token suppression."
    )


def _single_section(tokens: dict, family: str, what: str) -> tuple:
    if len(tokens) != 1:
        raise _layout_error(family, f"the text encoder tokenizes {what} into {sorted(tokens)}, expected one key.")
    ((key, sections),) = tokens.items()
    if len(sections) != 1:
        raise _layout_error(family, f"{what} came back in {len(sections)} sections, expected one.")
    ids = [t[0] for t in sections[0]]
    if not all(isinstance(i, int) for i in ids):
        raise _layout_error(family, f"{what} holds embeddings (an image or a textual-inversion embedding).")
    return key, [int(i) for i in ids]


def _pad_id(clip, key: str) -> Optional[int]:
    tok = clip.tokenizer
    sub = getattr(tok, f"clip_{key}", None) or getattr(tok, key, None)
    pad = getattr(sub, "pad_token", None)
    return None if pad is None else int(pad)


def _unpad(ids: list, pad: Optional[int]) -> tuple:
    """(left, right): how many pad ids the host put before and after the tokens."""
    if pad is None:
        return 0, 0
    left = 0
    while left < len(ids) and ids[left] == pad:
        left += 1
    right = 0
    while right < len(ids) - left and ids[len(ids) - 1 - right] == pad:
        right += 1
    return left, right


def chat_layout(clip, family: str) -> ChatLayout:
    """The host's template for ``family``, from its tokenization of "" and of a one-word probe."""
    key, empty = _single_section(clip.tokenize(""), family, "the empty prompt")
    _, probe = _single_section(clip.tokenize("x"), family, "a one-word prompt")
    pad = _pad_id(clip, key)
    el, er = _unpad(empty, pad)
    pl, pr = _unpad(probe, pad)
    empty, probe = empty[el : len(empty) - er], probe[pl : len(probe) - pr]
    head, tail = shared_head_tail(empty, probe)
    if head + tail != len(empty) or len(probe) <= head + tail:
        raise _layout_error(
            family,
            f"its tokenizer's template was not found: the empty prompt gives {len(empty)} tokens, a one-word prompt "
            f"{len(probe)}, sharing {head} in front and {tail} behind (expected the empty prompt to be exactly the "
            "shared template and the word to add tokens).",
        )
    _, masked = _single_section(clip.tokenize(MASK_TEXT), family, f"the mask text {MASK_TEXT!r}")
    ml, mr = _unpad(masked, pad)
    masked = masked[ml : len(masked) - mr]
    own = masked[head : len(masked) - tail]
    if len(masked) != head + tail + 1 or masked[:head] != empty[:head] or own[0] in (pad, *empty):
        raise _layout_error(
            family,
            f"its tokenizer does not spell {MASK_TEXT!r} as one ordinary token inside the template (found "
            f"{masked[head : len(masked) - tail]}), so there is no mask token for the masked-prompt test.",
        )
    return ChatLayout(family, key, tuple(empty[:head]), tuple(empty[head:]), pad, own[0])


def chat_text(clip, layout: ChatLayout, text: str, tokens: Optional[dict] = None) -> ChatText:
    """``text`` (or its ``tokens``, e.g. a masked copy) tokenized and encoded as the host does, with its own
    tokens located and the layout checked: the template intact around them, padding only at the ends, the
    encoder returning one row per token past the head it drops (Qwen-Image) and none otherwise."""
    family = layout.family
    tokens = clip.tokenize(text) if tokens is None else tokens
    key, ids = _single_section(tokens, family, "the prompt")
    left, right = _unpad(ids, layout.pad)
    core = ids[left : len(ids) - right]
    head, tail = len(layout.head), len(layout.tail)
    if tuple(core[:head]) != layout.head or tuple(core[len(core) - tail :]) != layout.tail or len(core) <= head + tail:
        raise _layout_error(
            family,
            f"the host tokenized {text[:60]!r} as {len(core)} tokens that do not sit inside its template "
            f"({head} template tokens in front, {tail} behind, the text's own in between); a prompt that brings its "
            "own template (Qwen-Image skips its template for text starting with '<|im_start|>') is not supported.",
        )
    start, end = left + head, left + len(core) - tail
    context = encode(clip, tokens)[0][0]
    drop = len(ids) - context.shape[0]
    expected = "drops part of the template head" if family in DROPS_HEAD else "returns one row per token"
    if (family in DROPS_HEAD and not 0 < drop <= start) or (family not in DROPS_HEAD and drop != 0):
        raise _layout_error(
            family,
            f"the text encoder returned {context.shape[0]} rows for {len(ids)} tokens (the text's own at "
            f"{start}–{end}); expected an encoder that {expected}.",
        )
    return ChatText(tokens, ids, start, end, drop, context)


def chat_masked_copies(clip, layout: ChatLayout, prompt: ChatText, max_tokens: int = 75) -> tuple:
    """(context rows of the masked words, masked contexts (n, T, D)): copy i has the prompt's own token i
    replaced by the layout's mask id; the template and padding stay as the host produced them, and every copy
    must come back with the prompt's rows at the same place."""
    positions = list(range(prompt.start, min(prompt.end, prompt.start + max_tokens)))
    if prompt.end - prompt.start > max_tokens:
        log.warning("SAFREE: the prompt has %d tokens; the first %d are tested", prompt.end - prompt.start, max_tokens)
    contexts = []
    for pos in positions:
        t = copy.deepcopy(prompt.tokens)
        section = list(t[layout.key][0])
        entry = list(section[pos])
        entry[0] = layout.mask_id
        section[pos] = tuple(entry)
        t[layout.key][0] = section
        masked = chat_text(clip, layout, "(masked prompt)", tokens=t)
        if masked.rows != prompt.rows or masked.context.shape != prompt.context.shape:
            raise _layout_error(
                layout.family,
                f"masking token {pos} moved the prompt's rows from {prompt.rows} to {masked.rows} (context "
                f"{tuple(prompt.context.shape)} → {tuple(masked.context.shape)}).",
            )
        contexts.append(masked.context)
    shape = (0,) + tuple(prompt.context.shape)
    return [p - prompt.drop for p in positions], (torch.stack(contexts) if contexts else torch.zeros(shape))


def chat_concepts(clip, layout: ChatLayout, concepts) -> tuple:
    """(the keywords' own rows (K', L, D) zero-padded to the longest, their row counts (K',)): each keyword
    encoded alone inside the template, as the host encodes a prompt. A BPE tokenizer spells a word differently
    at the start of the text and after a space ("nude" vs "Ġnude"), and inside a prompt a keyword mostly
    follows a space, so each keyword gives one subspace column per distinct spelling (as token suppression
    matches both)."""
    own, spellings = [], set()
    for concept in concepts:
        for spelling in (concept, " " + concept):
            text = chat_text(clip, layout, spelling)
            key = tuple(text.ids[text.start : text.end])
            if key in spellings:
                continue
            spellings.add(key)
            lo, hi = text.rows
            own.append(text.context[lo:hi])
    length = max(r.shape[0] for r in own)
    padded = torch.zeros(len(own), length, own[0].shape[-1])
    for k, r in enumerate(own):
        padded[k, : r.shape[0]] = r
    return padded, torch.tensor([r.shape[0] for r in own])


# -- HiDream-I1: two token streams reach every block's joint attention (T5 rows, Llama rows) -------------

#: HiDream's T5 end token (T5XXLTokenizer) and its Llama tokenizer's start / pad ids (HiDreamTokenizer)
LLAMA_START, LLAMA_PAD = 128000, 128009


@dataclasses.dataclass
class TokenStream:
    """One text stream's token-suppression inputs: the concepts' word-token states (N, D) and word-id
    sequences; for a prompt typed into the node, its rows (T, D), the concept's row positions in them and
    the length whose EOS rule keeps rows before ``length − 1`` (``hooks.token_mask_for_row``)."""

    concept_states: torch.Tensor
    words: list
    prompt_ref: Optional[torch.Tensor] = None
    positions: tuple = ()
    length: Optional[int] = None


class EncodeOnce:
    """A CLIP that encodes each distinct token dict once for the duration of one node's analysis: the HiDream
    guards ask for the same text through several helpers (the prompt for its T5 and its Llama stream, a keyword
    alone for the risk gate and as a subspace column), and each encode runs T5-XXL and Llama-3.1-8B."""

    def __init__(self, clip):
        self._clip, self._outputs = clip, {}

    def __getattr__(self, name):
        return getattr(self._clip, name)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        key = tuple((k, tuple(tuple(t[:2]) for section in v for t in section)) for k, v in sorted(tokens.items()))
        if key not in self._outputs:
            self._outputs[key] = self._clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        out = self._outputs[key]
        if return_dict:
            return out
        return (out["cond"], out.get("pooled_output")) if return_pooled else out["cond"]


def _hidream_tokens(clip, text: str, node: str) -> dict:
    """The host's tokens of ``text``, refused by name unless they are HiDream's (a T5 and a Llama section)."""
    tokens = clip.tokenize(text)
    if "t5xxl" not in tokens or "llama" not in tokens:
        raise FamilyMismatch(
            f"{node} on HiDream-I1 reads the T5 and Llama tokens of the text, but the CLIP input tokenizes into "
            f"{sorted(tokens)}. Connect HiDream's text encoders (QuadrupleCLIPLoader, type hidream)."
        )
    return tokens


def _hidream_encode(clip, text: str, llama_layer: int) -> tuple:
    """(T5 ids, T5 rows (128, D), Llama ids, Llama rows of ``llama_layer`` (R, D)) as HiDream's CLIP gives
    them: conditioning_llama3 (1, layers, R, D) has one row per Llama token after the start token."""
    tokens = _hidream_tokens(clip, text, "Token suppression")
    out = clip.encode_from_tokens(tokens, return_dict=True)
    llama = out.get("conditioning_llama3")
    t5_ids, llama_ids = ids_of(tokens, "t5xxl"), ids_of(tokens, "llama")
    if llama is None or llama.ndim != 4 or llama.shape[1] <= llama_layer or llama.shape[2] != len(llama_ids) - 1:
        raise FamilyMismatch(
            f"Token suppression on HiDream-I1 reads Llama layer {llama_layer} with one row per Llama token after "
            f"the start token ({len(llama_ids) - 1}), but the CLIP returned conditioning_llama3 of shape "
            f"{None if llama is None else tuple(llama.shape)}. Connect HiDream's text encoders."
        )
    return t5_ids, out["cond"][0].float().cpu(), llama_ids, llama[0, llama_layer].float().cpu()


def hidream_conditioning(clip, text: str, node: str) -> tuple:
    """(T5 context (1, T, D), per-layer Llama states (1, layers, R, D)) of ``text`` as HiDream's CLIP conditions
    a prompt (the same ``cond`` and ``conditioning_llama3`` the sampler hands the model)."""
    tokens = _hidream_tokens(clip, text, node)
    out = clip.encode_from_tokens(tokens, return_dict=True)
    llama = out.get("conditioning_llama3")
    if llama is None or llama.ndim != 4:
        raise FamilyMismatch(
            f"{node} on HiDream-I1 needs the per-layer Llama states (conditioning_llama3: 1, layers, tokens, width); "
            f"the CLIP returned {None if llama is None else tuple(llama.shape)}. Connect HiDream's text encoders."
        )
    return out["cond"].float().cpu(), llama.float().cpu()


def _t5_words(ids: list) -> list:
    return ids[: ids.index(T5_EOS)] if T5_EOS in ids else ids


def _llama_words(ids: list) -> list:
    """The text's own Llama ids: after the start token, before the padding (no end token)."""
    body = ids[1:] if ids and ids[0] == LLAMA_START else ids
    return body[: body.index(LLAMA_PAD)] if LLAMA_PAD in body else body


def hidream_token_streams(clip, concepts, prompt: str, llama_layer: int) -> tuple:
    """(the concepts' T5 contexts (K, 128, D) for the risk gate, the T5 ``TokenStream``, the Llama one).

    HiDream-I1's blocks attend to [image ‖ T5 ‖ Llama ``llama_layers[-1]`` ‖ that block's Llama layer]
    (HiDreamImageTransformer2DModel._forward); the concept's columns are found in each encoder's own rows:
    T5 (no start token: row = token position) and Llama (row = token position − 1: the host drops the start
    token's row). Similarity is measured at ``llama_layer``, the Llama layer every block reads; a BPE tokenizer
    spells a word differently after a space, so both spellings are matched exactly."""
    contexts, t5_states, llama_states, t5_words, llama_words = [], [], [], [], []
    for concept in concepts:
        t5_ids, t5_rows, llama_ids, llama_rows = _hidream_encode(clip, concept, llama_layer)
        own_t5, own_llama = _t5_words(t5_ids), _llama_words(llama_ids)
        contexts.append(t5_rows)
        t5_states.append(t5_rows[: len(own_t5)])
        llama_states.append(llama_rows[: len(own_llama)])
        for seq, found in ((own_t5, t5_words), (own_llama, llama_words)):
            if seq and seq not in found:
                found.append(seq)
        spaced = _llama_words(ids_of(clip.tokenize(" " + concept), "llama"))
        if spaced and spaced not in llama_words:
            llama_words.append(spaced)
    if not t5_words or not llama_words:
        raise ValueError(f"The concepts {list(concepts)!r} add no token of their own to HiDream's T5 or Llama text.")
    length = min(c.shape[0] for c in contexts)
    concept_ctx = torch.stack([c[:length] for c in contexts])
    t5 = TokenStream(torch.cat(t5_states), t5_words)
    llama = TokenStream(torch.cat(llama_states), llama_words)
    if not prompt.strip():
        log.warning(
            "Token suppression on HiDream-I1: no prompt was typed into the node, so the concept's Llama tokens are "
            "found only by their similarity to the concept encoded alone; a decoder LLM gives a word a different "
            "state in every context. Type the positive prompt into the node for exact token matches."
        )
        return concept_ctx, t5, llama
    t5_ids, t5_rows, llama_ids, llama_rows = _hidream_encode(clip, prompt, llama_layer)
    own_t5, own_llama = _t5_words(t5_ids), _llama_words(llama_ids)
    t5.prompt_ref, t5.positions, t5.length = t5_rows, tuple(match_token_ids(own_t5, t5_words)), len(own_t5) + 1
    llama.prompt_ref, llama.positions = llama_rows, tuple(match_token_ids(own_llama, llama_words))
    llama.length = len(own_llama) + 1  # the first padding row is the "EOS" of a text without an end token
    return concept_ctx, t5, llama


@dataclasses.dataclass
class LlamaSafreeInputs:
    """SAFREE's inputs on HiDream-I1's Llama stream, per Llama layer the model reads: the prompt's rows, the
    masked copies' rows, the keywords' own rows (zero-padded) — the "llm" layout of erasers/guards/safree.py."""

    llama: torch.Tensor  # (layers, R, D): the prompt's conditioning_llama3 (the reference the wrapper matches)
    own: int  # the prompt's own Llama rows: [0, own) (the host dropped the start token's row)
    positions: list  # the masked rows
    masked: dict  # layer → (n, R, D)
    concepts: dict  # layer → (K', L, D)
    concept_lengths: torch.Tensor  # (K',)
    #: the T5 contexts (T, D) of ``t5_copies`` (the T5 stream's masked copies), from the same encodes
    t5_masked: list = dataclasses.field(default_factory=list)


def hidream_llama_safree(clip, prompt: str, concepts, layers, max_tokens: int = 75, t5_copies=()) -> LlamaSafreeInputs:
    """Masked copies of the prompt on HiDream's Llama stream: copy i has the prompt's own Llama token i replaced
    by the host tokenizer's id for "!" (as on the chat families), everything else (CLIP, padding) as the host
    tokenized it; each copy encoded once gives every layer. HiDream's four encoders run independently, so copy i
    also carries the T5 section of ``t5_copies[i]`` (the T5 stream's masked copy i): one encode serves both
    streams' tests (``t5_masked``). Each keyword is encoded alone in both BPE spellings (at the start and after a
    space) and contributes its own rows per layer."""
    layers = sorted(set(int(layer) for layer in layers))
    tokens = _hidream_tokens(clip, prompt, "SAFREE")
    llama_ids = ids_of(tokens, "llama")
    stacked = clip.encode_from_tokens(tokens, return_dict=True).get("conditioning_llama3")
    rows = len(llama_ids) - 1
    if stacked is None or stacked.ndim != 4 or stacked.shape[1] <= layers[-1] or stacked.shape[2] != rows:
        raise FamilyMismatch(
            f"SAFREE on HiDream-I1 reads Llama layers up to {layers[-1]} with one row per Llama token after the start "
            f"token ({rows}), but the CLIP returned conditioning_llama3 of shape "
            f"{None if stacked is None else tuple(stacked.shape)}. Connect HiDream's text encoders."
        )
    stacked = stacked[0].float().cpu()
    own = len(_llama_words(llama_ids))
    bang = _llama_words(ids_of(clip.tokenize("!"), "llama"))
    if not bang:
        raise FamilyMismatch("SAFREE on HiDream-I1: the Llama tokenizer gives no token for '!', its mask token.")
    if own > max_tokens:
        log.warning("SAFREE: the prompt has %d Llama tokens; the first %d are tested", own, max_tokens)
    positions = list(range(min(own, max_tokens)))
    masked, t5_masked = {layer: [] for layer in layers}, []
    for i in range(max(len(positions), len(t5_copies))):
        t = copy.deepcopy(tokens)
        if i < len(t5_copies):
            t["t5xxl"] = copy.deepcopy(t5_copies[i]["t5xxl"])
        if i < len(positions):
            section = list(t["llama"][0])
            entry = list(section[i + 1])  # token position = row + 1: the start token comes first
            entry[0] = bang[0]
            section[i + 1] = tuple(entry)
            t["llama"][0] = section
        out = clip.encode_from_tokens(t, return_dict=True)
        if i < len(t5_copies):
            t5_masked.append(out["cond"][0].float().cpu())
        if i >= len(positions):
            continue
        states = out["conditioning_llama3"][0].float().cpu()
        if states.shape != stacked.shape:
            raise FamilyMismatch(
                f"SAFREE on HiDream-I1: masking Llama token {i + 1} changed the conditioning from "
                f"{tuple(stacked.shape)} to {tuple(states.shape)}; the masked copies must keep the prompt's rows."
            )
        for layer in layers:
            masked[layer].append(states[layer])
    own_rows, spellings = [], set()
    for concept in concepts:
        for spelling in (concept, " " + concept):
            spelled = clip.tokenize(spelling)
            words = tuple(_llama_words(ids_of(spelled, "llama")))
            if not words or words in spellings:
                continue
            spellings.add(words)
            rows = clip.encode_from_tokens(spelled, return_dict=True)["conditioning_llama3"][0]
            own_rows.append(rows[:, : len(words)].float().cpu())
    if not own_rows:
        raise ValueError(f"The concepts {list(concepts)!r} add no Llama token of their own to HiDream's text.")
    length = max(r.shape[1] for r in own_rows)
    concept_rows = {}
    for layer in layers:
        padded = torch.zeros(len(own_rows), length, stacked.shape[-1])
        for k, r in enumerate(own_rows):
            padded[k, : r.shape[1]] = r[layer]
        concept_rows[layer] = padded
    shape = (0,) + tuple(stacked.shape[1:])
    return LlamaSafreeInputs(
        stacked,
        own,
        positions,
        {layer: torch.stack(m) if m else torch.zeros(shape) for layer, m in masked.items()},
        concept_rows,
        torch.tensor([r.shape[1] for r in own_rows]),
        t5_masked,
    )
