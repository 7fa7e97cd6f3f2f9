"""Config dataclasses: each eraser validates its own parameters and serialises to a flat dict.

The same dict goes into eraser-file metadata, ComfyUI workflow ``extra`` metadata and A1111 infotext, so
an image or a file always says exactly how its eraser was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .errors import EraserError
from .text import check_prompts

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class ConfigError(EraserError):
    """A parameter has a value the pack refuses (the message names the parameter)."""


class ArgumentTypeError(ConfigError, TypeError):
    """A parameter has the wrong type; both a ``TypeError`` and one of the pack's errors (``EraserError``)."""


def check_number(name: str, value, low: Optional[float] = None, where: str = "") -> float:
    """``value`` as a finite float (≥ ``low`` when given); ``name`` is the parameter the message names.

    Booleans and strings are refused (``strength=True`` or ``lam="0.5"`` is a caller's mistake, not a
    number); numpy scalars are real numbers and pass.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{prefix}{name} must be a number, found {type(value).__name__} {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{prefix}{name} must be a finite number, found {value!r}.")
    if low is not None and number < low:
        raise ConfigError(f"{prefix}{name} must be ≥ {low:g}, found {value!r}.")
    return number


def check_path(name: str, value) -> str:
    """A file-system path parameter: ``str`` or any ``os.PathLike`` → ``str``; anything else is refused."""
    if isinstance(value, (bytes, bytearray)):
        raise ArgumentTypeError(f"{name} must be a path (str or os.PathLike), found bytes {value!r}; decode it first.")
    try:
        path = os.fspath(value)
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be a path (str or os.PathLike), found {type(value).__name__} {value!r}."
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ConfigError(f"{name} is an empty path; give a file name.")
    return path


def text_list(name: str, value) -> list:
    """A list-of-text parameter. A bare string is ONE entry (never its letters); None → []; every entry must
    be a string (None entries are kept for the caller to drop)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray, dict)) or not hasattr(value, "__iter__"):
        raise ArgumentTypeError(
            f"{name} must be a list of strings (or one string), found {type(value).__name__} {value!r}."
        )
    items = list(value)
    bad = [item for item in items if item is not None and not isinstance(item, str)]
    if bad:
        raise ArgumentTypeError(
            f"{name} must hold strings only, found {type(bad[0]).__name__} {bad[0]!r}. Quote each entry."
        )
    return items


def shipped_names(filename: str) -> list:
    """The names of a list shipped in erasers/data/ (one per line; a role after the first comma dropped;
    blank lines and ``#`` comments skipped; a name repeated in another case kept once, first spelling)."""
    with open(os.path.join(DATA_DIR, filename), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    names, seen = [], set()
    for line in lines:
        name = line.split(",")[0].strip()
        if name and not name.startswith("#") and name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


@dataclass(frozen=True)
class PresetList:
    """A preset's ``preserve`` entry that stands for a list shipped in erasers/data/: ``from_preset`` puts
    its names in the config, minus the concepts being erased (compared case-insensitively — the config
    refuses a concept that is both erased and preserved). A ``preserve`` the caller passes replaces it."""

    filename: str
    description: str = ""

    def names(self, erased=()) -> list:
        drop = {str(c).strip().lower() for c in erased if c is not None}
        return [n for n in shipped_names(self.filename) if n.lower() not in drop]


#: the 1,834 artists of the UCE authors' erasers/data/artists_sd.txt: the preservation set of UCE's (and,
#: following it, SPEED's and RECE's) published artistic-style erasure (closed_form.md §3.2, §4.2, §5.4)
ARTISTS = PresetList("artists_sd.txt", "every other artist of erasers/data/artists_sd.txt")


class SerialisedConfig:
    """to_dict / to_json / from_dict for config dataclasses with a ``method`` class variable.

    The flat dict is what eraser-file metadata, workflow ``extra`` and A1111 infotext carry.
    """

    method: ClassVar[str] = ""

    def to_dict(self) -> dict:
        out = {"method": self.method}
        out.update(dataclasses.asdict(self))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"method"})
        if unknown:
            raise ConfigError(f"{cls.method}: unknown parameters {unknown}; known ones are {sorted(known)}.")
        if data.get("method", cls.method) != cls.method:
            raise ConfigError(f"Expected a '{cls.method}' config, found method '{data.get('method')}'.")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EraserConfig(SerialisedConfig):
    """Fields shared by every closed-form method."""

    method: ClassVar[str] = ""

    concepts: list = field(default_factory=list)
    #: one anchor/guide per concept, or one for all; empty → the method's default for ``concept_type``
    anchors: list = field(default_factory=list)
    preserve: list = field(default_factory=list)
    #: "object" (things, people, characters), "art" (styles) or "nudity" — picks the published defaults
    concept_type: str = "object"
    #: rank cap for storage (truncated SVD); None keeps the delta exact
    rank_cap: Optional[int] = None

    CONCEPT_TYPES: ClassVar[tuple] = ("object", "art", "nudity")
    #: named published settings: preset name → field values (see ``from_preset``)
    PRESETS: ClassVar[dict] = {}

    def __post_init__(self):
        # a bare string is one concept: list("circle") would erase the letters c, i, r, c, l, e
        self.concepts = text_list("concepts", self.concepts)
        self.anchors = text_list("anchors", self.anchors)
        self.preserve = text_list("preserve", self.preserve)
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        self.concepts = check_prompts(self.concepts, "concept to erase")
        # anchors may legitimately be "" (erase towards the unconditional prompt): keep empties
        self.anchors = [a.strip() if a is not None else "" for a in self.anchors]
        self.preserve = [p.strip() for p in self.preserve if p and p.strip()]
        if not isinstance(self.concept_type, str) or self.concept_type not in self.CONCEPT_TYPES:
            raise ConfigError(f"concept_type must be one of {self.CONCEPT_TYPES}, found '{self.concept_type}'.")
        if self.anchors and len(self.anchors) not in (1, len(self.concepts)):
            raise ConfigError(
                f"Expected one anchor for all concepts or one per concept ({len(self.concepts)}), found "
                f"{len(self.anchors)}. Give a single anchor (e.g. 'art') or one per line in the same order."
            )
        if self.rank_cap is not None and (
            isinstance(self.rank_cap, bool) or not isinstance(self.rank_cap, int) or self.rank_cap < 1
        ):
            raise ConfigError(f"rank_cap must be a whole number ≥ 1 or empty, found {self.rank_cap!r}.")
        erased = {c.lower() for c in self.concepts}
        clash = [p for p in self.preserve if p.lower() in erased]
        if clash:
            raise ConfigError(f"These concepts are both erased and preserved: {clash}. Remove them from one list.")

    def _check_positive(self, **values) -> None:
        for name, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number:
                raise ArgumentTypeError(
                    f"{self.method}: {name} must be a finite number ≥ 0, found {type(value).__name__} {value!r}."
                )
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{self.method}: {name} must be a finite number ≥ 0, found {value!r}.")

    def anchors_for_concepts(self, default: str) -> list:
        """One anchor per concept (broadcasting a single one; the method's default when none is given)."""
        if not self.anchors:
            return [default] * len(self.concepts)
        if len(self.anchors) == 1:
            return self.anchors * len(self.concepts)
        return list(self.anchors)

    @classmethod
    def from_preset(cls, name: str, **fields) -> "EraserConfig":
        """A config with a published preset's values; explicit ``fields`` override the preset.

        A preset whose ``preserve`` is a ``PresetList`` (SPEED ``styles``, RECE ``art``: the other artists
        of erasers/data/artists_sd.txt) gets that list minus the erased ``concepts``; a ``preserve`` passed
        here (even ``[]``) replaces it.
        """
        if name not in cls.PRESETS:
            raise ConfigError(f"{cls.method}: unknown preset '{name}'; available: {', '.join(cls.PRESETS) or 'none'}.")
        values = {**cls.PRESETS[name], **fields}
        if isinstance(values.get("preserve"), PresetList):
            values["preserve"] = values["preserve"].names(text_list("concepts", values.get("concepts")))
        return cls(**values)


def describe(config: EraserConfig) -> str:
    """One-line human summary, e.g. for logs and infotext."""
    extra: dict[str, Any] = {
        k: v for k, v in config.to_dict().items() if k not in ("method", "concepts", "anchors", "preserve")
    }
    return f"{config.method}: erase {config.concepts} → {config.anchors or 'default'}; {extra}"
