"""The sampling-time methods on a diffusers ``UNet2DConditionModel`` or Wan 2.x text-to-video
``WanTransformer3DModel`` (removable attention processors on their cross-attention; other denoisers are
refused by class).

The same core math as the ComfyUI nodes:
* ``SuppressionProcessors(unet).install()`` swaps the processor of every cross-attention layer ("attn2")
  for one that applies token suppression (logit bias) and concept guidance (NAG, positive rows only)
  according to ``controller.state``; ``remove()`` puts the original processors back. With no state the
  original processor runs (bit-identical output).
* ``DiffusersTextEncoder`` adapts a CLIP tokenizer + text encoder to what SAFREE needs (encode ids), and
  ``safree_embeds`` returns the projected prompt embeddings.
* ``sld_noise`` does one SLD step from a 3-branch UNet call.

Imports diffusers only inside functions, so ``erasers`` stays importable without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from erasers.errors import UnsupportedFamily
from erasers.guards import concept_guidance as cg
from erasers.guards import safree, sld
from erasers.guards import token_suppress as ts
from erasers.text import PromptEncoding

log = logging.getLogger(__name__)


@dataclass
class SuppressionState:
    """What the processors do on the next UNet call.

    token_bias: (B, T) additive logit bias per batch row (0 = untouched; build with ``ts.logit_bias``).
    nag_context: (1, Tn, D) concept embeddings for the negative branch; nag_rows: positive batch rows.
    probe: optional ``probe(kind, **tensors)`` called by every processor call (``kind`` "bias" or "nag"),
        for measurements (erasers_dev/bench/guard_diagnostics.py); it must not change the tensors.
    """

    token_bias: Optional[torch.Tensor] = None
    nag_context: Optional[torch.Tensor] = None
    nag_rows: Optional[torch.Tensor] = None
    phi: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    calls: dict = field(default_factory=lambda: {"bias": 0, "nag": 0})
    probe: Optional[Callable] = None

    @property
    def active(self) -> bool:
        return self.token_bias is not None or self.nag_context is not None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype, keys: int) -> torch.Tensor:
    """The caller's cross-attention mask as an additive (B, 1 or Lq, T) bias in ``dtype``.

    diffusers hands attn2 the encoder mask already turned into a (B, 1, T) bias ((1 − m)·−10000); a boolean
    mask (True = attend) or a (B, T) one is converted the same way. A mask over another number of keys than
    the prompt has cannot be composed with a per-token bias: refused, never skipped."""
    if mask.dtype == torch.bool:
        mask = (~mask).to(dtype) * -10000.0
    if mask.dim() == 2:
        mask = mask[:, None, :]
    if mask.dim() != 3 or mask.shape[-1] != keys:
        raise UnsupportedFamily(
            f"Token suppression / concept guidance got a cross-attention mask of shape {tuple(mask.shape)} for "
            f"{keys} prompt tokens; expected (B, {keys}) or (B, 1 or queries, {keys}). The suppression was not "
            f"skipped: pass a mask over the prompt tokens, or none."
        )
    return mask.to(dtype)


class SuppressionAttnProcessor:
    """Cross-attention processor: standard attention + the active suppression ops; delegates to the
    layer's original processor when nothing is active.

    A caller's attention mask composes with the suppression (both are additive logit biases), so a masked
    prompt is suppressed like any other: the processor never falls back to unsuppressed attention."""

    def __init__(self, controller: "SuppressionProcessors", original):
        self.controller, self.original = controller, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.controller.state
        if state is None or not state.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        user = None
        if attention_mask is not None:
            user = additive_mask(
                attention_mask.to(hidden_states.device), hidden_states.dtype, encoder_hidden_states.shape[1]
            )
        if state.token_bias is not None:
            state.calls["bias"] += 1
            if state.probe is not None:
                state.probe(
                    "bias", attn=attn, hidden=hidden_states, context=encoder_hidden_states, bias=state.token_bias
                )
            if state.nag_context is None and not self.controller.wan:
                # token suppression alone is an additive (B, 1, T) attention mask: the layer's own processor
                # (and its optimized kernel) does all the work; the caller's mask is added to it
                mask = state.token_bias.to(hidden_states.device, hidden_states.dtype)[:, None, :]
                mask = mask if user is None else mask + user
                return self.original(attn, hidden_states, encoder_hidden_states, mask, temb, **kwargs)
        q = self.queries(attn, hidden_states)
        k, v = self.keys_values(attn, encoder_hidden_states)
        heads = attn.heads
        bias = None  # (B, 1, 1 or Lq, T): token bias + the caller's mask, broadcast over heads
        if state.token_bias is not None:
            bias = ts.bias_mask(state.token_bias.to(q.device), q.dtype)
        if user is not None:
            bias = user[:, None] if bias is None else bias + user[:, None]
        out = ts.attention(q, k, v, heads, bias)
        if state.nag_context is not None:
            state.calls["nag"] += 1
            rows = state.nag_rows.to(q.device)
            neg = state.nag_context.to(q.device, q.dtype).expand(len(rows), -1, -1)
            k_neg, v_neg = self.keys_values(attn, neg)
            z_neg = ts.attention(q[rows], k_neg, v_neg, heads)
            z_pos = out[rows]
            out = out.clone()
            out[rows] = cg.nag(z_pos, z_neg, state.phi, state.tau, state.alpha)
            if state.probe is not None:
                state.probe("nag", z_pos=z_pos, z_neg=z_neg, z_out=out[rows], phi=state.phi, tau=state.tau)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if getattr(attn, "residual_connection", False):
            out = out + hidden_states
        return out / getattr(attn, "rescale_output_factor", 1.0)

    # Q, K, V as the layer's own processor computes them: Wan 2.x normalises Q and K with an RMSNorm across
    # all heads before splitting them (WanAttnProcessor); a UNet's attn2 has no Q/K norm
    def queries(self, attn, hidden_states):
        q = attn.to_q(hidden_states)
        return attn.norm_q(q) if self.controller.wan else q

    def keys_values(self, attn, context):
        k = attn.to_k(context)
        return (attn.norm_k(k) if self.controller.wan else k), attn.to_v(context)


class SuppressionProcessors:
    """Install/remove the suppression processors on every cross-attention layer of a diffusers UNet."""

    def __init__(self, unet):
        self.unet = unet
        self.state: Optional[SuppressionState] = None
        self._originals: Optional[dict] = None
        self.wan = check_denoiser(unet)

    def cross_attention_names(self) -> list:
        return [name for name in self.unet.attn_processors if ".attn2." in name]

    def install(self) -> "SuppressionProcessors":
        if self._originals is not None:
            return self
        if not self.cross_attention_names():
            # nothing to patch would mean sampling unsuppressed: refuse (fail closed), never install nothing
            raise UnsupportedFamily(
                f"Token suppression / concept guidance found no cross-attention layer ('attn2') in this "
                f"{type(self.unet).__name__}; nothing would be suppressed, so nothing was installed."
            )
        self._originals = dict(self.unet.attn_processors)
        procs = {
            name: (SuppressionAttnProcessor(self, p) if ".attn2." in name else p)
            for name, p in self._originals.items()
        }
        self.unet.set_attn_processor(procs)
        return self

    def remove(self) -> None:
        if self._originals is not None:
            self.unet.set_attn_processor(self._originals)
            self._originals = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()


#: the denoisers whose text enters through per-block cross-attention ("attn2") that these processors
#: reproduce exactly; a joint-attention DiT (Flux, SD3, Qwen-Image, …) has no attn2 and is refused by name
CROSS_ATTENTION_DENOISERS = ("UNet2DConditionModel", "WanTransformer3DModel")


def check_denoiser(module) -> bool:
    """Refuse, by class, a denoiser these processors cannot suppress on; True for Wan 2.x (Q/K norms).

    Wan image-to-video blocks also attend to image-encoder tokens through ``add_k_proj`` (the first
    257 context rows); a per-token bias over the text alone does not describe that layer, so it is refused."""
    name = type(module).__name__
    if name not in CROSS_ATTENTION_DENOISERS:
        raise UnsupportedFamily(
            f"Token suppression / concept guidance through diffusers works on {', '.join(CROSS_ATTENTION_DENOISERS)} "
            f"(per-block cross-attention); found {name}. Its text enters through joint attention, which these "
            f"processors do not patch: use the ComfyUI nodes (which serve Flux, SD3, Chroma, Flux.2 and "
            f"Qwen-Image through the host's joint attention), or a closed-form eraser."
        )
    if name != "WanTransformer3DModel":
        return False
    i2v = [n for n, m in module.named_modules() if n.endswith("attn2") and getattr(m, "add_k_proj", None) is not None]
    if i2v:
        raise UnsupportedFamily(
            f"Token suppression / concept guidance through diffusers serves Wan text-to-video; this "
            f"WanTransformer3DModel is an image-to-video model ({i2v[0]} attends to image tokens through "
            f"add_k_proj). Use a closed-form eraser on it, or the ComfyUI nodes."
        )
    return True


# -- SAFREE on a diffusers CLIP ------------------------------------------------------------------------


class DiffusersTextEncoder:
    """CLIP tokenizer + text model → ``PromptEncoding`` (last hidden state, EOS-position pooled)."""

    def __init__(self, tokenizer, text_encoder, family: str = "sd1"):
        self.tokenizer, self.text_encoder, self.family = tokenizer, text_encoder, family
        self.context_length = tokenizer.model_max_length

    def tokenize(self, prompt: str) -> list:
        return self.tokenizer(prompt, truncation=True, max_length=self.context_length)["input_ids"]

    def encode(self, prompts: Sequence[str]) -> PromptEncoding:
        return self.encode_ids([self.tokenize(p) for p in prompts])

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> PromptEncoding:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else ids[0][-1]
        batch = torch.full((len(ids), self.context_length), pad, dtype=torch.long)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = torch.tensor(row)
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(batch.to(device))[0].float().cpu()
        lengths = torch.tensor([len(r) for r in ids])
        return PromptEncoding(
            hidden=hidden,
            lengths=lengths,
            token_ids=[list(r) for r in ids],
            pooled=hidden[torch.arange(len(ids)), lengths - 1],
        )


def safree_embeds(encoder, prompt: str, config: safree.SAFREEConfig) -> safree.SafreeResult:
    """SAFREE for one prompt: the masked-prompt test, projection and t′ (the one-off prompt analysis)."""
    ids = encoder.tokenize(prompt)
    positions, copies = safree.masked_copies(ids, has_bos=True, mask_id=safree.CLIP_MASK_ID)
    p = encoder.encode_ids([ids])
    m = encoder.encode_ids(copies) if copies else None
    c = encoder.encode(config.concepts)
    masked_hidden = m.hidden if m is not None else p.hidden[:0]
    masked_lengths = m.lengths if m is not None else p.lengths[:0]
    return safree.analyse(
        config,
        p.hidden[0],
        int(p.lengths[0]),
        positions,
        masked_hidden,
        masked_lengths,
        c.hidden,
        c.lengths,
        segments=safree.SEGMENTS.get(encoder.family),
    )


# -- SLD -----------------------------------------------------------------------------------------------


def sld_noise(
    unet, latents, t, uncond, cond, safety, cfg_scale: float, state: sld.SLDState, config: sld.SLDConfig, warmup: int
) -> torch.Tensor:
    """ε̃ for one step from one batched UNet call on [uncond, cond, safety] (ε-prediction UNet)."""
    x = torch.cat([latents] * 3)
    ctx = torch.cat([uncond, cond, safety])
    eps_u, eps_p, eps_s = unet(x, t, encoder_hidden_states=ctx).sample.chunk(3)
    return sld.sld_combine(eps_u, eps_p, eps_s, cfg_scale, state, config, warmup)
