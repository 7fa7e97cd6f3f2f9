"""Adversarial text-embedding attacks on an erased shapes model (the benchmark's robustness columns).

Both return a conditioning context (N, T, d) to sample with ``pipe(..., prompt_embeds=...)``; the
benchmark then reads the images with the classifier, exactly as for plain prompts.

* ``closed_form_context`` — RECE's derivation (closed_form.md §4.1, ``rece.derive_adversarial_embedding``):
  the context c′ = (λ_r I + Σ_l W_lᵀW_l)⁻¹ Σ_l W_lᵀW_l⁰ c that makes the *edited* cross-attention
  projections W_l reproduce the original model's outputs W_l⁰c for the concept prompt's rows c. Only
  meaningful for erasers that edit the projection weights.
* ``gradient_context`` — a short gradient search on the prompt's *input* token embeddings: Adam steps
  that maximise the classifier's log-probability of the erased concept on the edited model's one-step
  x̂₀ prediction (DDIM half-way through a short trajectory that follows the current embedding). The
  text encoder stays in the loop, so the result is a context the model's own encoder can produce from
  some (soft) token sequence.
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from erasers.edits.rece import adversarial_map, weight_grams
from erasers_diffusers.api import projection_params


def snapshot_projections(pipe) -> Dict[str, torch.Tensor]:
    """diffusers parameter name → a float64 copy of every text projection (W⁰, before an edit)."""
    return {
        name: param.detach().to("cpu", torch.float64, copy=True) for name, param in projection_params(pipe).values()
    }


def closed_form_context(
    pipe, originals: Dict[str, torch.Tensor], prompts: Sequence[str], lam_r: float = 0.1
) -> torch.Tensor:
    """c′ for every token row of ``prompts`` against the weights live in ``pipe`` now (§4.1)."""
    params = projection_params(pipe)
    current = [param.detach().to("cpu", torch.float64) for name, param in params.values()]
    original = [originals[name] for name, _ in params.values()]
    gram_cur, gram_cross = weight_grams(current, original)
    r_map = adversarial_map(gram_cur, gram_cross, lam_r)
    context = pipe.encode_prompts(list(prompts)).to("cpu", torch.float64)
    return (context @ r_map.T).float()


def encode_from_embeddings(text_encoder, embeddings: torch.Tensor) -> torch.Tensor:
    """The shapes text encoder's hidden states from input token embeddings (N, T, d), differentiably.

    Same computation as ``ShapesTextEncoder.forward`` after its embedding lookup (causal blocks, final
    LayerNorm); the pooled vector is not needed here.
    """
    x = embeddings + text_encoder.position_embedding[: embeddings.shape[1]]
    for block in text_encoder.blocks:
        x = block(x)
    return text_encoder.final_layer_norm(x)


def _guided_eps(unet, x, t, cond, uncond, guidance: float) -> torch.Tensor:
    eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def gradient_context(
    pipe,
    classifier,
    prompts: Sequence[str],
    axis: str,
    targets: torch.Tensor,
    steps: int = 20,
    lr: float = 0.05,
    trajectory_steps: int = 8,
    guidance: float = 4.0,
    seed: int = 0,
    progress=None,
) -> torch.Tensor:
    """Optimise the word/EOS input embeddings of ``prompts`` so the edited model draws ``targets``.

    ``targets``: (N,) class indices of ``axis`` (the erased concept of each prompt). ``lr`` is relative
    to the RMS of the token-embedding table (Adam moves each coordinate by about lr·RMS per step).
    """
    te = pipe.text_encoder
    ids, lengths = pipe.tokenizer.encode(list(prompts))
    device = pipe.device
    ids = ids.to(device)
    with torch.no_grad():
        emb0 = te.token_embedding(ids)
        scale = te.token_embedding.weight.pow(2).mean().sqrt().item()
        uncond = pipe.encode_prompts([""] * len(prompts))
    positions = torch.arange(ids.shape[1], device=device)[None]
    # every real token after BOS (the words and EOS); BOS and padding stay as they are
    editable = ((positions >= 1) & (positions < lengths.to(device)[:, None])).float()[..., None]
    delta = torch.zeros_like(emb0, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr * scale)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(trajectory_steps)
    half = trajectory_steps // 2
    alphas = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(int(seed))
    size = pipe.image_size
    targets = targets.to(device)
    for step in range(steps):
        cond = encode_from_embeddings(te, emb0 + delta * editable)
        x = torch.randn(len(prompts), 3, size, size, generator=gen).to(device)
        with torch.no_grad():
            for t in scheduler.timesteps[:half]:
                x = scheduler.step(_guided_eps(pipe.unet, x, t, cond.detach(), uncond, guidance), t, x).prev_sample
        t = scheduler.timesteps[half]
        eps = _guided_eps(pipe.unet, x, t, cond, uncond, guidance)
        a_t = alphas[t]
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # DDIM's x̂₀ (Song et al. eq. 12)
        loss = F.cross_entropy(classifier(x0)[axis], targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(step + 1, steps, float(loss))
    with torch.no_grad():
        return encode_from_embeddings(te, emb0 + delta * editable).detach()
