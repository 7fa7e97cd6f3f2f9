"""Real-webui tier: runs only when A1111_PATH (or FORGE_PATH) points at a stable-diffusion-webui checkout.

The checkout must be importable from the current interpreter (its requirements installed, e.g. a venv
made with --system-site-packages plus the webui's requirements_versions.txt). Without it every test here
is skipped with the reason.
"""
import os
import sys
from pathlib import Path

import pytest

WEBUI = os.environ.get("A1111_PATH") or os.environ.get("FORGE_PATH")
ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    if WEBUI:
        return
    skip = pytest.mark.skip(reason="A1111_PATH / FORGE_PATH not set: real-webui tests skipped "
                                   "(set it to a stable-diffusion-webui checkout to run them)")
    for item in items:
        if "tests/a1111" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def webui():
    """Import the real webui modules the glue touches; skip with the import error if they cannot load."""
    path = Path(WEBUI).resolve()
    for extra in (path, path / "extensions-builtin" / "Lora", ROOT):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    old_argv = sys.argv
    sys.argv = [sys.argv[0], "--skip-torch-cuda-test", "--no-half", "--use-cpu", "all", "--skip-prepare-environment"]
    try:
        from modules import shared
        if getattr(shared, "opts", None) is None:  # what webui.py's initialize does first (A1111 ≥ 1.6)
            from modules import shared_init
            shared_init.initialize()
        from modules import script_callbacks, scripts  # noqa: F401
        import network  # the Lora built-in
        import networks
    except Exception as exc:  # a webui that cannot import here: say exactly why
        pytest.skip(f"could not import the webui at {path}: {type(exc).__name__}: {exc}")
    finally:
        sys.argv = old_argv
    return {"network": network, "networks": networks, "scripts": scripts, "script_callbacks": script_callbacks}
