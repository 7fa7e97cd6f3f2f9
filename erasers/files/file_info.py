"""What a ``.safetensors`` adapter file is, from its header alone (eraser, SPM membrane or other LoRA).

Only the JSON header is read (8-byte length + header), never the tensors, so describing a large LoRA
costs one small read; the SHA-256 streams the bytes once and is cached per (path, size, mtime).
Pure Python: used by the ComfyUI route and usable by any host.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

from .safetensors_header import read_safetensors_header  # noqa: F401  (re-exported for hosts)

#: short hash = the first 10 hex digits of SHA-256 (A1111's "AutoV2" length, so both hosts agree)
SHORT_HASH = 10

_hash_cache: dict = {}
_hash_lock = threading.Lock()

# width of the text context read by attn2.to_k → family (erasers/files/families.py CONTEXT_DIM, UNets only)
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def sha256_short(path: str, length: int = SHORT_HASH) -> str:
    """SHA-256 of the file's bytes (first ``length`` hex digits), cached until the file changes."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key][:length]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    full = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = full
    return full[:length]


def _json_list(text, default=()):
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return list(default)
    return [str(v) for v in value] if isinstance(value, list) else list(default)


def guess_family(tensors: dict, metadata: dict):
    """Family from the attn2 ``to_k`` input width (768 / 1024 / 2048), else from kohya metadata."""
    for key, entry in tensors.items():
        shape = entry["shape"]
        low = key.lower()
        if (
            "attn2" in low
            and "to_k" in low
            and len(shape) == 2
            and ("down" in low or "lora_a" in low or low.endswith("to_k.weight"))
        ):
            family = _CONTEXT_FAMILY.get(int(shape[1]))
            if family:
                return family
    base = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    for marker, family in (
        ("sdxl", "sdxl"),
        ("xl", "sdxl"),
        ("v2", "sd2"),
        ("sd_v1", "sd1"),
        ("v1", "sd1"),
        ("flux", "flux"),
        ("sd3", "sd3"),
    ):
        if marker in base:
            return family
    return None


def describe_header(path: str, with_hash: bool = True) -> dict:
    """Method, concepts, family, size and short hash of an eraser / SPM / LoRA file, from its header."""
    tensors, metadata = read_safetensors_header(path)
    ranks = [
        e["shape"][0]
        for k, e in tensors.items()
        if (k.endswith("lora_down.weight") or k.endswith("lora_A.weight")) and e["shape"]
    ]
    info = {
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "tensors": len(tensors),
        "rank": max(ranks) if ranks else None,
        "family": guess_family(tensors, metadata),
        "method": None,
        "concepts": [],
    }
    if metadata.get("eraser.format_version") is not None:
        layers = json.loads(metadata.get("eraser.layers") or "{}") if metadata.get("eraser.layers") else {}
        info.update(
            kind="eraser",
            method=metadata.get("eraser.method"),
            concepts=_json_list(metadata.get("eraser.concepts")),
            anchors=_json_list(metadata.get("eraser.anchors")),
            preserve=_json_list(metadata.get("eraser.preserve")),
            family=metadata.get("eraser.family") or info["family"],
            layers=len(layers) if isinstance(layers, dict) else None,
            pack_version=metadata.get("eraser.pack_version"),
            base_fingerprint=metadata.get("eraser.base_fingerprint"),
        )
    elif metadata.get("prompts"):
        # SPM membranes (Con6924/SPM): comma-joined targets in `prompts` (spm.md §3.1)
        info.update(
            kind="spm", method="spm", concepts=[p.strip() for p in metadata["prompts"].split(",") if p.strip()]
        )
    else:
        # other erasure LoRAs usually carry no concept metadata; show the trainer's name if any
        info.update(kind="lora", title=metadata.get("modelspec.title") or metadata.get("ss_output_name"))
    if with_hash:
        info["sha256"] = sha256_short(path)
    return info
