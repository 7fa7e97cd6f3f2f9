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
    "suppression",
)


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from . import folders

    folders.register_model_folders()

    class ConceptErasersExtension(ComfyExtension):
        async def get_node_list(self):
            nodes = []
            for name in NODE_MODULES:
                module = importlib.import_module(f"{__name__}.{name}")
                nodes.extend(module.NODES)
            return nodes

    return ConceptErasersExtension()
