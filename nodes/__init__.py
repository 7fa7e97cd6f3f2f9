"""ComfyUI adapters (V3 node API). Imported only inside ComfyUI (see the root ``__init__.py``).

Each node module exports ``NODES`` (a list of ``io.ComfyNode`` classes); add a module name below to
register its nodes. Host-facing helpers that tests exercise without ComfyUI live in ``nodes/adapters.py``
and friends, which import nothing from ComfyUI at module level.
"""

import importlib
import logging

log = logging.getLogger(__name__)

NODE_MODULES = (
    "closed_form",
    "spm",
    "lora",
    "suppression",
    "check",
)


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from . import folders

    folders.register_model_folders()
    from . import routes  # front-end routes (web/): file info and presets

    routes.register_routes()

    class ConceptErasersExtension(ComfyExtension):
        async def get_node_list(self):
            nodes = []
            for name in NODE_MODULES:
                try:
                    module = importlib.import_module(f"{__name__}.{name}")
                except ImportError as exc:  # one broken/missing module must not hide the others
                    log.error("Concept Erasers: node module '%s' could not be imported: %s", name, exc)
                    continue
                nodes.extend(module.NODES)
            return nodes

    return ConceptErasersExtension()
