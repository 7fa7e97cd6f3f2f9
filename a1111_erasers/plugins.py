"""Plug points for the parts of the core written in parallel: SPM membranes and sampling-time guards.

Each section is one small function pair — "is it available?" and "do it" — so wiring a new core module
in means editing only this file. When a core module is missing the UI shows ``unavailable_message``
and nothing is applied (never a silent stand-in).

* SPM membranes + facilitated transport: ``erasers/spm.py`` (+ ``erasers/transport.py``), branch ``spm``.
* Guards (SAFREE, SLD, concept guidance, token suppression): ``erasers/safree.py``, ``sld.py``,
  ``concept_guidance.py``, ``token_suppress.py``, branch ``suppress``.
"""
from __future__ import annotations

import logging

from .core import core_module
from .settings import GUARDS

log = logging.getLogger(__name__)

GUARD_MODULES = {"safree": "safree", "sld": "sld", "concept_guidance": "concept_guidance",
                 "token_suppress": "token_suppress"}
GUARD_TITLES = {"safree": "SAFREE", "sld": "SLD (Safe Latent Diffusion)", "concept_guidance": "Concept guidance",
                "token_suppress": "Token suppression"}


class Unavailable(RuntimeError):
    """A requested feature is not in this build of the core."""


# -- SPM membranes ---------------------------------------------------------------------------------
def spm_module():
    return core_module("spm")


def spm_available() -> bool:
    return spm_module() is not None


def spm_unavailable_message() -> str:
    return ("SPM membranes need `erasers/spm.py`, which is not in this build of Concept Erasers. "
            "`<spm:…>` tags and the SPM list are ignored (an SPM file still loads as a plain LoRA with "
            "`<lora:name:1>`, without facilitated transport).")


def spm_entries(requests, resolve_path, prompts, encoder, model_keys, make_entry) -> list:
    """Plan entries for SPM membranes. ``requests``: TagRequests (kind "spm").

    ``resolve_path(name)`` → file path; ``prompts``: the batch's prompts (facilitated transport scores the
    first one, as the webui parses extra networks from the first prompt); ``make_entry(name, label,
    deltas, multiplier, source)`` builds a PlanEntry.
    """
    if not requests:
        return []
    module = spm_module()
    if module is None:
        raise Unavailable(spm_unavailable_message())
    raise Unavailable("erasers/spm.py exists but this glue does not yet know its API; update "
                      "a1111_erasers/plugins.py:spm_entries.")


# -- sampling-time guards --------------------------------------------------------------------------
def guard_available(name: str) -> bool:
    return name in GUARD_MODULES and core_module(GUARD_MODULES[name]) is not None


def guard_unavailable_message(names=GUARDS) -> str:
    missing = [GUARD_TITLES[n] for n in names if not guard_available(n)]
    if not missing:
        return ""
    return (f"Not in this build of Concept Erasers: {', '.join(missing)} (core modules "
            f"{', '.join('erasers/' + GUARD_MODULES[n] + '.py' for n in names if not guard_available(n))}). "
            f"Selecting them has no effect.")


def install_guards(p, settings, backend, encoder) -> list:
    """Register the selected guards for this generation; returns the labels of what was installed.

    A1111: CFG callbacks (``on_cfg_denoiser`` / ``on_cfg_denoised``) gated by a per-generation state;
    Forge: ``set_model_sampler_post_cfg_function`` etc. on the cloned UnetPatcher.
    """
    wanted = [g for g in settings.guards if g in GUARD_MODULES]
    if not wanted:
        return []
    missing = [g for g in wanted if not guard_available(g)]
    if missing:
        raise Unavailable(guard_unavailable_message(missing))
    raise Unavailable("The guard modules exist but this glue does not yet know their API; update "
                      "a1111_erasers/plugins.py:install_guards.")


def remove_guards(p) -> None:
    """Undo ``install_guards`` (A1111 callbacks are gated off; Forge needs nothing)."""
    return None
