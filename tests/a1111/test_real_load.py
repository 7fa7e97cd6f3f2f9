"""The entry script loaded the way the webui (A1111 or Forge 2) loads an extension script
(``modules.script_loading.load_module``
with the extension folder at the front of ``sys.path``), then its ``before_ui`` registration against the
real ``modules.extra_networks`` / ``modules.ui_extra_networks`` (see conftest.py for when this runs)."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_real_webui_loads_the_extension_script(webui, monkeypatch, tmp_path):
    from modules import extra_networks, script_callbacks, script_loading, scripts, ui_extra_networks

    monkeypatch.setattr(sys, "path", [str(ROOT)] + sys.path)
    monkeypatch.setattr(extra_networks, "extra_network_registry", dict(extra_networks.extra_network_registry))
    monkeypatch.setattr(ui_extra_networks, "extra_pages", list(ui_extra_networks.extra_pages))
    before = {k: list(v) for k, v in script_callbacks.callback_map.items()}
    module = script_loading.load_module(str(ROOT / "scripts" / "concept_erasers_a1111.py"))
    try:
        classes = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, scripts.Script) and v is not scripts.Script
        ]
        assert [c.__name__ for c in classes] == ["ConceptErasersScript"]
        script = classes[0]()
        assert script.title() == "Concept Erasers" and script.show(False) is scripts.AlwaysVisible
        backend = module.controller.backend
        if webui["forge2"]:  # found by importing ``backend.patcher.unet``; weights go through its ModelPatcher
            assert backend.kind == "forge2" and backend.weight_route == "forge", backend
        else:  # A1111 with the real Lora built-in (its ``networks`` module is importable here)
            assert backend.kind == "a1111" and backend.weight_route == "lora", backend
        added = {k: len(v) - len(before.get(k, [])) for k, v in script_callbacks.callback_map.items()}
        for key in (
            "callbacks_cfg_denoiser",
            "callbacks_cfg_denoised",
            "callbacks_model_loaded",
            "callbacks_before_ui",
            "callbacks_script_unloaded",
        ):
            assert added.get(key) == 1, (key, added)
        module._before_ui()
        assert {"eraser", "spm"} <= set(extra_networks.extra_network_registry)
        titles = [page.title for page in ui_extra_networks.extra_pages]
        assert any("rasers" in t for t in titles) and any("SPM" in t for t in titles), titles
        # the guard callbacks are inert with no session installed
        params = script_callbacks.CFGDenoiserParams(
            torch.zeros(2, 4, 2, 2), None, torch.ones(2), 0, 1, torch.zeros(1, 77, 768), torch.zeros(1, 77, 768), None
        )
        script_callbacks.cfg_denoiser_callback(params)
        assert torch.equal(params.text_cond, torch.zeros(1, 77, 768))
    finally:
        for key, callbacks in script_callbacks.callback_map.items():
            callbacks[:] = before.get(key, [])


def test_real_webui_preloads_the_extension_flags(webui, tmp_path):
    """``preload.py`` run by the webui's own ``preload_extensions`` on a copy of its real argument parser
    (A1111's, or Forge's with backend/args.py folded in): no clash with the host's flags."""
    import copy

    from modules import cmd_args, script_loading

    (tmp_path / "concept-erasers").symlink_to(ROOT, target_is_directory=True)
    parser = copy.deepcopy(cmd_args.parser)
    script_loading.preload_extensions(str(tmp_path), parser)
    opts, _ = parser.parse_known_args(["--erasers-dir", "/e", "--spm-dir", "/s"])
    assert (opts.erasers_dir, opts.spm_dir) == ("/e", "/s")
    assert parser.parse_known_args([])[0].erasers_dir is None
