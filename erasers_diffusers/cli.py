"""Command line: ``python -m erasers erase | info | bench …`` (``--help`` on each).

Extending it:
  * a module listed in ``PLUGINS`` that exposes ``add_subparsers(subparsers)`` adds its own subcommands
    (each sets ``func=callable(args) -> int`` with ``set_defaults``); missing modules are skipped;
  * ``BENCHES`` maps a benchmark name to ``"module:function"`` (relative to this package) or a callable
    taking the remaining argv list and returning an exit code: ``python -m erasers bench NAME [args…]``.
Every user input error (``erasers.errors.EraserError``, a bad command line, a missing or unreadable file)
prints as one line on stderr, ``error: …``, exit code 2; ``--debug`` shows the traceback instead. A closed
stdout (``info … | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

from erasers import __version__
from erasers.errors import BadEraserFile, EraserError

log = logging.getLogger(__name__)

#: optional modules that add subcommands (``add_subparsers(subparsers)``); absent ones are skipped
PLUGINS = ["erasers_dev.shapes.cli", "erasers_dev.world2.cli", "erasers_dev.demo", ".generate"]
#: benchmark name → "module:function" or callable(argv) -> int
BENCHES: dict = {
    "closed-form": "erasers_dev.bench.closed_form:main",
    "spm": "erasers_dev.bench.spm:main",
    "suppression": "erasers_dev.bench.suppression:main",
    "shapes": "erasers_dev.bench.shapes:main",
    "soak": "erasers_dev.bench.soak:main",
    "soak-comfy": "erasers_dev.bench.soak_comfy:main",
    "world2": "erasers_dev.bench.world2:main",
}


def register_bench(name: str, target: Union[str, Callable]) -> None:
    BENCHES[name] = target


def resolve(target: Union[str, Callable]) -> Callable:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module, __package__), attr)


# -- erase ----------------------------------------------------------------------------------------------


def type_words(annotation: str) -> str:
    """``Optional[int]`` → "a whole number (or none)": what the user must type, in words."""
    kind = str(annotation)
    words = "a value"
    if "bool" in kind:
        words = "true or false"
    elif "int" in kind and "float" not in kind:
        words = "a whole number"
    elif "float" in kind:
        words = "a number"
    elif "list" in kind:
        words = "a comma-separated list"
    elif "str" in kind:
        words = "text"
    return words + (" (or none)" if "Optional" in kind else "")


def parse_value(text: str, annotation: str, key: str = "the parameter"):
    """``--param`` value → the dataclass field's type (annotations are strings under postponed evaluation)."""
    kind = str(annotation)
    if text.lower() in ("none", "null", "") and "Optional" in kind:
        return None
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise EraserError(f"--param {key}: expected true or false, found '{text}'.")
    if "str" in kind:
        return text
    try:
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
        return json.loads(text)
    except ValueError:
        if "list" in kind:
            return [part.strip() for part in text.split(",") if part.strip()]
        raise EraserError(f"--param {key}: expected {type_words(kind)}, found '{text}'.") from None


def preset_names() -> str:
    """'speed: few, styles, …; rece: …' — every method's presets, for error messages and --help."""
    from erasers.edits.methods import METHODS

    return "; ".join(
        f"{name}: {', '.join(m.config_class.PRESETS)}" for name, m in sorted(METHODS.items()) if m.config_class.PRESETS
    )


def build_config(method_name: str, concepts, anchors, preserve, concept_type, rank_cap, params, preset=None):
    """The method's config from the command line. With ``preset`` it is ``from_preset(preset, …)`` and only
    the options actually given override the preset (an empty anchor/preserve list or an unset
    --concept-type / --rank-cap leaves the preset's value; --preserve replaces a preset's artist list)."""
    from erasers.config import ConfigError
    from erasers.edits.methods import get_method

    method = get_method(method_name)
    fields = {f.name: f.type for f in dataclasses.fields(method.config_class)}
    if preset is not None and preset not in method.config_class.PRESETS:
        have = method.config_class.PRESETS
        raise ConfigError(
            f"--preset '{preset}': {method.name} "
            + (f"has the presets {', '.join(have)}." if have else "has no presets.")
            + f" Presets by method: {preset_names()} (pick the method with --method)."
        )
    data = {
        "concepts": concepts,
        "anchors": anchors,
        "preserve": preserve,
        "concept_type": concept_type if concept_type is not None else "object",
        "rank_cap": rank_cap,
    }
    if preset is not None:  # only what was given overrides the preset
        data = {"concepts": concepts}
        data.update({k: v for k, v in (("anchors", anchors), ("preserve", preserve)) if v})
        data.update({k: v for k, v in (("concept_type", concept_type), ("rank_cap", rank_cap)) if v is not None})
    for item in params or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise EraserError(f"--param expects key=value, found '{item}'.")
        if key not in fields or key in ("concepts", "anchors", "preserve"):
            raise EraserError(
                f"{method.name} has no parameter '{key}'. Its parameters: "
                f"{', '.join(k for k in fields if k not in ('concepts', 'anchors', 'preserve'))}."
            )
        data[key] = parse_value(value.strip(), fields[key], key)
    if preset is not None:
        return method.config_class.from_preset(preset, **data)
    return method.config_class.from_dict(data)


def read_list_file(path: Optional[str]) -> list:
    if not path:
        return []
    if os.path.isdir(path):
        raise EraserError(f"'{path}' is a folder; expected a text file with one concept per line.")
    if not os.path.isfile(path):
        raise EraserError(f"No file at '{path}' (expected a text file with one concept per line).")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a BOM from Windows editors is not a concept
            return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError as exc:
        raise EraserError(
            f"'{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}; Latin-1 or "
            f"another code page?). Save it as UTF-8 and run again."
        ) from None
    except OSError as exc:
        raise EraserError(f"'{path}' could not be read ({exc.strerror or exc}).") from None


def load_diffusers_folder(folder: str):
    """A pipeline-like object with the denoiser, tokenizers and text encoders of a diffusers folder."""
    index = read_model_index(folder)
    try:
        if "unet" not in index:
            from diffusers import DiffusionPipeline

            return DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        from types import SimpleNamespace

        import diffusers
        import transformers

        parts = {}
        for name in ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            spec = index.get(name)
            if not spec or spec[1] is None or not os.path.isdir(os.path.join(folder, name)):
                continue
            library = diffusers if spec[0] == "diffusers" else transformers
            cls = getattr(library, str(spec[1]), None)
            if cls is None or not hasattr(cls, "from_pretrained"):
                raise BadEraserFile(
                    f"{os.path.join(folder, 'model_index.json')}: '{name}' names the class {spec[1]!r}, which "
                    f"{library.__name__} does not have. Fix the entry, e.g. "
                    f'["diffusers", "UNet2DConditionModel"].'
                )
            parts[name] = cls.from_pretrained(os.path.join(folder, name))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, EraserError):
            raise
        raise BadEraserFile(
            f"The diffusers folder '{folder}' could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Check that it is complete (model_index.json, unet/ or transformer/, text_encoder/, tokenizer/)."
        ) from exc
    if "unet" not in parts:
        raise BadEraserFile(
            f"'{folder}': model_index.json lists a unet but there is no loadable unet/ folder. "
            f"Pass a complete diffusers model folder."
        )
    return SimpleNamespace(**parts)


def read_model_index(folder: str) -> dict:
    """model_index.json of a diffusers folder, checked: a JSON object whose component entries are
    [library, class] pairs; anything else is refused naming the file and the entry."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise BadEraserFile(
            f"'{folder}' is not a diffusers model folder (no model_index.json). Pass the folder "
            f"that holds model_index.json, unet/ (or transformer/), text_encoder/, tokenizer/."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEraserFile(f"'{path}' is not valid JSON ({exc}). Re-download the model or fix the file.") from None
    if not isinstance(index, dict):
        raise BadEraserFile(f"'{path}' must hold a JSON object, found {type(index).__name__}.")
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        spec = index.get(name)
        if spec is None:
            continue
        if not isinstance(spec, list) or len(spec) != 2 or not all(v is None or isinstance(v, str) for v in spec):
            raise BadEraserFile(
                f"'{path}': entry '{name}' must be a [library, class] pair such as "
                f'["diffusers", "UNet2DConditionModel"], found {json.dumps(spec)[:80]}.'
            )
    return index


def model_files(source: str) -> tuple:
    """The files an eraser is computed from (a checkpoint, or every file of a diffusers folder): never outputs."""
    if os.path.isdir(source):
        return tuple(os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
    return (source,)


def cmd_erase(args) -> int:
    from erasers.config import ConfigError, check_number
    from erasers.edits.eraser import compute_eraser
    from erasers.errors import RefusedPath
    from erasers.files.eraser_file import FILE_TOLERANCE, output_file, save_eraser
    from erasers.files.writing import check_output_path

    check_number("--file-tolerance", args.file_tolerance, low=0)
    if args.file_tolerance >= 1:
        raise ConfigError(
            f"--file-tolerance is a relative error per layer and must be below 1 (default {FILE_TOLERANCE:g}), "
            f"found {args.file_tolerance:g}."
        )
    if args.out.endswith(("/", os.sep)) and not os.path.isdir(args.out):
        raise RefusedPath(
            f"--out '{args.out}' names a folder that does not exist. Create it first, or give a file name."
        )
    concepts = list(args.concept or []) + read_list_file(args.concepts_file)
    preserve = list(args.preserve or []) + read_list_file(args.preserve_file)
    config = build_config(
        args.method, concepts, args.anchor or [], preserve, args.concept_type, args.rank_cap, args.param, args.preset
    )
    out = output_file(args.out)  # None for a folder: the name comes from the eraser, checked when written
    if out:  # before any model is read: a refused output costs nothing
        check_output_path(out, model_files(args.checkpoint or args.diffusers), overwrite=args.force)
    started = time.perf_counter()
    if args.checkpoint:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint, tokenizer_dir=args.tokenizer)
        encoder, weights, family, source = ckpt.encoder, ckpt.weights, ckpt.family, args.checkpoint
    else:
        from . import api as diffusers_api

        pipe = load_diffusers_folder(args.diffusers)
        family, source = diffusers_api.pipeline_family(pipe), args.diffusers
    loaded = time.perf_counter()

    def progress(done, total):
        print(f"  encoded {done}/{total} prompts", file=sys.stderr)

    many = len(config.concepts) + len(config.preserve) > 64
    if args.checkpoint:
        eraser = compute_eraser(config, encoder, weights, family, progress=progress if many else None)
    else:  # the pipeline's own encoders (HiDream-I1: one per text stream)
        eraser = diffusers_api.compute_eraser_for_pipeline(pipe, config, progress=progress if many else None)
    path = save_eraser(
        eraser,
        args.out,
        exact=args.exact,
        tolerance=args.file_tolerance,
        overwrite=args.force,
        inputs=model_files(args.checkpoint or args.diffusers),
    )
    t = eraser.timings
    ranks = sorted({d.rank for d in eraser.deltas.values()})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    print(
        f"{eraser.method} eraser for {family.label} ({os.path.basename(source)}): {len(eraser.concepts)} "
        f"concept(s), {len(eraser.deltas)} layers, rank {rank}"
    )
    print(
        f"load {loaded - started:.2f} s, text encoding {t.get('encode_s', 0):.2f} s, solve "
        f"{t.get('solve_s', 0):.2f} s"
        + (f", rank-cap error {eraser.reconstruction_error:.3g}" if config.rank_cap else "")
    )
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return 0


# -- info -----------------------------------------------------------------------------------------------


def load_checked(path: str):
    """(header description, eraser or None, problems) of any .safetensors adapter file. Broken metadata or
    inconsistent factors become problems (shown by ``info``), never a traceback."""
    from erasers.files.eraser_file import load_eraser
    from erasers.files.file_info import describe_header

    header = describe_header(path, with_hash=False, check_values=True)
    problems = list(header["problems"])
    eraser = None
    if header.get("kind") == "eraser" and not problems:
        try:
            eraser = load_eraser(path)
            eraser.check_factors()
        except EraserError as exc:
            problems.append(str(exc))
            eraser = None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a metadata field of the wrong kind
            problems.append(f"its eraser metadata could not be read ({type(exc).__name__}: {str(exc)[:120]})")
            eraser = None
    return header, eraser, problems


def cmd_info(args) -> int:
    header, eraser, problems = load_checked(args.file)
    size = os.path.getsize(args.file)
    checked = "all tensors read: finite" if header["values_checked"] and not problems else ""
    if args.json:
        if eraser is not None:
            params = {k: v for k, v in eraser.config.items() if k not in ("method", "concepts", "anchors", "preserve")}
            data = {
                "file": args.file,
                "size_bytes": size,
                "kind": "eraser",
                "method": eraser.method,
                "family": eraser.family.value,
                "concepts": eraser.concepts,
                "anchors": eraser.config.get("anchors", []),
                "preserve": eraser.config.get("preserve", []),
                "parameters": params,
                "layers": {k: d.rank for k, d in sorted(eraser.deltas.items())},
                "pack_version": eraser.pack_version,
                "base_fingerprint": eraser.base_fingerprint,
                "reconstruction_error": eraser.reconstruction_error,
            }
        else:
            data = {k: v for k, v in header.items() if k not in ("problems", "values_checked")}
            data["file"] = args.file
        data.update(problems=problems, values_checked=header["values_checked"], ok=not problems)
        print(json.dumps(data, ensure_ascii=False, indent=1))
    elif eraser is not None:
        print_eraser(args, eraser, size)
        print(f"checks:      ok (header consistent; {checked})")
    else:
        print(f"file:        {args.file} ({size / 1e6:.2f} MB)")
        print(f"kind:        {header.get('kind', '?')}" + (f" ({header['title']})" if header.get("title") else ""))
        print(f"method:      {header.get('method') or '(not recorded)'}")
        print(f"family:      {header.get('family') or '(unknown)'}")
        print(f"concepts:    {', '.join(header.get('concepts') or []) or '(not recorded)'}")
        print(f"tensors:     {header['tensors']}, rank {header.get('rank') or '–'}")
        if header.get("format"):
            print(f"format:      {header['format']} ({header['format_title']})")
        elif header.get("note"):
            print(f"format:      (not recognised) {header['note']}")
        if "unet_layers" in header:  # adapters other than the pack's eraser files (file_info.adapter_layout)
            ranks = header.get("ranks") or []
            print(
                f"layers:      {header['layers']} ({header['unet_layers']} UNet/transformer, "
                f"{header['text_encoder_layers']} text encoder)" + (f"; ranks {ranks}" if len(ranks) > 1 else "")
            )
            encoders = ", ".join(header.get("text_encoders") or []) or "none"
            print(f"text keys:   {encoders}")
            modules = ", ".join(f"{m} ×{n}" for m, n in (header.get("modules") or {}).items()) or "–"
            print(f"modules:     {modules}")
        if problems:
            for problem in problems:
                print(f"PROBLEM:     {problem}")
        else:
            print(f"checks:      ok (header consistent; {checked})")
    if problems:
        more = f" (and {len(problems) - 1} more, listed on stdout)" if len(problems) > 1 else ""
        raise BadEraserFile(
            f"'{os.path.basename(args.file)}' is damaged: {problems[0]}{more}. No loader of the pack will apply it; "
            f"re-create or re-download it."
        )
    return 0


def print_eraser(args, eraser, size: int) -> None:
    ranks = [d.rank for d in eraser.deltas.values()]
    kinds = {}
    for key in eraser.deltas:
        kind = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key
        kinds[kind] = kinds.get(kind, 0) + 1
    params = {k: v for k, v in eraser.config.items() if k not in ("method", "concepts", "anchors", "preserve")}
    print(f"file:        {args.file} ({size / 1e6:.2f} MB)")
    print(f"method:      {eraser.method}")
    print(f"family:      {eraser.family.label}")
    print(f"concepts:    {', '.join(eraser.concepts)}")
    print(f"anchors:     {', '.join(repr(a) for a in eraser.config.get('anchors', [])) or '(method default)'}")
    print(f"preserve:    {', '.join(eraser.config.get('preserve', [])) or '(none)'}")
    print(f"parameters:  {json.dumps(params, ensure_ascii=False, sort_keys=True)}")
    low, high = min(ranks, default=0), max(ranks, default=0)
    print(
        f"edits:       {len(eraser.deltas)} layers ({', '.join(f'{n}× {k}' for k, n in sorted(kinds.items()))}), "
        f"rank {low if low == high else f'{low}–{high}'}"
    )
    print(f"made by:     concept-erasers {eraser.pack_version}; base fingerprint {eraser.base_fingerprint[:16]}")
    if eraser.reconstruction_error:
        print(
            f"stored:      approximately: worst relative error of a layer's delta {eraser.reconstruction_error:.3g} "
            f"(rank cap or truncated SVD; see the eraser.storage metadata)"
        )
    if args.layers:
        for key, delta in sorted(eraser.deltas.items()):
            print(f"  {key}  {delta.shape[0]}×{delta.shape[1]}  rank {delta.rank}")


# -- bench ----------------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    if args.name not in BENCHES:
        raise EraserError(f"Unknown benchmark '{args.name}'; available: {', '.join(sorted(BENCHES))}.")
    return int(resolve(BENCHES[args.name])(list(args.rest)) or 0)


# -- parser ---------------------------------------------------------------------------------------------


def add_erase(subparsers) -> None:
    from erasers.config import EraserConfig
    from erasers.edits.methods import METHODS
    from erasers.files.eraser_file import FILE_TOLERANCE

    p = subparsers.add_parser(
        "erase",
        help="compute an eraser from a checkpoint and save it",
        description="Compute a closed-form eraser on a model and write it as a .safetensors file (kohya LoRA layout).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="single-file SD1.x/SD2.x/SDXL .safetensors checkpoint")
    src.add_argument(
        "--diffusers",
        metavar="DIR",
        help="diffusers model folder (with model_index.json): SD1.x/SD2.x/SDXL/SD3/Flux, and Chroma, Flux.2, "
        "Qwen-Image, Z-Image, Lumina 2, Wan text-to-video (HiDream is refused)",
    )
    p.add_argument("--method", default="uce", choices=sorted(METHODS), help="closed-form method (default uce)")
    p.add_argument("--concept", action="append", metavar="TEXT", help="a concept to erase (repeatable)")
    p.add_argument("--concepts-file", metavar="FILE", help="more concepts, one per line")
    p.add_argument(
        "--anchor",
        action="append",
        metavar="TEXT",
        help="what to map the concept to: one for all, or one per --concept (default: method's)",
    )
    p.add_argument("--preserve", action="append", metavar="TEXT", help="a concept to keep unchanged (repeatable)")
    p.add_argument("--preserve-file", metavar="FILE", help="more concepts to preserve, one per line")
    p.add_argument(
        "--concept-type",
        default=None,
        choices=EraserConfig.CONCEPT_TYPES,
        help="picks the published defaults (default object, or the preset's)",
    )
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="a published setting of the method (as METHOD.from_preset); options given explicitly override it. "
        "speed 'styles' and rece 'art' preserve every other artist of erasers/data/artists_sd.txt unless "
        "--preserve/--preserve-file is given. Presets: " + preset_names(),
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="advanced method parameter, e.g. lam=0.5 or variant=2023 (repeatable)",
    )
    p.add_argument(
        "--rank-cap", type=int, metavar="N", help="truncate each layer's delta to rank N (prints the error)"
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="write full-rank deltas (RECE, MACE) densely and exactly instead of as truncated SVDs",
    )
    p.add_argument(
        "--file-tolerance",
        type=float,
        default=FILE_TOLERANCE,
        metavar="TOL",
        help=f"relative error per layer allowed when a full-rank delta is written as a truncated SVD "
        f"(default {FILE_TOLERANCE:g}; the computed edit itself stays exact)",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="folder with CLIP's vocab.json + merges.txt (single files)")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output .safetensors path, or an existing folder (the file is named after the method and concept)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace --out if it exists (never the model it was computed from)"
    )
    p.set_defaults(func=cmd_erase)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m erasers", description="Concept Erasers command line.")
    parser.add_argument("--version", action="version", version=f"concept-erasers {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_erase(subparsers)
    from .check import add_check  # the Eraser Check (#17): python -m erasers check

    add_check(subparsers)
    p = subparsers.add_parser(
        "info",
        help="print an eraser / SPM / LoRA file's metadata and check it",
        description="Print an eraser file's metadata and what it edits (SPM membranes and erasure LoRAs: what "
        "their header says), and check the file: lora_up / lora_down ranks that match, the layers its metadata "
        "lists, and (reading every tensor) no NaN / Inf. A damaged file is shown, flagged, and exits with code 2.",
    )
    p.add_argument("file", help="eraser, SPM or LoRA .safetensors file")
    p.add_argument("--layers", action="store_true", help="list every edited layer with its rank")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its table",
        description=f"Run a benchmark: {', '.join(sorted(BENCHES))}. Arguments after the "
        f"name go to the benchmark (e.g. 'bench closed-form --quick').",
    )
    p.add_argument("name", help=f"one of: {', '.join(sorted(BENCHES))}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (--help for its own)")
    p.set_defaults(func=cmd_bench)
    for name in PLUGINS:
        try:
            module = importlib.import_module(name, __package__)
        except ImportError as exc:
            log.debug("CLI plugin %s not available: %s", name, exc)
            continue
        if hasattr(module, "add_subparsers"):
            module.add_subparsers(subparsers)
        elif hasattr(module, "add_subparser"):  # a module that adds exactly one subcommand
            module.add_subparser(subparsers)
    return parser


class UsageError(EraserError):
    """A command line argparse refused (unknown option, a value of the wrong type, a missing argument)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see '<prog> --help')``, raised so ``main`` prints it once
    (plain argparse prints the whole usage block and then a second error line)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def quiet_broken_pipe() -> int:
    """stdout was closed by the reader (``info … | head``): stop quietly, without a second error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout in tests)
        pass
    return 0


def one_line(exc: BaseException) -> str:
    """The ``error: …`` line of a user error: the pack's own message, or what the OS said about which file."""
    if isinstance(exc, OSError) and not isinstance(exc, EraserError):
        where = f" '{exc.filename}'" if exc.filename else ""
        what = exc.strerror or str(exc)
        hint = {
            IsADirectoryError: "give a file, not a folder",
            NotADirectoryError: "a part of the path is a file, not a folder",
            FileNotFoundError: "check the path",
            FileExistsError: "a file is in the way: choose another name or move it",
            PermissionError: "check the file's permissions",
        }.get(type(exc), "check the path and the disk")
        return f"{what}:{where}. {hint[0].upper() + hint[1:]}."
    return " ".join(str(exc).split())  # one line, whatever the message held


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (EraserError, OSError) as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted; any file being written was left as it was.", file=sys.stderr)
        return 130
