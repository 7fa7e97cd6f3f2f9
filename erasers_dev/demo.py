"""``python -m erasers demo [--out DIR] [--concept circle]``: see an eraser work, in under a minute.

Loads the pack's small trained shapes-world model, erases one concept ("circle" by default) with each
closed-form method through the diffusers adapter (``erasers_diffusers.api``: compute → apply → sample →
remove, checking the weights come back bit for bit), and writes into the output folder:

* ``grid.png`` — before/after images: one row per prompt (the concept, a synonym of it, other shapes),
  one column per method (base first);
* ``report.md`` and ``report.json`` — per method, the rate at which the erased concept still appears
  (exact word, synonyms) and the fidelity on the other concepts relative to the base model, read by the
  shipped classifier over a few seeds; plus timings.

The full measurement (attacks, paraphrases, multi-concept, suppression methods) is
``python -m erasers bench shapes``.
"""

from __future__ import annotations

import json
import os
import time
from typing import List

import torch

from erasers.files.writing import atomic_write, atomic_write_text

DEFAULT_METHODS = ("uce", "rece", "speed", "mace")


def demo_eval_set(concept: str, reps: int = 2):
    """A small prompt set: the concept with every value of the other axis (``reps`` each), its synonyms
    (once each), and every other concept of its axis with every value of the other axis (once each)."""
    from .bench import shapes_eval as ev
    from .shapes import world

    axis = ev.axis_of(concept)
    if axis not in ("shape", "colour"):
        raise ValueError(f"The demo erases a shape or a colour; '{concept}' is a {axis}.")
    es = ev.EvalSet()
    S, C = world.SHAPES.index, world.COLOURS.index
    pairs = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    ordered = [p for p in pairs if concept in p] + [p for p in pairs if concept not in p]
    for s, c in ordered:
        es.add(f"a {c} {s}", "canonical", S(s), C(c), reps=reps if concept in (s, c) else 1)
    for s, c in pairs:
        if concept == s:
            for word in world.SYNONYMS[s][1:]:
                es.add(f"a {c} {word}", "synonym", S(s), C(c))
        if concept == c:
            for word in world.SYNONYMS[c][1:]:
                es.add(f"a {word} {s}", "synonym", S(s), C(c))
    return es


def grid_prompts(es, concept: str) -> List[int]:
    """Rows of the picture: the concept twice, a synonym, then one prompt per other concept of its axis."""
    from .bench import shapes_eval as ev

    axis = ev.axis_of(concept)
    other = "colour" if axis == "shape" else "shape"
    n_other = len(ev.VALUES[other])
    target = ev.VALUES[axis].index(concept)
    rows, seen = [], set()
    for i, (prompt, kind) in enumerate(zip(es.prompts, es.kinds)):
        named = es.labels[axis][i] == target
        if prompt in seen:
            continue
        if named and kind == "canonical" and sum(1 for r in rows if es.kinds[r] == "canonical") < 2:
            rows.append(i)
            seen.add(prompt)
        elif named and kind == "synonym" and not any(es.kinds[r] == "synonym" for r in rows):
            rows.append(i)
            seen.add(prompt)
    for value in range(len(ev.VALUES[axis])):
        if value == target:
            continue
        for i, prompt in enumerate(es.prompts):
            if es.labels[axis][i] == value and es.labels[other][i] == (value + 2) % n_other:
                rows.append(i)
                break
    return rows


def auto_threads() -> int:
    """2 threads on a free machine, 1 on a busy one: oversubscribed OpenMP threads spin and wait, which
    made this model's sampling 4–10× slower than one thread on the shared 2-core machines we measured."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else min(2, cores)


def run_demo(
    concept: str = "circle",
    out: str = "erasers_demo",
    methods=DEFAULT_METHODS,
    steps: int = 20,
    reps: int = 2,
    seed: int = 0,
    threads: int = 0,
    show_progress: bool = True,
    weights=None,
    classifier=None,
) -> dict:
    from erasers_diffusers import api as api

    from .bench import shapes_eval as ev
    from .bench.shapes import closed_form_config
    from .shapes import load_classifier, load_default, load_pipeline
    from .shapes.model import DEFAULT_GUIDANCE

    torch.set_num_threads(max(1, threads or auto_threads()))
    started = time.perf_counter()
    pipe = load_pipeline(weights) if weights else load_default()
    classifier = load_classifier(classifier) if classifier else load_classifier()
    es = demo_eval_set(concept, reps)
    rows = grid_prompts(es, concept)
    columns, report = (
        {},
        {"concept": concept, "steps": steps, "seed": seed, "images_per_column": len(es), "methods": {}},
    )
    snapshot = {n: p.detach().clone() for n, p in api.projection_params(pipe).values()}
    bar = _bar(len(methods) + 1, show_progress)

    def sample():
        t0 = time.perf_counter()
        images = pipe(es.prompts, steps=steps, guidance=DEFAULT_GUIDANCE, seed=seed, batch_size=len(es))
        return images, time.perf_counter() - t0

    bar.set_description("base")
    base_images, base_s = sample()
    base_pred = ev.predictions_to_tensors(classifier.predict(base_images))
    base_score = ev.score(base_pred, base_pred, es, [concept])
    report["base"] = {
        "exact": base_score["erased"]["exact"],
        "synonym": base_score["erased"]["synonym"],
        "related_accuracy": base_score["fidelity"]["related_accuracy"],
        "unrelated_accuracy": base_score["fidelity"]["unrelated_accuracy"],
        "seconds_per_image": base_s / len(es),
    }
    columns["base"] = base_images[rows]
    bar.update(1)
    for method in methods:
        bar.set_description(method)
        t0 = time.perf_counter()
        eraser = api.compute_eraser_for_pipeline(pipe, closed_form_config(method, [concept]))
        edit_s = time.perf_counter() - t0
        with api.erased(pipe, eraser):
            images, sample_s = sample()
        restored = all(torch.equal(p, snapshot[n]) for n, p in api.projection_params(pipe).values())
        if not restored:
            raise RuntimeError(f"Removing the {method} eraser did not restore the model's weights bit for bit.")
        scored = ev.score(ev.predictions_to_tensors(classifier.predict(images)), base_pred, es, [concept])
        report["methods"][method] = {
            "erased_exact": scored["erased"]["exact"],
            "erased_synonym": scored["erased"]["synonym"],
            "fidelity_related": scored["fidelity"]["related"],
            "fidelity_unrelated": scored["fidelity"]["unrelated"],
            "edit_seconds": edit_s,
            "seconds_per_image": sample_s / len(es),
            "weights_restored": restored,
            "layers": len(eraser.deltas),
        }
        columns[method.upper()] = images[rows]
        bar.update(1)
    bar.close()
    report["grid_rows"] = [es.prompts[i] for i in rows]
    report["total_seconds"] = time.perf_counter() - started
    os.makedirs(out, exist_ok=True)
    # atomic: an interrupted demo leaves the previous report whole. These three names are the demo's own
    # outputs (the folder is the demo's, see --out), so a re-run replaces them.
    grid = ev.labelled_grid(columns, report["grid_rows"])
    atomic_write(os.path.join(out, "grid.png"), lambda tmp: grid.save(tmp, format="PNG"), overwrite=True)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1), overwrite=True)
    atomic_write_text(os.path.join(out, "report.md"), report_markdown(report), overwrite=True)
    return report


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def report_markdown(report: dict) -> str:
    b = report["base"]
    lines = [
        f'# Erasing "{report["concept"]}" from the shapes-world model',
        "",
        f"{report['images_per_column']} images per column, {report['steps']} DDIM steps, seed {report['seed']}; "
        f"read by the shipped classifier. Total {report['total_seconds']:.0f} s.",
        "",
        "| method | concept still drawn: exact word ↓ | synonyms ↓ | fidelity, same kind ↑ | fidelity, other "
        "attributes ↑ | edit (s) |",
        "|---|---|---|---|---|---|",
        f"| base | {pct(b['exact'])} | {pct(b['synonym'])} | {pct(b['related_accuracy'])} accuracy | "
        f"{pct(b['unrelated_accuracy'])} accuracy | – |",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name.upper()} | {pct(m['erased_exact'])} | {pct(m['erased_synonym'])} | "
            f"{pct(m['fidelity_related'])} | {pct(m['fidelity_unrelated'])} | {m['edit_seconds']:.2f} |"
        )
    lines += [
        "",
        'Fidelity is relative to the base model on prompts that do not name the concept: "same kind" '
        '= the other shapes (or colours), "other attributes" = colour (or shape). After each method the '
        "model's weights were checked to be restored bit for bit.",
        "",
        "![grid](grid.png)",
        "",
        f"Rows: {'; '.join(report['grid_rows'])}.",
    ]
    return "\n".join(lines) + "\n"


class _NoBar:
    def set_description(self, _):
        pass

    def update(self, _):
        pass

    def close(self):
        pass


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="column")


def add_subparsers(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="erase 'circle' from the bundled shapes model and show before/after",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--out",
        default="erasers_demo",
        help="output folder (default ./erasers_demo); its grid.png, report.md and report.json are replaced",
    )
    p.add_argument("--concept", default="circle", help="a shape or colour of the shapes world (default circle)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated closed-form methods")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: 2, or 1 on a busy machine)")
    p.add_argument("--weights", default=None, help="a shapes_t2i.safetensors (default: the bundled model)")
    p.add_argument("--classifier", default=None, help="a shapes_classifier.safetensors (default: bundled)")
    p.set_defaults(func=cmd_demo)


def check_demo_args(args) -> list:
    """Every demo input checked before the model loads (``EraserError``: one ``error:`` line, exit 2);
    returns the method list."""
    from erasers.edits.methods import METHODS
    from erasers.errors import EraserError
    from erasers.files.safetensors_header import read_safetensors_header

    from .bench import shapes_eval as ev
    from .shapes.classifier import FORMAT_CLASSIFIER
    from .shapes.model import FORMAT_T2I

    try:
        axis = ev.axis_of(args.concept)
    except ValueError as exc:
        raise EraserError(f"--concept: {exc}") from None
    if axis not in ("shape", "colour"):
        raise EraserError(f"--concept: the demo erases a shape or a colour; '{args.concept}' is a {axis}.")
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise EraserError(
            f"--methods: expected closed-form methods from {', '.join(sorted(METHODS))}, found "
            f"{', '.join(unknown) if unknown else 'none'}."
        )
    for name, value, low in (("--steps", args.steps, 1), ("--seed", args.seed, 0), ("--threads", args.threads, 0)):
        if value < low:
            raise EraserError(f"{name} must be ≥ {low}, found {value}.")
    files = (("--weights", args.weights, FORMAT_T2I), ("--classifier", args.classifier, FORMAT_CLASSIFIER))
    for option, path, expected in files:
        if path is None:
            continue
        _, metadata = read_safetensors_header(os.fspath(path))  # refuses missing, pickled, truncated files
        if metadata.get("format") != expected:
            raise EraserError(
                f"{option} '{path}' is not a '{expected}' file (its metadata format is {metadata.get('format')!r}). "
                f"Pass the file written by `python -m erasers shapes train`."
            )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise EraserError(
            f"--out '{args.out}' is a file; the demo writes a folder (grid.png, report.md, report.json)."
        )
    return methods


def cmd_demo(args) -> int:
    methods = check_demo_args(args)
    report = run_demo(
        args.concept,
        args.out,
        methods,
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        weights=args.weights,
        classifier=args.classifier,
    )
    print(report_markdown(report).split("![grid]")[0].rstrip())
    print(f"\nwrote {os.path.join(args.out, 'grid.png')}, report.md, report.json")
    return 0
