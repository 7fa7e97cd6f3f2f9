"""Eraser Check node (V3, issue #17): before/after grid, leak probes and a report, inside the workflow.

A thin adapter over ``erasers.check``: probes, c′, grid and report are core code; this file only renders
each probe through ComfyUI's own sampler (``comfy.sample.sample`` with the host's MODEL objects, so every
eraser kind — weight patches, membranes, sampling-time guards — is checked as it really runs), decodes
with the VAE and, when a CLIP_VISION model is connected, scores each image zero-shot.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..erasers.check import adversarial_context, build_probes, eraser_summary, lines, report_text, response_gap
from ..erasers.check.probes import PHRASINGS
from ..erasers.check.run import run_check
from ..erasers.check.score import NEUTRAL_PROMPTS, THRESHOLD, zero_shot_scores
from . import adapters
from .fail_closed import rerun_every_queue

log = logging.getLogger(__name__)

#: pack node → the method name its erasure is (EraserClosedForm / EraserLoad read theirs from inputs / file)
NODE_METHODS = {
    "EraserLoRALoad": "lora",
    "EraserSPMLoad": "spm",
    "EraserSAFREE": "safree",
    "EraserSLD": "sld",
    "EraserConceptGuidance": "concept_guidance",
    "EraserTokenSuppress": "token_suppress",
}
KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")


def upstream(prompt: dict, start, stop=()) -> list:
    """Node ids reachable backwards from the link ``start`` ([node_id, slot]) in an API-format prompt,
    nearest first, not entering the nodes upstream of ``stop`` (the original model's own chain)."""
    seen, order, todo = set(stop), [], [start]
    while todo:
        link = todo.pop(0)
        nid = str(link[0]) if isinstance(link, list) and link else None
        if nid is None or nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        order.append(nid)
        todo += [v for v in prompt[nid].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
    return order


def upstream_erasers(prompt, node_id) -> tuple:
    """(methods, concepts, preserve) of the pack's eraser nodes between the original and the erased MODEL."""
    me = (prompt or {}).get(str(node_id), {}).get("inputs", {})
    if not me.get("erased_model"):
        return [], [], []
    stop = upstream(prompt, me.get("original_model")) if me.get("original_model") else []
    methods, concepts, preserve = [], [], []
    for nid in upstream(prompt, me["erased_model"], stop):
        node = prompt[nid]
        kind, inputs = node.get("class_type", ""), node.get("inputs", {})
        if kind == "EraserClosedForm":
            methods.append(str(inputs.get("method", "uce")))
        elif kind == "EraserLoad":
            methods.append("uce")  # corrected from the file below when it can be read
            try:
                import folder_paths

                from ..erasers.files.eraser_file import load_eraser

                eraser = load_eraser(folder_paths.get_full_path_or_raise("erasers", inputs.get("eraser_name")))
                methods[-1] = eraser.method
                concepts += eraser.concepts
                preserve += list(eraser.config.get("preserve", []))
            except Exception as exc:  # the user can still type the concepts
                log.info("Eraser Check: could not read %s: %s", inputs.get("eraser_name"), exc)
        elif kind in NODE_METHODS:
            methods.append(NODE_METHODS[kind])
        else:
            continue
        for key, out in (("concepts", concepts), ("preserve", preserve)):
            if isinstance(inputs.get(key), str):
                out += adapters.split_concepts(inputs[key])
    return methods, lines(concepts), lines(preserve)


def kv_weights(model) -> dict:
    state = adapters.canonical_state(model)
    keys = sorted(k for k in state if k.endswith(KV_SUFFIXES))
    return adapters.canonical_base_weights(model, keys) if keys else {}


class ClipVisionScorer:
    """Zero-shot scores: CLIP_VISION image embeddings against the CLIP text tower's projected pooled output."""

    name = "CLIP vision zero-shot"
    threshold = THRESHOLD

    def __init__(self, clip_vision, clip):
        self.clip_vision, self.clip = clip_vision, clip
        model = clip.cond_stage_model
        towers = [getattr(model, n) for n in ("clip_g", "clip_h", "clip_l") if getattr(model, n, None) is not None]
        tower = towers[0] if towers else getattr(model, getattr(model, "clip", ""), None)
        # ComfyUI marks towers loaded without CLIP's text projection (SD1.x checkpoints) as not projecting
        if tower is None or not getattr(tower, "options_default", (None, None, False))[2]:
            raise ValueError(
                "no score was computed: this CLIP's text tower has no trained text projection (SD1.x "
                "checkpoints do not carry CLIP's), so its text embeddings are not in the CLIP_VISION space; "
                "connect an SDXL CLIP with a ViT-bigG CLIP_VISION, or leave clip_vision empty"
            )
        self.neutral = self.text(list(NEUTRAL_PROMPTS))
        # fail before rendering, not at the first score: one blank image gives the vision embedding's width
        size = int(getattr(clip_vision, "image_size", 224) or 224)
        width = clip_vision.encode_image(torch.zeros(1, size, size, 3)).image_embeds.shape[-1]
        if width != self.neutral.shape[-1]:
            raise ValueError(
                f"no score was computed: the CLIP_VISION model embeds images {width} wide but this CLIP's text "
                f"projection gives {self.neutral.shape[-1]}, so they are not one embedding space; connect the "
                f"CLIP vision model that belongs to this text tower (ViT-L: 768, ViT-H: 1024, ViT-bigG: 1280)"
            )

    def text(self, texts) -> torch.Tensor:
        return torch.cat([self.clip.encode_from_tokens(self.clip.tokenize(t), return_pooled=True)[1] for t in texts])

    def __call__(self, images, text):
        v = self.clip_vision.encode_image(images).image_embeds
        return zero_shot_scores(v.float().cpu(), self.text([text])[0].float().cpu(), self.neutral.float().cpu())


class EraserCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        text = lambda name, tip: io.String.Input(name, multiline=True, default="", tooltip=tip)  # noqa: E731
        return io.Schema(
            node_id="EraserCheck",
            display_name="Eraser Check",
            category="concept_erasers",
            description="Renders the concept, other phrasings, your prompts, neighbours, unrelated prompts and (for "
            "weight edits) the c' attack probe with the same seeds before and after the erasure: one labelled "
            "grid (rows = probes; columns = before/after per seed) and a report.",
            inputs=[
                io.Model.Input("erased_model", tooltip="The model after the eraser(s)."),
                io.Model.Input("original_model", tooltip="The same model before the eraser(s)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with the model."),
                io.Vae.Input("vae", tooltip="Decodes the before/after renders."),
                text("concepts", "Concepts to look for, one per line. Empty = read from the erasers upstream."),
                text("extra_prompts", "Your own prompts that should lose the concept, one per line."),
                text("keep", "Neighbours that must survive, one per line. Empty = the eraser's preserve list."),
                io.Combo.Input(
                    "concept_type",
                    options=list(PHRASINGS),
                    default="object",
                    tooltip="Which phrasing templates probe the concept (style, object, person, …).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="First seed; before and after use the same seeds.",
                ),
                io.Int.Input("seeds", default=2, min=1, max=8, tooltip="How many seeds (seed, seed+1, …)."),
                io.Int.Input("steps", default=12, min=1, max=100, tooltip="Sampling steps per render."),
                io.Float.Input(
                    "cfg", default=7.0, min=0.0, max=30.0, step=0.5, tooltip="Classifier-free guidance scale."
                ),
                io.Int.Input("width", default=256, min=64, max=2048, step=8, tooltip="Render width (px)."),
                io.Int.Input("height", default=256, min=64, max=2048, step=8, tooltip="Render height (px)."),
                io.Combo.Input(
                    "sampler_name",
                    options=list(comfy.samplers.KSampler.SAMPLERS),
                    default="euler",
                    tooltip="Sampler for every render.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=list(comfy.samplers.KSampler.SCHEDULERS),
                    default="normal",
                    tooltip="Noise schedule for every render.",
                ),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Scores each image zero-shot."),
                io.Clip.Input("erased_clip", optional=True, tooltip="If an eraser also edits the CLIP."),
            ],
            outputs=[io.Image.Output("grid"), io.String.Output("report", tooltip="Table, then JSON.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, concepts="", keep="", **inputs):
        # empty concepts / keep are read from the erasers in the workflow graph, which the cache key cannot see
        return rerun_every_queue(cls) if not (lines(concepts) and lines(keep)) else None

    @classmethod
    def execute(
        cls,
        erased_model,
        original_model,
        clip,
        vae,
        concepts,
        extra_prompts,
        keep,
        concept_type,
        seed,
        seeds,
        steps,
        cfg,
        width,
        height,
        sampler_name,
        scheduler,
        clip_vision=None,
        erased_clip=None,
    ):
        import comfy.sample
        import comfy.utils

        hidden = getattr(cls, "hidden", None)
        methods, found, preserve = upstream_erasers(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", ""))
        concepts = lines(concepts) or found
        before_w, after_w = kv_weights(original_model), kv_weights(erased_model)
        keys = sorted(before_w)
        weight_edit = bool(keys) and any(not torch.equal(before_w[k], after_w[k]) for k in keys)
        probes = build_probes(
            concepts,
            concept_type=concept_type,
            extra=extra_prompts,
            neighbours=lines(keep) or preserve[:3],
            weight_edit=weight_edit,
        )
        embeds, gaps = {}, {}
        for c in concepts if weight_edit else []:
            ctx = adapters.ComfyCLIPEncoder(clip).encode([c]).hidden[0]
            embeds[c] = adversarial_context(ctx, [after_w[k] for k in keys], [before_w[k] for k in keys])
            gaps[c] = response_gap(ctx, embeds[c], [after_w[k] for k in keys], [before_w[k] for k in keys])
        bar = comfy.utils.ProgressBar(2 * seeds * len(probes))

        def render(side, probes, s):
            model, text_clip = (original_model, clip) if side == "before" else (erased_model, erased_clip or clip)
            negative = text_clip.encode_from_tokens_scheduled(text_clip.tokenize(""))
            out = []
            for p in probes:
                positive = text_clip.encode_from_tokens_scheduled(text_clip.tokenize(p.prompt))
                if p.kind == "adversarial" and side == "after":  # c′ replaces the concept's context
                    positive = [[embeds[p.prompt][None].to(positive[0][0].dtype), dict(positive[0][1])]]
                latent = torch.zeros([1, 4, height // 8, width // 8])
                latent = comfy.sample.fix_empty_latent_channels(model, latent)
                noise = comfy.sample.prepare_noise(latent, s)
                samples = comfy.sample.sample(
                    model,
                    noise,
                    steps,
                    cfg,
                    sampler_name,
                    scheduler,
                    positive,
                    negative,
                    latent,
                    denoise=1.0,
                    disable_pbar=True,
                    seed=s,
                )
                out.append(vae.decode(samples)[:1, ..., :3])
                bar.update(1)
            return torch.cat(out).float().cpu()

        scorer, reason, notes = None, None, []
        if clip_vision is not None:
            try:
                scorer = ClipVisionScorer(clip_vision, clip)
            except ValueError as exc:
                reason = str(exc)
        if not weight_edit:
            notes.append(
                "no c' probe: the erased model's cross-attention K/V weights equal the original's "
                "(a membrane, guard or no eraser), so there is no closed-form attack to derive"
            )
        summary = eraser_summary(methods, weight_edit=weight_edit)
        if not methods:  # nothing of the pack upstream (another node pack's eraser, a merge): say what changed
            summary["kind"] = "weight" if weight_edit else "unknown"
        result = run_check(
            probes,
            [seed + i for i in range(seeds)],
            render,
            concepts,
            scorer=scorer,
            settings={"steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler},
            eraser=summary,
            adversarial=gaps,
            notes=notes,
            **({"no_score_reason": reason} if reason else {}),
        )
        grid = result.grid[None]
        text = report_text(result.report)
        return io.NodeOutput(grid, text, ui={**ui.PreviewImage(grid, cls=cls).as_dict(), "text": [text]})


NODES = [EraserCheck]
