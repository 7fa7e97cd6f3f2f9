"""``<eraser:…>`` / ``<spm:…>`` extra networks and their card pages, built on the webui's base classes.

The base classes are passed in (``modules.extra_networks``, ``modules.ui_extra_networks``) so this module
imports nothing from the webui. ``activate`` only records the request; the deltas are injected later,
in the Script's ``after_extra_networks_activate`` — the Lora extension clears ``loaded_networks`` in
its own ``activate``, so anything injected earlier would be lost (a1111_host.md §A2.5).
"""

from __future__ import annotations

import html
import json
import logging
import os

from . import files
from .tags import from_extra_network_params

log = logging.getLogger(__name__)

PAGE_TITLES = {"eraser": "Erasers", "spm": "SPM"}


def make_extra_network(base_module, kind: str, controller):
    """An ``ExtraNetwork`` subclass instance named ``kind`` ("eraser" or "spm")."""

    class ConceptErasersNetwork(base_module.ExtraNetwork):
        def __init__(self):
            super().__init__(kind)

        def activate(self, p, params_list):
            try:
                requests = from_extra_network_params(kind, params_list, controller.host.default_multiplier())
            except ValueError as exc:
                log.error("Concept Erasers: %s", exc)
                controller._fail(p, str(exc))
                return
            controller.set_tags(p, kind, requests)

        def deactivate(self, p):
            pass

    ConceptErasersNetwork.__name__ = f"ConceptErasers{kind.capitalize()}Network"
    return ConceptErasersNetwork()


def card_description(kind: str, info: dict) -> str:
    concepts = ", ".join(info.get("concepts") or []) or "(no concepts in metadata)"
    parts = [f"Erases: {concepts}"]
    if info.get("method"):
        parts.append(f"method {info['method']}")
    if info.get("family"):
        parts.append(f"for {info['family']}")
    if info.get("error"):
        parts.append(f"⚠ {info['error']}")
    return html.escape(" · ".join(parts))


def prompt_js(kind: str, name: str, quote_js=json.dumps) -> str:
    """The JS expression the card inserts: <kind:name:DEFAULT_MULTIPLIER>."""
    return quote_js(f"<{kind}:{name}:") + " + opts.extra_networks_default_multiplier + " + quote_js(">")


def make_page(ui_module, kind: str, controller, quote_js=json.dumps):
    """An ``ExtraNetworksPage`` listing the files of ``models/erasers`` or ``models/spm``."""

    class ConceptErasersPage(ui_module.ExtraNetworksPage):
        def __init__(self):
            super().__init__(PAGE_TITLES[kind])
            self._files = {}

        def refresh(self):
            self._files = controller.available(kind)

        def create_item(self, name, index=None, enable_filter=True):
            path = self._files.get(name)
            if path is None:
                return None
            stem = os.path.splitext(path)[0]
            info = files.describe(kind, path)
            item = {
                "name": name,
                "filename": path,
                "shorthash": "",
                "preview": self.find_preview(stem) if hasattr(self, "find_preview") else None,
                "description": card_description(kind, info),
                "search_terms": [self.search_terms_from_path(path)] + info.get("concepts", [])
                if hasattr(self, "search_terms_from_path")
                else [name] + info.get("concepts", []),
                "local_preview": f"{stem}.png",
                "metadata": {
                    "concepts": info.get("concepts", []),
                    **{k: v for k, v in info.items() if k != "concepts"},
                },
                "sort_keys": {"default": index or 0},
                "prompt": prompt_js(kind, name, quote_js),
            }
            if hasattr(self, "get_sort_keys"):
                try:
                    item["sort_keys"] = {"default": index or 0, **self.get_sort_keys(path)}
                except OSError:
                    pass
            return item

        def list_items(self):
            self.refresh()
            for index, name in enumerate(sorted(self._files)):
                item = self.create_item(name, index)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return [d for d in controller.dirs(kind) if os.path.isdir(d)]

    ConceptErasersPage.__name__ = f"ConceptErasers{kind.capitalize()}Page"
    return ConceptErasersPage()
