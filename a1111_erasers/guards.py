"""Sampling-time guards on A1111: SAFREE, SLD, concept guidance and token suppression.

The math is the core's (``erasers/guards/safree.py``, ``sld.py``, ``concept_guidance.py``, ``token_suppress.py``);
this module only finds the webui's hook points (a1111_host.md §A2.1, §A2.4):

* ``on_cfg_denoiser`` (every CFG step): SAFREE swaps the positive rows of ``params.text_cond`` for their
  projected embedding (the webui reads the field back); the step and the cond rows are recorded for the
  other guards.
* ``on_cfg_denoised`` (A1111 only; Forge never fires it): SLD runs one extra UNet pass with the safety
  concept through ``params.inner_model`` and rewrites the cond rows of ``params.x`` **in place**
  (ε_p′ = ε_p − 𝟙γ), so the webui's own CFG combine yields the paper's ε̃.
* token suppression and concept guidance: a per-instance ``forward`` on every ``attn2`` module of the
  UNet (it shadows the optimiser's class-level forward). Rows that are not a guarded positive prompt, and
  every call outside the step window, go to the class forward untouched; ``restore()`` deletes the
  instance attribute, so after the generation the modules are exactly as the webui left them.

The callbacks are registered once (webui callbacks are global) and act only while a ``GuardSession`` is
installed: with no guard selected nothing is installed, so sampling is bit-identical.
Windows are fractions of the run's steps (``sampling_step / total_sampling_steps``): the webui hands the
callbacks step indices, not the σ schedule.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from .core import core_module

log = logging.getLogger(__name__)

#: the running session (the webui runs one generation at a time; callbacks are process-wide)
ACTIVE: Optional["GuardSession"] = None

#: UI preset → per-guard parameters. SLD has the paper's presets; the others scale their own knob.
TOKEN_FACTOR = {"weak": 0.5, "medium": 0.2, "strong": 0.05, "max": 0.0}
NAG_PHI = {"weak": 3.0, "medium": 5.0, "strong": 7.0, "max": 10.0}
#: SAFREE's svf_window per preset (self-validation stays on in all four). weak/medium = "paper": the projection
#: on the first t′ of 50 steps (the paper's window, ≤ 22 % of the schedule); strong/max = "whole": t′ only
#: switches the projection on or off per prompt, and when on it acts on every step. Measured on the shapes
#: world (erasers_dev/bench/results/guards/DIAGNOSTICS.md): whole cuts 'circle' from 83 % to 33 % (exact) at
#: full fidelity on the other shapes, and erases as much as projecting on every step without the switch
#: (40 % / 40 %) while keeping benign prompts better (90 % vs 77 %), so max gets no stronger SAFREE setting.
SAFREE_SVF_WINDOW = {"weak": "paper", "medium": "paper", "strong": "whole", "max": "whole"}


# -- configs from the accordion ---------------------------------------------------------------------
def guard_configs(settings) -> dict:
    """name → core config for each selected guard; raises the core's ConfigError when one is invalid."""
    concepts = settings.guard_concept_list()
    preset = settings.guard_preset
    out = {}
    for name in settings.guards:
        if name == "sld":
            out[name] = core_module("guards.sld").SLDConfig(concepts=list(concepts), preset=preset)
        elif name == "safree":
            out[name] = core_module("guards.safree").SAFREEConfig(
                concepts=list(concepts), self_validating=True, svf_window=SAFREE_SVF_WINDOW[preset]
            )
        elif name == "token_suppress":
            out[name] = core_module("guards.token_suppress").TokenSuppressConfig(
                concepts=list(concepts), factor=TOKEN_FACTOR[preset]
            )
        elif name == "concept_guidance":
            out[name] = core_module("guards.concept_guidance").ConceptGuidanceConfig(
                concepts=list(concepts), phi=NAG_PHI[preset]
            )
    return out


def label(name: str, config) -> str:
    if name == "sld":
        return f"SLD({config.preset})"
    if name == "token_suppress":
        return f"TokenSuppress(c={config.effective_factor:g})"
    if name == "concept_guidance":
        return f"ConceptGuidance(φ={config.phi:g})"
    if name == "safree":
        return f"SAFREE(svf_window={config.svf_window})" if config.self_validating else "SAFREE(every step)"
    return name


# -- helpers ---------------------------------------------------------------------------------------
def crossattn(cond):
    """The cross-attention context of a webui cond: the tensor itself, or SDXL's ``cond["crossattn"]``."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def with_crossattn(cond, hidden):
    if isinstance(cond, dict):
        new = copy.copy(cond)  # keeps the webui's DictWithShape type and its ``shape``
        new["crossattn"] = hidden
        return new
    return hidden


def matches(row: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a context row (T, D) is the reference encoding (T₀, D), possibly tiled/padded past T₀."""
    if reference is None or row.shape[-1] != reference.shape[-1] or row.shape[0] < reference.shape[0]:
        return False
    head = row[: reference.shape[0]].float()
    return bool(torch.allclose(head, reference.to(head.device, head.dtype), rtol=1e-3, atol=1e-3))


def tile_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    reps = max(1, -(-length // tensor.shape[0]))
    return tensor.repeat(reps, *([1] * (tensor.ndim - 1)))[:length]


def word_masked_prompts(prompt: str, tokenize) -> tuple:
    """SAFREE's masked-prompt inputs on a host that encodes text: (positions, texts, lengths).

    The webui encodes strings, not token ids, so a word (not a sub-word token) is masked by replacing it
    with "!" (CLIP id 0, the reference's mask token); every token position of that word gets the copy of
    the word, so all of its tokens are tested and projected together. ``tokenize(texts)`` → ids without
    BOS/EOS. Only the first 75-token chunk is analysed.
    """
    words = prompt.split()
    counts = [len(ids) for ids in tokenize(words)] if words else []
    positions, texts, lengths = [], [], []
    pos = 1  # after BOS
    for i, n in enumerate(counts):
        masked = " ".join(words[:i] + ["!"] + words[i + 1 :])
        for _ in range(n):
            if pos >= 76:
                break
            positions.append(pos)
            texts.append(masked)
            pos += 1
    if texts:
        lengths = [len(ids) + 2 for ids in tokenize(texts)]
    return positions, texts, lengths


# -- the session -----------------------------------------------------------------------------------
class GuardSession:
    """The guards of one generation: what to do at each callback, and the attention patches."""

    def __init__(self, configs: dict, encoder, prompts, family: str = "sd1"):
        self.configs = configs
        self.family = family
        self.patched = []
        self.cond_rows = []  # this step's positive context rows (after SAFREE)
        self._per_context = {}  # this step's (rows, bias) per context tensor: every attn2 sees the same one
        self.step, self.total = 0, 1
        self.stash = None
        self.warned = set()
        prompts = [p for p in dict.fromkeys(prompts or [""])]
        encoding = encoder.encode(prompts)
        self.prompt_refs = [
            (encoding.hidden[i, : max(int(encoding.lengths[i]), 1)], encoding.token_ids[i], int(encoding.lengths[i]))
            for i in range(len(prompts))
        ]
        self.safree = self._prepare_safree(encoder, prompts, encoding) if "safree" in configs else []
        self.sld_cond = None
        if "sld" in configs:
            self.sld_cond = encoder.sd_model.get_learned_conditioning([configs["sld"].safety_concept])
            self.sld_state = core_module("guards.sld").SLDState()
            self.sld_hidden = crossattn(self.sld_cond)[0].detach().float().cpu()
        self.token = self._prepare_tokens(encoder) if "token_suppress" in configs else None
        self.nag = None
        if "concept_guidance" in configs:
            neg = encoder.encode([", ".join(configs["concept_guidance"].concepts)])
            self.nag = {"neg": neg.hidden[:1], "hidden": neg.hidden}

    # preparation (once per batch: the prompts are known before sampling) ------------------------
    def _prepare_safree(self, encoder, prompts, encoding) -> list:
        safree = core_module("guards.safree")
        config = self.configs["safree"]
        concept = encoder.encode(list(config.concepts))
        tokenize = lambda texts: [ids[1:-1] for ids in encoder._token_ids(list(texts))]  # noqa: E731
        out = []
        for i, prompt in enumerate(prompts):
            positions, texts, lengths = word_masked_prompts(prompt, tokenize)
            if not texts:
                continue
            masked = encoder.encode(texts).hidden
            result = safree.analyse(
                config,
                encoding.hidden[i],
                int(encoding.lengths[i]),
                positions,
                masked,
                torch.tensor(lengths, dtype=torch.long).clamp(max=masked.shape[1]),
                concept.hidden,
                concept.lengths,
                encoder="clip",
                segments=safree.SEGMENTS.get(self.family),
            )
            if result.changed:
                out.append((encoding.hidden[i], result))
        return out

    def _prepare_tokens(self, encoder) -> dict:
        ts = core_module("guards.token_suppress")
        config = self.configs["token_suppress"]
        concept = encoder.encode(list(config.concepts))
        states = [concept.hidden[k, 1 : int(concept.lengths[k]) - 1] for k in range(len(config.concepts))]
        words = [ids[1:-1] for ids in concept.token_ids]
        exact = [(ref, ts.match_token_ids(ids, words), length) for ref, ids, length in self.prompt_refs]
        return {
            "states": torch.cat(states) if states else concept.hidden[:, 1],
            "exact": exact,
            "concept_hidden": concept.hidden,
        }

    # window ------------------------------------------------------------------------------------
    def in_window(self, config, fraction_end: float = 1.0) -> bool:
        frac = self.step / float(max(self.total, 1))
        return config.start_percent <= frac <= min(config.end_percent, fraction_end)

    # on_cfg_denoiser -----------------------------------------------------------------------------
    def on_cfg_denoiser(self, params) -> None:
        self.step, self.total = int(params.sampling_step), int(params.total_sampling_steps)
        if self.step == 0 and "sld" in self.configs:
            self.sld_state.reset()  # a new sampling pass (first pass or hires fix)
        cond = params.text_cond
        if self.safree:
            hidden = crossattn(cond)
            new = None
            config = self.configs["safree"]
            for r in range(hidden.shape[0]):
                for ref, result in self.safree:
                    if self.in_window(config, result.filter_fraction) and matches(hidden[r], ref):
                        new = hidden.clone() if new is None else new
                        # the analysed encoding covers the prompt's own chunks; later rows (padding the webui
                        # adds to match the uncond length comes after this callback) are left as they are
                        length = min(hidden.shape[1], result.hidden.shape[0])
                        new[r, :length] = result.hidden[:length].to(hidden.device, hidden.dtype)
                        break
            if new is not None:
                cond = with_crossattn(cond, new)
                params.text_cond = cond
        self.cond_rows = [row for row in crossattn(cond)]
        self._per_context = {}
        self.stash = (params.x, params.image_cond, params.sigma, cond)

    # on_cfg_denoised (SLD) -------------------------------------------------------------------------
    def on_cfg_denoised(self, params) -> None:
        if "sld" not in self.configs or self.stash is None:
            return
        sld = core_module("guards.sld")
        config = self.configs["sld"]
        x_in, image_cond, sigma_in, cond = self.stash
        n = crossattn(cond).shape[0]
        out = params.x
        if out.shape[0] != 2 * n or x_in.shape[0] != 2 * n:
            self._warn(
                "layout",
                "SLD skipped at this step: it needs one prompt per image and the uncond pass "
                "(no AND-prompts, no 'skip uncond' / NGMS, CFG > 1).",
            )
            return
        if not self.in_window(config):
            return
        safety = self.sld_cond
        if isinstance(safety, dict):
            c_safe = {k: tile_to(v.to(out.device), n) for k, v in safety.items()}
            make = {**c_safe, "c_concat": [image_cond[:n]]}
        else:
            make = {"c_crossattn": [tile_to(safety.to(out.device), n)], "c_concat": [image_cond[:n]]}
        with torch.no_grad():
            x0_safety = params.inner_model(x_in[:n], sigma_in[:n], cond=make)
        x, s = x_in[:n], sigma_in[:n]
        eps_p = sld.to_eps(x, out[:n], s)
        eps_u = sld.to_eps(x, out[n:], s)
        eps_s = sld.to_eps(x, x0_safety, s)
        self.sld_state.step = self.step
        gamma = sld.sld_gamma(eps_u, eps_p, eps_s, self.sld_state, config, config.warmup_for(self.total))
        out[:n] = sld.from_eps(x, sld.apply_to_cond(eps_p, gamma), s)  # in place: the webui keeps its tensor

    # attention ------------------------------------------------------------------------------------
    def positive_rows(self, context: torch.Tensor) -> list:
        rows = []
        for r in range(context.shape[0]):
            if any(matches(context[r], row) for row in self.cond_rows):
                rows.append(r)
        return rows

    def token_bias(self, context: torch.Tensor, rows: list) -> Optional[torch.Tensor]:
        if self.token is None or not rows:
            return None
        ts = core_module("guards.token_suppress")
        config = self.configs["token_suppress"]
        if not self.in_window(config):
            return None
        bias = torch.zeros(context.shape[:2], dtype=torch.float32)
        T = context.shape[1]
        for r in rows:
            row = context[r].float().cpu()
            valid = torch.ones(T, dtype=torch.bool)
            valid[0] = False  # the start token is the same for every prompt
            hit = ts.similar_tokens(row, self.token["states"], config.similarity, valid)
            prompt_length = None
            for ref, positions, length in self.token["exact"]:
                if matches(row, ref):
                    for p in positions:
                        if p < T:
                            hit[p] = True
                    prompt_length = length
                    break
            if config.include_eos and bool(hit.any()):
                start = prompt_length - 1 if prompt_length else int(hit.nonzero().max()) + 1
                hit[start:] = True
            bias[r] = ts.logit_bias(hit, config.effective_factor)
        return bias if bool(bias.any()) else None

    def nag_active(self, sigma) -> bool:
        if self.nag is None:
            return False
        config = self.configs["concept_guidance"]
        if not self.in_window(config) or config.effective_alpha <= 0:
            return False
        s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
        return s >= config.sigma_end_for(self.family)

    def attention_forward(self, module, x, context=None, mask=None, **kwargs):
        original = type(module).forward.__get__(module)
        if context is None or mask is not None or not self.cond_rows:
            return original(x, context=context, mask=mask, **kwargs)
        key = (id(context), context.data_ptr(), tuple(context.shape))
        if key not in self._per_context:
            rows = self.positive_rows(context)
            self._per_context[key] = (context, rows, self.token_bias(context, rows))  # context kept: id stays unique
        _, rows, bias = self._per_context[key]
        nag = bool(rows) and self.nag_active(self.stash[2] if self.stash else 0.0)
        if bias is None and not nag:
            return original(x, context=context, mask=mask, **kwargs)
        ts = core_module("guards.token_suppress")
        heads = module.heads
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        if bias is not None:
            out = ts.suppressed_attention(q, k, v, heads, bias.to(q.device))
        else:
            out = ts.attention(q, k, v, heads)
        if nag:
            config = self.configs["concept_guidance"]
            neg = self.nag["neg"].to(context.device, context.dtype)
            idx = torch.tensor(rows, device=q.device)
            kn = module.to_k(neg).expand(len(rows), -1, -1)
            vn = module.to_v(neg).expand(len(rows), -1, -1)
            z_neg = ts.attention(q[idx], kn, vn, heads)
            out = out.clone()
            out[idx] = core_module("guards.concept_guidance").nag(
                out[idx], z_neg, config.phi, config.tau, config.effective_alpha
            )
        return module.to_out(out)

    def patch(self, diffusion_model) -> None:
        """Per-instance ``forward`` on every cross-attention (``attn2``) module; ``restore`` removes them."""
        if self.token is None and self.nag is None:
            return
        sites = [
            (name, module)
            for name, module in diffusion_model.named_modules()
            if name.endswith("attn2") and all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out"))
        ]
        foreign = [name for name, module in sites if "forward" in vars(module)]
        if foreign:
            # the guards would not act in those blocks: stop before sampling rather than let an unguarded
            # image through (fail closed); nothing has been patched yet
            raise core_module("errors").EraserError(
                f"Concept Erasers: {len(foreign)} cross-attention module(s) ({', '.join(foreign[:3])}"
                f"{', …' if len(foreign) > 3 else ''}) already have a forward replaced by another extension, so "
                "token suppression / concept guidance cannot act there. Disable that extension for this "
                "generation, or switch these guards off."
            )
        for _name, module in sites:
            module.forward = _Bound(self, module)
            self.patched.append(module)

    def restore(self) -> None:
        for module in self.patched:
            if isinstance(vars(module).get("forward"), _Bound):
                del module.forward
        self.patched = []

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("Concept Erasers: %s", message)


class _Bound:
    """The instance ``forward`` (a small callable, recognisable on restore)."""

    def __init__(self, session, module):
        self.session, self.module = session, module

    def __call__(self, x, context=None, mask=None, **kwargs):
        return self.session.attention_forward(self.module, x, context=context, mask=mask, **kwargs)


# -- the global callbacks (registered once by the script) -------------------------------------------
def on_cfg_denoiser(params) -> None:
    if ACTIVE is not None:
        ACTIVE.on_cfg_denoiser(params)


def on_cfg_denoised(params) -> None:
    if ACTIVE is not None:
        ACTIVE.on_cfg_denoised(params)


def install(session: GuardSession, diffusion_model) -> None:
    global ACTIVE
    remove()
    session.patch(diffusion_model)
    ACTIVE = session


def remove() -> None:
    global ACTIVE
    if ACTIVE is not None:
        ACTIVE.restore()
    ACTIVE = None
