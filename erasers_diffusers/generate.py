"""``python -m erasers generate``: images from any diffusers model with SPM membranes / erasure LoRAs.

The lead wires ``add_subparser(subparsers)`` into ``erasers_diffusers/cli.py``. Everything is applied through
removable hooks (erasers_diffusers/apply.py); the pipeline's weights are never written.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="generate images with SPM membranes / erasure LoRAs (diffusers)", description=__doc__
    )
    p.add_argument("--model", required=True, help="diffusers model folder or hub id, or a single .safetensors file")
    p.add_argument("--prompt", required=True, action="append", help="prompt (repeat for a batch)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--spm", nargs="*", default=[], metavar="FILE", help="SPM membrane files")
    p.add_argument("--lora", nargs="*", default=[], metavar="FILE", help="erasure LoRA / UCE / ESD files")
    p.add_argument(
        "--strength",
        type=float,
        nargs="*",
        default=None,
        help="one strength per --spm then --lora file (default 1.0 each)",
    )
    p.add_argument("--no-transport", action="store_true", help="membranes as plain LoRAs (no facilitated transport)")
    p.add_argument("--combination", choices=("official", "linear"), default="official")
    p.add_argument(
        "--gate", choices=("always", "facilitated transport"), default="always", help="gate of the --lora files"
    )
    p.add_argument("--concepts", default="", help="comma-separated concepts for gated LoRAs without metadata")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--out", default="out", help="output folder")
    p.set_defaults(func=run)
    return p


def load_pipeline(model: str, device: str):
    import torch
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if os.path.isfile(model):
        pipe = StableDiffusionPipeline.from_single_file(model, torch_dtype=dtype)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
    return pipe.to(device)


def run(args) -> int:
    generate(args)
    return 0


def generate(args) -> list:
    """Generate and save the images; returns their paths."""
    import torch

    from .apply import DiffusersMembranes, HFTextEncoder, membrane_from_file

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    files = [(f, "spm") for f in args.spm] + [(f, "lora") for f in args.lora]
    strengths = list(args.strength or []) + [1.0] * (len(files) - len(args.strength or []))
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] or None
    membranes, loras = [], []
    for (path, kind), strength in zip(files, strengths):
        transport = not args.no_transport if kind == "spm" else args.gate == "facilitated transport"
        mem, report = membrane_from_file(
            pipe.unet, path, strength, transport, concepts if kind == "lora" else None, kind=kind, pipe=pipe
        )
        print(f"{os.path.basename(path)}: {report.summary()}")
        (membranes if kind == "spm" else loras).append(mem)
    encoder = HFTextEncoder(pipe.tokenizer, pipe.text_encoder)
    os.makedirs(args.out, exist_ok=True)
    saved = []
    with DiffusersMembranes(pipe, membranes, args.combination, encoder=encoder, loras=loras) as handle:
        rates = handle.set_prompts(args.prompt, args.images_per_prompt)
        for prompt, row in zip(args.prompt, rates.tolist()):
            print(f"rates for '{prompt}': " + ", ".join(f"{r:.3f}" for r in row))
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        size = {"height": args.size, "width": args.size} if args.size else {}
        images = pipe(
            prompt=args.prompt,
            negative_prompt=[args.negative] * len(args.prompt),
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            num_images_per_prompt=args.images_per_prompt,
            generator=generator,
            **size,
        ).images
    for i, image in enumerate(images):
        path = os.path.join(args.out, f"erasers_{args.seed}_{i:03d}.png")
        image.save(path)
        saved.append(path)
        print(path)
    return saved
