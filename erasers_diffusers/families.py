"""The newer families through diffusers (#16): transformer class → family record, names, prompt encoding.

The family table (``erasers/families/``) says, in ComfyUI's canonical keys, which Linear(s) text enters
through and what sits in front of them (Qwen-Image's ``txt_norm``, Z-Image / Lumina 2's ``cap_embedder``
RMSNorm, Wan's ``text_embedding`` MLP). diffusers names the same modules differently; this file maps its
parameter names onto those canonical keys, so the core's compute / apply / remove path edits them, and
encodes concepts with the pipeline's own ``encode_prompt`` exactly as the pipeline conditions its
transformer (template, what it drops, padding, mask):

=================================  ==============================  ===========================================
transformer (diffusers 0.42)        edited Linear → canonical       in front (→ canonical)
=================================  ==============================  ===========================================
ChromaTransformer2DModel            context_embedder → txt_in        —
Flux2Transformer2DModel             context_embedder → txt_in        — (diffusers' Flux.2 has no txt_norm)
QwenImageTransformer2DModel         txt_in → txt_in                  txt_norm (RMSNorm, ε 1e-6)
ZImageTransformer2DModel            cap_embedder.1 → cap_embedder.1  cap_embedder.0 (RMSNorm, ε norm_eps)
Lumina2Transformer2DModel           time_caption_embed.caption_      time_caption_embed.caption_embedder.0
                                    embedder.1 → cap_embedder.1      → cap_embedder.0 (RMSNorm)
WanTransformer3DModel (t2v)         blocks.i.attn2.to_k / to_v →     condition_embedder.text_embedder.linear_1
                                    blocks.i.cross_attn.k / .v       / linear_2 → text_embedding.0 / .2
AuraFlowTransformer2DModel          context_embedder →               — (Pile-T5's 256 rows, zeroed after </s>)
                                    cond_seq_linear
HiDreamImageTransformer2DModel      caption_projection.i.linear,     — (one text stream per projection: T5
                                    p_embedder.pooled_embedder.      or one Llama layer; the pooled embedder
                                    linear_1 (same names)            reads CLIP-L ⊕ CLIP-G with T5's stream)
=================================  ==============================  ===========================================

The rows an eraser is solved on are the rows the transformer attends to: Chroma's T5 up to and including
the first pad (its mask), Flux.2's 512 (no mask), Qwen-Image's rows after the dropped 34-token system
prefix, Z-Image's unpadded rows, Lumina 2's masked rows, Wan's 512 (real rows, then zeros: no mask, so the
zero rows reach every block through text_embedding), HiDream's 128 T5 rows and, per Llama layer, its 128
rows (diffusers keeps the start token's row, which ComfyUI drops; no mask reaches the transformer). The
token ids behind each row are read from the ``input_ids`` the pipeline passes to its text encoder (a
forward pre-hook; nothing is re-tokenized).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from erasers import families as family_table
from erasers.errors import ConceptTooLong, FamilyMismatch, UnsupportedFamily
from erasers.families.key_map import KeyMapEncoder, build_key_map, map_width, pre_keys
from erasers.files.families import layer_specs
from erasers.text import PromptEncoding, shared_head_tail

__all__ = [
    "DIFFUSERS_FAMILIES",
    "DiffusersFamily",
    "HiDreamStreamEncoder",
    "TemplatedPipelineEncoder",
    "hidream_stream_encoders",
    "lookup",
    "refuse_variant",
]


@dataclass(frozen=True)
class DiffusersFamily:
    """One diffusers transformer class: its family-table record and how diffusers names its text entry."""

    host_class: str  # the family table's host class (ComfyUI's model class name)
    config_class: str  # and its model_config class ("" where the record accepts any)
    #: canonical key → diffusers parameter name, as functions of the transformer's parameter names
    names: Callable[[list], dict]
    #: pipeline class names whose ``encode_prompt`` the encoder below knows (others are refused by name)
    pipelines: tuple
    #: how to call ``encode_prompt`` for one prompt and read (embeddings, transformer mask or None)
    encode: Callable
    #: the ``max_sequence_length`` the pipeline's ``__call__`` uses by default
    max_sequence_length: int
    #: rows the pipeline drops from the front of the unpadded encoder output (Qwen-Image's system prefix):
    #: the attribute of the pipeline that holds the count, or ""
    drop_attr: str = ""
    #: the pipeline attributes of the text encoder whose input_ids the rows come from, and of its tokenizer
    text_encoder_attr: str = "text_encoder"
    tokenizer_attr: str = "tokenizer"

    @property
    def record(self):
        return family_table.lookup(self.host_class, self.config_class)


def _fixed(table: dict) -> Callable[[list], dict]:
    return lambda names: {canonical: name for canonical, name in table.items() if name in names}


_WAN_KV = re.compile(r"^blocks\.(\d+)\.attn2\.to_([kv])\.weight$")


def _wan_names(names: list) -> dict:
    out = {}
    for name in names:
        if m := _WAN_KV.match(name):
            out[f"blocks.{m.group(1)}.cross_attn.{m.group(2)}.weight"] = name
    for i, canonical in (("1", "0"), ("2", "2")):
        for part in ("weight", "bias"):
            name = f"condition_embedder.text_embedder.linear_{i}.{part}"
            if name in names:
                out[f"text_embedding.{canonical}.{part}"] = name
    return out


_HIDREAM_PROJECTION = re.compile(r"^caption_projection\.\d+\.linear\.weight$")
_HIDREAM_POOLED = "p_embedder.pooled_embedder.linear_1.weight"


def _hidream_names(names: list) -> dict:
    """diffusers' HiDream names its caption projections and pooled embedder as ComfyUI does."""
    return {n: n for n in names if _HIDREAM_PROJECTION.match(n) or n == _HIDREAM_POOLED}


# -- encode_prompt, per pipeline: (embeddings (R, d), transformer mask (R,) or None) --------------------


def _chroma(pipe, prompt, device, length):
    embeds, _, mask, *_ = pipe.encode_prompt(
        prompt=[prompt], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
        max_sequence_length=length,
    )  # fmt: skip
    return embeds[0], mask[0]


def _flux2(pipe, prompt, device, length):
    embeds, _ = pipe.encode_prompt(prompt=[prompt], device=device, num_images_per_prompt=1, max_sequence_length=length)
    return embeds[0], None


def _qwen(pipe, prompt, device, length):
    embeds, mask = pipe.encode_prompt(
        prompt=[prompt], device=device, num_images_per_prompt=1, max_sequence_length=length
    )
    return embeds[0], None if mask is None else mask[0]


def _zimage(pipe, prompt, device, length):
    # ZImagePipeline writes the templated text back into the list it is given: a fresh list each call
    embeds, _ = pipe.encode_prompt(
        prompt=[prompt], device=device, do_classifier_free_guidance=False, max_sequence_length=length
    )
    return embeds[0], None


def _lumina2(pipe, prompt, device, length):
    embeds, mask, *_ = pipe.encode_prompt(
        prompt=[prompt], do_classifier_free_guidance=False, num_images_per_prompt=1, device=device,
        max_sequence_length=length,
    )  # fmt: skip
    return embeds[0], mask[0]


def _aura(pipe, prompt, device, length):
    # AuraFlowPipeline zeroes the rows after </s> and hands the transformer all 256 (no mask): every row counts
    embeds, *_ = pipe.encode_prompt(
        prompt=[prompt], do_classifier_free_guidance=False, num_images_per_prompt=1, device=device,
        max_sequence_length=length,
    )  # fmt: skip
    return embeds[0], None


def _wan(pipe, prompt, device, length):
    embeds, _ = pipe.encode_prompt(
        prompt=[prompt], do_classifier_free_guidance=False, num_videos_per_prompt=1, max_sequence_length=length,
        device=device,
    )  # fmt: skip
    return embeds[0], None


DIFFUSERS_FAMILIES = {
    "ChromaTransformer2DModel": DiffusersFamily(
        "Chroma", "", _fixed({"txt_in.weight": "context_embedder.weight"}),
        ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"), _chroma, 512,
    ),
    "Flux2Transformer2DModel": DiffusersFamily(
        "Flux2", "", _fixed({"txt_in.weight": "context_embedder.weight"}),
        ("Flux2Pipeline", "Flux2KleinPipeline"), _flux2, 512,
    ),
    "QwenImageTransformer2DModel": DiffusersFamily(
        "QwenImage", "QwenImage", _fixed({"txt_in.weight": "txt_in.weight", "txt_norm.weight": "txt_norm.weight"}),
        ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"), _qwen, 512,
        drop_attr="prompt_template_encode_start_idx",
    ),
    "ZImageTransformer2DModel": DiffusersFamily(
        "Lumina2", "ZImage",
        _fixed({"cap_embedder.1.weight": "cap_embedder.1.weight", "cap_embedder.0.weight": "cap_embedder.0.weight"}),
        ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"), _zimage, 512,
    ),
    "Lumina2Transformer2DModel": DiffusersFamily(
        "Lumina2", "Lumina2",
        _fixed({
            "cap_embedder.1.weight": "time_caption_embed.caption_embedder.1.weight",
            "cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight",
        }),
        ("Lumina2Pipeline",), _lumina2, 256,
    ),
    "WanTransformer3DModel": DiffusersFamily("WAN21", "WAN21_T2V", _wan_names, ("WanPipeline",), _wan, 512),
    "AuraFlowTransformer2DModel": DiffusersFamily(
        "AuraFlow", "AuraFlow", _fixed({"cond_seq_linear.weight": "context_embedder.weight"}),
        ("AuraFlowPipeline",), _aura, 256,
    ),
    # encode: HiDreamEncodings below (one encode_prompt per prompt serves every text stream)
    "HiDreamImageTransformer2DModel": DiffusersFamily(
        "HiDream", "HiDream", _hidream_names, ("HiDreamImagePipeline",), None, 128,
        text_encoder_attr="text_encoder_3", tokenizer_attr="tokenizer_3",
    ),
}  # fmt: skip

#: diffusers classes refused by name: (the family table's host class, config class, why diffusers refuses it
#: where the table serves the class in ComfyUI; "" = the table refuses it and its reason is the message)
REFUSED: dict = {}

#: the module paths of the norms in front (diffusers names), for their live ε
NORM_MODULES = {
    "txt_norm.weight": "txt_norm",
    "cap_embedder.0.weight": "cap_embedder.0",
    "time_caption_embed.caption_embedder.0.weight": "time_caption_embed.caption_embedder.0",
}


def lookup(module) -> Optional[DiffusersFamily]:
    """The entry of a diffusers transformer of the newer families (None for others); refused classes and
    variants raise ``UnsupportedFamily`` naming the class, the reason and that nothing was changed."""
    name = type(module).__name__
    if name in REFUSED:
        host, config, reason = REFUSED[name]
        record = family_table.lookup(host, config)  # raises with the table's reason where it refuses the class
        raise UnsupportedFamily(f"{record.label} ({name}) is refused by name: {reason}. Nothing was changed.")
    entry = DIFFUSERS_FAMILIES.get(name)
    if entry is not None:
        refuse_variant(module, entry)
    return entry


def refuse_variant(module, entry: DiffusersFamily) -> None:
    """Variants of a class that add conditioning the family record was not checked with."""
    name = type(module).__name__
    config = getattr(module, "config", None)
    label = entry.record.label
    if name == "WanTransformer3DModel":
        if getattr(config, "image_dim", None) is not None or getattr(config, "added_kv_proj_dim", None) is not None:
            raise UnsupportedFamily(
                f"This {name} has an image input (image_dim / added_kv_proj_dim: Wan image-to-video); the pack "
                f"erases on {label} only (the family table's WAN21_T2V / WAN22_T2V). Nothing was changed."
            )
        if any(n.endswith("attn2.to_kv.weight") for n, _ in module.named_parameters()):
            raise UnsupportedFamily(
                f"This {name} has fused cross-attention projections (attn2.to_kv, after fuse_projections()); "
                "the eraser edits to_k and to_v separately. Call transformer.unfuse_projections() first. "
                "Nothing was changed."
            )
    if name == "ZImageTransformer2DModel" and getattr(config, "siglip_feat_dim", None) is not None:
        raise UnsupportedFamily(
            f"This {name} has a SigLIP image input (siglip_feat_dim: Z-Image Omni); the pack erases on the "
            "text-to-image Z-Image only. Nothing was changed."
        )


def refuse_second_expert(pipe, label: str) -> None:
    """Wan 2.2 A14B denoises with two experts; an eraser on one would leave the other unerased."""
    if getattr(pipe, "transformer_2", None) is not None:
        raise UnsupportedFamily(
            f"This {type(pipe).__name__} has a second expert (transformer_2: Wan 2.2 A14B switches transformers "
            f"at boundary_ratio); an eraser applied to .transformer alone would leave the low-noise expert "
            f"unerased, so {label} with two experts is refused. Nothing was changed."
        )


# -- prompt encoding --------------------------------------------------------------------------------


class _Capture:
    """Records the input_ids / attention_mask the pipeline passes to its text encoder (forward pre-hook)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __enter__(self):
        def hook(_, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self.calls.append((ids, mask))

        self.handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class TemplatedPipelineEncoder:
    """``TextEncoder`` over a newer family's pipeline: one ``encode_prompt`` call per prompt (rows of a
    bidirectional encoder depend on padding, and the chat pipelines pad to the longest prompt), each
    returning exactly what the transformer is conditioned on.

    ``hidden`` holds the rows the transformer attends to; ``token_ids`` the ids behind them; ``lengths`` −
    2 is the row of the prompt's last word (the row after it is the template's closing token or </s>, as
    EOS follows the last word in CLIP); ``has_bos`` says rows come before the prompt (BOS, a kept template
    head). Where the prompt's words start and stop is found as the ComfyUI adapter does: the template's
    head and tail are what the empty prompt and a one-word probe share.
    """

    def __init__(self, pipe, entry: DiffusersFamily, label: str):
        self.pipe, self.entry, self.label = pipe, entry, label
        self.family = type(pipe).__name__
        self.context_length = 10**9  # the pipeline truncates silently: ``_row`` refuses a truncated concept
        self._template = None

    @torch.no_grad()
    def _row(self, prompt: str) -> tuple:
        """(rows the transformer attends to (R, d) float32 CPU, the token id behind each, the position in the
        encoder's input of each, the unpadded ids fed to the encoder, their positions)."""
        pipe = self.pipe
        embeds, mask, calls = self._encoder_call(prompt)
        if len(calls) != 1 or calls[0][0] is None:
            raise UnsupportedFamily(
                f"{self.family}.encode_prompt called its text encoder {len(calls)} time(s) for one prompt "
                "(expected once, with input_ids); the pack cannot tell which row holds which token."
            )
        ids, enc_mask = calls[0]
        ids = [int(t) for t in ids[0].tolist()]
        enc_mask = [1] * len(ids) if enc_mask is None else [int(bool(t)) for t in enc_mask[0].tolist()]
        real = [i for i, m in enumerate(enc_mask) if m]  # positions of the unpadded tokens
        rows = embeds.shape[0]
        drop = int(getattr(pipe, self.entry.drop_attr, 0)) if self.entry.drop_attr else 0
        if rows == len(ids) and not drop:
            positions = list(range(len(ids)))  # one row per token fed (padding included)
        elif rows == len(real) - drop:
            positions = real[drop:]  # the unpadded rows, after the dropped head
        else:
            raise ConceptTooLong(
                f"The concept '{prompt[:60]}' gave {rows} rows for {len(real)} tokens in {self.family}: the "
                "pipeline cut its context (max_sequence_length). Shorten the concept."
            )
        keep = list(range(rows)) if mask is None else [i for i, m in enumerate(mask.tolist()) if m]
        row_ids = [ids[positions[i]] for i in keep]
        pad = getattr(getattr(pipe, self.entry.tokenizer_attr, None), "pad_token_id", None)
        while pad is not None and row_ids and row_ids[-1] == pad and len(row_ids) > len(real) - drop:
            row_ids.pop()  # trailing padding, as the ComfyUI adapter strips it (MACE aligns the pad runs)
        hidden = embeds[keep].float().cpu()
        unpadded = [ids[i] for i in real]
        return hidden, row_ids, [positions[i] for i in keep], unpadded, real

    def _encoder_call(self, prompt: str) -> tuple:
        """(embeddings (R, d), transformer mask (R,) or None, the text encoder's recorded (ids, mask) calls)."""
        text_encoder = getattr(self.pipe, self.entry.text_encoder_attr, None)
        if text_encoder is None:
            raise UnsupportedFamily(
                f"{self.family} has no {self.entry.text_encoder_attr}; concepts cannot be encoded."
            )
        device = getattr(self.pipe, "device", "cpu")
        with _Capture(text_encoder) as capture:
            embeds, mask = self.entry.encode(self.pipe, prompt, device, self.entry.max_sequence_length)
        return embeds, mask, capture.calls

    def _head_tail(self) -> tuple:
        if self._template is None:
            empty = self._row("")[3]
            probe = self._row("x")[3]
            head, tail = shared_head_tail(empty, probe)
            self._template = (head, tail, empty[len(empty) - tail :])
        return self._template

    def encode(self, prompts) -> PromptEncoding:
        head, tail, closing = self._head_tail()
        rows, lengths, token_ids, before = [], [], [], []
        for prompt in list(prompts):
            hidden, row_ids, row_pos, unpadded, real = self._row(prompt)
            if tail and unpadded[len(unpadded) - tail :] != closing or len(real) >= self.entry.max_sequence_length:
                raise ConceptTooLong(
                    f"The concept '{prompt[:60]}' does not fit in {self.family}'s {self.entry.max_sequence_length} "
                    "positions (the pipeline truncated it). Shorten it or split it into several concepts."
                )
            start, stop = head, max(len(unpadded) - tail, head)
            if stop > start:
                last = row_pos.index(real[stop - 1]) if real[stop - 1] in row_pos else None
                first = row_pos.index(real[start]) if real[start] in row_pos else None
                if last is None or first is None:
                    raise FamilyMismatch(
                        f"{self.family} does not pass the words of '{prompt[:60]}' to its transformer (the rows "
                        "it keeps hold none of them); the pack cannot erase through this encoding."
                    )
                lengths.append(last + 2)
                before.append(first)
            else:  # the empty prompt
                lengths.append(min(2, hidden.shape[0]))
                before.append(row_pos.index(real[start]) if start < len(real) and real[start] in row_pos else 0)
            rows.append(hidden)
            token_ids.append(row_ids)
        return PromptEncoding.from_rows(rows, lengths, token_ids, before)


class HiDreamEncodings:
    """``HiDreamImagePipeline.encode_prompt`` once per prompt for all of HiDream-I1's text streams (T5, every
    Llama layer, the pooled CLIP-L ⊕ CLIP-G), with the input_ids its T5 and Llama encoders were called with.
    The last ``keep`` prompts are kept: a stream's solve encodes its prompts in turn, so a concept list plus
    a short preserve list is encoded once for all streams; a longer list is re-encoded per stream (one
    prompt's 32 Llama layers are 64 MB at 4096 wide: holding a 1,000-prompt list would need 64 GB)."""

    def __init__(self, pipe, length: int, keep: int = 64):
        self.pipe, self.length, self.keep, self._cache = pipe, length, keep, OrderedDict()

    @torch.no_grad()
    def get(self, prompt: str) -> dict:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        pipe = self.pipe
        for attr in ("text_encoder_3", "text_encoder_4"):
            if getattr(pipe, attr, None) is None:
                raise UnsupportedFamily(f"{type(pipe).__name__} has no {attr}; concepts cannot be encoded.")
        device = getattr(pipe, "device", "cpu")
        with _Capture(pipe.text_encoder_3) as t5, _Capture(pipe.text_encoder_4) as llama:
            out = pipe.encode_prompt(
                prompt=[prompt], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.length,
            )  # fmt: skip
        t5_rows, llama_rows, pooled = out[0], out[2], out[4]
        if t5_rows.ndim != 3 or llama_rows.ndim != 4 or pooled is None:
            raise FamilyMismatch(
                f"{type(pipe).__name__}.encode_prompt returned T5 {tuple(t5_rows.shape)} and Llama "
                f"{tuple(llama_rows.shape)} (expected (1, T, D) and (layers, 1, T, D)): not the layout of diffusers "
                "0.42's HiDream pipeline; nothing was changed."
            )
        got = {
            "t5": t5_rows[0], "llama": llama_rows[:, 0], "pooled": pooled[0].float().cpu(),
            "text_encoder_3": t5.calls, "text_encoder_4": llama.calls,
        }  # fmt: skip
        self._cache[prompt] = got
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return got


class HiDreamStreamEncoder(TemplatedPipelineEncoder):
    """``TemplatedPipelineEncoder`` over one HiDream text stream: ``t5`` (with the pooled vector: the stream
    that feeds the pooled embedder) or ``llama.<layer>``, read from a shared ``HiDreamEncodings``."""

    def __init__(self, pipe, entry: DiffusersFamily, label: str, encodings: HiDreamEncodings, stream: str):
        llama = stream != family_table.hidream.T5_STREAM
        if llama:
            entry = dataclasses.replace(entry, text_encoder_attr="text_encoder_4", tokenizer_attr="tokenizer_4")
        super().__init__(pipe, entry, label)
        self.encodings, self.stream = encodings, stream
        self.layer = int(stream.split(".")[1]) if llama else None
        self.family = f"{type(pipe).__name__} ({'Llama layer %d' % self.layer if llama else 'T5'})"

    def _encoder_call(self, prompt: str) -> tuple:
        got = self.encodings.get(prompt)
        if self.layer is None:
            return got["t5"], None, got["text_encoder_3"]
        if self.layer >= got["llama"].shape[0]:
            raise FamilyMismatch(
                f"HiDream's projection reads Llama layer {self.layer}, but {type(self.pipe).__name__} returned "
                f"{got['llama'].shape[0]} layers. Nothing was changed."
            )
        return got["llama"][self.layer], None, got["text_encoder_4"]

    def encode(self, prompts) -> PromptEncoding:
        prompts = list(prompts)
        enc = super().encode(prompts)
        if self.layer is not None:
            return enc
        return dataclasses.replace(enc, pooled=torch.stack([self.encodings.get(p)["pooled"] for p in prompts]))


def hidream_stream_encoders(pipe, transformer, entry: DiffusersFamily, streams) -> dict:
    """stream name → encoder, for ``compute_eraser_by_stream`` (one text stream per caption projection)."""
    pipeline = type(pipe).__name__
    if pipeline not in entry.pipelines:
        raise UnsupportedFamily(
            f"{pipeline} holds a HiDream-I1 transformer ({type(transformer).__name__}), but the pack encodes "
            f"concepts for it only through {', '.join(entry.pipelines)}. Nothing was changed."
        )
    encodings = HiDreamEncodings(pipe, entry.max_sequence_length)
    label = entry.record.label
    return {s: HiDreamStreamEncoder(pipe, entry, label, encodings, s) for s in sorted(set(streams))}


def live_eps(module, path: str) -> Optional[float]:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            return None
    eps = getattr(module, "eps", None)
    return None if eps is None else float(eps)


def text_entry_encoder(pipe, transformer, entry: DiffusersFamily, names: dict):
    """The encoder the closed form reads: the pipeline's ``encode_prompt`` rows, pushed through the
    record's norm / MLP in front of the edited Linear (the transformer's own weights and ε)."""
    record = entry.record
    pipeline = type(pipe).__name__
    if entry.pipelines and pipeline not in entry.pipelines:
        raise UnsupportedFamily(
            f"{pipeline} holds a {record.label} transformer ({type(transformer).__name__}), but the pack encodes "
            f"concepts for it only through {', '.join(entry.pipelines)} (their encode_prompt is the one the "
            "family was checked with; edit / control pipelines condition on images too). Load the model with "
            f"{entry.pipelines[0]}. Nothing was changed."
        )
    if not hasattr(pipe, "encode_prompt"):
        raise UnsupportedFamily(f"A {record.label} pipeline needs an encode_prompt method to encode concepts.")
    encoder = TemplatedPipelineEncoder(pipe, entry, record.label)
    params = dict(transformer.named_parameters())
    weights = {k: params[names[k]].detach() for k in pre_keys(record.pre) if k in names}
    edited = layer_specs({k: tuple(params[n].shape) for k, n in names.items()}, record.family)
    key_map = build_key_map(record.pre, weights, _pre_eps(transformer, record.pre, names))
    if key_map is None:
        return encoder
    return KeyMapEncoder(encoder, key_map, map_width(record.pre, weights), edited[0].in_features, record.label)


def _pre_eps(transformer, pre, names) -> Optional[float]:
    weight = getattr(pre, "weight", None)
    if weight is None or weight not in names:
        return None
    return live_eps(transformer, NORM_MODULES[names[weight]])
