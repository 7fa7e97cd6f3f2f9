"""Base fidelity of the shapes model: does it draw the prompted shape in the prompted colour?

For every (shape, colour) pair, sample ``per_prompt`` images of the prompt "a {colour} {shape}" with
fixed seeds, read them with the classifier, and tabulate prompted vs. classified. The same function
also scores held-out paraphrases (``world.HELDOUT_TEMPLATES`` and the held-out synonym/colour pairs).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import world

CANONICAL_TEMPLATE = "a {c} {s}"


def fidelity_prompts(
    per_prompt: int, template: str = CANONICAL_TEMPLATE
) -> Tuple[List[str], torch.Tensor, torch.Tensor]:
    """Prompts for every (shape, colour), ``per_prompt`` times each, with their label indices."""
    prompts, shapes, colours = [], [], []
    for si, s in enumerate(world.SHAPES):
        for ci, c in enumerate(world.COLOURS):
            for _ in range(per_prompt):
                prompts.append(template.format(s=s, c=c))
                shapes.append(si)
                colours.append(ci)
    return prompts, torch.tensor(shapes), torch.tensor(colours)


def paraphrase_prompts(per_prompt: int, seed: int = 0) -> Tuple[List[str], torch.Tensor, torch.Tensor]:
    """Held-out phrasings and held-out (synonym, colour) combinations, with their label indices."""
    gen = torch.Generator().manual_seed(seed)
    prompts, shapes, colours = [], [], []
    for si, s in enumerate(world.SHAPES):
        for ci, c in enumerate(world.COLOURS):
            for _ in range(per_prompt):
                st = world.STYLES[int(torch.randint(len(world.STYLES), (1,), generator=gen))]
                bg = world.BACKGROUNDS[int(torch.randint(len(world.BACKGROUNDS), (1,), generator=gen))]
                prompts.append(world.caption_for(s, c, st, bg, gen, world.HELDOUT_TEMPLATES, heldout=True))
                shapes.append(si)
                colours.append(ci)
    shape_of = {w: s for s in world.SHAPES for w in world.SYNONYMS[s]}
    for syn, c in world.HELDOUT_SYNONYM_COLOURS:
        for _ in range(per_prompt):
            prompts.append(f"a {c} {syn}")
            shapes.append(world.SHAPES.index(shape_of[syn]))
            colours.append(world.COLOURS.index(c))
    return prompts, torch.tensor(shapes), torch.tensor(colours)


def confusion(true: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) counts, rows = prompted, columns = classified."""
    return torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def confusion_markdown(table: torch.Tensor, names: Sequence[str], title: str) -> str:
    header = f"| {title} (prompted ↓ / classified →) | " + " | ".join(names) + " | accuracy |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for i, name in enumerate(names):
        row = table[i]
        acc = row[i].item() / max(1, row.sum().item())
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + f" | {acc:.1%} |")
    return "\n".join(lines)


def score(
    pipe,
    classifier,
    prompts: List[str],
    shapes: torch.Tensor,
    colours: torch.Tensor,
    steps: int,
    guidance: float,
    seed: int,
) -> Dict:
    images = pipe(prompts, steps=steps, guidance=guidance, seed=seed)
    pred = classifier.predict(images)
    conf_s = confusion(shapes, pred["shape"], len(world.SHAPES))
    conf_c = confusion(colours, pred["colour"], len(world.COLOURS))
    return {
        "n": len(prompts),
        "shape_accuracy": (pred["shape"] == shapes).float().mean().item(),
        "colour_accuracy": (pred["colour"] == colours).float().mean().item(),
        "both_accuracy": ((pred["shape"] == shapes) & (pred["colour"] == colours)).float().mean().item(),
        "shape_confusion": conf_s.tolist(),
        "colour_confusion": conf_c.tolist(),
        "images": images,
    }


def evaluate(
    pipe=None,
    classifier=None,
    per_prompt: int = 8,
    steps: int = 20,
    guidance: Optional[float] = None,
    seed: int = 0,
    paraphrases: bool = True,
) -> Dict:
    """Base fidelity (and paraphrase fidelity); returns numbers, confusion tables and a markdown report."""
    from .classifier import load_classifier
    from .model import DEFAULT_GUIDANCE, load_default

    pipe = pipe or load_default()
    classifier = classifier or load_classifier()
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    result = {"settings": dict(per_prompt=per_prompt, steps=steps, guidance=guidance, seed=seed)}
    result["canonical"] = score(pipe, classifier, *fidelity_prompts(per_prompt), steps, guidance, seed)
    if paraphrases:
        result["paraphrase"] = score(pipe, classifier, *paraphrase_prompts(per_prompt, seed), steps, guidance, seed)
    result["markdown"] = report_markdown(result)
    return result


def report_markdown(result: Dict) -> str:
    s = result["settings"]
    c = result["canonical"]
    out = [
        f'Base fidelity, prompts "{CANONICAL_TEMPLATE.format(c="{colour}", s="{shape}")}", {s["per_prompt"]} '
        f"images per (shape, colour), {s['steps']} DDIM steps, guidance {s['guidance']}, seed {s['seed']}: "
        f"shape {c['shape_accuracy']:.1%}, colour {c['colour_accuracy']:.1%}, both {c['both_accuracy']:.1%} "
        f"(n={c['n']}).",
        "",
        confusion_markdown(torch.tensor(c["shape_confusion"]), world.SHAPES, "shape"),
        "",
        confusion_markdown(torch.tensor(c["colour_confusion"]), world.COLOURS, "colour"),
    ]
    if "paraphrase" in result:
        p = result["paraphrase"]
        out += [
            "",
            f"Held-out paraphrases and synonym/colour pairs: shape {p['shape_accuracy']:.1%}, colour "
            f"{p['colour_accuracy']:.1%}, both {p['both_accuracy']:.1%} (n={p['n']}).",
        ]
    return "\n".join(out)
