"""``python -m erasers generate``: images from any diffusers model with SPM membranes / erasure LoRAs.

The lead wires ``add_subparser(subparsers)`` into ``erasers_diffusers/cli.py``. Everything is applied through
removable hooks (erasers_diffusers/apply.py); the pipeline's weights are never written.
"""

from __future__ import annotations

import argparse
import logging
import os

from erasers.config import ConfigError, check_number
from erasers.errors import BadEraserFile, EraserError, RefusedPath, UnsupportedFamily
from erasers.files.eraser_file import check_safetensors
from erasers.files.writing import atomic_write
from erasers.text import check_prompts

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
    p.add_argument("--out", default="out", help="output folder (images already there are never replaced)")
    p.set_defaults(func=run)
    return p


def load_pipeline(model: str, device: str):
    import torch
    from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        if os.path.isfile(model):
            pipe = StableDiffusionPipeline.from_single_file(model, torch_dtype=dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, EraserError):
            raise
        raise BadEraserFile(
            f"--model '{model}' could not be loaded as a diffusers model ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}). Pass a diffusers model folder (with model_index.json), a "
            f"single-file SD .safetensors, or a hub id that is in the local cache."
        ) from exc
    if getattr(pipe, "unet", None) is None:
        raise UnsupportedFamily(
            f"--model '{model}' is a {type(pipe).__name__} without a UNet; generate applies SPM membranes and "
            f"erasure LoRAs to UNet models (SD1.x, SD2.x, SDXL)."
        )
    return pipe.to(device)


def check_args(args) -> list:
    """Every input checked before any model is read (``EraserError`` → one ``error:`` line, exit 2).
    Returns the (path, kind, strength) of each membrane / LoRA file."""
    import torch

    prompts = check_prompts(args.prompt, "prompt")
    for name, value, low in (
        ("--steps", args.steps, 1),
        ("--images-per-prompt", args.images_per_prompt, 1),
        ("--seed", args.seed, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be a whole number ≥ {low}, found {value}.")
    check_number("--cfg", args.cfg, low=0)
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise ConfigError(f"--size must be a positive multiple of 8 (the VAE downsamples by 8), found {args.size}.")
    files = [(f, "spm") for f in args.spm] + [(f, "lora") for f in args.lora]
    strengths = list(args.strength or [])
    if len(strengths) > len(files):
        raise ConfigError(
            f"--strength has {len(strengths)} value(s) for {len(files)} --spm/--lora file(s); give at most one per "
            f"file, in the order --spm files then --lora files."
        )
    strengths = [check_number("--strength", v) for v in strengths] + [1.0] * (len(files) - len(strengths))
    for path, kind in files:
        check_safetensors(path)  # missing, pickled, truncated or foreign files: refused before the model loads
    if not os.path.exists(args.model) and (os.path.isabs(args.model) or args.model.count("/") != 1):
        raise BadEraserFile(
            f"--model '{args.model}': no such file or folder (and it is not a hub id 'owner/name'). Pass a "
            f"diffusers model folder, a single-file .safetensors, or a hub id in the local cache."
        )
    if os.path.isfile(args.model):
        check_safetensors(args.model)
    elif os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise BadEraserFile(f"--model '{args.model}' is a folder without model_index.json: not a diffusers model.")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ConfigError(f"--device must be cpu, cuda or cuda:N (or mps), found '{args.device}'.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device is available here; use --device cpu.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RefusedPath(f"--out '{args.out}' is a file; give a folder for the images.")
    args.prompt = prompts
    return [(path, kind, strength) for (path, kind), strength in zip(files, strengths)]


def free_name(folder: str, stem: str, suffix: str = ".png") -> str:
    """``stem.png``, or ``stem-1.png``, ``stem-2.png`` … when taken: an earlier image is never replaced."""
    path, n = os.path.join(folder, stem + suffix), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}-{n}{suffix}")
    return path


def run(args) -> int:
    generate(args)
    return 0


def generate(args) -> list:
    """Generate and save the images; returns their paths."""
    import torch

    from .apply import DiffusersMembranes, HFTextEncoder, membrane_from_file

    files = check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] or None
    membranes, loras = [], []
    for path, kind, strength in files:
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
        path = free_name(args.out, f"erasers_{args.seed}_{i:03d}")
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        saved.append(path)
        print(path)
    return saved
