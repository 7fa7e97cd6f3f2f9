"""The one reader of a ``.safetensors`` header: 8-byte little-endian length, then that many bytes of JSON.

Only the header is read, never the tensors, so it is cheap on a multi-GB file and never runs code from it.
Every check here (pickles, empty or truncated files, another format, a non-JSON header) raises
``BadEraserFile`` with what was expected, what was found and what to do.
"""

from __future__ import annotations

import json
import os
import struct

from ..errors import BadEraserFile

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
#: safetensors itself refuses headers above 100 MB
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _refuse_pickle(name: str, path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise BadEraserFile(
            f"'{name}' is a pickled PyTorch file. Only .safetensors files are loaded, because unpickling "
            f"an untrusted file can run arbitrary code. Convert it to .safetensors first."
        )


def header_length(path: "str | os.PathLike") -> int:
    """The declared header length, after checking the file can hold it and the JSON starts with '{'."""
    path = os.fspath(path)  # str or os.PathLike
    name = os.path.basename(path)
    _refuse_pickle(name, path)
    if not os.path.isfile(path):
        raise BadEraserFile(f"No file at '{path}'.")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise BadEraserFile(f"'{name}' could not be read ({exc}).") from exc
    if len(head) < 9:
        raise BadEraserFile(f"'{name}' has {size} bytes: too short for a .safetensors file (empty or truncated).")
    (length,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
        hint = " It looks like a zip/pickle archive." if head[:2] == b"PK" else ""
        raise BadEraserFile(
            f"'{name}' is not a .safetensors file: it declares a {length}-byte header in a {size}-byte file "
            f"(truncated or another format).{hint} Re-download or re-save it as .safetensors."
        )
    return length


def read_safetensors_header(path: "str | os.PathLike"):
    """``({tensor name: {"dtype", "shape"}}, metadata)`` from the header only; metadata values are strings."""
    path = os.fspath(path)  # str or os.PathLike
    name = os.path.basename(path)
    length = header_length(path)
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            raw = handle.read(length)
    except OSError as exc:
        raise BadEraserFile(f"'{name}' could not be read ({exc}).") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEraserFile(f"'{name}' has a header that is not JSON ({exc}): not a .safetensors file.") from exc
    if not isinstance(header, dict):
        raise BadEraserFile(f"'{name}' has a header that is not a JSON object: not a .safetensors file.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    tensors = {
        k: {"dtype": v.get("dtype"), "shape": list(v.get("shape") or [])}
        for k, v in header.items()
        if isinstance(v, dict)
    }
    return tensors, metadata
