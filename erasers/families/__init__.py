"""The family table: host model class → where text enters its denoiser and which methods apply.

One file per family group (``unet``, ``flux``, ``mmdit``, ``hidream``, ``wan``, ``aura``; ``tier2``: refused by
name); each exports ``RECORDS``. Adding a model class is one record. Hosts that know the model's class (ComfyUI:
``type(model.model).__name__`` and its ``model_config`` class) look it up here; files and diffusers keep
key sniffing (``erasers.files.families.detect_family``).
"""

from __future__ import annotations

from ..errors import UnsupportedFamily
from . import aura, flux, hidream, mmdit, tier2, unet, wan
from .key_map import KeyMapEncoder, build_key_map, gelu_mlp, rms_norm
from .record import CLOSED_FORM, GUARD_LABELS, GUARDS, FamilyRecord, PreMLP, PreNorm

RECORDS = unet.RECORDS + flux.RECORDS + mmdit.RECORDS + hidream.RECORDS + wan.RECORDS + aura.RECORDS + tier2.RECORDS

__all__ = [
    "CLOSED_FORM",
    "FamilyRecord",
    "GUARDS",
    "GUARD_LABELS",
    "KeyMapEncoder",
    "PreMLP",
    "PreNorm",
    "RECORDS",
    "build_key_map",
    "gelu_mlp",
    "guard_classes",
    "lookup",
    "lookup_guard",
    "rms_norm",
    "supported_classes",
]


def supported_classes() -> list:
    return sorted({r.host_class for r in RECORDS if r.supported})


def lookup(host_class: str, config_class: str = "") -> FamilyRecord:
    """The record of a host model class, or ``UnsupportedFamily`` naming the class and what is missing."""
    candidates = [r for r in RECORDS if r.host_class == host_class]
    if not candidates:
        raise UnsupportedFamily(
            f"The model class {host_class}{_config(config_class)} is not in the pack's family table, so the "
            f"closed-form erasers refuse it before anything runs. Supported: {', '.join(supported_classes())}. "
            "Supporting it needs a record in erasers/families/: which Linear(s) text enters through "
            "(canonical keys), any norm/MLP in front of them, and how the host's CLIP encodes a prompt."
        )
    fitting = [r for r in candidates if not r.config_classes or config_class in r.config_classes]
    if not fitting:
        accepted = sorted({c for r in candidates for c in r.config_classes})
        raise UnsupportedFamily(
            f"The model class {host_class} is loaded with the config {config_class or '?'}; the pack supports "
            f"{host_class} only as {', '.join(accepted)} ({', '.join(r.label for r in candidates)}). Other "
            "variants of the class add conditioning (image, audio, control) the closed forms were not checked "
            "against, so they are refused before anything runs."
        )
    record = fitting[0]
    if record.refused:
        needs = f" ({'; '.join(record.notes)})" if record.notes else ""
        raise UnsupportedFamily(
            f"{record.label} ({host_class}) is refused by name: {record.refused}{needs}. Nothing was changed."
        )
    return record


def guard_classes(guard: str) -> list:
    """'label (Class)' of every record a guard serves, for the refusal messages."""
    return [f"{r.label} ({r.host_class})" for r in RECORDS if r.guard_reason(guard) is None]


def lookup_guard(host_class: str, config_class: str, guard: str) -> FamilyRecord:
    """The record of a host model class if ``guard`` serves it, else ``UnsupportedFamily`` naming the class,
    the guard, the reason and the classes it does serve. Nothing has been sampled when this raises."""
    what = GUARD_LABELS.get(guard, guard)
    known = [r for r in RECORDS if r.host_class == host_class]
    if not known:
        raise UnsupportedFamily(
            f"The model class {host_class}{_config(config_class)} is not in the pack's family table "
            f"(erasers/families/), so {what} does not know where its text tokens sit and refuses it before "
            f"sampling. {what} serves: {', '.join(guard_classes(guard))}."
        )
    try:
        record = lookup(host_class, config_class)
    except UnsupportedFamily as exc:  # a refused record or a config variant: the table's own reason
        raise UnsupportedFamily(f"{what} refuses it before sampling: {exc}") from None
    reason = record.guard_reason(guard)
    if reason is not None:
        raise UnsupportedFamily(
            f"{what} cannot serve {record.label} ({host_class}{_config(config_class)}): {reason}. It refuses the "
            f"model before sampling (nothing was changed). {what} serves: {', '.join(guard_classes(guard))}."
        )
    return record


def _config(config_class: str) -> str:
    return f" (config {config_class})" if config_class else ""
