"""What the shapes benchmark and the demo measure: prompt sets with labels, and the metrics on them.

An ``EvalSet`` is a list of prompts with, per axis (shape, colour, style), the index of the value each
prompt names (−1 when it names none). The classifier's predictions on the sampled images are compared
with those labels:

* **erased-concept rate** — over prompts that name an erased concept, the fraction of images the
  classifier reads as that concept (lower is better). Split by how the concept is named: the exact word
  ("canonical" and "style" prompts), a synonym ("a green ball"), or a held-out paraphrase.
* **fidelity** — over prompts that name no erased concept, accuracy with the eraser divided by the base
  model's accuracy on the same prompts and noise (higher is better; 1.0 = unchanged). *Related*: the
  erased concept's own axis (other shapes when a shape is erased); *unrelated*: the other axes.

Everything here is pure: labels and predictions in, numbers out (the unit tests feed synthetic ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..shapes import world

AXES = ("shape", "colour", "style")
VALUES = {"shape": world.SHAPES, "colour": world.COLOURS, "style": world.STYLES}
#: which kinds of prompt count as naming the concept by its exact word
EXACT_KINDS = ("canonical", "style")
SYNONYM_KINDS = ("synonym", "paraphrase")


@dataclass
class EvalSet:
    prompts: List[str] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)
    labels: Dict[str, List[int]] = field(default_factory=lambda: {a: [] for a in AXES})

    def add(self, prompt: str, kind: str, shape: int = -1, colour: int = -1, style: int = -1, reps: int = 1):
        for _ in range(reps):
            self.prompts.append(prompt)
            self.kinds.append(kind)
            for axis, value in zip(AXES, (shape, colour, style)):
                self.labels[axis].append(value)

    def __len__(self) -> int:
        return len(self.prompts)

    def label(self, axis: str) -> torch.Tensor:
        return torch.tensor(self.labels[axis], dtype=torch.long)

    def kind_mask(self, kinds: Sequence[str]) -> torch.Tensor:
        return torch.tensor([k in kinds for k in self.kinds], dtype=torch.bool)

    def first_index(self, prompt: str) -> int:
        return self.prompts.index(prompt)


def axis_of(concept: str) -> str:
    """'circle' → 'shape', 'red' → 'colour' (canonical words only)."""
    for axis, values in VALUES.items():
        if concept in values:
            return axis
    raise ValueError(
        f"'{concept}' is not a concept of the shapes world; expected one of "
        f"{world.SHAPES + world.COLOURS + world.STYLES}."
    )


def build_eval_set(
    canonical_reps: int = 4,
    synonym_reps: int = 2,
    paraphrase_reps: int = 2,
    style_reps: int = 1,
    seed: int = 0,
    shapes: Optional[Sequence[str]] = None,
) -> EvalSet:
    """Every (shape, colour) pair, every synonym, held-out paraphrases and styled prompts.

    One universal set serves every erased concept (the metrics select by label), so the base model is
    sampled once per benchmark. ``shapes`` restricts the set (the demo uses all shapes too).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = list(shapes or world.SHAPES)
    es = EvalSet()
    S, C, ST = world.SHAPES.index, world.COLOURS.index, world.STYLES.index
    for s in shapes:
        for c in world.COLOURS:
            es.add(f"a {c} {s}", "canonical", S(s), C(c), reps=canonical_reps)
    if synonym_reps:
        for s in shapes:
            for word in world.SYNONYMS[s][1:]:
                for c in world.COLOURS:
                    es.add(f"a {c} {word}", "synonym", S(s), C(c), reps=synonym_reps)
        for c in world.COLOURS:
            for word in world.SYNONYMS[c][1:]:
                for s in shapes:
                    es.add(f"a {word} {s}", "synonym", S(s), C(c), reps=synonym_reps)
    if paraphrase_reps:
        for s in shapes:
            for c in world.COLOURS:
                st = world.STYLES[int(torch.randint(len(world.STYLES), (1,), generator=gen))]
                bg = world.BACKGROUNDS[int(torch.randint(len(world.BACKGROUNDS), (1,), generator=gen))]
                template = world.HELDOUT_TEMPLATES[
                    int(torch.randint(len(world.HELDOUT_TEMPLATES), (1,), generator=gen))
                ]
                # the style word is prompted in some templates only; it is not scored here
                es.add(template.format(s=s, c=c, st=st, bg=bg), "paraphrase", S(s), C(c), reps=paraphrase_reps)
    if style_reps:
        # half of the (shape, style, colour) combinations, balanced over each axis
        for i, s in enumerate(shapes):
            for j, st in enumerate(world.STYLES):
                for k, c in enumerate(world.COLOURS):
                    if (i + j + k) % 2 == 0:
                        es.add(f"a {st} {c} {s}", "style", S(s), C(c), ST(st), reps=style_reps)
    return es


def predictions_to_tensors(pred: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {axis: pred[axis].long().cpu() for axis in AXES if axis in pred}


def concept_mask(es: EvalSet, axis: str, erased: Sequence[int]) -> torch.Tensor:
    """Prompts that name one of the erased values on ``axis``."""
    labels = es.label(axis)
    return torch.isin(labels, torch.tensor(list(erased), dtype=torch.long))


def rate(hits: torch.Tensor, mask: torch.Tensor) -> Optional[float]:
    """Mean of a boolean over a mask; None when the mask is empty (nothing was measured)."""
    n = int(mask.sum())
    return None if n == 0 else float(hits[mask].float().mean())


def erased_rates(pred: Dict[str, torch.Tensor], es: EvalSet, axis: str, erased: Sequence[int]) -> dict:
    """Rate at which each erased concept still appears, by how it is named (lower is better)."""
    labels = es.label(axis)
    named = concept_mask(es, axis, erased)
    hits = pred[axis] == labels
    return {
        "exact": rate(hits, named & es.kind_mask(EXACT_KINDS)),
        "synonym": rate(hits, named & es.kind_mask(("synonym",))),
        "paraphrase": rate(hits, named & es.kind_mask(("paraphrase",))),
        "synonym_paraphrase": rate(hits, named & es.kind_mask(SYNONYM_KINDS)),
        "n_exact": int((named & es.kind_mask(EXACT_KINDS)).sum()),
    }


def axis_accuracy(pred: Dict[str, torch.Tensor], es: EvalSet, axes: Sequence[str], mask: torch.Tensor):
    """(correct, total) over every (image in mask, axis in axes) where the prompt names that axis."""
    correct = total = 0
    for axis in axes:
        labels = es.label(axis)
        scored = mask & (labels >= 0)
        correct += int((pred[axis][scored] == labels[scored]).sum())
        total += int(scored.sum())
    return correct, total


def fidelity(
    pred: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], es: EvalSet, axis: str, erased: Sequence[int]
) -> dict:
    """Accuracy on prompts that name no erased concept, relative to the base model (higher is better)."""
    others = ~concept_mask(es, axis, erased)
    out = {}
    for name, axes in (("related", (axis,)), ("unrelated", tuple(a for a in AXES if a != axis))):
        c_e, n = axis_accuracy(pred, es, axes, others)
        c_b, _ = axis_accuracy(base, es, axes, others)
        out[f"{name}_accuracy"] = None if n == 0 else c_e / n
        out[f"{name}_base_accuracy"] = None if n == 0 else c_b / n
        # relative to base; a base that never gets it right makes the ratio meaningless
        out[name] = None if n == 0 or c_b == 0 else c_e / c_b
        out[f"n_{name}"] = n
    return out


def score(pred: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor], es: EvalSet, concepts: Sequence[str]) -> dict:
    """All metrics for one erasure of ``concepts`` (all on one axis)."""
    axes = {axis_of(c) for c in concepts}
    if len(axes) != 1:
        raise ValueError(f"Concepts {list(concepts)} span several axes {sorted(axes)}; score one axis at a time.")
    axis = axes.pop()
    erased = [VALUES[axis].index(c) for c in concepts]
    return {
        "axis": axis,
        "concepts": list(concepts),
        "erased": erased_rates(pred, es, axis, erased),
        "base_erased": erased_rates(base, es, axis, erased),
        "fidelity": fidelity(pred, base, es, axis, erased),
    }


def meets_targets(
    result: dict, exact_max: float = 0.10, unrelated_min: float = 0.95, related_min: float = 0.85
) -> dict:
    """The issue's targets for a closed-form method on one concept: which hold."""
    e, f = result["erased"], result["fidelity"]
    return {
        "exact": e["exact"] is not None and e["exact"] <= exact_max,
        "unrelated": f["unrelated"] is not None and f["unrelated"] >= unrelated_min,
        "related": f["related"] is not None and f["related"] >= related_min,
    }


# -- pictures ----------------------------------------------------------------------------------------


def labelled_grid(columns: Dict[str, torch.Tensor], row_labels: Sequence[str], scale: int = 5, pad: int = 2):
    """PIL image: one column per name in ``columns`` ((rows, 3, H, W) in [0, 1] each), labelled."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = len(row_labels)
    h, w = next(iter(columns.values())).shape[-2:]
    # wide enough for the longest column name (the default bitmap font is ~6 px per character)
    cell_w, cell_h = max(w * scale, 6 * max(len(n) for n in names) + 4), h * scale
    left, top = 8 + 6 * max(len(r) for r in row_labels), 16
    width = left + len(names) * (cell_w + pad) + pad
    height = top + rows * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((left + pad + j * (cell_w + pad), 2), name, fill=(0, 0, 0))
        images = columns[name]
        arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i in range(rows):
            tile = Image.fromarray(arr[i]).resize((w * scale, cell_h), Image.NEAREST)
            canvas.paste(tile, (left + pad + j * (cell_w + pad), top + pad + i * (cell_h + pad)))
    for i, label in enumerate(row_labels):
        draw.text((4, top + pad + i * (cell_h + pad) + cell_h // 2 - 5), label, fill=(0, 0, 0))
    return canvas
