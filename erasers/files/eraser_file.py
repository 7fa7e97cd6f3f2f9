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
import re
from typing import Optional

import torch

from ..edits.eraser import Eraser
from ..errors import BadEraserFile, EraserError, UnknownKeys
from ..lowrank import LowRankDelta, truncate
from .families import Family, parse_family
from .keys import kohya_name
from .safetensors_header import PICKLE_SUFFIXES, header_length  # noqa: F401
from .writing import save_safetensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
#: Relative Frobenius error per layer, ‖ΔW − ΔW_k‖/‖ΔW‖, allowed when a delta with no exact low-rank form
#: smaller than the dense matrix (RECE, MACE with many rows) is written as a truncated SVD: the file then
#: reproduces each layer's edit to 0.1%. Measured on SD1.5 shapes (README "Eraser files"): RECE/MACE
#: deltas have slowly decaying spectra, so looser tolerances buy little size for a lot of error (RECE,
#: 10 concepts, CLIP-shaped encoder: still dense at 1e-2, 59 MB at 1e-1). None or ``exact=True``: such
#: deltas are written dense (exactly). The in-memory edit is never truncated by this.
FILE_TOLERANCE = 1e-3


def storage_form(delta: LowRankDelta, tolerance: Optional[float]):
    """(delta or None, error): how a layer is written. Exact factors when they are smaller than the dense
    matrix; otherwise the smallest truncated SVD within ``tolerance`` if that is smaller, else None (dense)."""
    out_features, in_features = delta.shape
    dense_size = out_features * in_features
    if delta.rank * (out_features + in_features) < dense_size:
        return delta, 0.0
    if not tolerance:
        return None, 0.0
    short, error = truncate(delta, tolerance)
    if short.rank * (out_features + in_features) < dense_size:
        return short, error
    return None, 0.0


def to_state_dict(eraser: Eraser, dtype: torch.dtype = torch.float32, tolerance: Optional[float] = FILE_TOLERANCE):
    """(tensors, metadata) of the file; ``tolerance`` as in ``FILE_TOLERANCE`` (None: full-rank deltas dense)."""
    tensors, names, truncated = {}, {}, {}
    for key, delta in sorted(eraser.deltas.items()):  # copies: methods may share factors across layers
        name = kohya_name(key)
        names[name] = key
        exact, (delta, error) = delta, storage_form(delta, tolerance)
        if delta is None:
            # full-rank edits (RECE, MACE) are smaller dense; `.diff` is the stock key for a dense
            # delta in ComfyUI's and A1111's LoRA loaders, so the file still loads everywhere
            tensors[f"{name}.diff"] = exact.dense(dtype).contiguous()
            continue
        if delta is not exact:
            truncated[name] = (delta.rank, error)
        if delta.rank == 0:
            # a layer the edit left unchanged (ΔW = 0): rank-0 factors would make every LoRA reader
            # (ComfyUI's, A1111's, ours) divide alpha by a zero rank, so it is stored as rank-1 zeros
            delta = LowRankDelta(delta.up.new_zeros(delta.shape[0], 1), delta.down.new_zeros(1, delta.shape[1]))
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
        "eraser.reconstruction_error": f"{max([eraser.reconstruction_error] + [e for _, e in truncated.values()]):.3g}",  # noqa: E501
        # how full-rank deltas were written: "exact", or truncated SVDs within a tolerance (rank, error per layer)
        "eraser.storage": json.dumps(
            {
                "tolerance": tolerance or None,
                "truncated": {n: {"rank": r, "error": float(f"{e:.3g}")} for n, (r, e) in truncated.items()},
            }
        ),
        "eraser.layers": json.dumps(names),
        # kohya/A1111 readers show these
        "ss_network_module": "networks.lora",
        "ss_output_name": "eraser-" + eraser.method,
    }
    return tensors, metadata


def default_file_name(eraser: Eraser) -> str:
    """``<method>-<first concept>[-and-N-more].safetensors``, in characters every file system accepts."""
    first = re.sub(r"[^A-Za-z0-9]+", "_", eraser.concepts[0] if eraser.concepts else "eraser").strip("_")[:40]
    more = f"-and-{len(eraser.concepts) - 1}-more" if len(eraser.concepts) > 1 else ""
    return f"{eraser.method}-{first or 'eraser'}{more}.safetensors"


def output_file(path, eraser: Optional[Eraser] = None) -> Optional[str]:
    """The file ``save_eraser`` writes for ``path``: ``.safetensors`` added; an existing folder → the eraser's
    default name inside it (None when no eraser is given yet)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, default_file_name(eraser)) if eraser is not None else None
    return path if path.endswith(".safetensors") else path + ".safetensors"


def save_eraser(
    eraser: Eraser,
    path: str,
    dtype: torch.dtype = torch.float32,
    exact: bool = False,
    tolerance: float = FILE_TOLERANCE,
    overwrite: bool = False,
    inputs: tuple = (),
) -> str:
    """Write ``eraser``; layers without a small exact form are truncated within ``tolerance`` unless ``exact``.

    ``path`` may be a file or an existing folder (the file is then named after the method and concepts). An
    existing file is replaced only with ``overwrite=True``, never when it is one of ``inputs`` (the model
    files the eraser was computed from), and the write is atomic (erasers/files/writing.py).
    """
    if not exact and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        # NaN compares false everywhere, so a NaN tolerance would store any truncation as "within tolerance"
        raise EraserError(
            f"tolerance is a relative error per layer in [0, 1) (default {FILE_TOLERANCE:g}), found {tolerance!r}."
        )
    eraser.check_factors()  # never write a file that could not be applied
    path = output_file(path, eraser)
    tensors, metadata = to_state_dict(eraser, dtype, None if exact else tolerance)
    truncated = json.loads(metadata["eraser.storage"])["truncated"]
    if truncated:
        log.warning(
            "Stored %d full-rank layer delta(s) as truncated SVDs (rank %d–%d), worst relative error "
            "%s (tolerance %g); save with exact=True (CLI --exact) to keep them exact and dense.",
            len(truncated),
            min(t["rank"] for t in truncated.values()),
            max(t["rank"] for t in truncated.values()),
            metadata["eraser.reconstruction_error"],
            tolerance,
        )
    save_safetensors_atomic(tensors, path, metadata=metadata, overwrite=overwrite, inputs=inputs)
    log.info("Saved %s eraser (%d layers) to %s", eraser.method, len(eraser.deltas), path)
    return path


def check_safetensors(path: str) -> None:
    """Refuse pickles, missing, empty, truncated or non-safetensors files before anything is loaded."""
    header_length(path)


def read_safetensors(path: "str | os.PathLike"):
    """(tensors, metadata) from a .safetensors file, with errors that say what is wrong."""
    path = os.fspath(path)  # str or os.PathLike
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    check_safetensors(path)
    try:  # one open for tensors and metadata
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadEraserFile(
            f"'{name}' could not be read as .safetensors ({exc}). The file may be truncated: "
            f"re-download or re-save it."
        ) from exc
    broken = [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        raise BadEraserFile(
            f"'{name}' holds non-finite values (NaN or Inf) in {len(broken)} tensor(s), e.g. {sorted(broken)[:3]}; "
            f"applying it would corrupt every image. Nothing was applied: re-create or re-download the file."
        )
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
    identities = {}  # one shared identity per input width: a dense delta is stored as (Δ, I)
    for stem in sorted(stems):
        dense = tensors.get(f"{stem}.diff")
        if stem in layers and dense is not None:
            width = dense.shape[1]
            identities.setdefault(width, torch.eye(width))
            deltas[layers[stem]] = LowRankDelta(dense.float(), identities[width])
            continue
        up, down = tensors.get(f"{stem}.lora_up.weight"), tensors.get(f"{stem}.lora_down.weight")
        if stem not in layers or up is None or down is None:
            unknown.append(stem)
            continue
        alpha = tensors.get(f"{stem}.alpha")
        # a rank-0 pair (ΔW = 0, from another writer) has no alpha/rank scale: 1 keeps it exactly zero
        scale = float(alpha) / down.shape[0] if alpha is not None and down.shape[0] else 1.0
        deltas[layers[stem]] = LowRankDelta(up.float() * scale, down.float())
    if unknown:
        raise UnknownKeys(
            f"{name} holds keys this eraser format does not know: {unknown[:10]}"
            f"{' …' if len(unknown) > 10 else ''}. Expected <layer>.lora_up/lora_down/alpha (or <layer>.diff) "
            f"for the layers listed in its metadata."
        )
    config = json.loads(metadata.get("eraser.config", "{}"))
    eraser = Eraser(
        deltas,
        family or Family.UNET,
        config,
        metadata.get("eraser.base_fingerprint", ""),
        float(metadata.get("eraser.reconstruction_error", "0") or 0),
        metadata.get("eraser.pack_version", "?"),
        source=source,
    )
    # refuse a damaged file where it is read, so every host (nodes, A1111, API) gets the same error
    eraser.check_factors()
    return eraser


def load_eraser(path: "str | os.PathLike") -> Eraser:
    path = os.fspath(path)  # str or os.PathLike
    tensors, metadata = read_safetensors(path)
    return from_state_dict(tensors, metadata, source=path)


def describe_file(path: "str | os.PathLike") -> dict:
    """Metadata and what the file edits — for `python -m erasers info` and the front end."""
    path = os.fspath(path)  # str or os.PathLike
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
