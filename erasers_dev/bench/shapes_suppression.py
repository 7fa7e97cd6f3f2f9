"""The four sampling-time suppression methods on the shapes pipeline, for the shapes benchmark.

The shapes model is a diffusers ``UNet2DConditionModel``, so the pack's diffusers path
(``erasers_diffusers/suppression.py``: removable attention processors, ``sld`` combination) runs on it
unchanged; what this module adds is the sampling loop that drives it step by step (the pipeline's own
``__call__`` has no per-step hook), with the same noise as ``ShapesPipeline.__call__`` for the same seed,
so its images are comparable image for image with the base model's.

Per method, with the methods' published defaults (family "unet"):
* token suppression — logit bias on the prompt positions whose tokens match the concept (exact ids, or
  hidden-state cosine ≥ ``similarity``), plus EOS/padding (the encoder is causal);
* concept guidance — NAG with the concept's context as the negative branch, while σ ≥ σ_end;
* SAFREE — the masked-token test and projection per prompt, used for the self-validated part of the
  schedule;
* SLD — a third UNet branch conditioned on the concept, combined as ``sld.sld_combine`` does.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch

from erasers.guards import safree, sld
from erasers.guards import token_suppress as ts
from erasers.guards.concept_guidance import ConceptGuidanceConfig
from erasers_diffusers.suppression import SuppressionProcessors, SuppressionState

log = logging.getLogger(__name__)

METHODS = ("token", "guidance", "safree", "sld")


def sigma_of(alphas_cumprod: torch.Tensor, t) -> float:
    a = float(alphas_cumprod[int(t)])
    return ((1 - a) / a) ** 0.5


def percent_to_sigma(alphas_cumprod: torch.Tensor, percent: float) -> float:
    """ComfyUI's ``percent_to_sigma`` for this schedule: percent p ↔ timestep (1 − p)·(T − 1); 0 → ∞, 1 → 0
    (so the window ends are inclusive of the first and last step)."""
    if percent <= 0.0:
        return float("inf")
    if percent >= 1.0:
        return 0.0
    return sigma_of(alphas_cumprod, round((1.0 - percent) * (len(alphas_cumprod) - 1)))


class ShapesSuppression:
    """``sample(prompts, steps, guidance, seed, prompt_embeds)`` with one suppression method active."""

    def __init__(self, pipe, method: str, concepts: Sequence[str], config=None, probe=None):
        """``config``: the method's config (default: its defaults for ``concepts``); ``probe(kind, **values)``
        is called with the per-step quantities (guard_diagnostics.py), never changing them."""
        if method not in METHODS:
            raise ValueError(f"Unknown suppression method '{method}'; expected one of {METHODS}.")
        self.pipe, self.method, self.concepts = pipe, method, list(concepts)
        if config is not None:
            self.config = config
        elif method == "token":
            self.config = ts.TokenSuppressConfig(concepts=self.concepts)
        elif method == "guidance":
            self.config = ConceptGuidanceConfig(concepts=self.concepts)
        elif method == "safree":
            self.config = safree.SAFREEConfig(concepts=self.concepts)
        else:
            self.config = sld.SLDConfig(concepts=self.concepts)
        self.probe = probe
        #: per-prompt SAFREE analyses of the last ``sample`` (diagnostics)
        self.safree_results: list = []
        self.processors = SuppressionProcessors(pipe.unet)

    # -- per-method preparation -------------------------------------------------------------------
    def _encode_ids(self, rows):
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        T = tok.context_length
        batch = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row[:T])
        lengths = torch.tensor([min(len(r), T) for r in rows])
        with torch.no_grad():
            return te(batch.to(self.pipe.device), lengths)[0].float().cpu(), lengths

    def token_bias(self, prompts, cond: torch.Tensor) -> torch.Tensor:
        """(N, T) bias for the cond rows: concept positions (ids or similar states) + EOS/padding."""
        tok = self.pipe.tokenizer
        concept_ids = [tok.ids(c)[1:-1] for c in self.concepts]
        concept_hidden, concept_len = self._encode_ids([tok.ids(c) for c in self.concepts])
        keyword_rows = torch.cat([concept_hidden[i, 1 : int(concept_len[i]) - 1] for i in range(len(self.concepts))])
        T = cond.shape[1]
        rows = []
        for i, prompt in enumerate(prompts):
            ids = tok.ids(prompt)
            valid = torch.zeros(T, dtype=torch.bool)
            valid[1 : max(1, len(ids) - 1)] = True  # word tokens only
            similar = ts.similar_tokens(cond[i].cpu(), keyword_rows, self.config.similarity, valid)
            mask = ts.concept_mask(T, ts.match_token_ids(ids, concept_ids), len(ids), self.config.include_eos, similar)
            rows.append(ts.logit_bias(mask, self.config.effective_factor))
        return torch.stack(rows)

    def safree_context(self, prompts, cond: torch.Tensor):
        """(projected context (N, T, d), fraction of the schedule to use it for, per prompt)."""
        tok = self.pipe.tokenizer
        concept_hidden, concept_len = self._encode_ids([tok.ids(c) for c in self.concepts])
        out, fractions = cond.clone().cpu(), []
        self.safree_results = []
        for i, prompt in enumerate(prompts):
            ids = tok.ids(prompt)
            # the shapes tokenizer's padding id stands in for CLIP's mask token
            positions, copies = safree.masked_copies(ids, has_bos=True, mask_id=tok.pad_id)
            if copies:
                masked, masked_len = self._encode_ids(copies)
            else:
                masked, masked_len = cond[:0].cpu(), torch.zeros(0, dtype=torch.long)
            result = safree.analyse(
                self.config,
                cond[i].cpu(),
                min(len(ids), cond.shape[1]),
                positions,
                masked,
                masked_len,
                concept_hidden,
                concept_len,
            )
            out[i] = result.hidden
            self.safree_results.append(result)
            fractions.append(result.filter_fraction if result.changed else 0.0)
        return out, torch.tensor(fractions)

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts,
        steps: int = 20,
        guidance: float = 4.0,
        seed: int = 0,
        prompt_embeds: Optional[torch.Tensor] = None,
        **_,
    ) -> torch.Tensor:
        pipe = self.pipe
        prompts = list(prompts)
        cond = prompt_embeds.to(pipe.device) if prompt_embeds is not None else pipe.encode_prompts(prompts)
        n = cond.shape[0]
        negative = ""
        if self.method == "safree" and self.config.keywords_as_negative:
            negative = safree.joined_keywords(self.config)  # the reference's negative prompt (§1.4)
        uncond = pipe.encode_prompts([negative] * n)
        gen = torch.Generator().manual_seed(int(seed))
        size = pipe.image_size
        x = torch.randn(n, 3, size, size, generator=gen).to(pipe.device)  # as ShapesPipeline.__call__
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps)
        alphas = scheduler.alphas_cumprod
        state = None
        safe_cond, fractions, sld_state, safety = None, None, None, None
        if self.method == "token":
            bias = torch.cat([torch.zeros(n, cond.shape[1]), self.token_bias(prompts, cond)])
            state = SuppressionState(token_bias=bias, probe=self.probe)
        elif self.method == "guidance":
            ctx = pipe.encode_prompts([", ".join(self.concepts)])
            state = SuppressionState(
                nag_context=ctx,
                nag_rows=torch.arange(n, 2 * n),
                phi=self.config.phi,
                tau=self.config.tau,
                alpha=self.config.effective_alpha,
                probe=self.probe,
            )
            sigma_end = self.config.sigma_end_for("unet")
        elif self.method == "safree":
            safe_cond, fractions = self.safree_context(prompts, cond)
            safe_cond = safe_cond.to(pipe.device)
        else:
            sld_state = sld.SLDState()
            safety = pipe.encode_prompts([self.config.safety_concept] * n)
            warmup = self.config.warmup_for(steps)
        # the config's start/end percent, as the ComfyUI nodes read them (σ window, both ends inclusive)
        s_start = percent_to_sigma(alphas, self.config.start_percent)
        s_stop = percent_to_sigma(alphas, self.config.end_percent)
        self.processors.install()
        try:
            for i, t in enumerate(scheduler.timesteps):
                sigma = sigma_of(alphas, t)
                inside = s_stop <= sigma <= s_start
                if self.probe is not None:  # before the UNet call: the attention probes of step i follow
                    self.probe("step", step=i, sigma=sigma, steps=steps)
                if self.method == "guidance":
                    self.processors.state = state if (inside and sigma >= sigma_end) else None
                else:
                    self.processors.state = state if inside else None
                c = cond
                if safe_cond is not None:
                    use = ((i / max(1, steps)) < fractions.to(pipe.device)) & inside
                    c = torch.where(use[:, None, None], safe_cond, cond)
                if self.method == "sld":
                    eps_u, eps_p, eps_s = pipe.unet(
                        torch.cat([x, x, x]), t, encoder_hidden_states=torch.cat([uncond, c, safety])
                    ).sample.chunk(3)
                    gamma = sld.sld_gamma(eps_u, eps_p, eps_s, sld_state, self.config, warmup)
                    gamma = gamma if inside else torch.zeros_like(gamma)
                    eps = eps_u + guidance * ((eps_p - eps_u) - gamma)
                    if self.probe is not None:
                        self.probe("sld", step=i, eps_u=eps_u, eps_p=eps_p, eps_s=eps_s, gamma=gamma, cfg=guidance)
                else:
                    eps_u, eps_c = pipe.unet(
                        torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, c])
                    ).sample.chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                x = scheduler.step(eps, t, x).prev_sample
        finally:
            self.processors.state = None
            self.processors.remove()
        return ((x + 1) / 2).clamp(0, 1).cpu()
