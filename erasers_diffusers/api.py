"""A small API for diffusers pipelines: compute an eraser, apply / remove it, save / load files.

    eraser = compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["Van Gogh"]))
    with erased(pipe, eraser, strength=1.0):
        image = pipe("a painting by Van Gogh").images[0]
    save_eraser(eraser, "vangogh.safetensors")

Works on any object with a denoiser (``.unet`` — a diffusers ``UNet2DConditionModel`` — or
``.transformer`` for Flux / SD3, and for Chroma, Flux.2, Qwen-Image, Z-Image, Lumina 2 and Wan text-to-video
through ``families.py``: the family table's edit points under diffusers' names, concepts encoded by the
pipeline's own ``encode_prompt``) and either CLIP towers (``.text_encoder``/``.tokenizer`` and optionally
``.text_encoder_2``/``.tokenizer_2``), a ``text_encoder_adapter()`` method returning an
``erasers.text.TextEncoder``, or (Flux/SD3) an ``encode_prompt`` method. diffusers itself is never
imported here: the pipeline object brings its modules.

Applying writes ``W + strength·ΔW`` into the module weights in their own dtype after keeping a CPU copy
of the originals; removing copies those back, so the model is restored bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from erasers import families as family_table
from erasers.config import ArgumentTypeError, check_number, check_path
from erasers.edits.eraser import Eraser, compute_eraser, compute_eraser_by_stream, fingerprint
from erasers.errors import EraserAlreadyApplied, NonFiniteResult, UnsupportedFamily
from erasers.files.eraser_file import load_eraser as _load_file
from erasers.files.eraser_file import save_eraser as _save_file
from erasers.files.families import ATTN2_KV, Family, detect_family, layer_specs
from erasers.files.keys import DIT_DIFFUSERS_TO_CANONICAL, SD3_DIFFUSERS_TO_CANONICAL, diffusers_to_canonical
from erasers.text import PromptEncoding

from . import families as new_families
from .clip_text import ClipTextEncoder, Tower

log = logging.getLogger(__name__)

__all__ = [
    "DiffusersTextEncoder",
    "canonical_weights",
    "pipeline_family",
    "compute_eraser_for_pipeline",
    "apply_eraser",
    "remove_eraser",
    "erased",
    "save_eraser",
    "load_eraser",
    "EraserHandle",
]

#: attribute set on the denoiser while an eraser is applied (refuses a second apply)
HANDLE_ATTR = "_concept_eraser_handle"
#: canonical marker keys that let ``detect_family`` see SDXL / Flux / SD3 from the projections alone
SDXL_MARKER = ("add_embedding.linear_1.weight", "label_emb.0.0.weight")


# -- which module weights are the text projections ---------------------------------------------------


def denoiser(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise UnsupportedFamily(
        f"Expected a diffusers pipeline with a .unet or .transformer, found {type(pipe).__name__} with "
        f"neither. Pass a StableDiffusion / SDXL / SD3 / Flux pipeline."
    )


def dit_family(module) -> Optional[Family]:
    """Flux / SD3 by name; the newer families (#16: Chroma, Flux.2, Qwen-Image, Z-Image, Lumina 2, Wan t2v)
    from the family table through ``families.DIFFUSERS_FAMILIES``; HiDream and unchecked variants are
    refused there by name. None for UNets."""
    entry = new_families.lookup(module)
    if entry is not None:
        return entry.record.family
    name = type(module).__name__.lower()
    if "flux" in name:
        return Family.FLUX
    if "sd3" in name:
        return Family.SD3
    return None


def new_family_params(pipe, module, entry) -> dict:
    """canonical key → (diffusers name, Parameter) of the edited Linear(s) of a newer-family transformer."""
    record = entry.record
    if record.family == Family.WAN:
        new_families.refuse_second_expert(pipe, record.label)
    named = dict(module.named_parameters())
    names = entry.names(list(named))
    shapes = {k: tuple(named[n].shape) for k, n in names.items()}
    out = {s.key: (names[s.key], named[names[s.key]]) for s in layer_specs(shapes, record.family)}
    if not out:
        raise UnsupportedFamily(
            f"The {type(module).__name__} ({record.label}) has none of the text-input layers the family table "
            f"names ({record.context_key or 'its text entry'} in ComfyUI's keys); expected the diffusers layout "
            "of diffusers 0.42. Nothing was changed."
        )
    return out


def layers_per_block(unet) -> int:
    value = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedFamily(
                f"UNets with a different layers_per_block per block ({list(value)}) have no "
                f"LDM layout, so their layers cannot be named canonically."
            )
        value = value[0]
    return int(value)


def projection_params(pipe) -> dict:
    """canonical key → (diffusers parameter name, Parameter) for every text projection (+ markers)."""
    module = denoiser(pipe)
    entry = new_families.lookup(module)
    if entry is not None:
        return new_family_params(pipe, module, entry)
    named = dict(module.named_parameters())
    out = {}
    family = dit_family(module)
    if family is not None:
        table = DIT_DIFFUSERS_TO_CANONICAL if family == Family.FLUX else SD3_DIFFUSERS_TO_CANONICAL
        for name, canonical in table.items():
            if name in named:
                out[canonical] = (name, named[name])
        return out
    per_block = layers_per_block(module)
    for name, param in named.items():
        if ATTN2_KV.search(name):
            canonical = diffusers_to_canonical(name, per_block)
            if canonical is None:
                raise UnsupportedFamily(
                    f"Cross-attention weight '{name}' is outside the UNet's down/mid/up "
                    f"attention blocks; this UNet layout is not supported."
                )
            out[canonical] = (name, param)
    if SDXL_MARKER[0] in named:
        out[SDXL_MARKER[1]] = (SDXL_MARKER[0], named[SDXL_MARKER[0]])
    return out


def canonical_weights(pipe) -> dict:
    """canonical key → weight tensor (the live parameter data, not a copy) of the text projections."""
    return {key: param.data for key, (_, param) in projection_params(pipe).items()}


def pipeline_family(pipe) -> Family:
    family = dit_family(denoiser(pipe))
    if family is not None:
        return family
    return detect_family({k: tuple(v.shape) for k, v in canonical_weights(pipe).items()})


# -- text encoding ------------------------------------------------------------------------------------


class PromptPipelineEncoder:
    """``TextEncoder`` for Flux / SD3 through the pipeline's own ``encode_prompt`` (one batched call)."""

    def __init__(self, pipe, family: Family, max_sequence_length: Optional[int] = None):
        self.pipe, self.family_enum, self.family = pipe, family, family.value
        self.t5 = getattr(pipe, "tokenizer_3" if family == Family.SD3 else "tokenizer_2", None)
        self.context_length = max_sequence_length or (256 if family == Family.SD3 else 512)
        self.context_dim = None  # the pipeline checks its own shapes

    @torch.no_grad()
    def encode(self, prompts) -> PromptEncoding:
        prompts = list(prompts)
        device = getattr(self.pipe, "device", "cpu")
        if self.family_enum == Family.FLUX:
            hidden, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.context_length,
            )
            tokenizer, has_bos = self.t5, False
        else:
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=self.context_length,
            )
            # SD3's context starts with the 77 CLIP positions; subject tokens are found there
            tokenizer, has_bos = self.pipe.tokenizer, True
        ids = [list(map(int, r)) for r in tokenizer(prompts)["input_ids"]]
        return PromptEncoding(
            hidden=hidden.float().cpu(),
            lengths=torch.tensor([len(r) for r in ids]),
            token_ids=ids,
            pooled=pooled.float().cpu(),
            has_bos=has_bos,
        )


def DiffusersTextEncoder(pipe):
    """The pipeline's text encoder(s) as an ``erasers.text.TextEncoder`` (the conditioning its
    denoiser sees: SD1/SD2 last hidden state; SDXL both penultimate layers → 2048 + pooled)."""
    if hasattr(pipe, "text_encoder_adapter"):
        return pipe.text_encoder_adapter()
    module = denoiser(pipe)
    entry = new_families.lookup(module)
    if entry is not None and entry.record.family == Family.HIDREAM:
        raise UnsupportedFamily(
            "HiDream-I1's caption projections read different text streams (T5, one Llama layer each), so no one "
            "text encoder describes them: use compute_eraser_for_pipeline, which solves each stream with its own "
            "encoder (api.hidream_encoders)."
        )
    if entry is not None:
        names = {k: n for k, (n, _) in projection_params(pipe).items()}
        names.update(entry.names([n for n, _ in module.named_parameters()]))
        return new_families.text_entry_encoder(pipe, module, entry, names)
    family = pipeline_family(pipe)
    if family.is_dit:
        if not hasattr(pipe, "encode_prompt"):
            raise UnsupportedFamily(f"A {family.label} pipeline needs an encode_prompt method to encode concepts.")
        return PromptPipelineEncoder(pipe, family)
    pairs = [(getattr(pipe, f"tokenizer{s}", None), getattr(pipe, f"text_encoder{s}", None)) for s in ("", "_2")]
    pairs = [(t, m) for t, m in pairs if t is not None and m is not None]
    if not pairs:
        raise UnsupportedFamily(
            f"{type(pipe).__name__} has no tokenizer + text_encoder pair and no "
            f"text_encoder_adapter(); cannot encode concepts."
        )
    if len(pairs) == 1 and family != Family.SDXL:
        towers = [Tower(pairs[0][0], pairs[0][1], "last")]
    else:
        # SDXL (and its refiner with only the G tower): penultimate layers, pooled from the last tower
        towers = [Tower(t, m, "penultimate", pooled=(n == len(pairs) - 1)) for n, (t, m) in enumerate(pairs)]
    # CLIP's 77 positions; tokenizers built by hand may report a huge model_max_length
    length = min(int(getattr(pairs[0][0], "model_max_length", 77) or 77), 77)
    return ClipTextEncoder(family.value, towers, context_length=length)


# -- compute / apply / remove -------------------------------------------------------------------------


def hidream_encoders(pipe) -> tuple:
    """(stream name → encoder, canonical key → stream) of a HiDream-I1 pipeline: each caption projection
    reads T5 or one Llama layer (``transformer.config.llama_layers``), the pooled embedder T5's stream."""
    module = denoiser(pipe)
    entry = new_families.lookup(module)
    keys = list(canonical_weights(pipe))
    streams = family_table.hidream.caption_streams(keys, getattr(module.config, "llama_layers", None))
    return new_families.hidream_stream_encoders(pipe, module, entry, streams.values()), streams


def compute_eraser_for_pipeline(pipe, config, progress=None) -> Eraser:
    """Solve ``config`` (a method config, e.g. ``UCEConfig``) on the pipeline's own weights and text encoder
    (HiDream-I1: per text stream, ``compute_eraser_by_stream``)."""
    if pipeline_family(pipe) == Family.HIDREAM:
        encoders, streams = hidream_encoders(pipe)
        weights = canonical_weights(pipe)
        return compute_eraser_by_stream(config, encoders, {k: weights[k] for k in streams}, streams, Family.HIDREAM)
    return compute_eraser(
        config, DiffusersTextEncoder(pipe), canonical_weights(pipe), pipeline_family(pipe), progress=progress
    )


@dataclass
class EraserHandle:
    """What ``apply_eraser`` changed: originals (CPU, original dtype) to copy back on removal.

    It exists (and is attached to the denoiser) before the first weight is written, so a failure part-way
    can always be undone from it; ``written`` lists the parameters changed so far, in order."""

    eraser: Eraser
    strength: float
    backup: dict = field(default_factory=dict)  # diffusers parameter name → original tensor (CPU)
    removed: bool = False
    written: list = field(default_factory=list)


def check_pipeline(pipe, eraser: Eraser) -> dict:
    """Family, keys and shapes of the eraser against the pipeline; returns its projection params."""
    if not isinstance(eraser, Eraser):
        raise ArgumentTypeError(
            f"eraser must be an Eraser (from compute_eraser_for_pipeline or load_eraser), found "
            f"{type(eraser).__name__}. To apply a file, load it first: load_eraser(path, pipe)."
        )
    params = projection_params(pipe)
    shapes = {k: tuple(p.shape) for k, (_, p) in params.items()}
    weights = {k: p.data for k, (_, p) in params.items() if k in eraser.deltas}
    eraser.check_model(shapes, pipeline_family(pipe), fingerprint(weights) if weights else None)
    return params


def check_strength(strength) -> float:
    """``strength`` as a finite float; NaN/Inf, booleans and strings are refused (``ConfigError``)."""
    return check_number("strength", strength)


def check_writable(params: dict, eraser: Eraser) -> None:
    """Every edited weight must take a float delta: quantised (integer) or meta tensors cannot."""
    for key in sorted(eraser.deltas):
        name, param = params[key]
        if not param.dtype.is_floating_point or param.is_meta:
            raise UnsupportedFamily(
                f"Layer {name} is stored as {param.dtype}{' on the meta device' if param.is_meta else ''}; an "
                f"eraser adds a float delta to it, which this weight cannot hold. Load the model in float32, "
                f"float16 or bfloat16 (not quantised, not offloaded to 'meta')."
            )


def new_weight(key: str, name: str, param, delta, strength: float) -> torch.Tensor:
    """``W + strength·ΔW`` in the weight's own dtype, refused when it is not finite (e.g. float16 overflow)."""
    value = (param.data.float() + strength * delta.dense(torch.float32).to(param.device)).to(param.dtype)
    if not torch.isfinite(value).all():
        raise NonFiniteResult(
            f"Applying the eraser at strength {strength:g} makes layer {name} ({key}) non-finite in "
            f"{param.dtype} (overflow). Lower the strength or load the model in float32; nothing was changed."
        )
    return value


def write_weight(param, value: torch.Tensor) -> None:
    """The one place ``apply_eraser`` writes a weight (tests inject failures here)."""
    param.data.copy_(value)


def restore_weights(module: torch.nn.Module, backup: dict, names) -> None:
    """Copy the originals of ``names`` back from ``backup`` (bit for bit)."""
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name in names:
            named[name].data.copy_(backup[name].to(named[name].device))


def apply_eraser(pipe, eraser: Eraser, strength: float = 1.0) -> EraserHandle:
    """Add ``strength·ΔW`` to the denoiser's weights in place; returns the handle ``remove_eraser`` needs.

    All or nothing: the eraser, the strength and every layer (present, shape, float dtype, finite factors)
    are checked before the first weight is written; if anything fails part-way (or the call is interrupted)
    the layers already written are restored bit for bit and the error propagates.
    """
    strength = check_strength(strength)
    module = denoiser(pipe)
    if getattr(module, HANDLE_ATTR, None) is not None:
        raise EraserAlreadyApplied(
            f"An eraser ({getattr(module, HANDLE_ATTR).eraser.method}) is already applied to this pipeline's "
            f"{type(module).__name__}. Call remove_eraser(pipe, handle) first, or use the erased(...) context."
        )
    params = check_pipeline(pipe, eraser)  # raises before anything is written (factors, family, keys, shapes)
    check_writable(params, eraser)
    handle = EraserHandle(eraser, strength)
    keys = sorted(eraser.deltas)
    with torch.no_grad():
        for key in keys:
            name, param = params[key]
            handle.backup[name] = param.data.detach().to("cpu", copy=True)
        setattr(module, HANDLE_ATTR, handle)  # the handle exists before the first write
        try:
            if strength != 0:
                for key in keys:
                    name, param = params[key]
                    value = new_weight(key, name, param, eraser.deltas[key], strength)
                    handle.written.append(name)  # before the write: a write that fails half-way is undone too
                    write_weight(param, value)
        except BaseException:
            restore_weights(module, handle.backup, handle.written)
            handle.removed = True
            setattr(module, HANDLE_ATTR, None)
            log.warning(
                "Applying the %s eraser failed; the %d layer(s) touched were restored bit for bit.",
                eraser.method,
                len(handle.written),
            )
            raise
    log.info("Applied %s eraser to %d layers at strength %g", eraser.method, len(eraser.deltas), strength)
    return handle


def remove_eraser(pipe, handle: EraserHandle) -> None:
    """Copy the original weights back (bit for bit)."""
    if not isinstance(handle, EraserHandle):
        raise ArgumentTypeError(
            f"handle must be the EraserHandle apply_eraser returned, found {type(handle).__name__}."
        )
    module = denoiser(pipe)
    if handle.removed:
        return
    if getattr(module, HANDLE_ATTR, None) is not handle:
        raise EraserAlreadyApplied("This handle does not belong to the eraser applied to this pipeline.")
    restore_weights(module, handle.backup, list(handle.backup))
    handle.removed = True
    setattr(module, HANDLE_ATTR, None)


@contextlib.contextmanager
def erased(pipe, eraser: Eraser, strength: float = 1.0):
    """``with erased(pipe, eraser): ...`` — the eraser is applied inside the block only."""
    handle = apply_eraser(pipe, eraser, strength)
    try:
        yield handle
    finally:
        remove_eraser(pipe, handle)


def save_eraser(eraser: Eraser, path, **options) -> str:
    """``erasers.files.eraser_file.save_eraser`` with the arguments checked (``path``: str or os.PathLike)."""
    if not isinstance(eraser, Eraser):
        raise ArgumentTypeError(f"eraser must be an Eraser, found {type(eraser).__name__}.")
    return _save_file(eraser, check_path("path", path), **options)


def load_eraser(path, pipe=None) -> Eraser:
    """Read an eraser file (str or os.PathLike); refuse a damaged one (factor ranks that differ, NaN/Inf),
    naming the file and layer (the core reader checks the factors); with ``pipe``, also check its family,
    layers and shapes against the pipeline."""
    eraser = _load_file(check_path("path", path))
    if pipe is not None:
        check_pipeline(pipe, eraser)
    return eraser
