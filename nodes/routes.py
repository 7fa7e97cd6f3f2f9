"""HTTP routes for the front end: eraser-file info and concept presets.

    GET /concept_erasers/file_info?folder=erasers|spm|loras|any&name=<file>  → header metadata + short hash
    ("any": the first of erasers, spm, loras holding the name — the SPM / LoRA loaders list all three)
    GET /concept_erasers/presets                                        → the pack's concept presets

Files are served only from the registered model folders, through ``folder_paths.get_full_path``, after
``resolve_model_file`` has refused traversal, absolute paths, backslashes and unknown folders. Nothing
here imports ComfyUI at module level: ``register_routes`` finds the running ``server.PromptServer`` lazily.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..erasers.errors import BadEraserFile, RefusedPath
from ..erasers.files.file_info import describe_header

log = logging.getLogger(__name__)

ALLOWED_FOLDERS = ("erasers", "spm", "loras")
ANY_FOLDER = "any"
PACK_ROOT = Path(__file__).resolve().parents[1]
#: the one preset folder: ``<name>.txt`` keyword lists (also the guards' ``preset`` menu) and name → list JSON
PRESET_DIR = PACK_ROOT / "erasers" / "data" / "presets"
_DRIVE = re.compile(r"^[A-Za-z]:")

_registered = False


def check_name(folder: str, name: str) -> None:
    """Refuse anything but a relative ``.safetensors`` name in a known folder (``RefusedPath``)."""
    if folder not in ALLOWED_FOLDERS + (ANY_FOLDER,):
        raise RefusedPath(f"Unknown folder '{folder}': expected one of {', '.join(ALLOWED_FOLDERS + (ANY_FOLDER,))}.")
    if not isinstance(name, str) or not name.strip():
        raise RefusedPath("Expected a file name, found an empty one.")
    if "\\" in name or "\x00" in name:
        raise RefusedPath(f"Refused '{name}': file names use '/' and hold no backslash or NUL.")
    if name.startswith("/") or os.path.isabs(name) or _DRIVE.match(name):
        raise RefusedPath(f"Refused '{name}': expected a name relative to a models folder, found an absolute path.")
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise RefusedPath(f"Refused '{name}': '..', '.' and empty path parts are not allowed.")
    if not name.lower().endswith(".safetensors"):
        raise RefusedPath(f"Refused '{name}': only .safetensors files are described.")


def locate_model_file(folder: str, name: str, folder_paths):
    """``(full path, folder it was found in)``; ``folder="any"`` searches erasers, spm, loras in turn."""
    check_name(folder, name)
    for candidate in ALLOWED_FOLDERS if folder == ANY_FOLDER else (folder,):
        if candidate not in folder_paths.folder_names_and_paths:
            continue
        full = folder_paths.get_full_path(candidate, name)
        if not full or not os.path.isfile(full):
            continue
        # belt and braces: the file, symlinks resolved, must lie inside one of the folder's directories
        # (also resolved, so a models folder that is itself a link to another drive still works)
        roots = [os.path.realpath(d) for d in folder_paths.get_folder_paths(candidate)]
        target = os.path.realpath(full)
        if not any(os.path.commonpath([root, target]) == root for root in roots):
            raise RefusedPath(f"Refused '{name}': it resolves outside models/{candidate}.")
        return full, candidate
    where = "models/" + folder if folder != ANY_FOLDER else "models/" + ", models/".join(ALLOWED_FOLDERS)
    raise FileNotFoundError(f"No file '{name}' in {where} (or the folder is not registered).")


def resolve_model_file(folder: str, name: str, folder_paths) -> str:
    """Full path of ``name`` inside the registered model folder ``folder``, or an error.

    Raises ``RefusedPath`` for anything but a relative ``.safetensors`` name in a known folder, and
    ``FileNotFoundError`` when the folder has no such file.
    """
    return locate_model_file(folder, name, folder_paths)[0]


def file_info(folder: str, name: str, folder_paths) -> dict:
    path, found_in = locate_model_file(folder, name, folder_paths)
    info = describe_header(path)
    info["folder"] = found_in
    info["name"] = name
    return info


def parse_preset_text(text: str) -> list:
    """One concept per line; '#' lines are comments (the format of erasers/data/presets/*.txt)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def load_presets(text_dir: Path = PRESET_DIR, json_dir: Path = PRESET_DIR) -> list:
    """``[{name, concepts, description, file}]`` from ``<name>.txt`` keyword lists and JSON files mapping
    name → list (or name → {"concepts": [...], "description": "..."}). The first of a name wins."""
    out, seen = [], set()

    def add(name, concepts, description, file):
        concepts = [c.strip() for c in concepts if isinstance(c, str) and c.strip()]
        if not isinstance(name, str) or not name.strip() or not concepts:
            log.warning("Preset '%s' in %s is empty or malformed; skipped.", name, file)
            return
        if name in seen:
            log.warning("Preset '%s' in %s repeats an earlier name; skipped.", name, file)
            return
        seen.add(name)
        out.append({"name": name, "concepts": concepts, "description": description, "file": file})

    for path in sorted(Path(text_dir).glob("*.txt")) if Path(text_dir).is_dir() else []:
        text = path.read_text(encoding="utf-8")
        comments = [line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip().startswith("#")]
        add(
            path.stem,
            parse_preset_text(text),
            " ".join(comments),
            path.relative_to(PACK_ROOT).as_posix() if PACK_ROOT in path.parents else path.name,
        )
    for path in sorted(Path(json_dir).glob("*.json")) if Path(json_dir).is_dir() else []:
        rel = path.relative_to(PACK_ROOT).as_posix() if PACK_ROOT in path.parents else path.name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("Preset file %s is not valid JSON (%s); skipped.", rel, exc)
            continue
        if not isinstance(data, dict):
            log.warning("Preset file %s must map names to lists; skipped.", rel)
            continue
        for name, value in data.items():
            if isinstance(value, dict):
                add(name, value.get("concepts") or [], str(value.get("description") or ""), rel)
            elif isinstance(value, list):
                add(name, value, "", rel)
            else:
                log.warning("Preset '%s' in %s is neither a list nor an object; skipped.", name, rel)
    return out


def register_routes(server=None, folder_paths=None) -> bool:
    """Add the routes to ComfyUI's PromptServer (once). Called from the pack's comfy_entrypoint."""
    global _registered
    if _registered:
        return False
    if server is None:
        # Only a running ComfyUI server has routes. Importing server.py ourselves would start importing
        # the whole web app (and fails when ComfyUI is used in-process, e.g. by scripts and tests).
        prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
        server = getattr(prompt_server, "instance", None)
        if server is None:
            log.info("Concept Erasers: no ComfyUI server is running; file-info routes not registered.")
            return False
    if folder_paths is None:
        import folder_paths  # noqa: PLW0621  (host module, imported lazily)
    from aiohttp import web

    routes = server.routes

    @routes.get("/concept_erasers/file_info")
    async def concept_erasers_file_info(request):
        folder = request.rel_url.query.get("folder", "")
        name = request.rel_url.query.get("name", "")
        try:
            info = await asyncio.to_thread(file_info, folder, name, folder_paths)
        except RefusedPath as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except FileNotFoundError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except BadEraserFile as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.json_response(info)

    @routes.get("/concept_erasers/presets")
    async def concept_erasers_presets(request):
        presets = await asyncio.to_thread(load_presets)
        return web.json_response({"presets": presets})

    _registered = True
    log.info("Concept Erasers routes registered: /concept_erasers/file_info, /concept_erasers/presets")
    return True
