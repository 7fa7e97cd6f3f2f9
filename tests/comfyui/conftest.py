"""Opt-in tests against a real ComfyUI checkout.

Set ``COMFYUI_PATH`` to a ComfyUI checkout and run with a Python that can import it (see the README
section 'Testing against ComfyUI'). Without ``COMFYUI_PATH`` every test in this folder is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
from comfy_harness import (  # noqa: F401  (comfy_server is a fixture re-exported for the tests)
    comfy_server,
    import_comfy,
    unet_config_from_env,
    write_random_sd15_checkpoint,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip()
SKIP_REASON = "COMFYUI_PATH is not set: real-ComfyUI tests skipped; see README 'Testing against ComfyUI'"


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a real ComfyUI server process (deselect with -m 'not server')")
    if COMFYUI_PATH and not Path(COMFYUI_PATH, "comfy", "model_management.py").is_file():
        raise pytest.UsageError(
            f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/model_management.py)"
        )


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on CPU: a namespace with sd, sample, model_management, utils, lora,
    folder_paths, nodes (and comfy, samplers, model_detection, model_patcher, path, version)."""
    t0 = time.monotonic()
    ns = import_comfy(COMFYUI_PATH)
    log.info("imported ComfyUI %s from %s in %.1f s", ns.version, ns.path, time.monotonic() - t0)
    return ns


@pytest.fixture(scope="session")
def sd15_unet_config():
    return unet_config_from_env()


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy, sd15_unet_config, tmp_path_factory):
    """Path of a random-weight SD1.5-architecture single-file checkpoint (written once per session, or
    reused from ``CE_TEST_CACHE_DIR`` when that is set; about 630 MB, takes 10-20 s to write)."""
    cache_dir = os.environ.get("CE_TEST_CACHE_DIR", "").strip()
    if cache_dir:
        key = hashlib.sha1(json.dumps([sd15_unet_config, comfy.version], sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"ce_test_sd15_{key}.safetensors"
        if path.is_file():
            log.info("reusing cached random SD1.5 checkpoint %s", path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("ckpt") / "ce_test_sd15.safetensors"
    t0 = time.monotonic()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # two test processes never share a temp file
    write_random_sd15_checkpoint(comfy, tmp, unet_config=sd15_unet_config)
    os.replace(tmp, path)
    log.info("random SD1.5 checkpoint written in %.1f s", time.monotonic() - t0)
    return path


@pytest.fixture(scope="session")
def sd15_loaded(comfy, sd15_checkpoint):
    """(model_patcher, clip, vae) loaded by ComfyUI's own single-file loader."""
    out = comfy.sd.load_checkpoint_guess_config(
        str(sd15_checkpoint), output_vae=True, output_clip=True, embedding_directory=None
    )
    model, clip, vae = out[:3]
    assert model is not None and clip is not None and vae is not None, "checkpoint loaded incompletely"
    return model, clip, vae
