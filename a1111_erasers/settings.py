"""The accordion's settings: one dataclass, one argument order, one infotext codec.

The order of ``ARG_ORDER`` is the order of the gradio components ``ui()`` returns, hence the order of the
positional ``args`` in the API's ``alwayson_scripts`` — append new fields at the end, never reorder.
Infotext: ``Concept Erasers: {"concepts":"van gogh","method":"uce",...}`` — a compact JSON object holding
only the fields that differ from their defaults (``enabled`` is implied by the key being present).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)

INFOTEXT_KEY = "Concept Erasers"
INFOTEXT_VERSION = 1
GUARDS = ("safree", "sld", "concept_guidance", "token_suppress")
GUARD_PRESETS = ("weak", "medium", "strong", "max")


@dataclass
class UISettings:
    enabled: bool = False
    #: closed-form method name (core registry: uce, rece, speed, mace …)
    method: str = "uce"
    #: one concept per line (commas also separate, unless the line is quoted)
    concepts: str = ""
    #: one anchor per concept, or one for all; empty → the method's default
    anchors: str = ""
    preserve: str = ""
    #: multiplier on the closed-form ΔW (0 → nothing applied)
    strength: float = 1.0
    #: extra method parameters as a JSON object, e.g. {"lam": 0.5, "variant": "2023"}
    method_options: str = ""
    eraser_files: list = field(default_factory=list)
    eraser_weight: float = 1.0
    spm_files: list = field(default_factory=list)
    spm_weight: float = 1.0
    #: SPM facilitated transport (per-prompt permeability)
    spm_transport: bool = True
    guards: list = field(default_factory=list)
    guard_preset: str = "medium"
    #: concepts the guards steer away from; empty → the erased concepts
    guard_concepts: str = ""

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args) -> "UISettings":
        """From the script's positional args (UI or API). Missing trailing args take their defaults."""
        values = {}
        for name, value in zip(ARG_ORDER, list(args or [])):
            values[name] = value
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict) -> "UISettings":
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name in data and data[f.name] is not None:
                setattr(out, f.name, _coerce(data[f.name], getattr(out, f.name), f.name))
        unknown = sorted(set(data) - set(ARG_ORDER) - {"v"})
        if unknown:
            log.warning("Concept Erasers: ignoring unknown settings %s", unknown)
        return out

    def to_args(self) -> list:
        return [getattr(self, name) for name in ARG_ORDER]

    # -- what is active ---------------------------------------------------------------------------
    @property
    def has_closed_form(self) -> bool:
        return self.enabled and bool(self.concept_list()) and self.strength != 0

    def concept_list(self) -> list:
        return _split(self.concepts)

    def options(self) -> dict:
        """``method_options`` parsed; raises ValueError naming the problem."""
        text = (self.method_options or "").strip()
        if not text:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'Method options must be a JSON object such as {{"lam": 0.5}}; '
                f"could not parse '{text[:60]}' ({exc.msg})."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f'Method options must be a JSON object such as {{"lam": 0.5}}, found {type(data).__name__}.'
            )
        return data

    def config_dict(self) -> dict:
        """The core config dict (``erasers.edits.methods.config_from_dict``) for the closed-form edit."""
        data = {
            "method": self.method,
            "concepts": self.concept_list(),
            "anchors": _split_lines(self.anchors),
            "preserve": _split(self.preserve),
        }
        for key, value in self.options().items():
            if key in ("method", "concepts", "anchors", "preserve"):
                raise ValueError(f"Method options may not set '{key}': use the field of the same name.")
            data[key] = value
        return data

    def guard_concept_list(self) -> list:
        return _split(self.guard_concepts) or self.concept_list()

    # -- infotext ---------------------------------------------------------------------------------
    def to_infotext(self) -> str:
        defaults = UISettings()
        data = {"v": INFOTEXT_VERSION}
        for name in ARG_ORDER:
            if name == "enabled":
                continue
            value = getattr(self, name)
            if value != getattr(defaults, name):
                data[name] = value
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_infotext(cls, value) -> Optional["UISettings"]:
        """From the parsed infotext value (a JSON string, or a dict); None when absent or unreadable."""
        if value is None or value == "":
            return None
        data = value
        if isinstance(value, str):
            try:
                data = json.loads(value)
            except json.JSONDecodeError:
                log.warning("Concept Erasers: could not read the infotext value %r", value[:80])
                return None
        if not isinstance(data, dict):
            return None
        data = dict(data)
        data["enabled"] = True
        return cls.from_dict(data)


ARG_ORDER = tuple(f.name for f in dataclasses.fields(UISettings))


def paste_getter(name: str):
    """Callable for ``Script.infotext_fields``: the field's value from parsed infotext params.

    An image without our key turns the switch off (so pasting it reproduces it); other fields are left
    alone (None means "no change" to the webui).
    """

    def getter(params: dict):
        settings = UISettings.from_infotext(params.get(INFOTEXT_KEY))
        if settings is None:
            return False if name == "enabled" else None
        return getattr(settings, name)

    getter.__name__ = f"concept_erasers_paste_{name}"
    return getter


def _coerce(value: Any, default: Any, name: str):
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes", "on")
        return bool(value)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"Concept Erasers: '{name}' must be a number, found {value!r}.") from None
    if isinstance(default, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    return str(value)


def _split(text: str) -> list:
    """One item per line; commas separate too unless the line is quoted (the core's ``split_concepts``)."""
    from .core import core_module

    return core_module("text").split_concepts(text or "")


def _split_lines(text: str) -> list:
    """Anchors: one per line, or a single comma-separated line; blank input → [] (method default)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) == 1:
        return _split(lines[0])
    return [line[1:-1] if len(line) >= 2 and line[0] == line[-1] == '"' else line for line in lines]
