"""ComfyUI nodes for sampling-time suppression: SAFREE, SLD, concept guidance, token suppression.

Each node: validate → ``m = model.clone()`` → register closures through named hooks → return m.
No weight is touched; strength 0 returns the clone unpatched (bit-identical output).
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..erasers.errors import UnsupportedFamily
from ..erasers.guards import safree, sld
from ..erasers.guards.base import preset_names, sigma_window
from ..erasers.guards.concept_guidance import ALPHA, ConceptGuidanceConfig
from ..erasers.guards.token_suppress import TokenSuppressConfig
from ..erasers.text import split_concepts
from . import prompt_trace
from . import suppression_clip as sc
from . import suppression_hooks as hooks
from .fail_closed import cannot, pass_through_input, rerun_every_queue

log = logging.getLogger(__name__)

CATEGORY = "concept_erasers/suppression"
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
#: families whose host encoder returns one row per token (no padding to a fixed length): a keyword encoding
#: cannot stand in for a negative prompt's rows in a batch, so keywords_as_negative is refused on them
UNPADDED_CONDITIONING = sc.LLM_FAMILIES + ("chroma",)


def common_inputs():
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="0 switches the method off"),
        io.Float.Input(
            "start_percent",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where in the schedule the method starts acting (0 = first step).",
        ),
        io.Float.Input(
            "end_percent",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Where in the schedule the method stops acting (1 = last step).",
        ),
        io.Float.Input(
            "risk_gate",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="prompts whose similarity to the concepts is below this are left untouched (0 = off)",
        ),
        pass_through_input(),
    ]


def window(m, config):
    return sigma_window(
        m.get_model_object("model_sampling").percent_to_sigma, config.start_percent, config.end_percent
    )


def register_attention(m, family: str, node: str, allow_pass_through: bool = False, unique_id=None) -> None:
    """Install the shared dispatchers once; a second suppression node reuses them (methods compose).

    A block whose attention another node already replaced (not one of ours) cannot be composed with: the
    suppression would silently not act there, so that is refused unless the user allows pass-through."""
    patches_replace = m.model_options.setdefault("transformer_options", {}).get("patches_replace", {})
    owned, todo = [], []
    if family in UNET_FAMILIES:
        current = patches_replace.get("attn2", {})
        dispatch = hooks.Attn2Dispatch()
        for name, number, index in hooks.unet_attn2_sites(m.model.diffusion_model.state_dict().keys()):
            existing = current.get((name, number, index)) or current.get((name, number))
            if isinstance(existing, hooks.Attn2Dispatch):
                continue
            if existing is not None:
                owned.append((name, number, index))
                continue
            todo.append(lambda n=name, k=number, i=index: m.set_model_attn2_replace(dispatch, n, k, i))
    else:
        current = patches_replace.get("dit", {})
        for kind, index in hooks.dit_sites(family, m.model.diffusion_model):
            key = ("double_block" if kind == "double" else "single_block", index)
            existing = current.get(key)
            if isinstance(existing, hooks.DitDispatch):
                continue
            if existing is not None:
                owned.append(key)
                continue
            todo.append(
                lambda k=key, d=hooks.DitDispatch(family, kind, index): m.set_model_patch_replace(d, "dit", k[0], k[1])
            )
    if owned:
        cannot(
            node,
            f"another node already replaced the attention of {len(owned)} block(s) ({', '.join(map(str, owned[:3]))}"
            f"{', …' if len(owned) > 3 else ''}); this node cannot act inside a replacement it does not own. Put "
            "this node before that one, or remove it.",
            allow_pass_through,
            unique_id,
        )
    for install in todo:
        install()


def add_wrapper(m, name: str, wrapper, kind: str = "APPLY_MODEL") -> None:
    import comfy.patcher_extension

    m.add_wrapper_with_key(getattr(comfy.patcher_extension.WrappersMP, kind), f"{hooks.WRAPPER_KEY}.{name}", wrapper)


def add_hidream_joint(m) -> None:
    """HiDream-I1's joint-attention override, installed per model call by one DIFFUSION_MODEL wrapper that
    token suppression and concept guidance share (registered once per model)."""
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    key = f"{hooks.WRAPPER_KEY}.{hooks.HIDREAM_JOINT_KEY}"
    if not m.get_wrappers(kind, key):
        m.add_wrapper_with_key(kind, key, hooks.make_hidream_joint_wrapper())


class EraserSAFREE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserSAFREE",
            display_name="SAFREE concept projection",
            category=CATEGORY,
            description="Projects the prompt tokens that carry the concepts out of the concept subspace "
            "(SAFREE); prompts with no flagged token stay bit-identical. svf_window 'paper' uses the projection "
            "on the first ≤ 22 % of the schedule: it only helps models that commit to the concept early. "
            "'whole' (recommended for models that decide late) keeps self-validation as an on/off switch and "
            "projects over the whole schedule. Shapes world (decides late), 'circle' 94 % base: paper 83 % "
            "exact / 100 % paraphrases, whole 33 % / 53 % at full fidelity on other shapes; held-out 'square' "
            "100 % → 59 % / 75 %. It about halves the rate and does not erase; not selective on colours ('red': "
            "the other colours kept 51 %). erasers_dev/bench/results/guards/DIAGNOSTICS.md.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Clip.Input(
                    "clip", tooltip="The text encoder loaded with this model; concepts are encoded with it."
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="the positive prompt text, the same as in CLIP Text Encode (CONDITIONING "
                    "carries no text). Empty: taken from the text encoder behind the positive "
                    "input of the sampler that uses this model; a warning says when it cannot",
                ),
                io.String.Input("concepts", multiline=True, default="", tooltip="empty → the preset's keywords"),
                io.Combo.Input(
                    "preset",
                    options=preset_names(),
                    default="nudity",
                    tooltip="keyword list used when concepts is empty (files in erasers/data/presets)",
                ),
                io.Float.Input(
                    "alpha",
                    default=0.01,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="detection margin α of the masked-token test (paper: 0.01)",
                ),
                io.Boolean.Input(
                    "include_eos",
                    default=True,
                    tooltip="also project the EOS/padding positions, which carry the concept in causal CLIP. "
                    "Flux.2 / Qwen-Image / Lumina 2 / Z-Image: the prompt's rows after the flagged word (a causal "
                    "decoder carries it forward); their template rows and padding are never projected",
                ),
                io.Boolean.Input(
                    "self_validating",
                    default=True,
                    tooltip="SAFREE's self-validation t′ (per prompt): use the projection only on the steps it "
                    "selects (which: svf_window); off = the projection on every step",
                ),
                io.Boolean.Input(
                    "keywords_as_negative",
                    default=False,
                    tooltip="also use the joined keywords as the negative prompt (the reference always does)",
                ),
            ]
            + [i for i in common_inputs() if i.id != "allow_pass_through"]
            # after risk_gate and optional: a UI workflow saved before this input loads its widget values
            # unshifted, and an API prompt without it runs as before (the paper window)
            + [
                io.Combo.Input(
                    "svf_window",
                    options=list(safree.SVF_WINDOWS),
                    default="paper",
                    optional=True,
                    tooltip="where the self-validated projection acts. paper: steps ≤ t′ of 50 from the start "
                    "(≤ 22 % of the schedule, the paper's window). whole: t′ as an on/off switch per prompt, "
                    "the projection over the whole schedule when on, for models that decide the concept late. "
                    "Measured on the shapes world, paper → whole: 'circle' exact 83 % → 33 %, paraphrases 100 % → "
                    "53 %; held-out 'square' 94 % → 59 %, 100 % → 75 %; other shapes kept (100 %). On a colour "
                    "('red') not selective: the other colours 102 % → 51 %. Ignored when self_validating is off.",
                ),
                pass_through_input(),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        prompt,
        concepts,
        preset,
        alpha,
        include_eos,
        self_validating,
        keywords_as_negative,
        strength,
        start_percent,
        end_percent,
        risk_gate,
        svf_window="paper",
        allow_pass_through=False,
    ) -> io.NodeOutput:
        config = safree.SAFREEConfig(
            concepts=split_concepts(concepts),
            preset=preset,
            alpha=alpha,
            include_eos=include_eos,
            self_validating=self_validating,
            svf_window=svf_window,
            keywords_as_negative=keywords_as_negative,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            risk_gate=risk_gate,
        )
        family = sc.model_family(model, "safree")
        m = model.clone()
        if not config.active:
            return io.NodeOutput(m)
        uid = _uid(cls)
        prompt = prompt.strip() or cls.recover_prompt(allow_pass_through)
        if not prompt:
            return io.NodeOutput(m)
        if keywords_as_negative and family in UNPADDED_CONDITIONING:
            raise UnsupportedFamily(
                f"SAFREE on {family}: keywords_as_negative cannot be applied: this family's conditionings are not "
                "padded to one length, so the keyword encoding cannot replace the negative rows. Type the keywords "
                "into the negative prompt's CLIP Text Encode instead and turn keywords_as_negative off."
            )
        if family == "hidream":
            return io.NodeOutput(cls.apply_hidream(m, config, clip, prompt, allow_pass_through, uid))
        if family in sc.LLM_FAMILIES:
            prompt_ctx, result = cls.analyse_chat(config, clip, prompt, family)
        else:
            prompt_ctx, result = cls.analyse_clip_t5(config, clip, prompt, family)
        negative = sc.encode(clip, safree.joined_keywords(config))[0][0] if keywords_as_negative else None
        # even a prompt SAFREE leaves alone is checked at sampling: the sampler must use the analysed prompt
        check = hooks.make_prompt_check("SAFREE", prompt_ctx[0], allow_pass_through, uid)
        add_wrapper(m, "safree_check", check, kind="OUTER_SAMPLE")
        if not result.changed and negative is None:
            return io.NodeOutput(m)
        end = min(config.end_percent, result.filter_fraction) if result.changed else config.end_percent
        s_start, s_end = sigma_window(m.get_model_object("model_sampling").percent_to_sigma, config.start_percent, end)
        wrapper = hooks.make_safree_wrapper(
            result, prompt_ctx[0], s_start, s_end, negative, allow_pass_through=allow_pass_through, unique_id=uid
        )
        add_wrapper(m, "safree", wrapper)
        return io.NodeOutput(m)

    @staticmethod
    def analyse_clip_t5(config, clip, prompt, family, prepared=None, masked=None) -> tuple:
        """SD1.x–SDXL (CLIP), SD3 / Flux.1 / Chroma / Wan (T5): (prompt context (1, T, D), SafreeResult).
        ``prepared``: ``masked_token_dicts``' output, ``masked``: its copies' contexts, when encoded elsewhere
        (HiDream: beside the Llama stream's copies)."""
        # the masked copy's id: T5's padding, CLIP's "!" (the reference's id 0)
        mask_id = sc.pad_id(family) if sc.is_t5(family) else safree.CLIP_MASK_ID
        tokens, positions, copies, n_real = prepared or sc.masked_token_dicts(clip, prompt, family, mask_id)
        prompt_ctx, prompt_pooled = sc.encode(clip, tokens)
        masked = masked if masked is not None else [sc.encode(clip, t)[0][0] for t in copies]
        length = min([prompt_ctx.shape[1]] + [c.shape[0] for c in masked])
        masked_ctx = torch_stack([c[:length] for c in masked], prompt_ctx)
        concept_ctx, concept_pooled, concept_lengths, _ = sc.encode_many(clip, config.concepts)
        t5 = sc.is_t5(family)
        token_range = (sc.token_offset(family), prompt_ctx.shape[1]) if family == "sd3" else None
        result = safree.analyse(
            config,
            prompt_ctx[0],
            n_real,
            positions,
            masked_ctx,
            torch_full(len(masked), n_real),
            concept_ctx,
            concept_lengths,
            encoder="t5" if t5 else "clip",
            segments=safree.SEGMENTS.get(family),
            prompt_pooled=prompt_pooled[0] if (t5 and prompt_pooled is not None) else None,
            concept_pooled=concept_pooled if t5 else None,
            token_range=token_range,
        )
        return prompt_ctx, result

    @classmethod
    def apply_hidream(cls, m, config, clip, prompt, allow_pass_through, uid):
        """HiDream-I1 (the pack's port): SAFREE once per text stream the blocks read — T5 as on Flux.1 (with
        the pooled CLIP vector), each Llama layer in the "llm" layout (its own rows, its own concept subspace,
        its own self-validation window)."""
        if config.keywords_as_negative:
            raise UnsupportedFamily(
                "SAFREE on HiDream-I1: keywords_as_negative is not ported (the negative would need the keywords' "
                "T5 and Llama conditioning in the batch). Type the keywords into the negative prompt's text "
                "encoder instead and turn keywords_as_negative off."
            )
        clip = sc.EncodeOnce(clip)  # the prompt and the keywords are asked for by both streams' helpers
        layers = sorted(set(int(layer) for layer in m.model.diffusion_model.llama_layers))
        prepared = sc.masked_token_dicts(clip, prompt, "hidream", sc.pad_id("hidream"))
        # one encode per masked position serves both streams (the four encoders run independently)
        llama = sc.hidream_llama_safree(clip, prompt, config.concepts, layers, t5_copies=prepared[2])
        prompt_ctx, t5_result = cls.analyse_clip_t5(
            config, clip, prompt, "hidream", prepared=prepared, masked=llama.t5_masked
        )
        llama_results = {
            layer: safree.analyse(
                config,
                llama.llama[layer],
                llama.own,
                llama.positions,
                llama.masked[layer],
                torch_full(len(llama.positions), llama.own),
                llama.concepts[layer],
                llama.concept_lengths,
                encoder="llm",
                token_range=(0, llama.own),
            )
            for layer in layers
        }
        add_wrapper(
            m,
            "safree_check",
            hooks.make_prompt_check("SAFREE", prompt_ctx[0], allow_pass_through, uid),
            "OUTER_SAMPLE",
        )
        if not t5_result.changed and not any(r.changed for r in llama_results.values()):
            return m
        to_sigma = m.get_model_object("model_sampling").percent_to_sigma

        def window_of(result):
            return sigma_window(to_sigma, config.start_percent, min(config.end_percent, result.filter_fraction))

        wrapper = hooks.make_hidream_safree_wrapper(
            t5_result,
            window_of(t5_result),
            llama_results,
            {layer: window_of(r) for layer, r in llama_results.items()},
            prompt_ctx[0],
            llama.llama,
        )
        add_wrapper(m, "safree", wrapper)
        return m

    @staticmethod
    def analyse_chat(config, clip, prompt, family) -> tuple:
        """Flux.2, Qwen-Image, Lumina 2, Z-Image (decoder LLMs behind a chat template or a start token; the
        pack's port, erasers/guards/safree.py): the prompt's own rows are found inside the host's template and
        checked before anything is patched; masked copies replace one own token each with the host's id for
        "!"; pooled vectors are means over own rows; only own rows are projected."""
        layout = sc.chat_layout(clip, family)
        text = sc.chat_text(clip, layout, prompt)
        positions, masked_ctx = sc.chat_masked_copies(clip, layout, text)
        concept_rows, concept_lengths = sc.chat_concepts(clip, layout, config.concepts)
        lo, hi = text.rows
        result = safree.analyse(
            config,
            text.context,
            hi - lo,
            positions,
            masked_ctx,
            torch_full(len(positions), hi - lo),
            concept_rows,
            concept_lengths,
            encoder="llm",
            token_range=(lo, hi),
        )
        return text.context[None], result

    @classmethod
    def fingerprint_inputs(cls, prompt="", **inputs):
        # an empty prompt is read from the workflow graph, which ComfyUI's cache key does not see
        return rerun_every_queue(cls) if isinstance(prompt, str) and not prompt.strip() else prompt

    @classmethod
    def recover_prompt(cls, allow_pass_through: bool = False) -> str:
        """The positive prompt text from the running workflow; if it cannot be found, an error (or "" with
        a warning on the node when the user allows pass-through)."""
        hidden = getattr(cls, "hidden", None)
        uid = getattr(hidden, "unique_id", None)
        texts = prompt_trace.positive_prompt_texts(getattr(hidden, "prompt", None), uid)
        usable = [t.strip() for t in texts if t and t.strip()]
        if len(texts) == 1 and usable:
            log.info(
                "SAFREE: the node's prompt is empty; using the positive prompt of the sampler that uses this "
                "model: %r",
                usable[0][:80],
            )
            return usable[0]
        if not texts:
            reason = "no sampler using this model was found in the workflow"
        elif not usable:
            reason = "the positive conditioning is built by a node whose text cannot be read"
        else:
            reason = f"{len(texts)} different positive prompts use this model"
        cannot(
            "SAFREE",
            f"the node's prompt is empty and the positive prompt could not be recovered ({reason}). SAFREE needs "
            "the prompt text for its masked-token test (CONDITIONING carries no text): type the positive prompt "
            "into the SAFREE node, or link one String node to both it and CLIP Text Encode.",
            allow_pass_through,
            uid,
        )
        return ""


class EraserSLD(io.ComfyNode):
    FAMILIES = {
        "sd1": None,
        "sd2": None,
        "sdxl": None,
        "sd3": None,
        "flux": "Flux is guidance-distilled and has no unconditional branch; SLD needs true CFG. Use "
        "concept guidance (EraserConceptGuidance) instead.",
    }

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserSLD",
            display_name="Safe Latent Diffusion",
            category=CATEGORY,
            description="Safe Latent Diffusion: a gated third guidance branch away from a safety concept "
            "(one extra model pass per step). It subtracts at most the safety concept's own guidance, and "
            "from benign prompts as much as from concept prompts. Shapes world, 'circle' (94 % exact / 88 % "
            "paraphrases): medium 72 % / 59 %, max 61 % / 29 % at 79 % fidelity on the other shapes. Stops "
            "paraphrases better than the named concept, which it does not erase. World 2 (GUARDS.md): max "
            "stops a named artist (100 → 0 %) and a flames proxy named / implied (90 → 0 %, 100 → 10 %) but "
            "keeps only 62 % of unrelated objects.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Clip.Input(
                    "clip", tooltip="The text encoder loaded with this model; concepts are encoded with it."
                ),
                io.Combo.Input(
                    "preset",
                    options=list(sld.PRESETS),
                    default="medium",
                    tooltip="SLD hyper-parameter preset: weak, medium, strong or max",
                ),
                io.String.Input(
                    "safety_concept",
                    multiline=True,
                    default=sld.SAFETY_CONCEPT,
                    tooltip="the text guided away from (SLD's default safety concept)",
                ),
            ]
            + common_inputs(),
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        preset,
        safety_concept,
        strength,
        start_percent,
        end_percent,
        risk_gate,
        allow_pass_through=False,
    ) -> io.NodeOutput:
        text = " ".join(safety_concept.split()) or sld.SAFETY_CONCEPT
        config = sld.SLDConfig(
            concepts=[text],
            preset=preset,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            risk_gate=risk_gate,
        )
        family = sc.model_family(model, "sld")
        sc.refuse("Safe Latent Diffusion", family, cls.FAMILIES)
        m = model.clone()
        if not config.active:
            return io.NodeOutput(m)
        import comfy.sampler_helpers

        safety = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        safety_hidden = sc.encode(clip, text)[0]
        s_start, s_end = window(m, config)
        fn = hooks.make_sld_pre_cfg(
            config,
            comfy.sampler_helpers.convert_cond(safety),
            sc.parameterisation(m),
            s_start,
            s_end,
            safety_hidden,
            skip_first=not sc.is_t5(family),
            allow_pass_through=allow_pass_through,
            unique_id=_uid(cls),
        )
        m.set_model_sampler_pre_cfg_function(fn)
        return io.NodeOutput(m)


class EraserConceptGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserConceptGuidance",
            display_name="Concept attention guidance (NAG)",
            category=CATEGORY,
            description="Normalized attention guidance with the concepts as the negative branch, inside every "
            "cross/joint attention; works on guidance-distilled Flux. Acts while σ ≥ σ_end (the early steps) "
            "and pushes benign prompts about as far as concept prompts: on the shapes world (which decides "
            "late) it does not erase ('circle' 94 % → 89 %; world 2: no named concept erased). On Chroma, "
            "Flux.2, Qwen-Image, HiDream and AuraFlow the concept's text rides beside the prompt's in each block's "
            "one pass (per step: Qwen-Image 1.02–1.04×, Flux.2-klein 1.06× at 1024 px, 1.53× at 512 px).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Clip.Input(
                    "clip", tooltip="The text encoder loaded with this model; concepts are encoded with it."
                ),
                io.String.Input(
                    "concepts",
                    multiline=True,
                    default="nudity, naked",
                    tooltip="concepts to suppress, one per line or comma-separated",
                ),
                io.Float.Input(
                    "phi",
                    default=5.0,
                    min=1.0,
                    max=20.0,
                    step=0.1,
                    tooltip="extrapolation scale φ (1 = off; NAG default 5)",
                ),
                io.Float.Input(
                    "tau", default=2.5, min=1.0, max=10.0, step=0.1, tooltip="L1-norm ratio clamp τ (NAG default 2.5)"
                ),
                io.Float.Input(
                    "alpha",
                    default=0.25,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="blend α with the positive attention (NAG default 0.25)",
                ),
                io.Float.Input(
                    "sigma_end",
                    default=-1.0,
                    min=-1.0,
                    max=100.0,
                    step=0.01,
                    tooltip="NAG acts while σ ≥ sigma_end; −1 = published default (4 UNet, 0.75 flow)",
                ),
            ]
            + common_inputs(),
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        concepts,
        phi,
        tau,
        alpha,
        sigma_end,
        strength,
        start_percent,
        end_percent,
        risk_gate,
        allow_pass_through=False,
    ) -> io.NodeOutput:
        config = ConceptGuidanceConfig(
            concepts=split_concepts(concepts),
            phi=phi,
            tau=tau,
            alpha=alpha,
            sigma_end=None if sigma_end < 0 else sigma_end,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            risk_gate=risk_gate,
        )
        family = sc.model_family(model, "concept_guidance")
        m = model.clone()
        if not config.active:
            return io.NodeOutput(m)
        neg_llama = None
        if family == "hidream":  # the concept's T5 rows and per-layer Llama rows, appended to the prompt's
            clip = sc.EncodeOnce(clip)  # a single keyword is both the negative and the gate's context
            neg, neg_llama = sc.hidream_conditioning(clip, ", ".join(config.concepts), "Concept guidance")
        else:
            neg = sc.encode(clip, ", ".join(config.concepts))[0]
        concept_ctx = sc.encode_many(clip, config.concepts)[0]
        s_start, s_end = window(m, config)
        if family == "sd1" and alpha == 0.25 and ALPHA.get(family):
            log.info("ConceptGuidance: the published SD1.5 workflow uses α = %.2f", ALPHA[family])
        if family == "hidream":
            add_hidream_joint(m)
        else:
            register_attention(m, family, "Concept guidance", allow_pass_through, _uid(cls))
        if family in UNET_FAMILIES:
            to = m.model_options.setdefault("transformer_options", {})
            patches = to.get("patches", {}).get("attn2_patch", [])
            if not any(isinstance(p, hooks.NagAttn2Patch) for p in patches):
                m.set_model_attn2_patch(hooks.NagAttn2Patch())
        add_wrapper(
            m,
            "concept_guidance",
            hooks.make_nag_wrapper(
                config,
                neg,
                concept_ctx,
                s_start,
                s_end,
                config.sigma_end_for(family),
                skip_first=not sc.is_t5(family),
                text_mask_refusal=family if family in hooks.HOST_BLOCK_NAG else None,
                neg_llama=neg_llama,
            ),
        )
        return io.NodeOutput(m)


class EraserTokenSuppress(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraserTokenSuppress",
            display_name="Token attention suppression",
            category=CATEGORY,
            description="Scales down (or drops) the image→text attention to the prompt tokens that carry the "
            "concepts (and EOS/padding after them), inside a σ window. Strong against prompts that name the "
            "concept or a close synonym (shapes world: 'circle' 94 % → 11 %, 'square' 100 % → 0 %); fails "
            "where the concept also lives in later words or similar tokens are not distinct ('red': 93 %). "
            "World 2: a named character 75 → 0 %, named flames 90 → 0 %; implied flames and a named artist "
            "style stay (100 %).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (cloned, never modified)."),
                io.Clip.Input(
                    "clip", tooltip="The text encoder loaded with this model; concepts are encoded with it."
                ),
                io.String.Input(
                    "concepts",
                    multiline=True,
                    default="nudity, naked",
                    tooltip="concepts to suppress, one per line or comma-separated",
                ),
                io.Float.Input(
                    "factor",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="attention multiplier for concept tokens (0 = drop)",
                ),
                io.Boolean.Input(
                    "include_eos", default=True, tooltip="also suppress EOS/padding positions, which carry the concept"
                ),
                io.Float.Input(
                    "similarity",
                    default=0.9,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="a prompt token counts as a concept token above this cosine to a keyword",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    tooltip="optional: the positive prompt, for exact token matches",
                ),
            ]
            + common_inputs(),
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        concepts,
        factor,
        include_eos,
        similarity,
        prompt,
        strength,
        start_percent,
        end_percent,
        risk_gate,
        allow_pass_through=False,
    ) -> io.NodeOutput:
        config = TokenSuppressConfig(
            concepts=split_concepts(concepts),
            factor=factor,
            include_eos=include_eos,
            similarity=similarity,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            risk_gate=risk_gate,
        )
        family = sc.model_family(model, "token_suppression")
        m = model.clone()
        if not config.active:
            return io.NodeOutput(m)
        if family == "hidream":  # two token streams, T5 and Llama, after the image tokens
            llama_layer = int(m.model.diffusion_model.llama_layers[-1])
            concept_ctx, t5, llama = sc.hidream_token_streams(clip, config.concepts, prompt, llama_layer)
            s_start, s_end = window(m, config)
            wrapper = hooks.make_hidream_token_wrapper(config, t5, llama, concept_ctx, s_start, s_end, llama_layer)
            add_wrapper(m, "token_suppress", wrapper)
            add_hidream_joint(m)
            return io.NodeOutput(m)
        concept_ctx, concept_tokens, words = sc.concept_words(clip, config.concepts, family)
        prompt_ref, positions, prompt_length = sc.prompt_positions(clip, prompt, words, family)
        s_start, s_end = window(m, config)
        register_attention(m, family, "Token suppression", allow_pass_through, _uid(cls))
        add_wrapper(
            m,
            "token_suppress",
            hooks.make_token_wrapper(
                config,
                concept_tokens,
                concept_ctx,
                s_start,
                s_end,
                prompt_ref,
                positions,
                prompt_length,
                skip_first=not sc.is_t5(family),
                family=family,
            ),
        )
        return io.NodeOutput(m)


def _uid(cls):
    return getattr(getattr(cls, "hidden", None), "unique_id", None)


def torch_stack(rows, like):
    import torch

    return torch.stack(rows) if rows else like.new_zeros((0,) + tuple(like.shape[1:]))


def torch_full(n, value):
    import torch

    return torch.full((n,), int(value), dtype=torch.long)


NODES = [EraserSAFREE, EraserSLD, EraserConceptGuidance, EraserTokenSuppress]
