"""Host glue for the sampling-time methods: per-step state, attention dispatchers, cfg functions.

Nothing here imports ComfyUI at module level, so the unit tests drive these objects with fake
``transformer_options``. How it fits together:

* every method registers an APPLY_MODEL wrapper (chainable, keyed) that decides per model call whether
  it acts (σ window, risk gate, which batch rows are the positive branch) and writes its per-call
  parameters into a *copy* of ``transformer_options`` under ``STATE_KEY``;
* one stateless dispatcher per attention site reads that state: ``Attn2Dispatch`` as the attn2 replace
  of every UNet cross-attention block, ``DitDispatch`` as the ``patches_replace["dit"]`` of every Flux
  double/single block and SD3 joint block (it installs an ``optimized_attention_override`` for the
  block's joint attention — available since ComfyUI 0.3.60; Flux's own attn1_patch arrived only in 0.17);
* with no state (outside the window, gate closed, uncond-only batch) the dispatchers run the host's
  own attention exactly as the unpatched model would: bit-identical output.

Several methods compose: their wrappers chain, and the dispatchers apply every op found in the state.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..erasers.families import aura
from ..erasers.guards import attention_lse as lse
from ..erasers.guards import concept_guidance as cg
from ..erasers.guards import joint
from ..erasers.guards import token_suppress as ts
from ..erasers.guards.base import in_window, log_gate, risk_score
from .caches import BoundedCache, tensor_key
from .suppression_clip import TABLE_FAMILIES  # the families whose guards come from the family table

log = logging.getLogger(__name__)

#: key of the per-call state in transformer_options (and so in every attention patch's extra_options)
STATE_KEY = "concept_erasers"
#: extra_options key the NAG attn2_patch uses to tell the replace where the appended concept tokens sit
NEG_SLICES_KEY = "concept_erasers_neg"
WRAPPER_KEY = "concept_erasers"


# -- small helpers -----------------------------------------------------------------------------------


def cond_rows(cond_or_uncond, batch: int, device=None) -> torch.Tensor:
    """Row indices of the positive branch: chunk i of ``cond_or_uncond`` covers rows [i·b, (i+1)·b)."""
    chunks = list(cond_or_uncond or [0])
    per = batch // max(len(chunks), 1)
    rows = [r for i, c in enumerate(chunks) if c == 0 for r in range(i * per, (i + 1) * per)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def with_state(transformer_options: dict, **updates) -> dict:
    """A copy of transformer_options whose state has ``updates`` merged in (lists are extended, the
    token bias is summed), so the caller's dict is never mutated and methods compose."""
    to = dict(transformer_options)
    state = dict(to.get(STATE_KEY) or {})
    for key, value in updates.items():
        if key == "nag":
            state["nag"] = list(state.get("nag", [])) + [value]
        elif key == "token_bias" and state.get("token_bias") is not None:
            state["token_bias"] = state["token_bias"] + value
        else:
            state[key] = value
    to[STATE_KEY] = state
    return to


def matches(row: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a conditioning row (T, D) is the reference encoding (T₀, D), possibly tiled to T = m·T₀."""
    if reference is None or row.shape[-1] != reference.shape[-1] or row.shape[0] % reference.shape[0]:
        return False
    head = row[: reference.shape[0]].float()
    return bool(torch.allclose(head, reference.to(head.device, head.dtype), rtol=1e-3, atol=1e-3))


def locate(row: torch.Tensor, reference: Optional[torch.Tensor]) -> Optional[int]:
    """Where the reference encoding (T₀, D) starts in a conditioning row (T, D): 0 when the row is it (or it
    tiled, ``matches``), T − T₀ when the model left-padded it (Flux.2 pads the context to 512 on the left,
    model_base.Flux2.extra_conds), None when the row is another prompt."""
    if matches(row, reference):
        return 0
    if reference is None or row.shape[-1] != reference.shape[-1] or row.shape[0] <= reference.shape[0]:
        return None
    offset = row.shape[0] - reference.shape[0]
    tail, pad = row[offset:].float(), row[:offset]
    if bool((pad == 0).all()) and torch.allclose(tail, reference.to(tail.device, tail.dtype), rtol=1e-3, atol=1e-3):
        return offset
    return None


def tile_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    reps = max(1, length // tensor.shape[0])
    return tensor.repeat(reps, *([1] * (tensor.ndim - 1)))[:length]


class GateLog:
    """Logs a method's risk score once per distinct prompt (not once per step)."""

    def __init__(self, method: str, threshold: float):
        # exact-content keys: a rounded sum could give one prompt another's decision
        self.method, self.threshold, self.seen = method, threshold, BoundedCache(256)

    def __call__(self, row: torch.Tensor, concept_hidden: torch.Tensor, skip_first: bool = True) -> bool:
        key = tensor_key(row)
        if key not in self.seen:
            score = risk_score(row, concept_hidden.to(row.device), skip_first=skip_first)
            self.seen[key] = log_gate(self.method, score, self.threshold)
        return self.seen[key]

    def __deepcopy__(self, memo):
        return self


def host_attention():
    """The host's own attention function (ComfyUI's optimized_attention), or plain SDPA outside ComfyUI."""
    try:
        from comfy.ldm.modules.attention import optimized_attention
    except ImportError:
        return None
    return optimized_attention


# -- token suppression: per-call mask -------------------------------------------------------------


def token_mask_for_row(
    row: torch.Tensor,
    concept_tokens: torch.Tensor,
    similarity: float,
    include_eos: bool,
    prompt_ref: Optional[torch.Tensor] = None,
    prompt_positions=(),
    prompt_length=None,
    skip_first: bool = True,
) -> torch.Tensor:
    """(T,) bool mask of concept positions in one conditioning row.

    Embedding similarity to the keywords' token states always; exact token matches of the prompt text
    when the row *is* that prompt's encoding (``prompt_ref``). EOS/padding: from the prompt's EOS when the
    prompt is known, else every position after the last hit (CLIP is causal: all of them carry it).
    """
    T = row.shape[0]
    valid = torch.ones(T, dtype=torch.bool, device=row.device)
    if skip_first:
        valid[0] = False  # the start token is the same for every prompt
    hit = ts.similar_tokens(row, concept_tokens.to(row.device), similarity, valid).cpu()
    offset = locate(row, prompt_ref) if prompt_ref is not None else None
    if offset:  # the model left-padded the prompt's rows: no tiling, positions shifted
        for p in prompt_positions:
            hit[offset + p] = True
        if include_eos and bool(hit.any()):
            # from the prompt's EOS (its length is known) or past the last hit on to the end
            tail = offset + prompt_length - 1 if prompt_length is not None else int(hit.nonzero().max()) + 1
            hit[tail:] = True
        return hit
    known = offset == 0
    if known:
        period = prompt_ref.shape[0]
        for rep in range(T // period):
            for p in prompt_positions:
                hit[rep * period + p] = True
    if include_eos and bool(hit.any()):
        if known and prompt_length is not None:
            period = prompt_ref.shape[0]
            for rep in range(T // period):
                hit[rep * period + prompt_length - 1 : (rep + 1) * period] = True
        else:
            last = int(hit.nonzero().max())
            hit[last + 1 :] = True
    return hit


def call_with_token_bias(executor, args: tuple, transformer_options: dict, kwargs: dict, bias, txt_len, install=None):
    """The model call ``executor(*args, to, **kwargs)`` with the (B, T) token bias in a copy of the state;
    ``install(to)`` may add a model-wide override first. (output, how many attentions the bias reached): the
    callers stop when none did rather than sampling unguarded."""
    acted = [0]
    to = with_state(
        transformer_options,
        token_bias=bias.to(args[3].device),
        txt_len=txt_len,
        model=getattr(executor, "class_obj", None),
        acted=acted,
    )
    if install is not None:
        install(to)
    return executor(*args, to, **kwargs), acted[0]


def make_token_wrapper(
    config,
    concept_tokens: torch.Tensor,
    concept_hidden: torch.Tensor,
    sigma_start: float,
    sigma_end: float,
    prompt_ref=None,
    prompt_positions=(),
    prompt_length=None,
    skip_first: bool = True,
    family: Optional[str] = None,
) -> Callable:
    """APPLY_MODEL wrapper: per call, the (B, T) logit bias of the suppressed columns (positive rows only).

    On the family-table families (``TABLE_FAMILIES``) it also checks, after the call, that the bias reached
    at least one of the model's text attentions; if none matched the layout the pack expects, it raises
    before any step has been taken, instead of sampling unguarded. Lumina 2 / Z-Image have no per-block
    replace hook: their joint layers are reached through a model-wide attention override set here."""
    factor = config.effective_factor
    gate = GateLog("TokenSuppress", config.risk_gate)
    checked = family in TABLE_FAMILIES

    def apply_model_wrapper(
        executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        if c_crossattn is None or not in_window(t, sigma_start, sigma_end):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        rows = cond_rows(transformer_options.get("cond_or_uncond"), c_crossattn.shape[0])
        bias = torch.zeros(c_crossattn.shape[:2], dtype=torch.float32)
        for r in rows.tolist():
            row = c_crossattn[r]
            if not gate(row, concept_hidden, skip_first):
                continue
            mask = token_mask_for_row(
                row,
                concept_tokens,
                config.similarity,
                config.include_eos,
                prompt_ref,
                prompt_positions,
                prompt_length,
                skip_first,
            )
            bias[r] = ts.logit_bias(mask, factor)
        if not bool(bias.any()):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        def model_level(to):  # Lumina 2 / Z-Image: no per-block hook, a model-wide override for this call
            dm = to[STATE_KEY]["model"].diffusion_model
            caption, joint_len = lumina_lengths(dm, x, c_crossattn.shape[1])
            to["optimized_attention_override"] = ModelLevelJoint(
                joint_len, caption, to[STATE_KEY], to.get("optimized_attention_override")
            )

        out, acted = call_with_token_bias(
            executor,
            (x, t, c_concat, c_crossattn, control),
            transformer_options,
            kwargs,
            bias,
            c_crossattn.shape[1],
            model_level if family in MODEL_LEVEL_FAMILIES else None,
        )
        if checked and acted == 0:
            raise RuntimeError(
                f"Token suppression found none of the {family} model's text attentions in the layout it was "
                f"built for ({LAYOUTS.get(family, '?')}), so the concept would not be suppressed; it stops at this "
                "first model call, before any step is completed. This ComfyUI may lay the model out differently (or "
                "the model has extra inputs, e.g. reference images): report it with the ComfyUI version."
            )
        return out

    return apply_model_wrapper


def make_hidream_token_wrapper(
    config, t5, llama, concept_hidden: torch.Tensor, sigma_start: float, sigma_end: float, llama_layer: int
) -> Callable:
    """APPLY_MODEL wrapper for HiDream-I1: per call, the (B, T5 + R) bias of the suppressed T5 rows and Llama
    rows (positive rows only; ``t5`` / ``llama``: suppression_clip.TokenStream), applied to every block's
    joint attention through a model-wide override (HiDream has no per-block replace hook). Raises at the
    first model call when no attention had the layout, instead of sampling unguarded."""
    factor = config.effective_factor
    gate = GateLog("TokenSuppress", config.risk_gate)

    def mask(row, stream):
        return token_mask_for_row(
            row,
            stream.concept_states,
            config.similarity,
            config.include_eos,
            stream.prompt_ref,
            stream.positions,
            stream.length,
            skip_first=False,  # T5 has no start token; the host dropped Llama's start token's row
        )

    def apply_model_wrapper(
        executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        if c_crossattn is None or not in_window(t, sigma_start, sigma_end):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        llama_rows = kwargs.get("encoder_hidden_states_llama3")
        if llama_rows is None or llama_rows.ndim != 4 or llama_rows.shape[1] <= llama_layer:
            raise RuntimeError(
                "Token suppression on HiDream-I1 needs the conditioning's per-layer Llama states (B, layers > "
                f"{llama_layer}, tokens, width) and this model call got "
                f"{None if llama_rows is None else tuple(llama_rows.shape)}: stopped before the first step rather "
                "than sampling unguarded. Encode the prompt with HiDream's text encoders."
            )
        rows = cond_rows(transformer_options.get("cond_or_uncond"), c_crossattn.shape[0])
        t5_len, llama_len = c_crossattn.shape[1], llama_rows.shape[2]
        bias = torch.zeros((c_crossattn.shape[0], t5_len + llama_len), dtype=torch.float32)
        for r in rows.tolist():
            if gate(c_crossattn[r], concept_hidden, False):
                both = torch.cat((mask(c_crossattn[r], t5), mask(llama_rows[r, llama_layer], llama)))
                bias[r] = ts.logit_bias(both, factor)
        if not bool(bias.any()):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        out, acted = call_with_token_bias(
            executor, (x, t, c_concat, c_crossattn, control), transformer_options, kwargs, bias, t5_len
        )
        if acted == 0:
            raise RuntimeError(
                "Token suppression found none of HiDream-I1's joint attentions in the layout it was built for "
                f"({LAYOUTS['hidream']}: image + {t5_len} + 2 × {llama_len} positions), so the concept would not be "
                "suppressed; it stops at this first model call. This ComfyUI may lay the model out differently: "
                "report it with the ComfyUI version."
            )
        return out

    return apply_model_wrapper


HIDREAM_JOINT_KEY = "hidream_joint"


def make_hidream_joint_wrapper() -> Callable:
    """DIFFUSION_MODEL wrapper for HiDream-I1, shared by token suppression and concept guidance: installs the
    model-wide ``ImageFirstJoint`` override for this call (HiDream has no per-block replace hook) and, for each
    concept guidance op in the state, appends the concept's T5 rows to ``context`` and its per-layer Llama rows
    to ``encoder_hidden_states_llama3``. Every per-token part of HiDream's forward (caption projections, the
    blocks' text modulation, norms and feed-forward, all-zero text positions) then carries the concept's text
    stream through every block beside the prompt's, as the model would carry it with the concept as the prompt;
    the override keeps the streams apart in the joint attention and the output reads image tokens only. One
    pass, no second run of the image stream (Flux.2 / Qwen-Image: ``DitDispatch.inline_guidance``)."""

    def diffusion_model_wrapper(executor, x, t, y, context, llama, image_cond, control, transformer_options, *a, **kw):
        state = transformer_options.get(STATE_KEY) or {}
        ops = state.get("nag") or []
        current = transformer_options.get("optimized_attention_override")
        if isinstance(current, ImageFirstJoint) or (state.get("token_bias") is None and not ops):
            return executor(x, t, y, context, llama, image_cond, control, transformer_options, *a, **kw)
        if context is None or llama is None or llama.ndim != 4:
            raise RuntimeError(
                "Concept guidance / token suppression on HiDream-I1 needs the T5 context and the per-layer Llama "
                f"states (B, layers, tokens, width); this model call got context "
                f"{None if context is None else tuple(context.shape)} and Llama "
                f"{None if llama is None else tuple(llama.shape)}: stopped before the first step rather than "
                "sampling unguarded. Encode the prompt with HiDream's text encoders."
            )
        batch = x.shape[0]
        t5_parts, llama_parts, concepts = [context], [llama], []
        for op in ops:
            t5_c = op["neg"].to(context.device, context.dtype).expand(batch, -1, -1)
            llama_c = op["neg_llama"].to(llama.device, llama.dtype).expand(batch, -1, -1, -1)
            if (
                t5_c.shape[2] != context.shape[2]
                or llama_c.shape[1] != llama.shape[1]
                or llama_c.shape[3] != llama.shape[3]
            ):
                raise RuntimeError(
                    "Concept guidance on HiDream-I1: the concept was encoded as T5 "
                    f"{tuple(t5_c.shape[1:])} and Llama {tuple(llama_c.shape[1:])}, the prompt as "
                    f"{tuple(context.shape[1:])} and {tuple(llama.shape[1:])}: encode both with the same text "
                    "encoders (the CLIP input of the guidance node)."
                )
            t5_parts.append(t5_c)
            llama_parts.append(llama_c)
            concepts.append((t5_c.shape[1], llama_c.shape[2]))
        width = x.shape[-1] + (image_cond.shape[-1] if image_cond is not None else 0)  # _forward: cat on width
        p = int(getattr(executor, "class_obj", None).patch_size)  # the executor runs HiDream's own _forward
        image_len = (-(-x.shape[-2] // p)) * (-(-width // p))
        joint_override = ImageFirstJoint(image_len, context.shape[1], llama.shape[2], state, current, concepts)
        to = dict(transformer_options, optimized_attention_override=joint_override)
        if ops:
            context, llama = torch.cat(t5_parts, dim=1), torch.cat(llama_parts, dim=2)
        out = executor(x, t, y, context, llama, image_cond, control, to, *a, **kw)
        if ops and joint_override.calls == 0:
            raise RuntimeError(
                "Concept guidance found none of HiDream-I1's joint attentions in the layout it was built for "
                f"({LAYOUTS['hidream']} with the concept's rows after the prompt's in each text block: "
                f"{joint_override.length} positions), so the concept would not be guided against; it stops at this "
                "first model call. This ComfyUI may lay the model out differently: report it with the ComfyUI version."
            )
        return out

    return diffusion_model_wrapper


class ImageFirstJoint:
    """``optimized_attention_override`` for one HiDream-I1 model call. Every block's joint attention is
    [image ‖ T5 ‖ Llama ``llama_layers[-1]`` ‖ that block's Llama layer] (double blocks: image, then their text;
    single blocks: the same concatenation), all of one length.

    Without concepts: the image queries get the T5 part of token suppression's bias on the T5 keys and the
    Llama part on both Llama key blocks, the text queries attend as the model does. With concept guidance's
    concepts (``concepts``: (T5 rows, Llama rows) each, appended after the prompt's rows in each of the three
    text blocks by ``make_hidream_joint_wrapper``): the prompt's text queries attend to [image, prompt text]
    keys and each concept's to [image, its own text] — each stream exactly as in a model call with that text
    alone —, the image queries give Z⁺ over [image, prompt text] (with the bias) and, on each op's rows, Z⁻
    over [image, concept text] (image-key part shared, log-sum-exp merge), then NAG (§5.4)."""

    def __init__(self, image_len: int, t5_len: int, llama_len: int, state: dict, previous=None, concepts=()):
        self.image_len, self.t5_len, self.llama_len = image_len, t5_len, llama_len
        self.state, self.previous, self.concepts = state, previous, list(concepts)
        self.t5_total = t5_len + sum(c for c, _ in self.concepts)
        self.llama_total = llama_len + sum(d for _, d in self.concepts)
        self.length = image_len + self.t5_total + 2 * self.llama_total
        self.calls = 0

    def text_columns(self, bias: torch.Tensor) -> torch.Tensor:
        """The prompt's (B, T5 + R) token bias over its three text blocks [T5 ‖ Llama initial ‖ Llama layer i]."""
        llama = bias[:, self.t5_len :]
        return torch.cat((bias[:, : self.t5_len], llama, llama), dim=1)

    def stream_columns(self, index: int, device) -> torch.Tensor:
        """Key positions of text stream ``index`` (0: the prompt, j: concept j) in its three text blocks."""
        before = self.concepts[: index - 1] if index else []
        t5_at = self.image_len + (self.t5_len + sum(c for c, _ in before) if index else 0)
        offset = self.llama_len + sum(d for _, d in before) if index else 0
        t5_n, llama_n = self.concepts[index - 1] if index else (self.t5_len, self.llama_len)
        last = self.image_len + self.t5_total + offset
        layer = last + self.llama_total
        spans = [(t5_at, t5_n), (last, llama_n), (layer, llama_n)]
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in spans])

    def __call__(self, func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
        seq = 2 if skip_reshape else 1
        bias = self.state.get("token_bias")
        if q.shape[seq] != self.length or rest or mask is not None or (bias is None and not self.concepts):
            return _host_call(self.previous, func, q, k, v, heads, rest, mask, skip_reshape, kw)
        self.calls += 1
        if bias is not None and "acted" in self.state:
            self.state["acted"][0] += 1
        if self.concepts:
            return self.guided(func, q, k, v, heads, skip_reshape, kw, bias)
        text = self.text_columns(bias.to(q.device))
        columns = torch.cat((text.new_zeros(text.shape[0], self.image_len), text), dim=1)
        return joint.joint_suppressed_attention(
            q,
            k,
            v,
            heads,
            columns,
            0,
            lambda q_, k_, v_, h, mask=None: func(q_, k_, v_, h, mask=mask, skip_reshape=skip_reshape, **kw),
            seq,
            2 if kw.get("skip_output_reshape") else 1,
            None,
            image_end=self.image_len,
        )

    def guided(self, func, q, k, v, heads, skip_reshape, kw, bias):
        qh, kh, vh = (_heads(t, heads, skip_reshape) for t in (q, k, v))  # (B, H, L, D)
        n = self.image_len
        k_img, v_img, q_img = kh[:, :, :n], vh[:, :, :n], qh[:, :, :n]
        out = torch.empty_like(qh)
        host_kw = dict(kw, skip_output_reshape=True)
        ops = self.state.get("nag") or []
        image = lse.attention_lse(q_img, k_img, v_img)
        z = None
        for index in range(len(self.concepts) + 1):
            cols = self.stream_columns(index, q.device)
            keys = torch.cat((k_img, kh[:, :, cols]), dim=2)
            values = torch.cat((v_img, vh[:, :, cols]), dim=2)
            out[:, :, cols] = func(qh[:, :, cols], keys, values, heads, skip_reshape=True, **host_kw).to(out.dtype)
            if index == 0:
                columns = None if bias is None else self.text_columns(bias.to(q.device).float())[:, None, None, :]
                prompt = lse.attention_lse(q_img, kh[:, :, cols], vh[:, :, cols], columns)
                z = _to_seq(lse.merge(*image, *prompt)[0], True)
                continue
            op = ops[index - 1]
            rows = op["rows"].to(q.device)
            shared = tuple(t[rows] for t in image)
            concept = lse.attention_lse(q_img[rows], kh[rows][:, :, cols], vh[rows][:, :, cols])
            z_neg = _to_seq(lse.merge(*shared, *concept)[0], True)
            z = z.clone()
            z[rows] = cg.nag(z[rows], z_neg, op["phi"], op["tau"], op["alpha"])
        out[:, :, :n] = _heads(z.to(q.dtype), heads, False)
        return out if kw.get("skip_output_reshape") else _to_seq(out, True)

    def __deepcopy__(self, memo):
        return self


# -- concept guidance: per-call parameters ------------------------------------------------------------


def make_nag_wrapper(
    config,
    neg_context: torch.Tensor,
    concept_hidden: torch.Tensor,
    sigma_start: float,
    sigma_end: float,
    nag_sigma_end: float,
    skip_first: bool = True,
    text_mask_refusal: Optional[str] = None,
    neg_llama: Optional[torch.Tensor] = None,
) -> Callable:
    """APPLY_MODEL wrapper: enables NAG for the positive rows while σ is in the window and σ ≥ σ_end.
    ``text_mask_refusal`` (a family label): a model call with a text attention mask is refused (the families
    whose concept stream runs through the host's blocks, ``HOST_BLOCK_NAG``). ``neg_llama``: HiDream-I1's
    per-layer Llama states of the concept (1, layers, R, D), appended by ``make_hidream_joint_wrapper``."""
    gate = GateLog("ConceptGuidance", config.risk_gate)
    params = {"phi": float(config.phi), "tau": float(config.tau), "alpha": float(config.effective_alpha)}

    def apply_model_wrapper(
        executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        sigma = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if c_crossattn is None or sigma < nag_sigma_end or not in_window(t, sigma_start, sigma_end):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        rows = cond_rows(transformer_options.get("cond_or_uncond"), c_crossattn.shape[0])
        rows = torch.tensor(
            [r for r in rows.tolist() if gate(c_crossattn[r], concept_hidden, skip_first)], dtype=torch.long
        )
        if rows.numel() == 0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if text_mask_refusal and kwargs.get("attention_mask") is not None:
            raise RuntimeError(
                f"Concept guidance on {text_mask_refusal} runs the concept's text through the model's blocks, and "
                "this prompt came with a text attention mask (a batch of prompts of different lengths), which "
                "the host's blocks apply to the prompt's length only. Encode one prompt per conditioning; "
                "stopped at the first step rather than sampling unguarded."
            )
        op = dict(params, neg=neg_context, rows=rows.to(c_crossattn.device), stream={})
        if neg_llama is not None:
            op["neg_llama"] = neg_llama
        to = with_state(
            transformer_options,
            nag=op,
            txt_len=c_crossattn.shape[1],
            model=getattr(executor, "class_obj", None),
            latent_shape=tuple(x.shape),
        )
        return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

    return apply_model_wrapper


# -- UNet cross-attention --------------------------------------------------------------------------


class NagAttn2Patch:
    """attn2_patch: appends each active NAG op's concept context to ``context``/``value`` so the block's
    own to_k/to_v project it; the replace splits it off again (``NEG_SLICES_KEY``)."""

    def __call__(self, n, context, value, extra_options):
        state = extra_options.get(STATE_KEY) or {}
        ops = state.get("nag") or []
        if not ops:
            return n, context, value
        slices, parts_c, parts_v = [], [context], [value]
        start = context.shape[1]
        for op in ops:
            neg = op["neg"].to(context.device, context.dtype)
            neg = neg.expand(context.shape[0], -1, -1)
            slices.append((start, neg.shape[1]))
            start += neg.shape[1]
            parts_c.append(neg)
            parts_v.append(neg)
        extra_options[NEG_SLICES_KEY] = slices
        return n, torch.cat(parts_c, dim=1), torch.cat(parts_v, dim=1)

    def __deepcopy__(self, memo):
        return self


class Attn2Dispatch:
    """attn2 replace for every UNet cross-attention block: token bias and NAG from the per-call state;
    the host's own attention when there is none (bit-identical to the unpatched block)."""

    def __init__(self, attention=None):
        self.attention = attention  # None → ComfyUI's optimized_attention, else plain SDPA

    def plain(self, q, k, v, heads, extra_options, mask=None):
        fn = self.attention or host_attention()
        if fn is None:
            return ts.attention(q, k, v, heads, mask)
        return fn(
            q,
            k,
            v,
            heads,
            mask=mask,
            attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        state = extra_options.get(STATE_KEY)
        if not state:
            return self.plain(q, k, v, heads, extra_options)
        slices = extra_options.pop(NEG_SLICES_KEY, [])
        T = slices[0][0] if slices else k.shape[1]
        k_pos, v_pos = k[:, :T], v[:, :T]
        bias = state.get("token_bias")
        if bias is not None and bias.shape[1] == T:
            # the bias is an additive mask through the host's own attention: same kernel, one call
            out = ts.suppressed_attention(
                q,
                k_pos,
                v_pos,
                heads,
                bias.to(q.device),
                lambda q_, k_, v_, h, mask=None: self.plain(q_, k_, v_, h, extra_options, mask),
            )
        else:
            out = self.plain(q, k_pos, v_pos, heads, extra_options)
        for op, (start, length) in zip(state.get("nag") or [], slices):
            rows = op["rows"].to(q.device)
            z_neg = ts.attention(q[rows], k[rows, start : start + length], v[rows, start : start + length], heads)
            out = out.clone()
            out[rows] = cg.nag(out[rows], z_neg, op["phi"], op["tau"], op["alpha"])
        return out

    def __deepcopy__(self, memo):
        return self


def unet_attn2_sites(state_dict_keys) -> list:
    """(block_name, number, block_index) of every cross-attention block, from the model's weight keys."""
    import re

    pattern = re.compile(
        r"(?:(input_blocks|output_blocks)\.(\d+)\.\d+|(middle_block)\.\d+)"
        r"\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight$"
    )
    sites = set()
    for key in state_dict_keys:
        m = pattern.search(key)
        if m:
            if m.group(3):  # the middle block is ("middle", 0) although its path is middle_block.1
                sites.add(("middle", 0, int(m.group(4))))
            else:
                sites.add(("input" if m.group(1) == "input_blocks" else "output", int(m.group(2)), int(m.group(4))))
    return sorted(sites)


# -- DiT joint attention (Flux double/single blocks, SD3 joint blocks) --------------------------------


def _heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, H, L, D) view: Flux passes that already (``skip_reshape``); SD3 passes (B, L, H·D), v (B, L, H, D)."""
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _take(t: torch.Tensor, rows: list) -> torch.Tensor:
    """Rows ``rows`` (sorted) of t: a view when they are consecutive (the usual case), else a gathered copy."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t.narrow(0, rows[0], len(rows))
    return t[torch.tensor(rows, dtype=torch.long, device=t.device)]


def _to_seq(t: torch.Tensor, skip_reshape: bool) -> torch.Tensor:
    """(B, H, L, D) → (B, L, H·D) when the caller passed head-split tensors; SD3 hands v over as
    (B, L, H, D)."""
    if not skip_reshape:
        return t.reshape(t.shape[0], t.shape[1], -1) if t.ndim == 4 else t
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)


class DitDispatch:
    """``patches_replace["dit"]`` block replacement: with state, installs an attention override for this
    block's joint attention (image rows × concept text columns bias; NAG on the image rows)."""

    def __init__(self, family: str, kind: str, index: int):
        self.family, self.kind, self.index = family, kind, index
        # text rows the model puts before the context (AuraFlow's registers): [registers ‖ context ‖ image]
        self.registers = TEXT_BEFORE_CONTEXT.get(family, 0)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        to = args.get("transformer_options") or {}
        state = to.get(STATE_KEY)
        if not state:
            return extra["original_block"](args)
        if self.family == "wan":
            return self.cross_attention_block(args, extra, to, state)
        if self.family in HOST_BLOCK_NAG and state.get("nag"):
            return self.host_block_guidance(args, extra, to, state)
        img = args["img"]
        if self.kind == "double":
            txt_len = args["txt"].shape[1]
            joint = txt_len + img.shape[1]
        else:  # Flux / AuraFlow single block: img is already cat(txt, img)
            txt_len = state.get("txt_len", 0) + self.registers
            joint = img.shape[1]
        previous = to.get("optimized_attention_override")

        def attention_override(func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
            length = q.shape[2] if skip_reshape else q.shape[1]
            if self.family in TABLE_FAMILIES:
                return self.table_joint(
                    func, q, k, v, heads, rest, mask, skip_reshape, kw, state, txt_len, joint, previous
                )
            if length != joint or rest:
                if previous is not None:
                    return previous(func, q, k, v, heads, *rest, mask=mask, skip_reshape=skip_reshape, **kw)
                return func(q, k, v, heads, *rest, mask=mask, skip_reshape=skip_reshape, **kw)
            return self.joint_attention(func, q, k, v, heads, mask, skip_reshape, kw, state, args, txt_len)

        to2 = dict(to)
        to2["optimized_attention_override"] = attention_override
        return extra["original_block"](dict(args, transformer_options=to2))

    def table_joint(self, func, q, k, v, heads, rest, mask, skip_reshape, kw, state, txt_len, joint_len, previous):
        """Token suppression in a family-table model's joint attention (text first, ``txt_len`` text keys, the
        context's after ``self.registers``); Qwen-Image passes its text mask positionally. Anything else
        (another length) runs unchanged."""
        return table_joint_attention(
            func, q, k, v, heads, rest, mask, skip_reshape, kw, state, self.registers, txt_len, joint_len, previous
        )

    def cross_attention_block(self, args, extra, to, state):
        """Wan: a block runs self-attention, then cross-attention to the text (WanAttentionBlock.forward);
        the second attention call is the cross-attention, whose keys are the block's own projections of
        ``txt``. Every query — every frame's tokens — gets the token bias there.

        Concept guidance: each NAG op's concept context, through the model's own ``text_embedding`` (once per
        model call), is appended to ``txt``, so the block's own k/v (and RMSNorm on k, per row) project it;
        the cross-attention is split again: Z⁺ on the prompt's rows (biased), Z⁻ on the concept's, NAG on the
        guided rows — what the UNet attn2 dispatch does (``Attn2Dispatch``)."""
        txt = args["txt"]
        txt_len = txt.shape[1]
        ops = state.get("nag") or []
        slices, parts, start = [], [txt], txt_len
        for op in ops:
            stream = op["stream"]
            if "txt" not in stream:
                dm = state["model"].diffusion_model
                stream["txt"] = dm.text_embedding(op["neg"].to(txt.device, txt.dtype))
            neg = stream["txt"].to(txt.dtype).expand(txt.shape[0], -1, -1)
            slices.append((start, neg.shape[1]))
            start += neg.shape[1]
            parts.append(neg)
        previous = to.get("optimized_attention_override")
        calls = [0]
        bias = state.get("token_bias")

        def attention_override(func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
            calls[0] += 1
            if calls[0] != 2 or (bias is None and not ops):
                return _host_call(previous, func, q, k, v, heads, rest, mask, skip_reshape, kw)
            keys = k.shape[2] if skip_reshape else k.shape[1]
            if keys != start or (bias is not None and bias.shape[1] != txt_len) or rest or mask is not None:
                raise RuntimeError(
                    f"The guards expected Wan block {self.index}'s second attention to be its cross-attention to "
                    f"the {start} text rows (keys (B, {start}, H·D), no mask); it got keys of length {keys}"
                    f"{' with a mask' if mask is not None else ''}. This ComfyUI lays Wan out differently: stopped "
                    "before the first step rather than sampling unguarded."
                )
            host = lambda q_, k_, v_, h, mask=None: func(q_, k_, v_, h, mask=mask, **kw)  # noqa: E731
            k_pos, v_pos = k[:, :txt_len], v[:, :txt_len]
            if bias is not None:
                state["acted"][0] += 1
                out = ts.suppressed_attention(q, k_pos, v_pos, heads, bias.to(q.device), host)
            else:
                out = host(q, k_pos, v_pos, heads)
            for op, (first, length) in zip(ops, slices):
                rows = op["rows"].to(q.device)
                z_neg = host(q[rows], k[rows, first : first + length], v[rows, first : first + length], heads)
                out = out.clone()
                out[rows] = cg.nag(out[rows], z_neg, op["phi"], op["tau"], op["alpha"])
            return out

        block_args = dict(args, transformer_options=dict(to, optimized_attention_override=attention_override))
        if len(parts) > 1:
            block_args["txt"] = torch.cat(parts, dim=1)
        out = extra["original_block"](block_args)
        if calls[0] < 2 and (bias is not None or ops):
            raise RuntimeError(
                f"The guards found no cross-attention in Wan block {self.index} ({calls[0]} attention call(s), "
                "expected self-attention then cross-attention): stopped before the first step rather than sampling "
                "unguarded."
            )
        return out

    #: the concept's text stream rides in the block's own pass, appended to the prompt's text
    #: (``inline_guidance``). False → the block runs once more for the guided rows with [concept ‖ image]
    #: (``two_pass_guidance``): the reference the tests compare the inline path against, and the path taken
    #: by Flux-type single blocks with reference images (their modulation ranges follow the prompt's length).
    inline_concept_stream = True

    def host_block_guidance(self, args, extra, to, state):
        """NAG on Chroma / Flux.2 / Qwen-Image through the host's own block (§5.4)."""
        if args.get("attn_mask") is not None:
            raise RuntimeError(
                f"Concept guidance on {self.family} runs the concept's text through the model's blocks, and this "
                "model call brought an attention mask laid out for the prompt's text length (a regional mask?), "
                "which cannot be applied to the concept's: stopped at the first step rather than sampling unguarded."
            )
        if self.family in ONE_PASS_ONLY or (
            self.inline_concept_stream and not (self.kind == "single" and to.get("reference_image_num_tokens"))
        ):
            return self.inline_guidance(args, extra, to, state)
        return self.two_pass_guidance(args, extra, to, state)

    def inline_guidance(self, args, extra, to, state):
        """One pass of the host's block over [prompt text ‖ concept text(s) ‖ image] (§5.4).

        Z⁻ needs the concept's text stream carried through every block by that block's own projections, norms
        and modulation, exactly as the prompt's is. Every one of those is per token, so appending the concept's
        tokens to the text the block reads makes the block compute the concept stream beside the prompt's; only
        the joint attention mixes tokens, and there ``inline_joint_attention`` keeps the streams apart: prompt
        text attends to [prompt, image] keys, each concept to [its own, image] keys, the image queries to
        [prompt, image] (Z⁺) and, on the guided rows, to [concept, image] (Z⁻), then NAG. The block's text
        output holds the next block's concept stream; it is cut out before the model sees the block's output.
        The extra work is the concept's tokens (Flux.2: 512, Qwen-Image: the prompt's own length), not a
        second pass over the image tokens (the cost table in docs/suppression.md)."""
        img = args["img"]
        single = self.kind == "single"
        batch = img.shape[0]
        txt_len = int(state.get("txt_len", 0)) + self.registers if single else args["txt"].shape[1]
        dm = state["model"].diffusion_model
        ops = state["nag"]
        streams, spans, start = [], [], txt_len
        for op in ops:
            stream = op["stream"]
            if "txt" not in stream:
                stream["txt"] = concept_text_stream(self.family, dm, op["neg"].to(img.device, img.dtype))
            concept = stream["txt"].to(img.dtype).expand(batch, -1, -1)
            streams.append(concept)
            spans.append((start, concept.shape[1]))
            start += concept.shape[1]
        text_end = start
        cache = ops[0]["stream"]
        if "inline_pe" not in cache and "pe" in args:  # AuraFlow has no rotary positions
            cache["inline_pe"] = joint_rotary(self.family, dm, args["pe"], txt_len, [n for _, n in spans], state)
        joint_len = img.shape[1] + text_end - txt_len if single else text_end + img.shape[1]
        previous = to.get("optimized_attention_override")
        acted = [0]

        def attention_override(func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
            if (q.shape[2] if skip_reshape else q.shape[1]) != joint_len:
                return _host_call(previous, func, q, k, v, heads, rest, mask, skip_reshape, kw)
            if any(r is not None for r in rest) or mask is not None:
                raise RuntimeError(
                    f"Concept guidance expected {self.family} {self.kind} block {self.index}'s joint attention "
                    "without a mask; this ComfyUI passes a mask: stopped at the first step rather than sampling "
                    "unguarded."
                )
            acted[0] += 1
            if not skip_reshape:  # (B, L, H·D), as ComfyUI 0.3.x's Qwen-Image passes it: head-split here
                q, k, v = (_heads(t, heads, False) for t in (q, k, v))
            return self.inline_joint_attention(func, q, k, v, heads, kw, state, txt_len, spans, ops)

        to2 = dict(to, optimized_attention_override=attention_override)
        block_args = dict(args, transformer_options=to2)
        if "inline_pe" in cache:
            block_args["pe"] = cache["inline_pe"]
        if single:
            block_args["img"] = torch.cat((img[:, :txt_len], *streams, img[:, txt_len:]), dim=1)
            to2["img_slice"] = [text_end, joint_len]
        else:
            block_args["txt"] = torch.cat((args["txt"], *streams), dim=1)
        out = extra["original_block"](block_args)
        if acted[0] != 1:
            raise RuntimeError(
                f"Concept guidance found {acted[0]} joint attention(s) of length {joint_len} in {self.family} "
                f"{self.kind} block {self.index} (expected one): this ComfyUI lays the block out differently; "
                "stopped at the first step rather than sampling unguarded."
            )
        sequence = out["img"] if single else out["txt"]
        if sequence is None:  # an MMDiT's last joint layer may drop its text output (AuraFlow's is_last)
            raise RuntimeError(
                f"Concept guidance on {self.family}: {self.kind} block {self.index} returns no text stream, so the "
                "concept's stream cannot be carried on: stopped at the first step rather than sampling unguarded."
            )
        for op, (first, length) in zip(ops, spans):
            op["stream"]["txt"] = sequence[:, first : first + length]
        if single:
            return dict(out, img=torch.cat((sequence[:, :txt_len], sequence[:, text_end:]), dim=1))
        return dict(out, txt=sequence[:, :txt_len])

    def inline_joint_attention(self, func, q, k, v, heads, kw, state, txt_len, spans, ops):
        """The joint attention of [prompt ‖ concept₁ ‖ … ‖ image] as (B, H, L, D) tensors, each stream kept to
        its own text keys (``inline_guidance``). The image queries' image-key part is computed once for every
        row and shared by Z⁺ and each Z⁻ (log-sum-exp merge, exact); token suppression's column bias applies to
        the image queries' prompt keys, as on the model's own joint attention."""
        text_end = spans[-1][0] + spans[-1][1]
        k_img, v_img, q_img = k[:, :, text_end:], v[:, :, text_end:], q[:, :, text_end:]

        def text_queries(first, length):
            keys = torch.cat((k[:, :, first : first + length], k_img), dim=2)
            values = torch.cat((v[:, :, first : first + length], v_img), dim=2)
            q_text = q[:, :, first : first + length]
            return func(q_text, keys, values, heads, skip_reshape=True, **dict(kw, skip_output_reshape=True))

        outputs = [text_queries(0, txt_len)] + [text_queries(first, length) for first, length in spans]
        image = lse.attention_lse(q_img, k_img, v_img)
        bias = state.get("token_bias")
        columns = None
        if bias is not None:
            state["acted"][0] += 1
            columns = joint.joint_column_bias(bias.to(q.device), txt_len, self.registers)[:, None, None, :]
        prompt = lse.attention_lse(q_img, k[:, :, :txt_len], v[:, :, :txt_len], columns)
        z = _to_seq(lse.merge(*image, *prompt)[0], True)
        for op, (first, length) in zip(ops, spans):
            rows = op["rows"].to(q.device)
            shared = tuple(t[rows] for t in image)
            keys, values = (t[rows, :, first : first + length] for t in (k, v))
            concept = lse.attention_lse(q_img[rows], keys, values)
            z_neg = _to_seq(lse.merge(*shared, *concept)[0], True)
            z = z.clone()
            z[rows] = cg.nag(z[rows], z_neg, op["phi"], op["tau"], op["alpha"])
        outputs.append(_heads(z.to(q.dtype), heads, False))
        out = torch.cat(outputs, dim=2)
        return out if kw.get("skip_output_reshape") else _to_seq(out, True)

    def two_pass_guidance(self, args, extra, to, state):
        """NAG on Chroma / Flux.2 / Qwen-Image through the host's own block, twice (§5.4).

        Z⁻ needs the concept's text stream carried through every block by that block's own projections, norms
        and modulation. Rather than re-implement three families' blocks, the block runs once more for the
        guided rows with [concept stream ‖ the same image stream] (the concept's rotary positions computed as
        the model computes a prompt's): its attention output on the image queries is Z⁻ (the image queries
        and keys are the positive pass's: same image input, same modulation), and its text output is the
        concept stream the next block reads. Then the block runs for the batch as usual, and in its joint
        attention NAG mixes Z⁻ into the guided rows' image part (token suppression's bias composes there).
        Exact, at the price of the guided rows' image work in the extra pass (the cost table in
        docs/suppression.md)."""
        img = args["img"]
        single = self.kind == "single"
        txt_len = int(state.get("txt_len", 0)) if single else args["txt"].shape[1]
        joint_len = img.shape[1] if single else txt_len + img.shape[1]
        previous = to.get("optimized_attention_override")
        dm = state["model"].diffusion_model
        z_negs = []
        for op in state["nag"]:
            rows = op["rows"].to(img.device)
            stream = op["stream"]
            if "txt" not in stream:
                stream["txt"] = concept_text_stream(self.family, dm, op["neg"].to(img.device, img.dtype))
            if "pe" not in stream:
                stream["pe"] = concept_rotary(self.family, dm, args["pe"], txt_len, stream["txt"].shape[1], state)
            concept = stream["txt"].to(img.dtype).expand(len(rows), -1, -1)
            n_concept = concept.shape[1]
            captured = []

            def capture(func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
                out = _host_call(previous, func, q, k, v, heads, rest, mask, skip_reshape, kw)
                captured.append(_image_part(out, n_concept, kw))
                return out

            neg_args = dict(
                args,
                vec=take_rows(args["vec"], rows, img.shape[0]),
                pe=take_rows(stream["pe"], rows, img.shape[0]),
                transformer_options=dict(to, optimized_attention_override=capture, **{STATE_KEY: None}),
            )
            if single:
                if n_concept != txt_len and to.get("reference_image_num_tokens"):
                    raise RuntimeError(
                        "Concept guidance on Flux-type single blocks with reference images needs the concept as "
                        f"long as the prompt ({n_concept} vs {txt_len} tokens): the host's modulation ranges follow "
                        "the prompt's length. Stopped at the first step rather than sampling unguarded."
                    )
                neg_args["transformer_options"]["img_slice"] = [n_concept, n_concept + img.shape[1] - txt_len]
                neg_args["img"] = torch.cat((concept, img[rows, txt_len:]), dim=1)
            else:
                neg_args.update(img=img[rows], txt=concept)
            out = extra["original_block"](neg_args)
            if len(captured) != 1:
                raise RuntimeError(
                    f"Concept guidance expected one joint attention in {self.family} {self.kind} block {self.index} "
                    f"and saw {len(captured)}: this ComfyUI lays the block out differently; stopped at the first "
                    "step rather than sampling unguarded."
                )
            stream["txt"] = out["img"][:, :n_concept] if single else out["txt"]
            z_negs.append((op, captured[0]))
        acted = [0]

        def guided(func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
            out = table_joint_attention(
                func, q, k, v, heads, rest, mask, skip_reshape, kw, state, 0, txt_len, joint_len, previous
            )
            if (q.shape[2] if skip_reshape else q.shape[1]) != joint_len:
                return out
            acted[0] += 1
            z = out
            for op, z_neg in z_negs:
                rows = op["rows"].to(out.device)
                z_pos = _image_part(z, txt_len, kw)[rows]
                mixed = cg.nag(z_pos, z_neg.to(z_pos.device), op["phi"], op["tau"], op["alpha"])
                z = _with_image_part(z, rows, mixed, txt_len, kw)
            return z

        out = extra["original_block"](dict(args, transformer_options=dict(to, optimized_attention_override=guided)))
        if acted[0] != 1:
            raise RuntimeError(
                f"Concept guidance found no joint attention of length {joint_len} in {self.family} {self.kind} block "
                f"{self.index}: this ComfyUI lays the block out differently; stopped at the first step rather than "
                "sampling unguarded."
            )
        return out

    #: compute the image-key attention once and share it between NAG's two branches (attention_lse.py).
    #: False → the model's own attention gives Z⁺ and Z⁻ repeats the image-key part: the reference path
    #: the tests compare the shared one against (and the path taken when the model brings its own mask).
    share_image_attention = True

    def joint_attention(self, func, q, k, v, heads, mask, skip_reshape, kw, state, args, txt_len):
        bias = state.get("token_bias")
        ops = state.get("nag") or []
        if ops and mask is None and self.share_image_attention:
            return self.guided(func, q, k, v, heads, skip_reshape, kw, state, args, txt_len, bias, ops)
        if bias is not None and mask is None:
            out = self.suppressed(func, q, k, v, heads, skip_reshape, kw, bias.to(q.device), txt_len)
        elif bias is not None:  # the model brought its own mask: fold the bias into it
            out = func(
                q,
                k,
                v,
                heads,
                mask=self.folded_mask(q, mask, bias, txt_len, skip_reshape),
                skip_reshape=skip_reshape,
                **kw,
            )
        else:
            out = func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, **kw)
        if not ops:
            return out
        guided_rows = sorted({r for op in ops for r in op["rows"].tolist()})
        rows = torch.tensor(guided_rows, dtype=torch.long, device=q.device)
        image_qkv = tuple(_heads(_take(t, guided_rows), heads, skip_reshape)[:, :, txt_len:] for t in (q, k, v))
        img = lse.attention_lse(*image_qkv)
        z_pos = _image_part(out, txt_len, kw)[rows].float()
        z = self.guide(ops, guided_rows, z_pos, img, image_qkv, args, state["model"].diffusion_model)
        return _with_image_part(out, rows, z, txt_len, kw)

    def guided(self, func, q, k, v, heads, skip_reshape, kw, state, args, txt_len, bias, ops):
        """Joint attention with NAG: the host's attention for every text query and for the unguided rows;
        for the guided rows' image queries, Z⁺ = image-key part ⊕ prompt-key part, Z⁻ = the same image-key
        part ⊕ concept-key part (log-sum-exp merge: exact)."""
        seq = 2 if skip_reshape else 1
        L = q.shape[seq]
        guided_rows = sorted({r for op in ops for r in op["rows"].tolist()})
        others = [r for r in range(q.shape[0]) if r not in guided_rows]
        out_txt = func(q.narrow(seq, 0, txt_len), k, v, heads, mask=None, skip_reshape=skip_reshape, **kw)

        qh, kh, vh = (_heads(_take(t, guided_rows), heads, skip_reshape) for t in (q, k, v))
        q_img, k_img, v_img = (t[:, :, txt_len:] for t in (qh, kh, vh))
        img = lse.attention_lse(q_img, k_img, v_img)
        columns = None
        if bias is not None:  # token suppression composes: its column bias on the prompt keys of Z⁺
            columns = torch.zeros(len(guided_rows), txt_len, dtype=torch.float32, device=q.device)
            columns[:, txt_len - bias.shape[1] :] = _take(bias.to(q.device), guided_rows)
            columns = columns[:, None, None, :]
        prompt = lse.attention_lse(q_img, kh[:, :, :txt_len], vh[:, :, :txt_len], columns)
        z_pos = _to_seq(lse.merge(*img, *prompt)[0], True)
        z = self.guide(ops, guided_rows, z_pos, img, (q_img, k_img, v_img), args, state["model"].diffusion_model)

        if not others:  # the usual case (cfg 1, or every row guided): no scatter
            out_img = z.to(out_txt.dtype)
        else:
            rows = torch.tensor(guided_rows, dtype=torch.long, device=q.device)
            out_img = torch.empty((q.shape[0], L - txt_len, z.shape[-1]), dtype=out_txt.dtype, device=q.device)
            out_img[rows] = z.to(out_txt.dtype)
            q_o, k_o, v_o = (_take(t, others) for t in (q, k, v))
            q_o = q_o.narrow(seq, txt_len, L - txt_len)
            if bias is not None:
                cols = torch.zeros(len(others), L, dtype=torch.float32, device=q.device)
                cols[:, txt_len - bias.shape[1] : txt_len] = _take(bias.to(q.device), others)
                o = ts.suppressed_attention(
                    q_o,
                    k_o,
                    v_o,
                    heads,
                    cols,
                    lambda q_, k_, v_, h, mask=None: func(
                        q_, k_, v_, h, mask=mask, skip_reshape=skip_reshape, **dict(kw, skip_output_reshape=False)
                    ),
                )
            else:
                o = func(
                    q_o, k_o, v_o, heads, mask=None, skip_reshape=skip_reshape, **dict(kw, skip_output_reshape=False)
                )
            out_img[torch.tensor(others, dtype=torch.long, device=q.device)] = o
        if kw.get("skip_output_reshape"):
            return torch.cat((out_txt, _heads(out_img, heads, False)), dim=2)
        return torch.cat((out_txt, out_img), dim=1)

    def guide(self, ops, rows, z_pos, img, image_qkv, args, dm):
        """NAG on the image queries of the guided ``rows`` (a sorted list; z_pos: their (R, N, H·D) Z⁺ in
        float32, ``img``: their shared image-key attention, ``image_qkv``: their image q, k, v as
        (R, H, N, D)); each op takes the previous op's output as its Z⁺, so several concept guidances
        compose."""
        z = z_pos
        position = {r: i for i, r in enumerate(rows)}
        for op in ops:
            sub = [position[r] for r in op["rows"].tolist()]
            shared = tuple(_take(t, sub) for t in img)
            q_img, k_img, v_img = (_take(t, sub) for t in image_qkv)
            z_neg = _to_seq(self.negative_branch(op, op["rows"], q_img, k_img, v_img, shared, args, dm), True)
            if sub == list(range(len(rows))):
                z = cg.nag(z, z_neg, op["phi"], op["tau"], op["alpha"])
            else:
                index = torch.tensor(sub, dtype=torch.long, device=z.device)
                z = z.clone()
                z[index] = cg.nag(z[index], z_neg, op["phi"], op["tau"], op["alpha"])
        return z

    @staticmethod
    def suppressed(func, q, k, v, heads, skip_reshape, kw, bias, txt_len):
        """Image queries attend with the column bias as an additive (B, 1, 1, L) mask, text queries without
        it: two calls of the host's attention. Query rows are independent, so splitting them is exact."""
        seq = 2 if skip_reshape else 1  # Flux hands over (B, H, L, D), SD3 (B, L, H·D)
        L = q.shape[seq]
        offset = txt_len - bias.shape[1]  # SD3 register tokens sit before the context
        columns = torch.zeros(bias.shape[0], L, dtype=torch.float32, device=q.device)
        columns[:, offset:txt_len] = bias
        out_txt = func(q.narrow(seq, 0, txt_len), k, v, heads, mask=None, skip_reshape=skip_reshape, **kw)
        out_img = ts.suppressed_attention(
            q.narrow(seq, txt_len, L - txt_len),
            k,
            v,
            heads,
            columns,
            lambda q_, k_, v_, h, mask=None: func(q_, k_, v_, h, mask=mask, skip_reshape=skip_reshape, **kw),
        )
        return torch.cat((out_txt, out_img), dim=2 if kw.get("skip_output_reshape") else 1)

    @staticmethod
    def folded_mask(q, mask, bias, txt_len, skip_reshape):
        """The model's own mask plus the image-rows × concept-columns bias, as one additive (B, 1, L, L) mask."""
        L = q.shape[2 if skip_reshape else 1]
        offset = txt_len - bias.shape[1]
        full = torch.zeros(bias.shape[0], 1, L, L, dtype=torch.float32, device=q.device)
        full[:, 0, txt_len:, offset:txt_len] = bias[:, None, :]
        if mask.dtype == torch.bool:  # True = attend
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill(~mask, float("-inf"))
        while mask.ndim < 4:
            mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
        return (full + mask.float()).to(q.dtype)

    # NAG's negative branch: the concept text stream, propagated block by block like the prompt's (§5.4)
    def negative_branch(self, op, rows, q_img, k_img, v_img, shared, args, dm):
        """Z⁻ (R, H, N, D) for the image queries: the shared image-key part ⊕ the concept stream's keys.
        The concept stream's own queries attend to [concept, image] keys to carry it to the next block."""
        tk, tv = self.advance_concept_stream(op, rows, args, k_img, v_img, dm)
        concept = lse.attention_lse(q_img, tk, tv)
        return lse.merge(*shared, *concept)[0]

    def advance_concept_stream(self, op, rows, args, k_img, v_img, dm):
        """This block's work on the concept text stream: its (k, v) for Z⁻, and the stream carried on to the
        next block (its queries attend to [concept, image] keys). The share of NAG's cost that an exact
        NAG cannot avoid: the stream is as long as the concept's padded encoding (Flux: 256 T5 tokens)."""
        tq, tk, tv, carry = self.concept_stream(op, rows, args, k_img.dtype, dm)
        if carry is not None:
            attn = torch.nn.functional.scaled_dot_product_attention(
                tq, torch.cat((tk, k_img), 2), torch.cat((tv, v_img), 2)
            )
            carry(_to_seq(attn, True))
        return tk, tv

    def concept_stream(self, op, rows, args, dtype, dm):
        """(q, k, v) of the concept text stream in this block, (R, H, T⁻, D), and ``carry(attention)`` that
        finishes the block for the stream (None where no later block reads it)."""
        stream = op["stream"]
        vec = args["vec"][rows]
        if self.family == "flux":
            from comfy.ldm.flux.layers import apply_mod

            if "txt" not in stream:
                neg = op["neg"].to(vec.device, dm.txt_in.weight.dtype if hasattr(dm.txt_in, "weight") else dtype)
                stream["txt"] = dm.txt_in(neg).expand(len(rows), -1, -1)
            nt = stream["txt"]
            if self.kind == "double":
                block = dm.double_blocks[self.index]
                mod1, mod2 = block.txt_mod(vec)
                m = apply_mod(block.txt_norm1(nt), (1 + mod1.scale), mod1.shift)
                qkv = block.txt_attn.qkv(m)
                tq, tk, tv = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
                tq, tk = block.txt_attn.norm(tq, tk, tv)

                def carry_double(attn):
                    t = nt + apply_mod(block.txt_attn.proj(attn.to(nt.dtype)), mod1.gate)
                    stream["txt"] = t + apply_mod(
                        block.txt_mlp(apply_mod(block.txt_norm2(t), (1 + mod2.scale), mod2.shift)), mod2.gate
                    )

                return tq.to(dtype), tk.to(dtype), tv.to(dtype), carry_double
            else:
                block = dm.single_blocks[self.index]
                mod, _ = block.modulation(vec)
                xm = apply_mod(block.pre_norm(nt), (1 + mod.scale), mod.shift)
                qkv, mlp = torch.split(block.linear1(xm), [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
                tq, tk, tv = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
                tq, tk = block.norm(tq, tk, tv)

                def carry_single(attn):
                    out = block.linear2(torch.cat((attn.to(nt.dtype), block.mlp_act(mlp)), 2))
                    stream["txt"] = nt + apply_mod(out, mod.gate)

                last = self.index == len(dm.single_blocks) - 1  # only the image stream leaves the last block
                return tq.to(dtype), tk.to(dtype), tv.to(dtype), (None if last else carry_single)
        if self.family == "sd3":
            if "txt" not in stream:
                nctx = dm.context_embedder(op["neg"].to(vec.device, dtype)).expand(len(rows), -1, -1)
                if getattr(dm, "register_length", 0) > 0:
                    nctx = torch.cat((dm.register.to(nctx.dtype).expand(len(rows), -1, -1), nctx), 1)
                stream["txt"] = nctx
            block = dm.joint_blocks[self.index]
            (tq, tk, tv), inter = block.context_block.pre_attention(stream["txt"], vec)
            heads = block.context_block.attn.num_heads
            tq, tk, tv = (_heads(t, heads, False).to(dtype) for t in (tq, tk, tv))

            def carry(attn):
                stream["txt"] = block.context_block.post_attention(attn.to(stream["txt"].dtype), *inter)

            # the last joint block is context pre-only (no ``inter``): nothing reads its stream
            return tq, tk, tv, (carry if inter is not None else None)
        raise RuntimeError(f"concept guidance has no DiT branch for '{self.family}'")


#: the families whose concept guidance runs through the host's own blocks (``DitDispatch.host_block_guidance``)
HOST_BLOCK_NAG = ("chroma", "flux2", "qwen_image", "auraflow")
#: of those, the ones with no two-pass port: their concept stream rides in the block's one pass only
ONE_PASS_ONLY = ("auraflow",)
#: text rows a family's model puts before the context in its joint attention (AuraFlow's register tokens)
TEXT_BEFORE_CONTEXT = {"auraflow": aura.REGISTER_TOKENS}
#: Flux.2's context length at sampling: model_base.Flux2.extra_conds left-pads the context to 512 with zeros
FLUX2_TEXT_LEN = 512


def concept_text_stream(family: str, dm, context: torch.Tensor) -> torch.Tensor:
    """The text stream the first block reads for ``context`` (1, T, D), made as the model makes a prompt's:
    Flux.2 left-pads it to 512 (extra_conds), then txt_norm where the model has one (Flux.2 with the norm,
    Qwen-Image), then txt_in (Flux.forward_orig, Chroma.forward_orig, QwenImageTransformer2DModel._forward)."""
    if family == "auraflow":  # MMDiT._forward: cond_seq_linear, then the register tokens in front
        text = dm.cond_seq_linear(context)
        return torch.cat((dm.register_tokens.to(text.dtype).expand(text.shape[0], -1, -1), text), dim=1)
    if family == "flux2" and context.shape[1] < FLUX2_TEXT_LEN:
        context = torch.nn.functional.pad(context, (0, 0, FLUX2_TEXT_LEN - context.shape[1], 0))
    norm = getattr(dm, "txt_norm", None)
    if norm is not None:
        context = norm(context)
    return dm.txt_in(context)


def text_position_ids(family: str, dm, length: int, latent_shape) -> torch.Tensor:
    """(1, length, 3) rotary position ids of a text of ``length`` tokens, as the model assigns them: Chroma
    all zeros; Flux.2 zeros but ``params.txt_ids_dims`` counting 0…T−1 (Flux.forward); Qwen-Image every axis
    counting from txt_start, which follows from the latent's size (QwenImageTransformer2DModel._forward)."""
    if family == "qwen_image":
        p = int(dm.patch_size)
        h, w = int(latent_shape[-2]), int(latent_shape[-1])
        start = round(max(((w + (p // 2)) // p) // 2, ((h + (p // 2)) // p) // 2))
        return torch.arange(start, start + length, dtype=torch.float32).reshape(1, -1, 1).repeat(1, 1, 3)
    axes = len(dm.pe_embedder.axes_dim)
    ids = torch.zeros((1, length, axes), dtype=torch.float32)
    if family == "flux2":
        for i in getattr(dm.params, "txt_ids_dims", []) or []:
            ids[:, :, i] = torch.arange(length, dtype=torch.float32)
    return ids


def concept_rotary(family: str, dm, pe: torch.Tensor, txt_len: int, n_concept: int, state: dict) -> torch.Tensor:
    """The block's rotary table with the prompt's T text rows replaced by the concept's: the image rows are
    the prompt's, the concept's text rows are computed by the model's own pe_embedder. Fails closed when the
    text rows this computes for the prompt are not the ones the model passed (another ComfyUI's layout)."""
    return _rotary_with_concepts(family, dm, pe, txt_len, [n_concept], state, keep_prompt=False)


def joint_rotary(family: str, dm, pe: torch.Tensor, txt_len: int, lengths: list, state: dict) -> torch.Tensor:
    """The rotary table of [prompt text ‖ concept texts of ``lengths`` ‖ image] (``inline_guidance``): each
    concept's rows are the positions the model gives a prompt of that length."""
    return _rotary_with_concepts(family, dm, pe, txt_len, lengths, state, keep_prompt=True)


def _rotary_with_concepts(family, dm, pe, txt_len, lengths, state, keep_prompt):
    # EmbedND gives (B, 1, L, …); Qwen-Image in ComfyUI 0.3.x moved the sequence to axis 1: (B, L, 1, …)
    seq = 2 if pe.shape[1] == 1 else 1

    def rotary(length: int) -> torch.Tensor:
        table = dm.pe_embedder(text_position_ids(family, dm, length, state.get("latent_shape")).to(pe.device))
        return (table if seq == 2 else table.squeeze(1).unsqueeze(2)).to(pe.dtype)

    mine = rotary(txt_len)
    prompt_rows = pe[:1].narrow(seq, 0, txt_len).float()
    same = mine.shape == prompt_rows.shape and torch.allclose(mine.float(), prompt_rows, atol=1e-4)
    if not same:
        raise RuntimeError(
            f"Concept guidance could not reproduce the {family} model's rotary positions of its {txt_len} text "
            "tokens (this ComfyUI assigns them differently), so the concept's cannot be made: stopped at the first "
            "step rather than sampling unguarded."
        )
    texts = [pe.narrow(seq, 0, txt_len)] if keep_prompt else []
    texts += [(lambda t: t.expand(pe.shape[0], *t.shape[1:]))(rotary(n)) for n in lengths]
    image = pe.narrow(seq, txt_len, pe.shape[seq] - txt_len)
    return torch.cat((*texts, image), dim=seq)


def take_rows(obj, rows: torch.Tensor, batch: int):
    """``obj`` restricted to the batch ``rows``: tensors whose first axis is the batch are indexed, tuples,
    lists and dataclasses (Chroma's / Flux.2's modulation records) are mapped; a batch-1 table is kept."""
    import dataclasses

    if torch.is_tensor(obj):
        return obj[rows.to(obj.device)] if obj.ndim and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(take_rows(o, rows, batch) for o in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: take_rows(getattr(obj, f.name), rows, batch) for f in dataclasses.fields(obj)}
        )
    return obj


def _image_part(out: torch.Tensor, txt_len: int, kw: dict) -> torch.Tensor:
    """The image queries' rows of a joint attention output, as (B, N, H·D)."""
    if kw.get("skip_output_reshape"):  # (B, H, L, D)
        return _to_seq(out[:, :, txt_len:], True)
    return out[:, txt_len:]


def _with_image_part(out: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, txt_len: int, kw: dict) -> torch.Tensor:
    """A copy of ``out`` whose ``rows`` have the image part ``z`` (R, N, H·D)."""
    out = out.clone()
    if kw.get("skip_output_reshape"):
        out[rows, :, txt_len:] = _heads(z, out.shape[1], False).to(out.dtype)
    else:
        out[rows, txt_len:] = z.to(out.dtype)
    return out


def _host_call(previous, func, q, k, v, heads, rest, mask, skip_reshape, kw):
    """The attention call as the model made it (through any override installed before ours); a mask the
    model passed positionally is in ``rest``."""
    kw = dict(kw, skip_reshape=skip_reshape) if rest else dict(kw, mask=mask, skip_reshape=skip_reshape)
    if previous is not None:
        return previous(func, q, k, v, heads, *rest, **kw)
    return func(q, k, v, heads, *rest, **kw)


def table_joint_attention(
    func, q, k, v, heads, rest, mask, skip_reshape, kw, state, text_start, image_start, joint_len, previous
):
    """A family-table model's joint attention [text ‖ image] of ``joint_len`` positions: the image queries
    [image_start, L) get the context's column bias at [text_start, text_start + T); a call of another length
    (a text-only refiner, an image-only one) runs unchanged. A mask the model passes positionally (Qwen-Image,
    Lumina 2) is kept and added to."""
    host_rest, host_mask = rest, mask
    if rest and mask is None:
        mask, rest = rest[0], rest[1:]
    length = q.shape[2] if skip_reshape else q.shape[1]
    bias = state.get("token_bias")
    if length != joint_len or rest or bias is None:
        return _host_call(previous, func, q, k, v, heads, host_rest, host_mask, skip_reshape, kw)
    state["acted"][0] += 1
    columns = joint.joint_column_bias(bias.to(q.device), length, text_start)
    seq = 2 if skip_reshape else 1
    out_seq = 2 if kw.get("skip_output_reshape") else 1
    return joint.joint_suppressed_attention(
        q,
        k,
        v,
        heads,
        columns,
        image_start,
        lambda q_, k_, v_, h, mask=None: func(q_, k_, v_, h, mask=mask, skip_reshape=skip_reshape, **kw),
        seq,
        out_seq,
        mask,
    )


#: families whose joint layers have no per-block replace hook: reached through a model-wide override
MODEL_LEVEL_FAMILIES = ("lumina2", "zimage")
LAYOUTS = {
    "chroma": "Flux double/single blocks, text first",
    "flux2": "Flux double/single blocks, text first (context left-padded to 512)",
    "qwen_image": "joint blocks, text first, text mask",
    "lumina2": "joint layers [caption ‖ image] after the caption and noise refiners",
    "zimage": "joint layers [caption padded to 32 ‖ image padded to 32] after the refiners",
    "wan": "per-block cross-attention to the 512 text rows",
    "hidream": "[image ‖ T5 ‖ Llama initial ‖ Llama layer i] in every block",
    "auraflow": "[8 registers ‖ Pile-T5 text ‖ image] in every double and single layer",
}


def lumina_lengths(dm, x: torch.Tensor, context_len: int) -> tuple:
    """(caption length, joint length) of NextDiT's main layers (comfy/ldm/lumina/model.py): the caption
    rows, padded to ``pad_tokens_multiple`` with ``cap_pad_token`` (Z-Image), then the image patches,
    padded likewise."""
    multiple = getattr(dm, "pad_tokens_multiple", None)
    p = int(dm.patch_size)
    h, w = x.shape[-2], x.shape[-1]
    caption, image = context_len, (-(-h // p)) * (-(-w // p))
    if multiple:
        caption += (-caption) % multiple
        image += (-image) % multiple
    return caption, caption + image


class ModelLevelJoint:
    """``optimized_attention_override`` for one Lumina 2 / Z-Image model call: acts only in the attentions
    of the joint length (the main layers; the caption and noise refiners are shorter), where the caption
    sits first: text keys [0, T), its padding up to ``image_start``, then the image."""

    def __init__(self, joint_len: int, image_start: int, state: dict, previous=None):
        self.joint_len, self.image_start, self.state, self.previous = joint_len, image_start, state, previous

    def __call__(self, func, q, k, v, heads, *rest, mask=None, skip_reshape=False, **kw):
        return table_joint_attention(
            func,
            q,
            k,
            v,
            heads,
            rest,
            mask,
            skip_reshape,
            kw,
            self.state,
            0,
            self.image_start,
            self.joint_len,
            self.previous,
        )

    def __deepcopy__(self, memo):
        return self


def dit_sites(family: str, diffusion_model) -> list:
    """(kind, index) of every joint-attention block: Flux double + single blocks (Chroma and Flux.2 too),
    SD3 joint blocks, Qwen-Image's transformer blocks and Wan's blocks (both replaced as "double_block").
    Lumina 2 / Z-Image have none: their token suppression is a model-wide override (``ModelLevelJoint``)."""
    if family in ("chroma", "flux2"):
        family = "flux"
    if family == "qwen_image":
        return [("double", i) for i in range(len(diffusion_model.transformer_blocks))]
    if family == "wan":
        return [("double", i) for i in range(len(diffusion_model.blocks))]
    if family == "flux":
        return [("double", i) for i in range(len(diffusion_model.double_blocks))] + [
            ("single", i) for i in range(len(diffusion_model.single_blocks))
        ]
    if family == "sd3":
        return [("double", i) for i in range(len(diffusion_model.joint_blocks))]
    if family == "auraflow":  # MMDiT's double_layers / single_layers, replaced as double_block / single_block
        return [("double", i) for i in range(len(diffusion_model.double_layers))] + [
            ("single", i) for i in range(len(diffusion_model.single_layers))
        ]
    return []


# -- SAFREE: swap the positive conditioning inside the filter window -----------------------------------


def make_safree_wrapper(
    result,
    prompt_ref: torch.Tensor,
    sigma_start: float,
    sigma_end: float,
    negative_ref: Optional[torch.Tensor] = None,
    pooled_ref: Optional[torch.Tensor] = None,
    allow_pass_through: bool = False,
    unique_id=None,
) -> Callable:
    """APPLY_MODEL wrapper: rows of the positive branch whose context is the analysed prompt's encoding
    get the projected context (and pooled ``y`` on DiTs); with ``negative_ref`` (keywords as negative) the
    negative rows get the keyword encoding. Other prompts pass through unchanged. A context the model
    left-padded (Flux.2 pads it to 512 with zero rows in front, ``locate``) gets the projection behind its
    padding, the padding rows untouched."""
    projected = result.hidden
    warned = {}

    def apply_model_wrapper(
        executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        if c_crossattn is None or not in_window(t, sigma_start, sigma_end):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        chunks = transformer_options.get("cond_or_uncond")
        rows = set(cond_rows(chunks, c_crossattn.shape[0]).tolist())
        new_ctx, new_y, changed = None, None, False
        for r in range(c_crossattn.shape[0]):
            row = c_crossattn[r]
            offset = locate(row, prompt_ref) if r in rows else None
            if offset is not None and result.changed:
                if new_ctx is None:
                    new_ctx = c_crossattn.clone()
                if offset:
                    new_ctx[r, offset:] = projected.to(row.device, row.dtype)
                else:
                    new_ctx[r] = tile_to(projected.to(row.device, row.dtype), row.shape[0])
                y = kwargs.get("y")
                if result.pooled is not None and y is not None:
                    new_y = y.clone() if new_y is None else new_y
                    width = result.pooled.shape[-1]
                    new_y[r, :width] = result.pooled.to(y.device, y.dtype)
                changed = True
            elif r in rows and offset is None and not warned.get("prompt"):
                warned["prompt"] = True
                log.warning(
                    "SAFREE: the positive conditioning is not the prompt given to the SAFREE node; that "
                    "conditioning is left unchanged (type the same prompt into both)."
                )
            elif r not in rows and negative_ref is not None:
                if row.shape[0] % negative_ref.shape[0] == 0:
                    if new_ctx is None:
                        new_ctx = c_crossattn.clone()
                    new_ctx[r] = tile_to(negative_ref.to(row.device, row.dtype), row.shape[0])
                    changed = True
                elif not warned.get("negative"):
                    # the option was asked for: a negative row it cannot replace is refused, not skipped
                    from .fail_closed import cannot

                    cannot(
                        "SAFREE",
                        f"keywords_as_negative: the negative conditioning has {row.shape[0]} rows and the keywords' "
                        f"encoding {negative_ref.shape[0]}, which is not a whole multiple of it, so it cannot replace "
                        "them in the batch. Shorten the keyword list, or type the keywords into the negative "
                        "prompt's CLIP Text Encode and turn keywords_as_negative off.",
                        allow_pass_through,
                        unique_id,
                    )
                    warned["negative"] = True
        if not changed:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if new_y is not None:
            kwargs = dict(kwargs, y=new_y)
        return executor(x, t, c_concat, new_ctx, control, transformer_options, **kwargs)

    return apply_model_wrapper


def make_hidream_safree_wrapper(
    t5_result, t5_window: tuple, llama_results: dict, llama_windows: dict, prompt_ref: torch.Tensor, llama_ref
) -> Callable:
    """APPLY_MODEL wrapper for SAFREE on HiDream-I1 (the pack's port: one projection per text stream). Rows of
    the positive branch whose T5 context and per-layer Llama states are the analysed prompt's get, while σ is
    in each stream's own window (its self-validation t′), the projected T5 context (and pooled ``y``) and the
    projected rows of each Llama layer; other prompts pass through unchanged (the prompt check refuses a
    sampler whose positive conditioning is another text before the first step)."""
    warned = {}

    def apply_model_wrapper(
        executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        t5_on = t5_result.changed and in_window(t, *t5_window)
        layers_on = [layer for layer, r in llama_results.items() if r.changed and in_window(t, *llama_windows[layer])]
        if c_crossattn is None or not (t5_on or layers_on):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        llama = kwargs.get("encoder_hidden_states_llama3")
        rows = cond_rows(transformer_options.get("cond_or_uncond"), c_crossattn.shape[0]).tolist()
        new_ctx, new_llama, new_y = None, None, None
        for r in rows:
            same_llama = (
                llama is not None
                and llama.shape[1:] == llama_ref.shape
                and bool(torch.allclose(llama[r].float(), llama_ref.to(llama.device), rtol=1e-3, atol=1e-3))
            )
            if not matches(c_crossattn[r], prompt_ref) or not same_llama:
                if not warned.get("prompt"):
                    warned["prompt"] = True
                    log.warning(
                        "SAFREE: the positive conditioning is not the prompt given to the SAFREE node; that "
                        "conditioning is left unchanged (type the same prompt into both)."
                    )
                continue
            if t5_on:
                new_ctx = c_crossattn.clone() if new_ctx is None else new_ctx
                new_ctx[r] = tile_to(t5_result.hidden.to(c_crossattn.device, c_crossattn.dtype), c_crossattn.shape[1])
                y = kwargs.get("y")
                if t5_result.pooled is not None and y is not None:
                    new_y = y.clone() if new_y is None else new_y
                    new_y[r, : t5_result.pooled.shape[-1]] = t5_result.pooled.to(y.device, y.dtype)
            for layer in layers_on:
                new_llama = llama.clone() if new_llama is None else new_llama
                new_llama[r, layer] = llama_results[layer].hidden.to(llama.device, llama.dtype)
        if new_ctx is None and new_llama is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if new_y is not None:
            kwargs = dict(kwargs, y=new_y)
        if new_llama is not None:
            kwargs = dict(kwargs, encoder_hidden_states_llama3=new_llama)
        ctx = new_ctx if new_ctx is not None else c_crossattn
        return executor(x, t, c_concat, ctx, control, transformer_options, **kwargs)

    return apply_model_wrapper


def make_prompt_check(node: str, prompt_ref: torch.Tensor, allow_pass_through: bool, unique_id=None) -> Callable:
    """OUTER_SAMPLE wrapper run once before the first step: every positive conditioning the sampler got must
    be the encoding of the prompt the node analysed. Otherwise (the text encoder holds another text, or
    several prompts are combined) that conditioning would be sampled unguarded — refused before sampling."""
    from .fail_closed import cannot

    def outer_sample_wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        conds = [c.get("cross_attn") for c in (getattr(guider, "conds", None) or {}).get("positive", []) or []]
        foreign = [c for c in conds if c is not None and not matches(c[0], prompt_ref)]
        if foreign:
            cannot(
                node,
                f"{len(foreign)} of the sampler's {len(conds)} positive conditioning(s) is not the encoding of "
                "the prompt this node analysed, so it would be sampled unguarded. Give the node the same text as "
                "the CLIP Text Encode node (or leave its prompt empty to read it from the workflow).",
                allow_pass_through,
                unique_id,
            )
        return executor(*args, **kwargs)

    return outer_sample_wrapper


# -- SLD: a pre-CFG function with one extra model pass for the safety concept -------------------------


def step_index(sigma, sample_sigmas) -> tuple:
    """(i, number of steps) of σ in the run's schedule; (−1, 0) when the schedule is unknown."""
    if sample_sigmas is None:
        return -1, 0
    s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    ss = sample_sigmas.flatten().float().cpu()
    return int((ss - s).abs().argmin()), max(len(ss) - 1, 1)


def make_sld_pre_cfg(
    config,
    safety_cond,
    parameterisation: str,
    sigma_start: float,
    sigma_end: float,
    safety_hidden: torch.Tensor,
    skip_first: bool = True,
    calc=None,
    allow_pass_through: bool = False,
    unique_id=None,
) -> Callable:
    """sampler_pre_cfg_function: ε_p′ = ε_p − 𝟙γ (SLD §2.1) before the host's CFG combines the branches.

    ``safety_cond`` is the safety concept's conditioning in the host's list form; ``calc(model, cond, x,
    sigma, model_options) → x₀`` runs the extra pass (ComfyUI: encode_model_conds + calc_cond_batch).
    """
    from ..erasers.guards import sld

    state = sld.SLDState()
    gate = GateLog("SLD", config.risk_gate)
    warned = {}

    from .fail_closed import cannot

    def refuse_once(what: str, reason: str) -> None:
        # the first step: nothing has been denoised yet, so an error here still comes before any image
        if not warned.get(what):
            cannot("Safe Latent Diffusion", reason, allow_pass_through, unique_id)
            warned[what] = True  # only reached with pass-through allowed: warn once, never skip a refusal

    def pre_cfg_function(args):
        out = args["conds_out"]
        if len(out) < 2 or out[1] is None:
            refuse_once(
                "uncond",
                "the sampler ran no negative (unconditional) branch — ComfyUI skips it at cfg 1 — and SLD "
                "guides relative to it. Set cfg above 1.",
            )
            return out
        x, sigma = args["input"], args["sigma"]
        model_options = args["model_options"]
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        i, total = step_index(sigma, sample_sigmas)
        if i <= 0:
            state.reset()
        if not in_window(sigma, sigma_start, sigma_end):
            return out
        if sample_sigmas is None:  # only inside the window does SLD need the schedule
            refuse_once(
                "sigmas",
                "the sampler does not publish its schedule (transformer_options['sample_sigmas']), which SLD's "
                "warm-up counts steps on. Use a KSampler / SamplerCustom node.",
            )
            return out
        ctx = _positive_context(args.get("conds"))
        if ctx is not None and not gate(ctx, safety_hidden, skip_first):
            return out
        x0_safety = (calc or _comfy_calc)(args["model"], safety_cond, x, sigma, model_options)
        eps_p = sld.to_guidance_space(x, out[0], sigma, parameterisation)
        eps_u = sld.to_guidance_space(x, out[1], sigma, parameterisation)
        eps_s = sld.to_guidance_space(x, x0_safety, sigma, parameterisation)
        state.step = max(i, 0)
        gamma = sld.sld_gamma(eps_u, eps_p, eps_s, state, config, config.warmup_for(total))
        cond = sld.from_guidance_space(x, sld.apply_to_cond(eps_p, gamma), sigma, parameterisation)
        return [cond] + list(out[1:])

    return pre_cfg_function


def _positive_context(conds):
    try:
        return conds[0][0]["model_conds"]["c_crossattn"].cond[0]
    except (TypeError, KeyError, IndexError, AttributeError):
        return None


def _comfy_calc(model, safety_cond, x, sigma, model_options):
    import comfy.samplers

    processed = comfy.samplers.encode_model_conds(model.extra_conds, safety_cond, x, x.device, "positive")
    (x0,) = comfy.samplers.calc_cond_batch(model, [processed], x, sigma, model_options)
    return x0
