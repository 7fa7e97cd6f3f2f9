"""Command line: ``python -m erasers erase | info | bench …`` (``--help`` on each).

Extending it:
  * a module listed in ``PLUGINS`` that exposes ``add_subparsers(subparsers)`` adds its own subcommands
    (each sets ``func=callable(args) -> int`` with ``set_defaults``); missing modules are skipped;
  * ``BENCHES`` maps a benchmark name to ``"module:function"`` (relative to this package) or a callable
    taking the remaining argv list and returning an exit code: ``python -m erasers bench NAME [args…]``.
Errors the pack raises (``erasers.errors.EraserError``) print as one line on stderr, exit code 2.
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
PLUGINS = ["erasers_dev.shapes.cli", "erasers_dev.demo", ".generate"]
#: benchmark name → "module:function" or callable(argv) -> int
BENCHES: dict = {
    "closed-form": ".bench.closed_form:main",
    "spm": ".bench.spm:main",
    "suppression": ".bench.suppression:main",
    "shapes": ".bench.shapes:main",
}


def register_bench(name: str, target: Union[str, Callable]) -> None:
    BENCHES[name] = target


def resolve(target: Union[str, Callable]) -> Callable:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module, __package__), attr)


# -- erase ----------------------------------------------------------------------------------------------


def parse_value(text: str, annotation: str):
    """``--param`` value → the dataclass field's type (annotations are strings under postponed evaluation)."""
    kind = str(annotation)
    if text.lower() in ("none", "null", "") and "Optional" in kind:
        return None
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise EraserError(f"Expected true/false for a boolean parameter, found '{text}'.")
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
        raise EraserError(f"Expected a {kind} value, found '{text}'.") from None


def build_config(method_name: str, concepts, anchors, preserve, concept_type, rank_cap, params):
    from erasers.edits.methods import get_method

    method = get_method(method_name)
    fields = {f.name: f.type for f in dataclasses.fields(method.config_class)}
    data = {
        "concepts": concepts,
        "anchors": anchors,
        "preserve": preserve,
        "concept_type": concept_type,
        "rank_cap": rank_cap,
    }
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
        data[key] = parse_value(value.strip(), fields[key])
    return method.config_class.from_dict(data)


def read_list_file(path: Optional[str]) -> list:
    if not path:
        return []
    if not os.path.isfile(path):
        raise EraserError(f"No file at '{path}' (expected one concept per line).")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]


def load_diffusers_folder(folder: str):
    """A pipeline-like object with the denoiser, tokenizers and text encoders of a diffusers folder."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise BadEraserFile(
            f"'{folder}' is not a diffusers model folder (no model_index.json). Pass the folder "
            f"that holds model_index.json, unet/ (or transformer/), text_encoder/, tokenizer/."
        )
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
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
        parts[name] = getattr(library, spec[1]).from_pretrained(os.path.join(folder, name))
    return SimpleNamespace(**parts)


def model_files(source: str) -> tuple:
    """The files an eraser is computed from (a checkpoint, or every file of a diffusers folder): never outputs."""
    if os.path.isdir(source):
        return tuple(os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
    return (source,)


def cmd_erase(args) -> int:
    from erasers.edits.eraser import compute_eraser
    from erasers.files.eraser_file import output_file, save_eraser
    from erasers.files.writing import check_output_path

    concepts = list(args.concept or []) + read_list_file(args.concepts_file)
    preserve = list(args.preserve or []) + read_list_file(args.preserve_file)
    config = build_config(
        args.method, concepts, args.anchor or [], preserve, args.concept_type, args.rank_cap, args.param
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
        encoder, weights = diffusers_api.DiffusersTextEncoder(pipe), diffusers_api.canonical_weights(pipe)
        family, source = diffusers_api.pipeline_family(pipe), args.diffusers
    loaded = time.perf_counter()

    def progress(done, total):
        print(f"  encoded {done}/{total} concepts", file=sys.stderr)

    eraser = compute_eraser(config, encoder, weights, family, progress=progress if len(concepts) > 64 else None)
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


def cmd_info(args) -> int:
    from erasers.files.eraser_file import load_eraser

    eraser = load_eraser(args.file)
    size = os.path.getsize(args.file)
    ranks = [d.rank for d in eraser.deltas.values()]
    kinds = {}
    for key in eraser.deltas:
        kind = key.rsplit(".", 2)[-2] if key.endswith(".weight") else key
        kinds[kind] = kinds.get(kind, 0) + 1
    params = {k: v for k, v in eraser.config.items() if k not in ("method", "concepts", "anchors", "preserve")}
    if args.json:
        print(
            json.dumps(
                {
                    "file": args.file,
                    "size_bytes": size,
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
                },
                ensure_ascii=False,
                indent=1,
            )
        )
        return 0
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
    return 0


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
    src.add_argument("--diffusers", metavar="DIR", help="diffusers model folder (with model_index.json)")
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
        default="object",
        choices=EraserConfig.CONCEPT_TYPES,
        help="picks the published defaults (default object)",
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
    parser = argparse.ArgumentParser(prog="python -m erasers", description="Concept Erasers command line.")
    parser.add_argument("--version", action="version", version=f"concept-erasers {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_erase(subparsers)
    p = subparsers.add_parser(
        "info",
        help="print an eraser file's metadata and what it edits",
        description="Print an eraser file's metadata and what it edits.",
    )
    p.add_argument("file", help="eraser .safetensors file")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except EraserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
