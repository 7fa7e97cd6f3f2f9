"""Import the repository root as the ComfyUI package ``concept_erasers`` (nodes/ use ``..erasers``)."""

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK = "concept_erasers"


def pack_module(name: str):
    """Import ``<repo>/<name>`` as ``concept_erasers.<name>``."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")
