"""Eraser files: ``.safetensors`` in the kohya LoRA layout, so stock LoRA loaders apply them too.

Per edited layer ``L`` (canonical key → ``keys.kohya_name``):
    L.lora_up.weight (out, r)   L.lora_down.weight (r, in)   L.alpha = r   (scale α/r = 1: ΔW = up·down)
Header metadata (all strings): eraser.* fields below. Only safetensors is ever read: a pickled file could
run code on load.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from typing import Optional

import torch

from . import __version__
from .eraser import Eraser
from .errors import BadEraserFile, UnknownKeys
from .families import Family, parse_family
from .keys import kohya_name
from .lowrank import LowRankDelta

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def to_state_dict(eraser: Eraser, dtype: torch.dtype = torch.float32):
    tensors, names = {}, {}
    for key, delta in sorted(eraser.deltas.items()):  # copies: methods may share factors across layers
        name = kohya_name(key)
        names[name] = key
        tensors[f"{name}.lora_up.weight"] = delta.up.to(dtype, copy=True).contiguous()
        tensors[f"{name}.lora_down.weight"] = delta.down.to(dtype, copy=True).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(delta.rank))
    metadata = {
        "eraser.format_version": FORMAT_VERSION,
        "eraser.method": eraser.method,
        "eraser.concepts": json.dumps(eraser.concepts, ensure_ascii=False),
        "eraser.anchors": json.dumps(eraser.config.get("anchors", []), ensure_ascii=False),
        "eraser.preserve": json.dumps(eraser.config.get("preserve", []), ensure_ascii=False),
        "eraser.config": json.dumps(eraser.config, ensure_ascii=False, sort_keys=True),
        "eraser.family": eraser.family.value,
        "eraser.pack_version": eraser.pack_version,
        "eraser.base_fingerprint": eraser.base_fingerprint,
        "eraser.reconstruction_error": f"{eraser.reconstruction_error:.3g}",
        "eraser.layers": json.dumps(names),
        # kohya/A1111 readers show these
        "ss_network_module": "networks.lora",
        "ss_output_name": "eraser-" + eraser.method,
    }
    return tensors, metadata


def save_eraser(eraser: Eraser, path: str, dtype: torch.dtype = torch.float32) -> str:
    from safetensors.torch import save_file

    if not path.endswith(".safetensors"):
        path += ".safetensors"
    tensors, metadata = to_state_dict(eraser, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    log.info("Saved %s eraser (%d layers) to %s", eraser.method, len(eraser.deltas), path)
    return path


def check_safetensors(path: str) -> None:
    """Refuse pickles, missing, empty, truncated or non-safetensors files before anything is loaded."""
    name = os.path.basename(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise BadEraserFile(
            f"'{name}' is a pickled PyTorch file. Only .safetensors files are loaded, because unpickling "
            f"an untrusted file can run arbitrary code. Convert it to .safetensors first."
        )
    if not os.path.isfile(path):
        raise BadEraserFile(f"No file at '{path}'.")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise BadEraserFile(f"'{name}' has {size} bytes: too short for a .safetensors file (empty or truncated).")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or header_len > size - 8:
        hint = " It looks like a zip/pickle archive." if head[:2] == b"PK" else ""
        raise BadEraserFile(
            f"'{name}' is not a .safetensors file (its header is unreadable).{hint} Expected the "
            f"safetensors layout; re-download or re-save the file."
        )


def read_safetensors(path: str):
    """(tensors, metadata) from a .safetensors file, with errors that say what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = os.path.basename(path)
    check_safetensors(path)
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadEraserFile(f"'{name}' could not be read as .safetensors ({exc}). The file may be truncated: "
                            f"re-download or re-save it.") from exc
    return tensors, metadata


def from_state_dict(tensors: dict, metadata: dict, source: Optional[str] = None) -> Eraser:
    name = os.path.basename(source) if source else "the file"
    if metadata.get("eraser.format_version") is None:
        raise BadEraserFile(
            f"{name} has no eraser metadata: it is not an eraser file made by this pack. To apply an ordinary "
            f"erasure LoRA use 'Load Erasure LoRA' instead."
        )
    family = parse_family(metadata.get("eraser.family"))
    layers = json.loads(metadata.get("eraser.layers", "{}"))
    deltas, unknown = {}, []
    stems = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in tensors}
    for stem in sorted(stems):
        up, down = tensors.get(f"{stem}.lora_up.weight"), tensors.get(f"{stem}.lora_down.weight")
        if stem not in layers or up is None or down is None:
            unknown.append(stem)
            continue
        alpha = tensors.get(f"{stem}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        deltas[layers[stem]] = LowRankDelta(up.float() * scale, down.float())
    if unknown:
        raise UnknownKeys(f"{name} holds keys this eraser format does not know: {unknown[:10]}"
                          f"{' …' if len(unknown) > 10 else ''}. Expected <layer>.lora_up/lora_down/alpha "
                          f"for the layers listed in its metadata.")
    config = json.loads(metadata.get("eraser.config", "{}"))
    eraser = Eraser(deltas, family or Family.UNET, config, metadata.get("eraser.base_fingerprint", ""),
                    float(metadata.get("eraser.reconstruction_error", "0") or 0),
                    metadata.get("eraser.pack_version", "?"), source=source)
    return eraser


def load_eraser(path: str) -> Eraser:
    tensors, metadata = read_safetensors(path)
    return from_state_dict(tensors, metadata, source=path)


def describe_file(path: str) -> dict:
    """Metadata and what the file edits — for `python -m erasers info` and the front end."""
    eraser = load_eraser(path)
    return {
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "method": eraser.method,
        "family": eraser.family.value,
        "concepts": eraser.concepts,
        "anchors": eraser.config.get("anchors", []),
        "preserve": eraser.config.get("preserve", []),
        "config": eraser.config,
        "layers": len(eraser.deltas),
        "max_rank": max((d.rank for d in eraser.deltas.values()), default=0),
        "pack_version": eraser.pack_version,
        "base_fingerprint": eraser.base_fingerprint,
    }
