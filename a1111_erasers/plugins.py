"""Plug points for the parts of the core written in parallel: SPM membranes and sampling-time guards.

Each section is one small function pair — "is it available?" and "do it" — so wiring a new core module
in means editing only this file. When a core module is missing the UI shows ``unavailable_message``
and nothing is applied (never a silent stand-in).

* SPM membranes + facilitated transport: ``erasers/membranes/spm.py`` (+ ``erasers/membranes/transport.py``),
  branch ``spm``.
* Guards (SAFREE, SLD, concept guidance, token suppression): ``erasers/guards/safree.py``, ``sld.py``,
  ``concept_guidance.py``, ``token_suppress.py``, branch ``suppress``.
"""

from __future__ import annotations

import logging

from .core import core_module
from .settings import GUARDS

log = logging.getLogger(__name__)

GUARD_MODULES = {
    "safree": "guards.safree",
    "sld": "guards.sld",
    "concept_guidance": "guards.concept_guidance",
    "token_suppress": "guards.token_suppress",
}
GUARD_TITLES = {
    "safree": "SAFREE",
    "sld": "SLD (Safe Latent Diffusion)",
    "concept_guidance": "Concept guidance",
    "token_suppress": "Token suppression",
}


class Unavailable(RuntimeError):
    """A requested feature is not in this build of the core."""


# -- SPM membranes ---------------------------------------------------------------------------------
def spm_module():
    return core_module("membranes.spm")


def spm_available() -> bool:
    return spm_module() is not None


def spm_unavailable_message() -> str:
    return (
        "SPM membranes need `erasers/membranes/spm.py`, which is not in this build of Concept Erasers. "
        "`<spm:…>` tags and the SPM list are ignored (an SPM file still loads as a plain LoRA with "
        "`<lora:name:1>`, without facilitated transport)."
    )


def spm_entries(requests, resolve_path, prompt, encoder, shapes, make_entry, combination="official") -> list:
    """Plan entries for SPM membranes (``requests``: TagRequests of kind "spm").

    ``resolve_path(name)`` → file path or None; ``prompt``: the batch's first prompt — the webui applies
    one set of extra networks per batch, parsed from the first prompt, so facilitated transport scores
    that prompt and the rate holds for the whole batch; ``shapes``: canonical key → shape of every UNet
    parameter. Rates mᵢ = weight · m(prompt) (or weight with transport off) are folded into the deltas:
    "official" (spm.md §4.2, the reference's rule): ΔW = (Σᵢ mᵢUᵢ)(Σⱼ mⱼDⱼ) as one entry;
    "linear": one entry per membrane at mᵢ.
    """
    if not requests:
        return []
    spm = spm_module()
    formats = core_module("membranes.formats")
    if spm is None or formats is None:
        raise Unavailable(spm_unavailable_message())
    lowrank = core_module("lowrank")
    read = core_module("files.eraser_file").read_safetensors
    membranes, sources = [], []
    for request in requests:
        path = resolve_path(request.name)
        if path is None:
            raise core_module("errors").BadEraserFile(
                f"No SPM membrane named '{request.name}' in the SPM folder. Put the .safetensors file in "
                f"models/spm (or pass --spm-dir) and refresh the SPM card page."
            )
        tensors, metadata = read(path)
        deltas, report = formats.convert_file(tensors, metadata, shapes, source=path, fmt="spm")
        concepts = report.concepts
        transport = request.transport and bool(concepts)
        if request.transport and not concepts:
            log.warning("Concept Erasers: %s has no 'prompts' metadata; facilitated transport is off for it.", path)
        gate = spm.Gate(spm.GATE_FT if transport else spm.GATE_ALWAYS, concepts)
        membranes.append(spm.Membrane(deltas, gate, float(request.weight), name=request.name))
        sources.append(path)
    needs_text = any(m.gate.transport for m in membranes)
    rates = spm.RateCache(membranes, encoder if needs_text else None).rates([prompt])[0].tolist()
    tag = ",".join(f"{r.name}@{m:.4f}" for r, m in zip(requests, rates))
    if combination == "linear":
        return [
            make_entry(f"spm:{r.name}@{m:.4f}", f"spm:{r.name}", mem.unet_deltas(), m, path)
            for r, m, mem, path in zip(requests, rates, membranes, sources)
        ]
    combined = {}
    for m, mem in zip(rates, membranes):
        for key, delta in mem.unet_deltas().items():
            if not isinstance(delta, lowrank.LowRankDelta):
                raise Unavailable(f"SPM '{mem.name}' has a dense delta on {key}; only low-rank membranes combine.")
            up, down = delta.up.float() * m, delta.down.float() * m
            if key in combined:
                prev = combined[key]
                if prev.rank != delta.rank:
                    raise spm.CombinationError(
                        f"The official SPM combination needs equal ranks; {key} has {prev.rank} and {delta.rank}."
                    )
                combined[key] = lowrank.LowRankDelta(prev.up + up, prev.down + down)
            else:
                combined[key] = lowrank.LowRankDelta(up, down)
    return [
        make_entry(
            f"spm:{tag}",
            "spm(" + ", ".join(f"{r.name}×{m:.2f}" for r, m in zip(requests, rates)) + ")",
            combined,
            1.0,
            ";".join(sources),
        )
    ]


# -- sampling-time guards --------------------------------------------------------------------------
#: guards whose webui sampling hooks are implemented (a1111_erasers/guards.py)
WIRED_GUARDS = ("safree", "sld", "concept_guidance", "token_suppress")
#: backends whose hooks the guards use: A1111's CFGDenoiser callbacks and ldm/sgm ``attn2`` modules.
#: Forge never fires ``on_cfg_denoised`` and replaces the attention modules, so it is not wired yet.
GUARD_BACKENDS = ("a1111",)


def guard_available(name: str, backend=None) -> bool:
    if backend is not None and getattr(backend, "kind", None) not in GUARD_BACKENDS:
        return False
    return name in WIRED_GUARDS and core_module(GUARD_MODULES[name]) is not None


def guard_unavailable_message(names=GUARDS, backend=None) -> str:
    if backend is not None and getattr(backend, "kind", None) not in GUARD_BACKENDS and backend.supported:
        return (
            f"The sampling-time guards are wired for Automatic1111's sampler callbacks only; on "
            f"{backend.label} they are not available yet (use the closed-form erasure, eraser files or "
            f"SPM membranes). The section is disabled so nothing pretends to guard."
        )
    missing = [GUARD_TITLES[n] for n in names if not guard_available(n)]
    if not missing:
        return ""
    return f"Not in this build of Concept Erasers: {', '.join(missing)}. The section is disabled."


def install_guards(p, settings, backend, encoder) -> list:
    """Install the selected guards for this sampling pass; returns the labels of what was installed.

    Idempotent per pass: a previous session (hires fix, an interrupted run) is removed first. Nothing is
    installed when no guard is selected, so sampling stays bit-identical.
    """
    from . import guards

    guards.remove()
    wanted = [g for g in settings.guards if g in GUARD_MODULES]
    if not settings.enabled or not wanted:
        return []
    missing = [g for g in wanted if not guard_available(g, backend)]
    if missing:
        raise Unavailable(guard_unavailable_message(missing, backend))
    configs = {n: c for n, c in guards.guard_configs(settings).items() if c.active}
    if not configs:
        return []
    prompts = list(getattr(p, "prompts", None) or getattr(p, "all_prompts", None) or [""])
    prompts += [h for h in (getattr(p, "hr_prompts", None) or []) if isinstance(h, str)]  # hires pass
    session = guards.GuardSession(configs, encoder, prompts, family=getattr(encoder, "family", "sd1"))
    guards.install(session, p.sd_model.model.diffusion_model)
    return [guards.label(n, c) for n, c in configs.items()]


def remove_guards(p) -> None:
    """Undo ``install_guards``: callbacks gated off, every patched ``attn2.forward`` removed."""
    from . import guards

    guards.remove()
