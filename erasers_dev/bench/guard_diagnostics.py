"""``python -m erasers_dev.bench.guard_diagnostics``: what each sampling-time guard does, step by step.

The shapes bench (shapes.py) says *whether* a guard erases; this says *why*, by measuring each mechanism
on the shapes world and printing it next to its paper's own setting (shared/reference/suppression.md):

* schedule — σ per step, how much of each schedule lies above NAG's published σ cut-off, and when the
  model commits to a shape: the prompt is switched from the concept to a benign one after step k and the
  classifier reads what was drawn (the guards must act before this point);
* SAFREE — which tokens the masked-prompt (leave-one-out) test flags on concept and benign prompts, the
  projection's size ‖Δ‖/‖p‖, β and t′ of self-validating filtering and how many steps it keeps the
  projection on, and the rate with the projection on for the whole schedule, with the keyword negative
  prompt, and with a FreeU-style low-frequency filter of the skip features (the latent re-attention);
* SLD — per step: past warm-up or not, the share of elements the threshold admits, the share where the
  clamp saturates, and ‖γ‖ / ‖ε_p − ε_∅‖ (the safety term against the CFG term: both get s_g);
* concept guidance — per step: on (σ ≥ σ_end) or not, ‖Z − Z⁺‖/‖Z⁺‖ (how far the attention output
  moves from the positive branch), ‖Z⁺ − Z⁻‖/‖Z⁺‖ and the share of tokens the τ cap clips;
* token suppression — image→text attention mass on the concept word, EOS, padding and the other tokens,
  without and with the bias, and the positions flagged on benign prompts.

``--quick`` runs one seed and a few prompts on the shipped model; ``--tiny`` runs on a random tiny model
(plumbing only: seconds, the numbers mean nothing) — the unit test uses it.
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch

from erasers.guards import safree, sld
from erasers.guards import token_suppress as ts
from erasers.guards.concept_guidance import ConceptGuidanceConfig

from . import shapes_eval as ev
from .shapes_suppression import ShapesSuppression, sigma_of

log = logging.getLogger(__name__)

#: SD1.x's noise schedule (scaled_linear, β from 0.00085 to 0.012 over 1000 steps): to say what a σ
#: cut-off published for SD means on another schedule
SD_BETAS = (0.00085, 0.012, 1000)


# -- prompts -------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Prompts naming the concept exactly, by a synonym, and benign ones (the same axis, another value)."""

    exact: List[str]
    synonym: List[str]
    benign: List[str]
    #: the benign counterpart of each exact prompt (for the switch test)
    counterpart: List[str]
    axis: str
    target: int
    #: word naming the concept/its counterpart in each prompt (for per-token tables)
    words: Dict[str, str] = field(default_factory=dict)


def build_prompts(concept: str, quick: bool) -> Prompts:
    from ..shapes import world

    axis = ev.axis_of(concept)
    values = ev.VALUES[axis]
    target = values.index(concept)
    other_axis = world.COLOURS if axis == "shape" else world.SHAPES
    others = [v for v in values if v != concept and v in world.SYNONYMS]
    if quick:
        other_axis = other_axis[:2]

    def phrase(word, other):
        return f"a {other} {word}" if axis == "shape" else f"a {word} {other}"

    synonyms = world.SYNONYMS[concept][1:]
    exact = [phrase(concept, o) for o in other_axis]
    synonym = [phrase(s, o) for s in synonyms for o in other_axis]
    benign = [phrase(v, o) for v in others for o in other_axis]
    counterpart = [phrase(others[0], o) for o in other_axis]
    return Prompts(exact, synonym, benign, counterpart, axis, target)


def concept_rate(classifier, images: torch.Tensor, axis: str, target: int) -> float:
    pred = ev.predictions_to_tensors(classifier.predict(images))[axis]
    return float((pred == target).float().mean())


def accuracy(classifier, images: torch.Tensor, prompts: Sequence[str], axis: str) -> float:
    """Share of images whose ``axis`` value is the one the prompt names (benign prompts: fidelity)."""
    values = ev.VALUES[axis]
    labels = torch.tensor([next(i for i, v in enumerate(values) if v in p.split()) for p in prompts])
    pred = ev.predictions_to_tensors(classifier.predict(images))[axis]
    return float((pred == labels).float().mean())


# -- plain sampling with a prompt switch ---------------------------------------------------------------


@torch.no_grad()
def sample_switch(pipe, cond_a, cond_b, switch: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Sampling as ShapesPipeline with context ``cond_a`` for steps < ``switch`` and ``cond_b`` after."""
    n = cond_a.shape[0]
    uncond = pipe.encode_prompts([""] * n)
    gen = torch.Generator().manual_seed(int(seed))
    size = pipe.image_size
    x = torch.randn(n, 3, size, size, generator=gen).to(pipe.device)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        c = cond_a if i < switch else cond_b
        eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, c])).sample.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def schedule_sigmas(pipe, steps: int) -> List[float]:
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    return [sigma_of(scheduler.alphas_cumprod, t) for t in scheduler.timesteps]


def sd_sigma(t: torch.Tensor) -> torch.Tensor:
    lo, hi, n = SD_BETAS
    betas = torch.linspace(lo**0.5, hi**0.5, n, dtype=torch.float64) ** 2
    a = torch.cumprod(1 - betas, 0)
    return ((1 - a) / a).sqrt()[t]


def fraction_above(sigmas: torch.Tensor, cut: float) -> float:
    """Share of the timestep range [0, T) whose σ is ≥ ``cut`` (what ComfyUI's percent means)."""
    return float((sigmas >= cut).double().mean())


def schedule_section(pipe, classifier, pr: Prompts, args) -> dict:
    sig20, sig50 = schedule_sigmas(pipe, 20), schedule_sigmas(pipe, 50)
    a = pipe.scheduler.alphas_cumprod.double()
    shapes_sig = ((1 - a) / a).sqrt()
    sd_sig = sd_sigma(torch.arange(SD_BETAS[2]))
    out = {
        "sigmas_20": sig20,
        "steps_sigma_ge_4": {20: sum(s >= 4 for s in sig20), 50: sum(s >= 4 for s in sig50)},
        "range_sigma_ge_4": {"shapes": fraction_above(shapes_sig, 4.0), "sd1": fraction_above(sd_sig, 4.0)},
        "switch": [],
    }
    cond_a = pipe.encode_prompts(pr.exact * args.reps)
    cond_b = pipe.encode_prompts(pr.counterpart * args.reps)
    for steps in args.switch_steps:
        ks = sorted({int(round(f * steps)) for f in args.switch_fractions})
        for k in ks:
            images = sample_switch(pipe, cond_a, cond_b, k, steps, args.guidance, args.seed)
            rate = concept_rate(classifier, images, pr.axis, pr.target)
            images = sample_switch(pipe, cond_b, cond_a, k, steps, args.guidance, args.seed)
            late = concept_rate(classifier, images, pr.axis, pr.target)
            out["switch"].append({"steps": steps, "k": k, "fraction": k / steps, "rate": rate, "late": late})
    return out


# -- SAFREE -------------------------------------------------------------------------------------------


def token_words(pipe, prompt: str) -> List[str]:
    return ["<bos>"] + pipe.tokenizer.split(prompt) + ["<eos>"]


def safree_section(pipe, classifier, pr: Prompts, concept: str, args) -> dict:
    out = {"groups": {}, "rates": {}}
    concept_words = set(_synonyms(concept))
    for group, prompts in (("exact", pr.exact), ("synonym", pr.synonym), ("benign", pr.benign)):
        method = ShapesSuppression(pipe, "safree", [concept])
        cond = pipe.encode_prompts(prompts)
        safe, fractions = method.safree_context(prompts, cond)
        rows = []
        for prompt, res, c, s in zip(prompts, method.safree_results, cond.cpu(), safe):
            words = token_words(pipe, prompt)
            flagged = [words[p] for p, f in zip(res.positions, res.flagged.tolist()) if f]
            delta = (s - c).norm() / c.norm()
            proj = res.info.get("projected_rows", 0)
            rows.append(
                {
                    "prompt": prompt,
                    "flagged": flagged,
                    "concept_flagged": any(w in concept_words for w in flagged),
                    "other_flagged": any(w not in concept_words for w in flagged),
                    "delta": float(delta),
                    "projected_rows": proj,
                    "beta": res.beta,
                    "t_prime": res.t_prime,
                    "fraction": res.filter_fraction if res.changed else 0.0,
                    "steps_on_20": _steps_on(res, 20),
                    "steps_on_50": _steps_on(res, 50),
                    "d": [round(float(x), 4) for x in res.distances],
                }
            )
        out["groups"][group] = rows
    out["subspace"] = subspace_share(pipe, pr, concept)
    base_cfg = safree.SAFREEConfig(concepts=[concept])
    variants = {
        "SAFREE (paper window)": base_cfg,
        "SVF as a switch over the whole schedule (svf_window whole)": replace(base_cfg, svf_window="whole"),
        "projection at every step (no SVF)": replace(base_cfg, self_validating=False),
        "every step, EOS/padding not projected (the reference)": replace(
            base_cfg, self_validating=False, include_eos=False
        ),
        "+ keyword negative prompt": replace(base_cfg, keywords_as_negative=True),
    }
    prompts = pr.exact * args.reps
    synonyms = pr.synonym * args.reps
    for name, cfg in variants.items():
        out["rates"][name] = _rates(pipe, classifier, "safree", concept, cfg, prompts, synonyms, pr, args)
    # latent re-attention: a FreeU-style filter of the first two up stages' skip features (released
    # code: s1 0.9, s2 0.2, b 1.0, a 2×2 low-frequency window); diffusers applies it to every batch row
    if hasattr(pipe.unet, "enable_freeu"):
        pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.0, b2=1.0)
        try:
            out["rates"]["+ Fourier skip filter (LRA, all rows)"] = _rates(
                pipe, classifier, "safree", concept, base_cfg, prompts, synonyms, pr, args
            )
            out["rates"]["Fourier skip filter alone (no SAFREE)"] = _rates(
                pipe, classifier, "safree", concept, replace(base_cfg, strength=0.0), prompts, synonyms, pr, args
            )
        finally:
            pipe.unet.disable_freeu()
    return out


def subspace_share(pipe, pr: Prompts, concept: str) -> dict:
    """‖P_C δ‖/‖δ‖ per row kind: how much of the direction that tells a concept prompt from its benign
    counterpart (δ = h(exact) − h(counterpart), the rows the UNet reads) lies in SAFREE's concept subspace."""
    a = pipe.encode_prompts(pr.exact).double().cpu()
    b = pipe.encode_prompts(pr.counterpart).double().cpu()
    ids = pipe.tokenizer.ids(concept)
    c = pipe.encode_prompts([concept]).double().cpu()[0, len(ids) - 1]  # pooled = the EOS state
    p_c = safree.projection_matrix(c[:, None])
    n = len(pipe.tokenizer.ids(pr.exact[0]))
    out = {}
    for name, rows in (("last word", slice(n - 2, n - 1)), ("EOS", slice(n - 1, n)), ("padding", slice(n, None))):
        d = (a[:, rows] - b[:, rows]).reshape(-1, a.shape[-1])
        out[name] = float((d @ p_c).norm() / d.norm().clamp_min(1e-12))
    return out


def _synonyms(concept: str) -> List[str]:
    from ..shapes import world

    return world.SYNONYMS.get(concept, [concept])


def _steps_on(res, steps: int) -> int:
    if not res.changed:
        return 0
    return sum(1 for i in range(steps) if i / steps < res.filter_fraction)


def _rates(pipe, classifier, method, concept, config, prompts, synonyms, pr: Prompts, args) -> dict:
    m = ShapesSuppression(pipe, method, [concept], config=config)
    got = {}
    for key, ps in (("exact", prompts), ("synonym", synonyms)):
        images = m.sample(ps, steps=args.steps, guidance=args.guidance, seed=args.seed)
        got[key] = concept_rate(classifier, images, pr.axis, pr.target)
    benign = pr.benign * args.reps
    images = m.sample(benign, steps=args.steps, guidance=args.guidance, seed=args.seed)
    got["benign_accuracy"] = accuracy(classifier, images, benign, pr.axis)
    return got


# -- SLD ----------------------------------------------------------------------------------------------


class StepRecorder:
    """Collects probe values per step: ``rec[step][name]`` lists."""

    def __init__(self):
        self.step = 0
        self.steps = 0
        self.sigma: Dict[int, float] = {}
        self.values: Dict[int, Dict[str, list]] = {}

    def add(self, name, value):
        self.values.setdefault(self.step, {}).setdefault(name, []).append(float(value))

    def mean(self, step, name) -> Optional[float]:
        vals = self.values.get(step, {}).get(name)
        return None if not vals else sum(vals) / len(vals)


def sld_probe(config: sld.SLDConfig, rec: StepRecorder, n: int):
    def probe(kind, **v):
        if kind == "step":
            rec.step, rec.steps = v["step"], v["steps"]
            rec.sigma[v["step"]] = v["sigma"]
            return
        if kind != "sld":
            return
        diff = v["eps_p"] - v["eps_s"]
        admitted = diff < config.threshold
        mu = torch.clamp((diff * config.guidance_scale).abs(), max=1.0)
        cfg_term = (v["eps_p"] - v["eps_u"]).flatten(1).norm(dim=1)
        rec.add("admitted", admitted.float().mean())
        rec.add("saturated", ((mu >= 1.0) & admitted).float().sum() / admitted.float().sum().clamp_min(1))
        rec.add("active", float(v["gamma"].abs().sum() > 0))
        rec.add("ratio", (v["gamma"].flatten(1).norm(dim=1) / cfg_term.clamp_min(1e-12)).mean())
        rec.add("concept_vs_cfg", ((v["eps_s"] - v["eps_u"]).flatten(1).norm(dim=1) / cfg_term).mean())

    return probe


def sld_section(pipe, classifier, pr: Prompts, concept: str, args) -> dict:
    out = {"per_step": {}, "rates": {}, "warmup": {}}
    for preset in sld.PRESETS:
        cfg = sld.SLDConfig(concepts=[concept], preset=preset)
        out["warmup"][preset] = {s: cfg.warmup_for(s) for s in (20, 50)}
    cfg = sld.SLDConfig(concepts=[concept])
    for group, prompts in (("exact", pr.exact), ("benign", pr.benign)):
        rec = StepRecorder()
        m = ShapesSuppression(pipe, "sld", [concept], config=cfg, probe=sld_probe(cfg, rec, len(prompts)))
        m.sample(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
        out["per_step"][group] = [
            {
                "step": s,
                "sigma": rec.sigma.get(s),
                **{k: rec.mean(s, k) for k in ("active", "admitted", "saturated", "ratio", "concept_vs_cfg")},
            }
            for s in sorted(rec.values)
        ]
    for preset in args.sld_presets:
        c = sld.SLDConfig(concepts=[concept], preset=preset)
        out["rates"][preset] = _rates(
            pipe, classifier, "sld", concept, c, pr.exact * args.reps, pr.synonym * args.reps, pr, args
        )
    return out


# -- concept guidance ---------------------------------------------------------------------------------


def nag_probe(rec: StepRecorder):
    def probe(kind, **v):
        if kind == "step":
            rec.step, rec.steps = v["step"], v["steps"]
            rec.sigma[v["step"]] = v["sigma"]
            return
        if kind != "nag":
            return
        zp, zn, zo = (v[k].float() for k in ("z_pos", "z_neg", "z_out"))
        norm = zp.norm(dim=-1).clamp_min(1e-12)
        rec.add("move", ((zo - zp).norm(dim=-1) / norm).mean())
        rec.add("gap", ((zp - zn).norm(dim=-1) / norm).mean())
        z_tilde = zp + (v["phi"] - 1.0) * (zp - zn)
        s = z_tilde.abs().sum(-1) / zp.abs().sum(-1).clamp_min(1e-6)
        rec.add("clipped", (s > v["tau"]).float().mean())

    return probe


def guidance_section(pipe, classifier, pr: Prompts, concept: str, args) -> dict:
    out = {"per_step": {}, "rates": {}}
    cfg = ConceptGuidanceConfig(concepts=[concept])
    out["sigma_end"] = cfg.sigma_end_for("unet")
    for group, prompts in (("exact", pr.exact), ("benign", pr.benign)):
        rec = StepRecorder()
        # every step measured (σ_end 0); "on" says whether the default σ_end would have acted there
        m = ShapesSuppression(pipe, "guidance", [concept], config=replace(cfg, sigma_end=0.0), probe=nag_probe(rec))
        m.sample(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
        out["per_step"][group] = [
            {
                "step": s,
                "sigma": rec.sigma.get(s),
                "on": rec.sigma.get(s, 0) >= out["sigma_end"],
                **{k: rec.mean(s, k) for k in ("move", "gap", "clipped")},
            }
            for s in sorted(rec.values)
        ]
    variants = {"defaults (σ_end 4)": cfg, "every step (σ_end 0)": replace(cfg, sigma_end=0.0)}
    for name, c in variants.items():
        out["rates"][name] = _rates(
            pipe, classifier, "guidance", concept, c, pr.exact * args.reps, pr.synonym * args.reps, pr, args
        )
    return out


# -- token suppression --------------------------------------------------------------------------------


def token_probe(rec: StepRecorder, categories: torch.Tensor, rows: slice):
    """Attention mass per key category (0 concept word, 1 EOS, 2 padding, 3 other) without/with the bias."""

    def probe(kind, **v):
        if kind == "step":
            rec.step = v["step"]
            return
        if kind != "bias":
            return
        attn = v["attn"]
        q = attn.to_q(v["hidden"][rows])
        k = attn.to_k(v["context"][rows])
        bias = v["bias"][rows].to(q.dtype)[:, None, None, :]
        for name, b in (("before", None), ("after", bias)):
            p = ts.attention_probs(q, k, attn.heads, b).mean(dim=(1, 2))  # (B, T)
            for c, label in enumerate(("concept", "eos", "pad", "other")):
                rec.add(f"{name}_{label}", (p * (categories == c)).sum(-1).mean())

    return probe


def token_categories(pipe, prompts: Sequence[str], words: Sequence[str]) -> torch.Tensor:
    T = pipe.tokenizer.context_length
    cats = torch.full((len(prompts), T), 3, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks = token_words(pipe, p)
        n = min(len(toks), T)
        for j, w in enumerate(toks[:n]):
            if w in words:
                cats[i, j] = 0
        cats[i, n - 1] = 1
        cats[i, n:] = 2
    return cats


def token_section(pipe, classifier, pr: Prompts, concept: str, args) -> dict:
    from ..shapes import world

    out = {"mass": {}, "flagged": {}, "rates": {}}
    cfg = ts.TokenSuppressConfig(concepts=[concept])
    axis_words = {w for v in ev.VALUES[pr.axis] for w in world.SYNONYMS.get(v, [v])}
    for group, prompts in (("exact", pr.exact), ("synonym", pr.synonym), ("benign", pr.benign)):
        n = len(prompts)
        rec = StepRecorder()
        cats = token_categories(pipe, prompts, axis_words)
        m = ShapesSuppression(pipe, "token", [concept], config=cfg, probe=token_probe(rec, cats, slice(n, 2 * n)))
        cond = pipe.encode_prompts(prompts)
        bias = m.token_bias(prompts, cond)
        out["flagged"][group] = sum(bool((b < 0).any()) for b in bias) / max(1, n)
        m.sample(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
        means = {}
        for key in ("before", "after"):
            for label in ("concept", "eos", "pad", "other"):
                vals = [rec.mean(s, f"{key}_{label}") for s in rec.values]
                vals = [x for x in vals if x is not None]
                means[f"{key}_{label}"] = sum(vals) / len(vals) if vals else None
        out["mass"][group] = means
    out["rates"]["defaults"] = _rates(
        pipe, classifier, "token", concept, cfg, pr.exact * args.reps, pr.synonym * args.reps, pr, args
    )
    return out


# -- the shapes bench's guard rows, at named presets -----------------------------------------------------

#: the issue's targets for a guard at its recommended preset (#14)
GUARD_TARGETS = {"exact_max": 0.15, "synonym_max": 0.25, "unrelated_min": 0.90, "related_min": 0.85}


def bench_variants(concept: str) -> Dict[str, tuple]:
    """name → (method, config): each guard at the paper's setting and at the pack's named presets."""
    c = [concept]
    return {
        "SAFREE (paper window)": ("safree", safree.SAFREEConfig(concepts=c)),
        "SAFREE strong (svf_window whole)": ("safree", safree.SAFREEConfig(concepts=c, svf_window="whole")),
        "SLD medium (paper default)": ("sld", sld.SLDConfig(concepts=c, preset="medium")),
        "SLD max": ("sld", sld.SLDConfig(concepts=c, preset="max")),
        "concept guidance (paper, σ_end 4)": ("guidance", ConceptGuidanceConfig(concepts=c)),
        "token suppression (defaults)": ("token", ts.TokenSuppressConfig(concepts=c)),
    }


def bench_section(pipe, classifier, concept: str, args) -> dict:
    """The shapes bench's own prompt set, noise and scoring (shapes.run) for the guard rows only."""
    from . import shapes

    es = ev.build_eval_set(args.reps, 1, 1, 1, seed=args.seed)
    if args.tiny:
        es = ev.build_eval_set(1, 1, 0, 0, seed=args.seed)
    base = shapes.sample_and_read(pipe, classifier, es.prompts, args)
    out = {"n": len(es), "base": ev.score(base.pred, base.pred, es, [concept]), "rows": {}}
    for name, (method, cfg) in bench_variants(concept).items():
        sampler = ShapesSuppression(pipe, method, [concept], config=cfg).sample
        got = shapes.sample_and_read(pipe, classifier, es.prompts, args, sampler=sampler)
        scored = ev.score(got.pred, base.pred, es, [concept])
        e, f = scored["erased"], scored["fidelity"]
        scored["targets"] = {
            "exact": e["exact"] is not None and e["exact"] <= GUARD_TARGETS["exact_max"],
            "synonyms": e["synonym_paraphrase"] is not None
            and e["synonym_paraphrase"] <= GUARD_TARGETS["synonym_max"],
            "unrelated": f["unrelated"] is not None and f["unrelated"] >= GUARD_TARGETS["unrelated_min"],
            "related": f["related"] is not None and f["related"] >= GUARD_TARGETS["related_min"],
        }
        scored["ms_per_image"] = 1000 * got.seconds / len(es)
        out["rows"][name] = scored
    out["base_ms_per_image"] = 1000 * base.seconds / len(es)
    return out


# -- report -------------------------------------------------------------------------------------------


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def num(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(res: dict) -> str:
    lines = [f"# Guard diagnostics — concept '{res['concept']}', {res['steps']} steps, guidance {res['cfg']}", ""]
    if "base" in res:
        b = res["base"]
        lines += [
            f"Base model (no guard), same prompts and seeds: exact {pct(b['exact'])}, synonyms {pct(b['synonym'])}, "
            f"benign accuracy {pct(b['benign_accuracy'])}.",
            "",
        ]
    if "schedule" in res:
        s = res["schedule"]
        lines += [
            "## Schedule",
            "",
            f"σ at 20 steps: {', '.join(f'{x:.2f}' for x in s['sigmas_20'])}",
            "",
            f"Steps with σ ≥ 4 (NAG's published UNet cut-off): {s['steps_sigma_ge_4'][20]} of 20, "
            f"{s['steps_sigma_ge_4'][50]} of 50; share of the timestep range with σ ≥ 4: this model "
            f"{pct(s['range_sigma_ge_4']['shapes'])}, SD1.x {pct(s['range_sigma_ge_4']['sd1'])}.",
            "",
            "When the concept is decided: the concept prompt for steps < k and its benign counterpart after "
            "(a guard acting only before k), and the reverse (a guard acting only from k on); the rate at "
            "which the concept is drawn:",
            "",
            *_head(["steps", "k", "k / steps", "concept before k", "concept from k"]),
        ]
        lines += [
            f"| {r['steps']} | {r['k']} | {r['fraction']:.2f} | {pct(r['rate'])} | {pct(r['late'])} |"
            for r in s["switch"]
        ]
        lines.append("")
    if "safree" in res:
        s = res["safree"]
        lines += [
            "## SAFREE",
            "",
            "Paper (§1.2–1.5): α = 0.01; projected tokens e′ = (I − P_C)P_M e; t′ = round(10·sigmoid(2k(10β − t₀))), "
            "k = 2.5, t₀ = 5.333 → the projection is used for steps ≤ t′ of 50 (at most 11 of 50 = 22 %).",
            "",
            *_head(
                [
                    "prompts",
                    "n",
                    "any token flagged",
                    "concept word flagged",
                    "other word flagged",
                    "‖Δ‖/‖p‖",
                    "rows projected",
                    "β",
                    "t′",
                    "steps on (of 20)",
                    "steps on (of 50)",
                ]
            ),
        ]
        for g, rows in s["groups"].items():
            n = len(rows)

            def mean(key, rows=rows):
                return sum(float(r[key]) for r in rows) / max(1, len(rows))

            anyf = sum(bool(r["flagged"]) for r in rows) / max(1, n)
            lines.append(
                f"| {g} | {n} | {pct(anyf)} | {pct(mean('concept_flagged'))} | {pct(mean('other_flagged'))} | "
                f"{mean('delta'):.3f} | {mean('projected_rows'):.1f} | {mean('beta'):.3f} | {mean('t_prime'):.1f} | "
                f"{mean('steps_on_20'):.1f} | {mean('steps_on_50'):.1f} |"
            )
        sub = s["subspace"]
        lines += [
            "",
            "Share of the concept-vs-counterpart direction inside span(C) (‖P_C δ‖/‖δ‖): "
            + ", ".join(f"{k} rows {pct(v)}" for k, v in sub.items())
            + " — what (I − P_C) can remove at most.",
        ]
        ex = s["groups"]["exact"][0]
        lines += ["", f"Example: '{ex['prompt']}': flagged {ex['flagged']}, d_i = {ex['d']}", ""]
        lines += _rate_table(s["rates"])
    if "sld" in res:
        s = res["sld"]
        lines += [
            "## SLD",
            "",
            "Paper presets (§2.2, 50 steps): warm-up δ (steps at 20 / 50 after rescaling): "
            + ", ".join(f"{k} {v[20]}/{v[50]}" for k, v in s["warmup"].items())
            + ". μ = clamp(s_S|ε_p − ε_S|, 1) where ε_p − ε_S < λ; the table is the medium preset.",
            "",
            *_head(
                [
                    "step",
                    "σ",
                    "active (exact)",
                    "admitted",
                    "saturated",
                    "‖γ‖/‖ε_p − ε_∅‖ exact",
                    "‖γ‖/‖ε_p − ε_∅‖ benign",
                    "‖ε_S − ε_∅‖/‖ε_p − ε_∅‖ exact",
                ]
            ),
        ]
        for a, b in zip(s["per_step"]["exact"], s["per_step"]["benign"]):
            lines.append(
                f"| {a['step']} | {num(a['sigma'], '{:.2f}')} | {'yes' if a['active'] else 'no'} | "
                f"{pct(a['admitted'])} | {pct(a['saturated'])} | {num(a['ratio'])} | {num(b['ratio'])} | "
                f"{num(a['concept_vs_cfg'])} |"
            )
        lines.append("")
        lines += _rate_table(s["rates"])
    if "guidance" in res:
        s = res["guidance"]
        lines += [
            "## Concept guidance (NAG)",
            "",
            f"Paper (§5.4): φ = 5, τ = 2.5, α = 0.25 (SD1.5 workflow 0.38), acts while σ ≥ σ_end = {s['sigma_end']} "
            "(UNet). Measured at every step; 'on' = the default σ_end acts there.",
            "",
            *_head(
                [
                    "step",
                    "σ",
                    "on",
                    "‖Z − Z⁺‖/‖Z⁺‖ exact",
                    "‖Z⁺ − Z⁻‖/‖Z⁺‖ exact",
                    "τ-clipped exact",
                    "‖Z − Z⁺‖/‖Z⁺‖ benign",
                    "‖Z⁺ − Z⁻‖/‖Z⁺‖ benign",
                ]
            ),
        ]
        for a, b in zip(s["per_step"]["exact"], s["per_step"]["benign"]):
            lines.append(
                f"| {a['step']} | {num(a['sigma'], '{:.2f}')} | {'yes' if a['on'] else 'no'} | {num(a['move'])} | "
                f"{num(a['gap'])} | {pct(a['clipped'])} | {num(b['move'])} | {num(b['gap'])} |"
            )
        lines.append("")
        lines += _rate_table(s["rates"])
    if "bench" in res:
        s = res["bench"]
        b = s["base"]["base_erased"]
        lines += [
            "## Shapes-bench guard rows",
            "",
            f"The shapes bench's prompt set ({s['n']} images), noise and scores; base: exact {pct(b['exact'])}, "
            f"synonyms/paraphrases {pct(b['synonym_paraphrase'])}. Targets (#14): exact ≤ 15 %, synonyms ≤ 25 %, "
            "unrelated ≥ 90 %, related ≥ 85 %.",
            "",
            *_head(
                ["guard", "exact ↓", "synonyms / paraphrases ↓", "related ↑", "unrelated ↑", "ms / image", "targets"]
            ),
        ]
        for name, r in s["rows"].items():
            e, f = r["erased"], r["fidelity"]
            missed = [k for k, ok in r["targets"].items() if not ok]
            verdict = "all met" if not missed else "missed: " + ", ".join(missed)
            lines.append(
                f"| {name} | {pct(e['exact'])} | {pct(e['synonym_paraphrase'])} | {pct(f['related'])} | "
                f"{pct(f['unrelated'])} | {r['ms_per_image']:.0f} | {verdict} |"
            )
        lines.append("")
    if "token" in res:
        s = res["token"]
        lines += [
            "## Token suppression",
            "",
            "Image→text attention mass (mean over layers, heads, queries and steps) on the word naming a value "
            "of the concept's axis, EOS, padding and the other tokens (BOS, other words), without / with the bias.",
            "",
            *_head(
                [
                    "prompts",
                    "flagged",
                    "concept before",
                    "concept after",
                    "EOS before",
                    "EOS after",
                    "pad before",
                    "pad after",
                    "other before",
                    "other after",
                ]
            ),
        ]
        for g, m in s["mass"].items():
            lines.append(
                f"| {g} | {pct(s['flagged'][g])} | "
                + " | ".join(
                    pct(m[f"{k}_{c}"]) for c in ("concept", "eos", "pad", "other") for k in ("before", "after")
                )
                + " |"
            )
        lines.append("")
        lines += _rate_table(s["rates"])
    return "\n".join(lines)


def _head(columns: Sequence[str]) -> list:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _rate_table(rates: dict) -> list:
    lines = _head(["setting", "exact ↓", "synonyms ↓", "benign accuracy ↑"])
    for name, r in rates.items():
        lines.append(f"| {name} | {pct(r['exact'])} | {pct(r['synonym'])} | {pct(r['benign_accuracy'])} |")
    return lines + [""]


# -- entry point ----------------------------------------------------------------------------------------

SECTIONS = ("schedule", "safree", "sld", "guidance", "token", "bench")
#: what runs without --sections ("bench" samples the shapes bench's full prompt set: minutes)
DEFAULT_SECTIONS = SECTIONS[:-1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m erasers_dev.bench.guard_diagnostics", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--concept", default="circle")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--reps", type=int, default=2, help="images per prompt for the rates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma list of {', '.join(SECTIONS)} (default: all but bench)",
    )
    p.add_argument("--quick", action="store_true", help="two values of the other axis, one image per prompt")
    p.add_argument("--tiny", action="store_true", help="a random tiny model (plumbing only; seconds)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    return p


def parse_args(argv=None):
    from ..shapes.model import DEFAULT_GUIDANCE

    args = build_parser().parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"Unknown section(s) {bad}; choose from {', '.join(SECTIONS)}.")
    if args.guidance is None:
        args.guidance = DEFAULT_GUIDANCE
    if args.quick or args.tiny:
        args.reps = 1
    if args.tiny:
        args.steps = min(args.steps, 4)
    args.switch_steps = [args.steps] if (args.quick or args.tiny) else [20, 50]
    args.switch_fractions = (0.0, 0.5, 1.0) if args.tiny else (0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
    args.sld_presets = ["medium"] if (args.quick or args.tiny) else list(sld.PRESETS)
    return args


def load(args):
    from ..shapes import load_classifier, load_default
    from ..shapes import model as shapes_model
    from ..shapes.classifier import ShapesClassifier

    if args.tiny:
        pipe = shapes_model.random_pipeline(0, shapes_model.tiny_config())
        torch.manual_seed(0)
        classifier = ShapesClassifier(width=8)
    else:
        pipe, classifier = load_default(), load_classifier()
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe, classifier.eval().requires_grad_(False)


def run(args, pipe=None, classifier=None) -> dict:
    from ..demo import auto_threads

    torch.set_num_threads(max(1, int(args.threads) or auto_threads()))
    if pipe is None or classifier is None:
        pipe, classifier = load(args)
    pr = build_prompts(args.concept, args.quick or args.tiny)
    res = {"concept": args.concept, "steps": args.steps, "cfg": args.guidance}
    # the base model on the same prompts and noise: every rate below compares with it
    off = ts.TokenSuppressConfig(concepts=[args.concept], strength=0.0)
    res["base"] = _rates(
        pipe, classifier, "token", args.concept, off, pr.exact * args.reps, pr.synonym * args.reps, pr, args
    )
    if "schedule" in args.sections:
        res["schedule"] = schedule_section(pipe, classifier, pr, args)
    if "safree" in args.sections:
        res["safree"] = safree_section(pipe, classifier, pr, args.concept, args)
    if "sld" in args.sections:
        res["sld"] = sld_section(pipe, classifier, pr, args.concept, args)
    if "guidance" in args.sections:
        res["guidance"] = guidance_section(pipe, classifier, pr, args.concept, args)
    if "token" in args.sections:
        res["token"] = token_section(pipe, classifier, pr, args.concept, args)
    if "bench" in args.sections:
        res["bench"] = bench_section(pipe, classifier, args.concept, args)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
