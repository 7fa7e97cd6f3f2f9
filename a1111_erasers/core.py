"""Load the pack's core (``erasers/``) under a unique module name.

The core uses only relative imports, so it can live under any package name. In the webui it is loaded
as ``concept_erasers_core``; if the same directory was already imported as ``erasers`` (the pack's own
tests, the CLI), that module is reused so class identities match.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

CORE_NAME = "concept_erasers_core"
CORE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "erasers")


def _same_dir(module) -> bool:
    path = getattr(module, "__file__", None)
    return bool(path) and os.path.dirname(os.path.abspath(path)) == os.path.abspath(CORE_DIR)


def load_core():
    """The core package (``erasers/`` of this repository), imported once under ``CORE_NAME``."""
    module = sys.modules.get(CORE_NAME)
    if module is not None:
        return module
    existing = sys.modules.get("erasers")
    if existing is not None and _same_dir(existing):
        sys.modules[CORE_NAME] = existing
        return existing
    spec = importlib.util.spec_from_file_location(
        CORE_NAME, os.path.join(CORE_DIR, "__init__.py"), submodule_search_locations=[CORE_DIR]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(CORE_NAME, None)
        raise
    return module


def core_module(name: str):
    """A submodule of the core, e.g. ``core_module("files.eraser_file")``; None if it does not exist (yet)."""
    package = load_core()
    try:
        return importlib.import_module(f"{package.__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f".{name}"):
            return None
        raise
