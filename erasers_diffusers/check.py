"""``python -m erasers check --model … --eraser FILE --concept …``: the Eraser Check without ComfyUI.

Renders the probes of ``erasers.check`` (the concept, other phrasings, your prompts, neighbours,
unrelated prompts, and the c′ probe of a weight edit) with the same seeds before and after applying the
eraser, and writes ``check.png`` (the labelled grid) and ``check.json`` (the report) into ``--out``.

``--eraser`` is any file the diffusers path applies: an eraser file made by this pack (a weight edit:
applied to the weights, with the c′ probe), an SPM membrane or an erasure LoRA (kohya, PEFT, ESD, UCE
weights, EraseAnything: applied as removable forward hooks, gated per prompt as ``generate --spm /
--lora`` does; no c′ probe, since K/V weights do not change). The kind is read from the file, as
``info`` does. ``--model`` is a diffusers folder or hub id, a single-file SD checkpoint, or ``shapes`` (the
pack's shapes world, whose classifier then scores every image; it takes the pack's eraser files only).
Elsewhere no score is computed (the report says so); the grid shows what was rendered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Optional, Sequence

import torch

from erasers.check import adversarial_context, build_probes, eraser_summary, report_table, response_gap, run_check
from erasers.errors import EraserError

from . import api

log = logging.getLogger(__name__)

KV = re.compile(r"attn2\.to_[kv]\.weight$")


# -- rendering -------------------------------------------------------------------------------------------


def is_shapes(pipe) -> bool:
    return hasattr(pipe, "encode_prompts") and hasattr(pipe, "image_size")


@torch.no_grad()
def encode_context(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """(N, T, d) conditioning the denoiser reads for ``prompts``."""
    if is_shapes(pipe):
        return pipe.encode_prompts(list(prompts)).float().cpu()
    device = getattr(pipe, "device", "cpu")
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return embeds.float().cpu()


class PipelineRenderer:
    """``render(side, probes, seed)`` for a diffusers SD pipeline or the shapes pipeline.

    Prompts are encoded by the pipeline; an adversarial probe's conditioning is the c′ given in
    ``embeds`` (concept → (T, d)). Every image of one call uses noise from ``seed`` (diffusers: one
    generator per image, all seeded alike; shapes: one generator for the batch, same on both sides).
    The eraser is applied for the "after" side only, inside ``erased`` (weights restored afterwards).
    """

    def __init__(self, pipe, eraser, steps: int, cfg: float, size: Optional[int], embeds: dict, strength=1.0):
        self.pipe, self.eraser, self.steps, self.cfg, self.size = pipe, eraser, steps, cfg, size
        self.embeds, self.strength = embeds, strength

    def conditioning(self, side: str, probes) -> torch.Tensor:
        cond = encode_context(self.pipe, [p.prompt for p in probes])
        for i, p in enumerate(probes):
            if p.kind == "adversarial" and side == "after":  # before: the original response to the concept
                cond[i] = self.embeds[p.prompt].to(cond.dtype)
        return cond

    def sample(self, side: str, probes, seed: int) -> torch.Tensor:
        cond = self.conditioning(side, probes)
        n = cond.shape[0]
        if is_shapes(self.pipe):
            images = self.pipe(
                [p.prompt for p in probes], steps=self.steps, guidance=self.cfg, seed=seed, prompt_embeds=cond
            )
            return images.permute(0, 2, 3, 1)
        device = getattr(self.pipe, "device", "cpu")
        negative = encode_context(self.pipe, [""] * n)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in range(n)]
        size = {"height": self.size, "width": self.size} if self.size else {}
        out = self.pipe(
            prompt_embeds=cond.to(device, self.pipe.unet.dtype),
            negative_prompt_embeds=negative.to(device, self.pipe.unet.dtype),
            num_inference_steps=self.steps,
            guidance_scale=self.cfg,
            generator=generators,
            output_type="pt",
            **size,
        ).images
        return out.float().cpu().permute(0, 2, 3, 1)

    def __call__(self, side: str, probes, seed: int) -> torch.Tensor:
        if side == "before":
            return self.sample(side, probes, seed)
        if isinstance(self.eraser, MembraneFile):  # hooks gated by this call's prompts, removed afterwards
            with self.eraser.applied(self.pipe, [p.prompt for p in probes]):
                return self.sample(side, probes, seed)
        with api.erased(self.pipe, self.eraser, self.strength):
            return self.sample(side, probes, seed)


# -- SPM membranes and erasure LoRAs ---------------------------------------------------------------------


class MembraneFile:
    """An SPM membrane or an erasure LoRA as the check's "after" side: the hooks of ``erasers_diffusers.apply``
    (UNet and text encoder), installed around each render and gated by that render's prompts — facilitated
    transport for SPM, always open for a LoRA, as ``generate --spm / --lora`` apply them by default."""

    def __init__(self, pipe, path: str, kind: str, strength: float = 1.0, concepts: Sequence[str] = ()):
        from .apply import membrane_from_file

        if kind not in ("spm", "lora"):
            raise EraserError(f"MembraneFile kind must be 'spm' or 'lora', found {kind!r}.")
        self.kind, self.method, self.source = kind, kind, path
        self.membrane, self.report = membrane_from_file(
            pipe.unet, path, strength, kind == "spm", list(concepts) or None, kind=kind, pipe=pipe
        )
        self.concepts = list(concepts) or list(self.membrane.gate.concepts) or list(self.report.concepts)
        self.config = {"preserve": []}

    @contextlib.contextmanager
    def applied(self, pipe, prompts: Sequence[str]):
        from .apply import DiffusersMembranes, HFTextEncoder

        membranes, loras = ([self.membrane], []) if self.kind == "spm" else ([], [self.membrane])
        encoder = HFTextEncoder(pipe.tokenizer, pipe.text_encoder)
        with DiffusersMembranes(pipe, membranes, encoder=encoder, loras=loras) as handle:
            handle.set_prompts(list(prompts))
            yield handle


def eraser_file_kind(path: str) -> str:
    """'eraser', 'spm' or 'lora', read from the file's header as ``info`` does; a layout no loader reads is
    refused, naming what ``check`` takes."""
    from erasers.errors import UnknownFormat
    from erasers.files.file_info import describe_header

    header = describe_header(path, with_hash=False)
    if header.get("kind") == "eraser":
        return "eraser"
    if header.get("format") is None:
        raise UnknownFormat(
            f"--eraser {os.path.basename(path)}: no loader of the pack reads this file. check takes an eraser "
            f"file made by this pack, an SPM membrane or an erasure LoRA (kohya, PEFT, ESD, UCE weights, "
            f"EraseAnything); `python -m erasers info {path}` shows what the file holds."
        )
    return "spm" if header["kind"] == "spm" else "lora"


# -- the c′ probe ----------------------------------------------------------------------------------------


def kv_weights(pipe) -> dict:
    """canonical key → float32 CPU copy of every to_k / to_v projection reading the text context."""
    return {
        k: w.detach().to("cpu", torch.float32, copy=True)
        for k, w in api.canonical_weights(pipe).items()
        if KV.search(k)
    }


def adversarial_embeds(pipe, eraser, concepts: Sequence[str], strength: float = 1.0) -> tuple:
    """({concept: c′ (T, d)}, {concept: response gaps}) from the pipeline's weights before and after."""
    original = kv_weights(pipe)
    with api.erased(pipe, eraser, strength):
        current = kv_weights(pipe)
    keys = sorted(original)
    context = encode_context(pipe, list(concepts))
    embeds, gaps = {}, {}
    for i, concept in enumerate(concepts):
        c = context[i]
        cp = adversarial_context(c, [current[k] for k in keys], [original[k] for k in keys])
        embeds[concept] = cp
        gaps[concept] = response_gap(c, cp, [current[k] for k in keys], [original[k] for k in keys])
    return embeds, gaps


# -- the shapes world's scorer -----------------------------------------------------------------------------


class ShapesScorer:
    """The shapes classifier as a scorer: an image shows a text when the classifier reads the shape (or
    colour) the text names; texts naming neither are not scored."""

    name = "shapes classifier"
    threshold = 0.5

    def __init__(self, classifier=None):
        from erasers_dev.shapes import load_classifier, world

        self.classifier = classifier or load_classifier()
        self.words = {}
        for axis, values in (("shape", world.SHAPES), ("colour", world.COLOURS)):
            for i, value in enumerate(values):
                for word in world.SYNONYMS[value]:
                    self.words[word] = (axis, i)

    def target(self, text: str):
        found = [self.words[w] for w in re.findall(r"[a-z]+", text.lower()) if w in self.words]
        shapes = [f for f in found if f[0] == "shape"]
        return (shapes or found or [None])[0]

    def __call__(self, images: torch.Tensor, text: str):
        target = self.target(text)
        if target is None:
            return None
        pred = self.classifier.predict(images.permute(0, 3, 1, 2).contiguous())
        return (pred[target[0]] == target[1]).float()


def shapes_probe_options() -> dict:
    """Phrasings and unrelated prompts in the shapes world's own words (it knows no others)."""
    return {
        "phrasings": ("a {c}", "a picture of a red {c}", "a striped blue {c} on a white background"),
        "unrelated": ("a green square", "a yellow triangle", "a purple cross"),
    }


# -- the command -------------------------------------------------------------------------------------------


def check_pipeline(
    pipe,
    eraser,
    concepts: Sequence[str] = (),
    extra: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    seeds: Sequence[int] = (0, 1),
    steps: int = 20,
    cfg: float = 7.5,
    size: Optional[int] = None,
    concept_type: str = "object",
    strength: float = 1.0,
    scorer=None,
    probe_options: Optional[dict] = None,
    progress=None,
):
    """Run the check of ``eraser`` (a loaded pack eraser, or a ``MembraneFile``) on ``pipe``; returns an
    ``erasers.check.CheckResult``. Only a weight edit gets the c′ probe."""
    weight_edit = not isinstance(eraser, MembraneFile)
    concepts = list(concepts) or eraser.concepts
    if not concepts:
        raise EraserError(
            f"{os.path.basename(eraser.source or 'the eraser')} records no concepts: name the concept(s) to "
            f"look for with --concept."
        )
    neighbours = list(neighbours) or list(eraser.config.get("preserve", []))[:3]
    options = dict(probe_options or {})
    probes = build_probes(
        concepts, concept_type=concept_type, extra=extra, neighbours=neighbours, weight_edit=weight_edit, **options
    )
    notes = []
    if weight_edit:
        api.check_pipeline(pipe, eraser)  # family and layers, before anything is rendered
        embeds, gaps = adversarial_embeds(pipe, eraser, concepts, strength)
    else:
        if is_shapes(pipe):
            raise EraserError(
                "--model shapes takes the pack's eraser files only: its denoiser is not a diffusers UNet, so "
                "SPM membranes and erasure LoRAs cannot be hooked into it."
            )
        embeds, gaps = {}, {}
        what = "an SPM membrane" if eraser.kind == "spm" else "an erasure LoRA"
        notes.append(
            f"no c' probe: {what} acts through forward hooks and leaves the K/V weights unchanged, "
            f"so there is no closed-form attack to derive ({eraser.report.summary()})"
        )
    render = PipelineRenderer(pipe, eraser, steps, cfg, size, embeds, strength)
    settings = {
        "steps": steps,
        "cfg": cfg,
        "sampler": "DDIM (shapes)" if is_shapes(pipe) else type(pipe.scheduler).__name__,
    }
    if is_shapes(pipe):
        upscale = 8
    else:
        upscale = 1
    return run_check(
        probes,
        seeds,
        render,
        concepts,
        scorer=scorer,
        settings={**settings, "strength": strength},
        # a LoRA is a weight patch in ComfyUI but forward hooks here: K/V weights stay, as for a membrane
        eraser=eraser_summary(
            [eraser.method],
            source=os.path.basename(eraser.source or ""),
            **({} if weight_edit else {"kind": "membrane"}),
        ),
        adversarial=gaps,
        notes=notes,
        upscale=upscale,
        progress=progress,
        no_score_reason="no score was computed: the diffusers check has no image scorer yet "
        "(the shapes world uses its classifier); the grid shows what was rendered",
    )


def load_model(model: str, device: str):
    if model == "shapes":
        from erasers_dev.shapes import load_default

        return load_default().clone().to(device)
    from .generate import load_pipeline

    pipe = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_png(grid: torch.Tensor, path: str) -> None:
    from PIL import Image

    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().cpu().numpy()).save(path)


def cmd_check(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seeds = [int(s) for s in str(args.seeds).replace(" ", "").split(",") if s]
    if not seeds:
        raise EraserError(f"--seeds: expected comma-separated whole numbers, found '{args.seeds}'.")
    kind = eraser_file_kind(args.eraser)
    pipe = load_model(args.model, device)
    shapes = is_shapes(pipe)
    if kind == "eraser":
        eraser = api.load_eraser(args.eraser, pipe)
    elif shapes:
        raise EraserError(
            f"--eraser {os.path.basename(args.eraser)} is an {'SPM membrane' if kind == 'spm' else 'erasure LoRA'}; "
            "--model shapes takes the pack's eraser files only (its denoiser is not a diffusers UNet)."
        )
    else:
        eraser = MembraneFile(pipe, args.eraser, kind, args.strength, args.concept or ())
        print(f"{os.path.basename(args.eraser)}: {eraser.report.summary()}")
    result = check_pipeline(
        pipe,
        eraser,
        concepts=args.concept or [],
        extra=args.prompt or [],
        neighbours=args.keep or [],
        seeds=seeds,
        steps=args.steps if args.steps is not None else (20 if shapes else 20),
        cfg=args.cfg if args.cfg is not None else (4.0 if shapes else 7.5),
        size=args.size,
        concept_type=args.concept_type,
        strength=args.strength,
        scorer=ShapesScorer() if shapes else None,
        probe_options=shapes_probe_options() if shapes else None,
        progress=lambda done, total: log.info("rendered %d/%d", done, total),
    )
    os.makedirs(args.out, exist_ok=True)
    png, report = os.path.join(args.out, "check.png"), os.path.join(args.out, "check.json")
    save_png(result.grid, png)
    with open(report, "w", encoding="utf-8") as handle:
        json.dump(result.report, handle, indent=1, ensure_ascii=False)
    print(report_table(result.report).rstrip())
    print(f"\nwrote {png} ({result.grid.shape[1]}x{result.grid.shape[0]}) and {report}")
    return 0


def add_check(subparsers) -> None:
    from erasers.check.probes import PHRASINGS

    p = subparsers.add_parser(
        "check", help="before/after grid and report of an eraser on a model", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="diffusers folder or hub id, single .safetensors file, or 'shapes'")
    p.add_argument(
        "--eraser",
        required=True,
        metavar="FILE",
        help="an eraser file made by this pack, an SPM membrane or an erasure LoRA (kind read from the file)",
    )
    p.add_argument("--concept", action="append", metavar="TEXT", help="concept to look for (default: the eraser's)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="an extra prompt to probe (repeatable)")
    p.add_argument("--keep", action="append", metavar="TEXT", help="a neighbour that must survive (default: preserve)")
    p.add_argument("--concept-type", default="object", choices=sorted(PHRASINGS), help="phrasings to probe")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 7.5; shapes 4)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--strength", type=float, default=1.0, help="eraser strength (default 1)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--out", default="erasers_check", help="output folder for check.png and check.json")
    p.set_defaults(func=cmd_check)
