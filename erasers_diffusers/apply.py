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

from erasers.config import ArgumentTypeError, ConfigError, check_number, check_path, text_list
from erasers.errors import NonFiniteResult, UnknownFormat
from erasers.files.eraser_file import read_safetensors
from erasers.files.keys import canonical_to_diffusers_unet, diffusers_unet_candidates
from erasers.lowrank import LowRankDelta
from erasers.membranes.formats import convert_file, detect_format, get_format
from erasers.membranes.formats._common import TEXT_PREFIX
from erasers.membranes.hooks import MembraneHooks
from erasers.membranes.spm import GATE_ALWAYS, GATE_FT, Gate, Membrane, RateCache, build_stacks
from erasers.text import PromptEncoding

log = logging.getLogger(__name__)


class HFTextEncoder:
    """TextEncoder over a transformers CLIP: a plain 77-token encode, last hidden state (spm.md §4.1)."""

    def __init__(self, tokenizer, text_encoder, family: str = "sd1"):
        self.tokenizer, self.text_encoder, self.family = tokenizer, text_encoder, family
        self.context_length = tokenizer.model_max_length
        self.context_dim = text_encoder.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts) -> PromptEncoding:
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        ids = batch.input_ids
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(ids.to(device))[0].float().cpu()
        eos = self.tokenizer.eos_token_id
        rows = []
        for row in ids.tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
        return PromptEncoding(hidden=hidden, lengths=torch.tensor([len(r) for r in rows]), token_ids=rows)


def text_encoder_modules(pipe) -> dict:
    """Canonical text-encoder name → the pipeline's text encoder module: SDXL's pair is clip_l + clip_g;
    a lone encoder is clip_h when 1024 wide (SD2's OpenCLIP ViT-H), clip_l otherwise."""
    first, second = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if first is not None and second is not None:
        return {"clip_l": first, "clip_g": second}
    if first is not None:
        # not every pipeline's encoder is a CLIPTextModel (the shapes world's is not): read the width defensively
        width = getattr(getattr(first, "config", None), "hidden_size", None)
        return {"clip_h" if width == 1024 else "clip_l": first}
    return {}


_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _text_path(name: str) -> str:
    """HF parameter name → the ``text_model.…`` spelling LoRA files use (transformers 5 dropped the
    ``text_model`` wrapper module from CLIPTextModel; checkpoints and LoRAs still spell it)."""
    return "text_model." + name if name.startswith(_TEXT_MODEL_PARTS) else name


def _module_path(module: torch.nn.Module, path: str) -> str:
    """The reverse of ``_text_path`` for this module's layout."""
    if path.startswith("text_model.") and not hasattr(module, "text_model"):
        return path[len("text_model.") :]
    return path


def text_model_keys(pipe) -> dict:
    """``te.<encoder>.<text_model.… path>`` → parameter of each of the pipeline's text encoders."""
    return {
        f"{TEXT_PREFIX}{enc}.{_text_path(name)}": p.detach()
        for enc, module in text_encoder_modules(pipe).items()
        for name, p in module.named_parameters()
    }


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

    def __init__(
        self,
        pipe,
        membranes: Sequence[Membrane] = (),
        combination: str = "official",
        encoder=None,
        loras: Sequence[Membrane] = (),
    ):
        """``membranes`` combine by ``combination``; ``loras`` (gated erasure LoRAs) always linearly."""
        self.unet = pipe.unet
        self.membranes = list(membranes) + list(loras)
        for mem in self.membranes:
            if not isinstance(mem, Membrane):
                raise ArgumentTypeError(
                    f"membranes and loras must hold Membrane objects (from membrane_from_file), found "
                    f"{type(mem).__name__}."
                )
            check_number(f"strength of {mem.name}", mem.strength)
            check_membrane_finite(mem)
        self.groups, self.text_hooks, self._pre = [], [], None
        try:
            self._install(pipe, membranes, combination, encoder)
        except BaseException:
            self.remove()  # all or nothing: no hook stays behind when installing fails part-way
            raise

    def _install(self, pipe, membranes, combination, encoder) -> None:
        split = len(membranes)
        to_canon = unet_canonical_names(self.unet)
        self.shapes = {to_canon[n]: tuple(p.shape) for n, p in self.unet.named_parameters() if n in to_canon}
        to_diff = {c[: -len(".weight")]: d[: -len(".weight")] for d, c in to_canon.items() if c.endswith(".weight")}
        needs_text = any(m.gate.transport for m in self.membranes)
        if needs_text and encoder is None:
            encoder = HFTextEncoder(pipe.tokenizer, pipe.text_encoder)
        self.cache = RateCache(self.membranes, encoder)
        for rule, idx in ((combination, list(range(split))), ("linear", list(range(split, len(self.membranes))))):
            if idx:
                stacks = build_stacks([self.membranes[i] for i in idx], rule, self.shapes)
                hooks = MembraneHooks(self.unet, stacks, module_name=to_diff.get)
                if hooks.missing:
                    log.warning("%d layer(s) not found in the UNet: %s", len(hooks.missing), hooks.missing[:5])
                self.groups.append((idx, hooks))
        self.prompt_rates: Optional[torch.Tensor] = None
        self.images_per_prompt = 1
        self.text_hooks = apply_text_deltas(pipe, self.membranes)
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
            raise RuntimeError(
                f"UNet batch {sample.shape[0]} is not a multiple of {rows.shape[0]} prompt rows; "
                f"call set_prompts() with the prompts of this call."
            )
        rows = rows.repeat(sample.shape[0] // rows.shape[0], 1)  # CFG: [uncond; cond] share the prompt's rate
        for idx, hooks in self.groups:
            hooks.rates = rows[:, idx]

    def remove(self) -> None:
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        for hooks in self.text_hooks:
            hooks.remove()
        self.text_hooks = []
        for _, hooks in self.groups:
            hooks.remove()
        self.groups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def check_membrane_finite(mem: Membrane) -> None:
    """Refuse a membrane holding NaN/Inf (one built in memory; files are checked when read), naming the layer."""
    for key, delta in mem.deltas.items():
        parts = [delta.up, delta.down] if isinstance(delta, LowRankDelta) else [delta]
        parts = [getattr(p, "weight", p) for p in parts]
        if any(isinstance(p, torch.Tensor) and p.is_floating_point() and not torch.isfinite(p).all() for p in parts):
            raise NonFiniteResult(
                f"{mem.name}: layer {key} holds NaN or Inf; applying it would corrupt every image. "
                f"Nothing was hooked: re-create the membrane / LoRA."
            )


def apply_text_deltas(pipe, membranes: Sequence[Membrane]) -> list:
    """Forward hooks adding each gate-"always" membrane's text-encoder deltas (at its strength) to the
    pipeline's text encoders; ``remove()`` on each restores them bit for bit (weights are never written).
    Facilitated transport acts on the UNet only: gated text keys are skipped with a warning."""
    encoders = text_encoder_modules(pipe)
    per_encoder = {}
    for i, mem in enumerate(membranes):
        text = {k: d for k, d in mem.deltas.items() if isinstance(k, str) and k.startswith(TEXT_PREFIX)}
        if text and mem.gate.transport:
            log.warning(
                "%s: the facilitated-transport gate acts on the UNet only; its %d text-encoder layer(s) "
                "are applied with gate 'always' only.",
                mem.name,
                len(text),
            )
            continue
        for key, delta in text.items():
            enc, path = key[len(TEXT_PREFIX) :].split(".", 1)
            if enc in encoders:
                per_encoder.setdefault(enc, {}).setdefault(i, {})[path] = delta
    installed = []
    try:
        for enc, by_membrane in per_encoder.items():
            module = encoders[enc]
            shapes = {_text_path(n): tuple(p.shape) for n, p in module.named_parameters()}
            order = sorted(by_membrane)
            stacks = build_stacks([Membrane(by_membrane[i], name=membranes[i].name) for i in order], "linear", shapes)
            hooks = MembraneHooks(module, stacks, module_name=lambda path, module=module: _module_path(module, path))
            installed.append(hooks)
            hooks.rates = torch.tensor([[float(membranes[i].strength) for i in order]])  # one row: any batch
    except BaseException:
        for hooks in installed:  # all or nothing across the text encoders too
            hooks.remove()
        raise
    return installed


def load_for_unet(unet, path, fmt: Optional[str] = None, pipe=None, **options):
    """A file's LayerDeltas against a diffusers UNet (canonical keys) and, when ``pipe`` is given, its text
    encoders (``te.<encoder>.…``), with the conversion report. ``path``: str or os.PathLike."""
    path = check_path("path", path)
    to_canon = unet_canonical_names(unet)
    model_keys = {to_canon[n]: p.detach() for n, p in unet.named_parameters() if n in to_canon}
    if pipe is not None:
        model_keys.update(text_model_keys(pipe))
    tensors, metadata = read_safetensors(path)
    source = os.path.basename(path)
    if isinstance(fmt, str):
        check_requested_format(tensors, metadata, fmt, source)
    return convert_file(tensors, metadata, model_keys, source=source, fmt=fmt, **options)


def check_requested_format(tensors, metadata, fmt: str, source: str) -> None:
    """A file read as ``fmt`` (e.g. ``--spm``) must be one: otherwise say what it is and how to load it, instead
    of converting it under the wrong name (a kohya SDXL LoRA used to be called "a SDXL spm file")."""
    chosen = get_format(fmt)
    if chosen.recognise(tensors, metadata or {}):
        return
    try:
        actual = detect_format(tensors, metadata, source)
    except UnknownFormat:
        actual = None
    if actual is None or actual.NAME == chosen.NAME:
        return  # nothing better to say: let the converter name what does not fit
    raise UnknownFormat(
        f"{source} is a {actual.TITLE} file, not a {chosen.TITLE} file. Load it as an erasure LoRA "
        f"(CLI: --lora; Python: membrane_from_file(..., kind='lora')) instead."
    )


def membrane_from_file(
    unet,
    path,
    strength: float = 1.0,
    transport: bool = True,
    concepts=None,
    fmt: Optional[str] = None,
    kind: str = "spm",
    pipe=None,
) -> tuple:
    """(Membrane, report); ``kind`` "spm" reads the SPM layout, "lora" detects any erasure format. With
    ``pipe`` the file's text-encoder keys are matched too (DiffusersMembranes applies them)."""
    strength = check_number("strength", strength)
    if kind not in ("spm", "lora"):
        raise ConfigError(f"kind must be 'spm' or 'lora', found {kind!r}.")
    names = text_list("concepts", concepts)
    path = check_path("path", path)
    deltas, report = load_for_unet(unet, path, fmt=fmt or ("spm" if kind == "spm" else None), pipe=pipe)
    names = names or list(report.concepts)
    gate = Gate(GATE_FT if transport else GATE_ALWAYS, names)
    return Membrane(deltas, gate, strength, name=f"{kind}:{os.path.basename(path)}"), report


__all__ = [
    "DiffusersMembranes",
    "HFTextEncoder",
    "membrane_from_file",
    "apply_text_deltas",
    "text_model_keys",
    "load_for_unet",
    "unet_canonical_names",
    "canonical_to_diffusers_unet",
]
