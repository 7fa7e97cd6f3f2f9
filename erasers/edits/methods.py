"""Registry of closed-form methods: name → (config class, erase function, families served).

A method module exposes a ``<Name>Config(EraserConfig)`` and ``erase(config, encoder, weights, specs,
progress)`` returning ``{canonical key: LowRankDelta}``. Adding a method is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedFamily
from ..files.families import Family
from . import mace, rece, speed, uce


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    config_class: type
    erase: Callable
    families: tuple
    #: which layer kinds the method edits by default
    kinds: tuple = ("k", "v", "text_in", "pooled_in")


ALL_FAMILIES = tuple(Family)

METHODS = {
    "uce": Method("uce", "UCE (Unified Concept Editing)", uce.UCEConfig, uce.erase, ALL_FAMILIES),
    "rece": Method("rece", "RECE (Reliable and Efficient Concept Erasure)", rece.RECEConfig, rece.erase, ALL_FAMILIES),
    "speed": Method("speed", "SPEED (null-space concept erasure)", speed.SPEEDConfig, speed.erase, ALL_FAMILIES),
    "mace": Method("mace", "MACE closed-form refinement", mace.MACEConfig, mace.erase, ALL_FAMILIES),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise UnsupportedFamily(f"Unknown method '{name}'; available: {', '.join(METHODS)}.") from None


def check_family(method: Method, family: Family) -> None:
    if family not in method.families:
        serving = [m.name for m in METHODS.values() if family in m.families]
        raise UnsupportedFamily(
            f"{method.title} does not support {family.label} models. Methods that do: {', '.join(serving) or 'none'}."
        )


def config_from_dict(data: dict):
    method = get_method(data.get("method", ""))
    return method.config_class.from_dict(data)
