"""Per-generation orchestration: settings + tags → plan entries → the backend's weight route.

The ``Script`` hooks in ``scripts/concept_erasers_a1111.py`` call into one ``Controller``:

    before_process                 → begin(): settings, infotext
    after_extra_networks_activate  → apply_weights() (A1111: into networks.loaded_networks)
    process_before_every_sampling  → apply_weights() again (covers hires fix, img2img, disabled extra
                                     networks; Forge: patch the cloned UnetPatcher) + guards
    postprocess                    → finish(): our networks out, direct backups restored
    on_model_loaded                → invalidate(): cached erasers were solved for the old weights

Closed-form erasers are solved once per (base weights fingerprint, method config) and kept on the CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import files, plugins
from .backend import Backend, detect_backend
from .core import core_module
from .inject import PREFIX, DirectRoute, ForgeRoute, LoraRoute, PlanEntry, original_weights, unet_shapes
from .settings import INFOTEXT_KEY, UISettings
from .tags import TagRequest, find_tags
from .text_encoder import WebuiTextEncoder

log = logging.getLogger(__name__)

STATE_ATTR = "concept_erasers_state"
ERROR_KEY = "Concept Erasers error"
#: infotext entry: what each guard of the run resolved to (a preset's meaning can change between versions)
GUARDS_KEY = "Concept Erasers guards"
CACHE_SIZE = 8


@dataclass
class Host:
    """What the controller needs from the webui, injected so tests can use fakes."""

    models_path: str = "models"
    erasers_dir: Optional[str] = None
    spm_dir: Optional[str] = None
    autocast: Callable = contextlib.nullcontext
    #: stop the generation (``shared.state.interrupt``) — used when a requested erasure cannot be applied
    interrupt: Optional[Callable] = None
    default_multiplier: Callable = lambda: 1.0


@dataclass
class GenerationState:
    settings: UISettings
    tags: dict = field(default_factory=lambda: {"eraser": [], "spm": []})
    entries: Optional[list] = None
    entries_model: Optional[str] = None
    applied: list = field(default_factory=list)
    failed: bool = False


class Controller:
    def __init__(
        self, host: Optional[Host] = None, backend: Optional[Backend] = None, detect: Callable = detect_backend
    ):
        self.host = host or Host()
        self._backend = backend
        self._detect = detect
        self._redetect = backend is None
        self.erasers = OrderedDict()  # (model fingerprint, config json) → Eraser
        self.loaded_files = {}  # path → ((mtime, size), Eraser)
        self.direct = DirectRoute()
        self.forge = ForgeRoute()

    # -- host ------------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        # detected lazily: the Lora built-in may load after this extension
        if self._backend is None or (
            self._redetect and self._backend.kind == "a1111" and self._backend.networks is None
        ):
            self._backend = self._detect()
        return self._backend

    def dirs(self, kind: str) -> list:
        override = self.host.erasers_dir if kind == "eraser" else self.host.spm_dir
        return files.model_dirs(kind, self.host.models_path, override)

    def available(self, kind: str) -> dict:
        return files.list_files(self.dirs(kind))

    # -- lifecycle -------------------------------------------------------------------------------
    def invalidate(self, *_args) -> None:
        """``on_model_loaded``: drop solved erasers and any direct patch (they belong to the old weights)."""
        self.erasers.clear()
        self.direct.restore()

    def state(self, p) -> GenerationState:
        state = getattr(p, STATE_ATTR, None)
        if state is None:
            state = GenerationState(UISettings())
            setattr(p, STATE_ATTR, state)
        return state

    def begin(self, p, settings: UISettings) -> GenerationState:
        self.direct.restore()  # a generation that died before postprocess left a patch behind
        plugins.remove_guards(p)  # likewise for guard patches
        state = GenerationState(settings)  # tags arrive later, from the extra networks' activate()
        setattr(p, STATE_ATTR, state)
        if settings.enabled:
            p.extra_generation_params[INFOTEXT_KEY] = settings.to_infotext()
        return state

    def set_tags(self, p, kind: str, requests: list) -> None:
        """From the extra network's ``activate`` (called every batch; each call overrides the previous)."""
        state = self.state(p)
        if state.tags.get(kind) != list(requests):
            state.tags[kind] = list(requests)
            state.entries = None

    # -- the plan --------------------------------------------------------------------------------
    def requests(self, state: GenerationState, kind: str) -> list:
        out = list(state.tags.get(kind, []))
        settings = state.settings
        if settings.enabled:
            chosen = settings.eraser_files if kind == "eraser" else settings.spm_files
            weight = settings.eraser_weight if kind == "eraser" else settings.spm_weight
            out += [
                TagRequest(kind, name, weight, settings.spm_transport)
                for name in chosen
                if name not in {r.name for r in out}
            ]
        return [r for r in out if r.weight != 0]

    def _closed_form(self, settings: UISettings, encoder, weights: dict, model_id: str):
        methods = core_module("edits.methods")
        config = methods.config_from_dict(settings.config_dict())
        key = (model_id, config.to_json())
        eraser = self.erasers.get(key)
        if eraser is None:
            log.info("Concept Erasers: solving %s for %s", config.method, config.concepts)
            eraser = core_module("edits.eraser").compute_eraser(config, encoder, weights)
            self.erasers[key] = eraser
            while len(self.erasers) > CACHE_SIZE:
                self.erasers.popitem(last=False)
        else:
            self.erasers.move_to_end(key)
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
        label = f"{config.method}({', '.join(config.concepts)})"
        return PlanEntry(f"{PREFIX}{config.method}:{digest}", label, eraser.deltas, settings.strength)

    def _load_file(self, path: str):
        stat = os.stat(path)
        stamp = (stat.st_mtime, stat.st_size)
        cached = self.loaded_files.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, core_module("files.eraser_file").load_eraser(path))
            self.loaded_files[path] = cached
        return cached[1], stamp

    def _file_entry(self, request: TagRequest, shapes: dict):
        path = files.resolve(request.name, self.available("eraser"))
        if path is None:
            raise core_module("errors").BadEraserFile(
                f"No eraser file named '{request.name}' in {self.dirs('eraser')}. Put the .safetensors file there "
                f"(or pass --erasers-dir) and refresh the Erasers card page."
            )
        eraser, stamp = self._load_file(path)
        eraser.check_model(shapes)
        digest = hashlib.sha256(f"{path}|{stamp}".encode()).hexdigest()[:12]
        label = f"eraser:{request.name}"
        return PlanEntry(f"{PREFIX}file:{digest}", label, eraser.deltas, request.weight, source=path)

    def plan(self, p) -> list:
        """Plan entries for this batch (cached on ``p`` while the model and tags stay the same)."""
        state = self.state(p)
        if not (state.settings.has_closed_form or self.requests(state, "eraser") or self.requests(state, "spm")):
            # nothing asked for: never touch the model (it may be one this extension cannot read, e.g.
            # a Flux UNet on Forge 2), so a disabled accordion can never stop a generation
            return []
        route = self.backend.weight_route
        weights = original_weights(p.sd_model, route, self.direct if route == "direct" else None)
        model_id = core_module("edits.eraser").fingerprint(weights)
        if state.entries is not None and state.entries_model == model_id:
            return state.entries
        entries = []
        settings = state.settings
        encoder = WebuiTextEncoder(p.sd_model, self.host.autocast)
        if settings.has_closed_form:
            entries.append(self._closed_form(settings, encoder, weights, model_id))
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        for request in self.requests(state, "eraser"):
            entries.append(self._file_entry(request, shapes))
        spm_requests = self.requests(state, "spm")
        if spm_requests:
            available = self.available("spm")
            prompts = list(getattr(p, "prompts", None) or getattr(p, "all_prompts", None) or [""])
            make = lambda name, label, deltas, mult, source: PlanEntry(  # noqa: E731
                PREFIX + name, label, deltas, mult, source
            )
            entries += plugins.spm_entries(
                spm_requests,
                lambda name: files.resolve(name, available),
                prompts[0],
                encoder,
                unet_shapes(p.sd_model, route),
                make,
            )
        state.entries, state.entries_model = entries, model_id
        return entries

    # -- applying --------------------------------------------------------------------------------
    def apply_weights(self, p, stage: str) -> list:
        """Put this batch's deltas into the model (idempotent). Returns the applied entries."""
        state = self.state(p)
        backend = self.backend
        if not backend.supported or state.failed:
            return []
        route = backend.weight_route
        try:
            entries = self.plan(p)
        except plugins.Unavailable as exc:
            self._fail(p, str(exc))
            return []
        except Exception as exc:  # EraserError subclasses ValueError; anything else is a bug
            self._fail(p, str(exc), exc_info=not isinstance(exc, ValueError))
            return []
        if route == "lora":
            LoraRoute(backend.networks, backend.network).sync(p.sd_model, entries)
        elif route == "direct":
            if stage == "sampling":  # weights change right before the sampler runs, restored after
                self.direct.apply(p.sd_model, entries)
        elif route == "forge" and stage == "sampling":
            self.forge.apply(p.sd_model, entries)
        if entries and [e.label for e in entries] != state.applied:
            log.info("Concept Erasers (%s): %s", route, ", ".join(f"{e.label}×{e.multiplier:g}" for e in entries))
        state.applied = [e.label for e in entries]
        return entries

    def apply_guards(self, p) -> list:
        """Install the selected sampling-time guards for the coming sampling pass (re-run before the hires
        pass: the session is rebuilt, SLD's momentum starts again). Returns their labels."""
        state = self.state(p)
        backend = self.backend
        if not backend.supported or state.failed:
            plugins.remove_guards(p)
            return []
        try:
            labels = plugins.install_guards(
                p, state.settings, backend, WebuiTextEncoder(p.sd_model, self.host.autocast)
            )
        except plugins.Unavailable as exc:
            plugins.remove_guards(p)
            self._fail(p, str(exc))
            return []
        except Exception as exc:
            plugins.remove_guards(p)
            self._fail(p, str(exc), exc_info=not isinstance(exc, ValueError))
            return []
        if labels:
            log.info("Concept Erasers guards: %s", ", ".join(labels))
            p.extra_generation_params[GUARDS_KEY] = ", ".join(labels)
        return labels

    def finish(self, p) -> None:
        """``postprocess``: take our networks out and restore direct patches (Forge needs nothing)."""
        backend = self.backend
        if backend.weight_route == "lora":
            LoraRoute(backend.networks, backend.network).clear()
        self.direct.restore()
        plugins.remove_guards(p)

    def unload(self) -> None:
        """``on_script_unloaded``."""
        self.finish(None)
        self.erasers.clear()

    def _fail(self, p, message: str, exc_info: bool = False) -> None:
        """A requested erasure cannot be applied: apply nothing, say why, and stop the generation."""
        state = self.state(p)
        state.failed = True
        log.error("Concept Erasers: %s", message, exc_info=exc_info)
        backend = self.backend
        if backend.weight_route == "lora":
            LoraRoute(backend.networks, backend.network).clear()
        self.direct.restore()
        p.extra_generation_params[ERROR_KEY] = message
        comment = getattr(p, "comment", None)
        if callable(comment):
            comment(f"Concept Erasers: {message}")
        if self.host.interrupt is not None:
            self.host.interrupt()


def tags_in(prompt: str) -> list:
    """Convenience for tests and the API docs."""
    return find_tags(prompt)
