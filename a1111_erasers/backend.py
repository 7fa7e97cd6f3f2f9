"""Which webui is hosting us — decided by trying imports, never by version strings.

Probe order (a1111_host.md §A3): Forge 2's ``backend.patcher.unet`` → Forge 1 / reForge / Forge Classic's
``modules_forge.unet_patcher`` → A1111's ``ldm.modules.attention`` / ``sgm.modules.attention``. The Lora
built-in (``networks``) decides how weight deltas are injected on A1111.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

FORGE2, FORGE1, A1111, UNSUPPORTED = "forge2", "forge1", "a1111", "unsupported"

LABELS = {
    FORGE2: "Forge 2 / Forge Neo (backend/)",
    FORGE1: "Forge 1 / reForge / Forge Classic (ldm_patched)",
    A1111: "Automatic1111 (ldm/sgm)",
    UNSUPPORTED: "unknown webui",
}


@dataclass(frozen=True)
class Backend:
    kind: str
    #: the Lora built-in's ``networks`` module (A1111 only): deltas ride on its backup/merge machinery
    networks: object = None
    #: the Lora built-in's ``network`` module (its ``Network`` class), if importable
    network: object = None

    @property
    def supported(self) -> bool:
        return self.kind != UNSUPPORTED

    @property
    def is_forge(self) -> bool:
        return self.kind in (FORGE1, FORGE2)

    @property
    def weight_route(self) -> str:
        """ "forge" (ModelPatcher.add_patches), "lora" (networks.loaded_networks) or "direct" (own backup)."""
        if self.is_forge:
            return "forge"
        return "lora" if self.networks is not None else "direct"

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def message(self) -> str:
        if self.kind == UNSUPPORTED:
            return (
                "Concept Erasers could not recognise this webui: none of Forge 2's `backend.patcher.unet`, "
                "Forge 1's `modules_forge.unet_patcher` or A1111's `ldm.modules.attention` / "
                "`sgm.modules.attention` can be imported. The extension stays inactive; generation is not "
                "affected. Supported: Automatic1111 1.7–1.10, Forge 1, reForge, Forge Classic, Forge 2/Neo."
            )
        if self.weight_route == "direct":
            return (
                f"{self.label}: the built-in Lora extension is disabled, so weight edits use this "
                f"extension's own backup and are restored after every generation."
            )
        return f"{self.label}: weight edits go through the host's LoRA/patch system."


def _importable(name: str, importer: Callable) -> Optional[object]:
    try:
        return importer(name)
    except Exception:  # ImportError, but a half-broken fork can raise anything while importing
        return None


def detect_backend(importer: Callable = importlib.import_module) -> Backend:
    """Probe the host by importing modules; ``importer`` is injectable so tests use fake module sets."""
    if _importable("backend.patcher.unet", importer) is not None:
        return Backend(FORGE2)
    if _importable("modules_forge.unet_patcher", importer) is not None:
        return Backend(FORGE1)
    if (
        _importable("ldm.modules.attention", importer) is not None
        or _importable("sgm.modules.attention", importer) is not None
    ):
        # on A1111 the Lora built-in is importable as the top-level ``networks`` once it has loaded
        networks = _importable("networks", importer)
        if networks is not None and not hasattr(networks, "loaded_networks"):
            networks = None
        network = _importable("network", importer) if networks is not None else None
        return Backend(A1111, networks, network)
    return Backend(UNSUPPORTED)
