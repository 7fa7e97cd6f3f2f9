"""Eraser and SPM files on disk: where they are, their names, and what their headers say.

Only ``.safetensors`` files are listed; a header is read without loading any tensor (8-byte length +
JSON), so the card page stays fast with many files.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Optional

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
FOLDERS = {"eraser": "erasers", "spm": "spm"}


def model_dirs(kind: str, models_path: str, override: Optional[str] = None) -> list:
    """``--erasers-dir`` / ``--spm-dir`` when given, else ``<models>/erasers`` / ``<models>/spm``."""
    return [override] if override else [os.path.join(models_path, FOLDERS[kind])]


def list_files(dirs: Iterable[str]) -> dict:
    """name → path; name = path below the folder without the suffix, '/'-separated (like the Lora page)."""
    found = {}
    for root in dirs:
        if not root or not os.path.isdir(root):
            continue
        for folder, _subdirs, names in os.walk(root, followlinks=True):
            for fname in sorted(names):
                if not fname.lower().endswith(SUFFIX):
                    continue
                path = os.path.join(folder, fname)
                rel = os.path.relpath(path, root)[: -len(SUFFIX)].replace(os.sep, "/")
                found.setdefault(rel, path)
    return found


def resolve(name: str, files: dict) -> Optional[str]:
    """A tag's name → path: exact relative name, else a unique basename match (case-insensitive)."""
    if name in files:
        return files[name]
    lowered = name.lower()
    matches = [p for n, p in files.items() if n.lower() == lowered or n.rsplit("/", 1)[-1].lower() == lowered]
    return matches[0] if len(matches) == 1 else None


def read_header_metadata(path: str) -> dict:
    """``__metadata__`` of a .safetensors file ({} if it has none); BadEraserFile (a ValueError) if unreadable."""
    from .core import core_module

    return core_module("files.safetensors_header").read_safetensors_header(path)[1]


def concepts_from_metadata(kind: str, meta: dict) -> list:
    """The erased concepts a file declares: eraser files store a JSON list, SPM files a comma list."""
    if kind == "eraser":
        try:
            value = json.loads(meta.get("eraser.concepts", "[]"))
            return [str(v) for v in value] if isinstance(value, list) else []
        except json.JSONDecodeError:
            return []
    prompts = meta.get("prompts", "")
    return [p.strip() for p in prompts.split(",") if p.strip()]


def describe(kind: str, path: str) -> dict:
    """Card data for one file: concepts, method / family, or the reason it cannot be read."""
    try:
        meta = read_header_metadata(path)
    except (OSError, ValueError) as exc:
        return {"concepts": [], "error": str(exc)}
    info = {"concepts": concepts_from_metadata(kind, meta)}
    if kind == "eraser":
        info["method"] = meta.get("eraser.method", "")
        info["family"] = meta.get("eraser.family", "")
        if "eraser.format_version" not in meta:
            info["error"] = "no eraser metadata (not made by Concept Erasers; load it as a LoRA instead)"
    else:
        info["rank"] = meta.get("rank", "")
    return info
