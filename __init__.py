"""Concept Erasers — ComfyUI entry point.

Nodes are registered only when ComfyUI is importable, so the package (and its tests) import without any
host. The host-agnostic core lives in ``erasers/``; ``nodes/`` holds the thin ComfyUI adapters.
"""

import importlib.util
import logging

log = logging.getLogger(__name__)

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI calls it)

    WEB_DIRECTORY = "./web"
    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
else:
    __all__ = []
