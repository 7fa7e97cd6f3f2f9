"""Base fidelity of a world-2 model: does it draw each concept when it is named (or described, or implied)?

``prompt_sets`` builds the fixed prompt sets (the same ones the world-2 bench erases from); ``evaluate``
samples each with fixed seeds, reads the images with the axis's judge and reports, per set, the rate at
which the judged class is the prompted one, with a confusion table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import world


@dataclass
class PromptSet:
    """Prompts whose images should show ``targets[i]`` on ``axis``."""

    name: str
    axis: str
    prompts: List[str]
    targets: List[int]


def prompt_sets(per_prompt: int = 4) -> Dict[str, PromptSet]:
    """Named, nicknamed, described and implied prompts per axis (fixed, no randomness); held-out material
    only where the set's name says so."""
    objects = list(world.OBJECTS)
    sets: Dict[str, PromptSet] = {}

    def add(name, axis, items):
        sets[name] = PromptSet(
            name,
            axis,
            [p for p, _ in items for _ in range(per_prompt)],
            [t for _, t in items for _ in range(per_prompt)],
        )

    add(
        "object",
        "object",
        [(f"a {world.COLOURS[i % len(world.COLOURS)]} {o}", i) for i, o in enumerate(objects)],
    )
    add("colour", "colour", [(f"a {c} {objects[i % 6]}", i) for i, c in enumerate(world.COLOURS)])
    add(
        "artist_name",
        "artist",
        [
            (world.ARTIST_TEMPLATES[i % len(world.ARTIST_TEMPLATES)].format(scene=f"a {objects[i]}", a=a), i + 1)
            for i, a in enumerate(world.ARTISTS[1:])
        ],
    )
    add(
        "artist_description_heldout",
        "artist",
        [
            (
                world.describe_style(
                    a,
                    world.HELDOUT_DESCRIPTION_TEMPLATES[i % len(world.HELDOUT_DESCRIPTION_TEMPLATES)],
                    f"a {objects[(i + 3) % len(objects)]}",
                ),
                i + 1,
            )
            for i, a in enumerate(world.ARTISTS[1:])
        ],
    )
    add("character_name", "character", [(names[0], i + 1) for i, names in enumerate(world.CHARACTER_NAMES.values())])
    add(
        "character_nickname",
        "character",
        [(nick, i + 1) for i, names in enumerate(world.CHARACTER_NAMES.values()) for nick in names[1:]],
    )
    add(
        "flames_named",
        "flames",
        [(f"a {o} {world.FLAME_PHRASES[i % len(world.FLAME_PHRASES)]}", 1) for i, o in enumerate(objects)],
    )
    add(
        "flames_implied_heldout",
        "flames",
        [(f"a {objects[i % len(objects)]} , {phrase}", 1) for i, phrase in enumerate(world.HELDOUT_IMPLYING * 2)],
    )
    add("flames_absent", "flames", [(f"a {o}", 0) for o in objects])
    return sets


def confusion(true: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)


@torch.no_grad()
def evaluate(
    pipe,
    judges,
    per_prompt: int = 4,
    steps: int = 20,
    guidance: float = 4.0,
    seed: int = 0,
    sets: Optional[Sequence[str]] = None,
) -> Dict:
    """Rate of the prompted class per prompt set (and its confusion table), plus a markdown report."""
    all_sets = prompt_sets(per_prompt)
    chosen = [all_sets[name] for name in (sets or all_sets)]
    prompts = [p for s in chosen for p in s.prompts]
    images = pipe(prompts, steps=steps, guidance=guidance, seed=seed)
    pred = judges.predict(images)
    out = {"settings": dict(per_prompt=per_prompt, steps=steps, guidance=guidance, seed=seed), "sets": {}}
    start = 0
    for s in chosen:
        sl = slice(start, start + len(s.prompts))
        start += len(s.prompts)
        true = torch.tensor(s.targets)
        got = pred[s.axis][sl]
        k = len(judges.axes[s.axis])
        out["sets"][s.name] = {
            "axis": s.axis,
            "n": len(s.prompts),
            "rate": (got == true).float().mean().item(),
            "confusion": confusion(true, got, k).tolist(),
        }
    out["images"] = images
    out["markdown"] = report_markdown(out)
    return out


def report_markdown(result: Dict) -> str:
    s = result["settings"]
    lines = [
        f"Base fidelity: {s['per_prompt']} images per prompt, {s['steps']} DDIM steps, guidance {s['guidance']}, "
        f"seed {s['seed']}; rate = share of images whose judged class is the prompted one.",
        "",
        "| prompt set | judge | n | rate |",
        "|---|---|---|---|",
    ]
    for name, r in result["sets"].items():
        lines.append(f"| {name} | {r['axis']} | {r['n']} | {r['rate']:.1%} |")
    return "\n".join(lines)
