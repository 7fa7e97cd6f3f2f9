"""Import the repository as a package (``concept_erasers``) so ``nodes/`` modules with relative imports
load in unit tests without ComfyUI (the root ``__init__`` is inert outside ComfyUI)."""
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "concept_erasers"


def load(module: str):
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = pkg
        spec.loader.exec_module(pkg)
    return importlib.import_module(f"{PACKAGE}.{module}")
