"""Erasure adapter file formats, one module each; ``detect_format`` asks each recogniser in turn.

Every module has ``NAME``, ``TITLE``, ``recognise(tensors, metadata) -> bool`` and
``convert(tensors, metadata, model_keys, source=…, **options) -> (LayerDeltas, ConversionReport)``;
``model_keys`` maps canonical keys (plus ``te.<encoder>.…`` text keys) to shapes or tensors.
Order matters: the most specific layouts come first. ``dit`` (the newer DiTs in ComfyUI's names) is chosen
by the model, before the others, because its names mean other layers on other families.
"""

from __future__ import annotations

from ...errors import UnknownFormat
from . import dit, eraseanything, esd, kohya, peft, spm, uce_weights
from ._common import ConversionReport, LayerDeltas, model_shapes  # noqa: F401

FORMATS = (spm, kohya, eraseanything, peft, uce_weights, esd, dit)


def get_format(name: str):
    for fmt in FORMATS:
        if fmt.NAME == name:
            return fmt
    raise UnknownFormat(f"Unknown format '{name}'; known: {', '.join(f.NAME for f in FORMATS)}.")


def detect_format(tensors, metadata, source: str = "the file"):
    for fmt in FORMATS:
        if fmt.recognise(tensors, metadata or {}):
            return fmt
    sample = sorted(tensors)[:5]
    raise UnknownFormat(
        f"{source} is not in any format this pack reads. Tried: "
        f"{'; '.join(f'{f.NAME} ({f.TITLE})' for f in FORMATS)}. Its first keys are {sample}."
    )


def convert_file(tensors, metadata, model_keys, source: str = "the file", fmt=None, **options):
    """Detect (or take) the format and convert; returns (LayerDeltas, ConversionReport).

    On Chroma, Flux.2, Qwen-Image, Lumina 2 / Z-Image and Wan a file of LoRA factors is read by the names
    ComfyUI resolves for that family (``dit``), whatever spelling it uses."""
    if fmt is None and dit.applies(tensors, metadata or {}, model_shapes(model_keys)):
        fmt = dit
    fmt = get_format(fmt) if isinstance(fmt, str) else (fmt or detect_format(tensors, metadata, source))
    return fmt.convert(tensors, metadata or {}, model_keys, source=source, **options)
