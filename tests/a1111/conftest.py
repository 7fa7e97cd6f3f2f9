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
#: Forge 2 keeps its engine in ``backend/`` (probed the same way the glue does, by what is there)
FORGE2 = bool(WEBUI) and (Path(WEBUI) / "backend" / "patcher" / "unet.py").is_file()
#: the host's Lora built-in: ``extensions-builtin/Lora`` on A1111, ``sd_forge_lora`` on Forge 2
LORA_DIR = "sd_forge_lora" if FORGE2 else "Lora"


def pytest_configure(config):
    config.addinivalue_line("markers", "a1111_only(reason): needs A1111's ldm/sgm modules or its Lora merge")
    config.addinivalue_line("markers", "forge2_only(reason): needs Forge 2's backend/ (ModelPatcher, LoraLoader)")


def pytest_collection_modifyitems(config, items):
    if WEBUI:
        for item in items:
            for name, wrong_host in (("a1111_only", FORGE2), ("forge2_only", not FORGE2)):
                marker = item.get_closest_marker(name)
                if marker is not None and wrong_host:
                    host = "Forge 2" if FORGE2 else "A1111"
                    item.add_marker(pytest.mark.skip(reason=f"not on {host}: {marker.args[0]}"))
        return
    skip = pytest.mark.skip(
        reason="A1111_PATH / FORGE_PATH not set: real-webui tests skipped "
        "(set it to a stable-diffusion-webui checkout to run them)"
    )
    for item in items:
        if "tests/a1111" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def webui():
    """Import the real webui modules the glue touches; skip with the import error if they cannot load."""
    path = Path(WEBUI).resolve()
    for extra in (path, path / "extensions-builtin" / LORA_DIR, ROOT):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
    old_argv = sys.argv
    sys.argv = [sys.argv[0], "--skip-torch-cuda-test", "--no-half", "--use-cpu", "all", "--skip-prepare-environment"]
    if FORGE2:
        sys.argv.append("--always-cpu")  # Forge's backend/args.py: its memory manager otherwise asserts CUDA
    try:
        if FORGE2:  # what Forge's webui.py runs before anything else (packages_3rdparty on sys.path, devices)
            from modules_forge.initialization import initialize_forge

            initialize_forge()
            from modules import initialize

            initialize.imports()  # webui.py's import order (importing modules.shared first is circular on Forge)
        from modules import shared

        if getattr(shared, "opts", None) is None:  # what webui.py's initialize does first (A1111 ≥ 1.6)
            from modules import shared_init

            shared_init.initialize()
        import network  # the Lora built-in
        import networks
        from modules import script_callbacks, scripts  # noqa: F401
    except Exception as exc:  # a webui that cannot import here: say exactly why
        pytest.skip(f"could not import the webui at {path}: {type(exc).__name__}: {exc}")
    finally:
        sys.argv = old_argv
    return {
        "network": network,
        "networks": networks,
        "scripts": scripts,
        "script_callbacks": script_callbacks,
        "forge2": FORGE2,
    }
