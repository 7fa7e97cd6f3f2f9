"""Concept Erasers — the Automatic1111 / Forge entry (the only file the webui imports from this pack).

The webui imports every ``scripts/*.py`` with the extension folder at the front of ``sys.path``, and
caches modules globally by name. To avoid shadowing (or being shadowed by) another extension, the glue
(``a1111_erasers/``) is loaded under the unique name ``concept_erasers_a1111_glue`` and the core
(``erasers/``) under ``concept_erasers_core`` — never as a bare ``import erasers``.

API (``alwayson_scripts``): ``{"concept erasers": {"args": [...]}}`` with the args in this order (trailing
ones may be omitted; see docs/a1111.md):
  0 enabled (bool)          1 method (str)           2 concepts (str)        3 anchors (str)
  4 preserve (str)          5 strength (float)       6 method_options (JSON str)
  7 eraser_files (list)     8 eraser_weight (float)  9 spm_files (list)      10 spm_weight (float)
  11 spm_transport (bool)   12 guards (list)         13 guard_preset (str)   14 guard_concepts (str)
"""

import importlib.util
import logging
import os
import sys

from modules import script_callbacks, scripts

log = logging.getLogger("concept_erasers")

GLUE_NAME = "concept_erasers_a1111_glue"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_glue():
    module = sys.modules.get(GLUE_NAME)
    if module is not None:
        return module
    package_dir = os.path.join(_ROOT, "a1111_erasers")
    spec = importlib.util.spec_from_file_location(
        GLUE_NAME, os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[GLUE_NAME] = module
    spec.loader.exec_module(module)
    return module


_load_glue()
runtime = importlib.import_module(f"{GLUE_NAME}.runtime")
settings_mod = importlib.import_module(f"{GLUE_NAME}.settings")


def _host():
    from modules import devices, paths, shared

    cmd = getattr(shared, "cmd_opts", None)
    return runtime.Host(
        models_path=getattr(paths, "models_path", os.path.join(os.getcwd(), "models")),
        erasers_dir=getattr(cmd, "erasers_dir", None),
        spm_dir=getattr(cmd, "spm_dir", None),
        autocast=getattr(devices, "autocast", runtime.contextlib.nullcontext),
        interrupt=lambda: shared.state.interrupt(),
        default_multiplier=lambda: float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0)),
    )


controller = runtime.Controller(_host())


class ConceptErasersScript(scripts.Script):
    sorting_priority = 16  # Forge: accordion order

    def title(self):
        return "Concept Erasers"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        ui = importlib.import_module(f"{GLUE_NAME}.ui")
        return ui.build(self, is_img2img, controller)

    def before_process(self, p, *args):
        if controller.backend.supported:
            controller.begin(p, settings_mod.UISettings.from_args(args))

    def after_extra_networks_activate(self, p, *args, **kwargs):
        if controller.backend.supported:
            controller.apply_weights(p, "networks")

    def process_batch(self, p, *args, **kwargs):
        # A1111 < 1.10 has no process_before_every_sampling: the direct route applies here instead
        if controller.backend.weight_route == "direct":
            controller.apply_weights(p, "sampling")
        if not hasattr(scripts.Script, "process_before_every_sampling"):
            controller.apply_guards(p)  # A1111 < 1.10; re-installed before the hires pass in before_hr

    def before_hr(self, p, *args):
        if controller.backend.supported and not hasattr(scripts.Script, "process_before_every_sampling"):
            controller.apply_guards(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if controller.backend.supported:
            controller.apply_weights(p, "sampling")
            controller.apply_guards(p)

    def postprocess(self, p, processed, *args):
        if controller.backend.supported:
            controller.finish(p)


def _before_ui():
    if not controller.backend.supported:
        log.warning("Concept Erasers: %s", controller.backend.message())
        return
    from modules import extra_networks, ui_extra_networks

    en = importlib.import_module(f"{GLUE_NAME}.extra_networks")
    quote_js = getattr(ui_extra_networks, "quote_js", None) or __import__("json").dumps
    for kind in ("eraser", "spm"):
        extra_networks.register_extra_network(en.make_extra_network(extra_networks, kind, controller))
        ui_extra_networks.register_page(en.make_page(ui_extra_networks, kind, controller, quote_js))


guards = importlib.import_module(f"{GLUE_NAME}.guards")
script_callbacks.on_cfg_denoiser(guards.on_cfg_denoiser)  # inert unless a guard session is installed
if hasattr(script_callbacks, "on_cfg_denoised"):
    script_callbacks.on_cfg_denoised(guards.on_cfg_denoised)
script_callbacks.on_model_loaded(controller.invalidate)
script_callbacks.on_before_ui(_before_ui)
script_callbacks.on_script_unloaded(controller.unload)
