"""Run a check with a host's renderer and (optionally) a scorer: images in, grid + report out.

The host supplies
  * ``render(side, probes, seed) -> (N, H, W, 3)`` images in [0, 1], ``side`` = "before" or "after",
    one image per probe, every probe with the same seed (the host's own sampler and model objects);
  * optionally a ``Scorer``: ``scorer(images, text) -> (N,) scores in [0, 1]`` (or None when it cannot
    score that text), with a ``name``; an image shows ``text`` when its score is ≥ ``scorer.threshold``.
Everything else — the grid, the shares per row, the report — is here, host-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

from .grid import compose_grid, grid_geometry
from .probes import Probe, eraser_kind
from .report import NO_SCORE, SCHEMA, summarise

log = logging.getLogger(__name__)
SIDES = ("before", "after")


class Scorer(Protocol):
    name: str
    threshold: float

    def __call__(self, images: torch.Tensor, text: str) -> Optional[torch.Tensor]: ...


@dataclass
class CheckResult:
    grid: torch.Tensor  # (height, width, 3) in [0, 1]
    report: dict
    images: dict  # side → (rows, seeds, H, W, 3)


def column_labels(seeds: Sequence[int]) -> list:
    return [f"seed {s} {side}" for s in seeds for side in SIDES]


def presence(scorer, images: torch.Tensor, text: str) -> Optional[torch.Tensor]:
    """(N,) bool: does each image show ``text``? None when the scorer cannot score it."""
    if scorer is None or not text:
        return None
    scores = scorer(images, text)
    return None if scores is None else scores.reshape(-1).float().cpu() >= float(getattr(scorer, "threshold", 0.5))


def share(hits: Optional[torch.Tensor]) -> Optional[float]:
    return None if hits is None else float(hits.float().mean())


def concept_hits(scorer, images: torch.Tensor, probe: Probe, concepts: Sequence[str]):
    """The erased concept in each image: the row's own concept, or any of them for rows about none."""
    targets = [probe.concept] if probe.concept else list(concepts)
    found = [h for h in (presence(scorer, images, c) for c in targets) if h is not None]
    if not found:
        return None
    return torch.stack(found).any(dim=0)


def score_row(scorer, probe: Probe, concepts, before: torch.Tensor, after: torch.Tensor) -> dict:
    hb, ha = concept_hits(scorer, before, probe, concepts), concept_hits(scorer, after, probe, concepts)
    sb = sa = None
    if probe.expect == "kept":
        sb, sa = presence(scorer, before, probe.prompt), presence(scorer, after, probe.prompt)
    changed = None
    if hb is not None and ha is not None:
        flips = hb != ha
        if sb is not None and sa is not None:
            flips = flips | (sb != sa)
        changed = share(flips)
    return {
        "concept_share": {"before": share(hb), "after": share(ha)},
        "subject_share": {"before": share(sb), "after": share(sa)},
        "changed": changed,
    }


def run_check(
    probes: Sequence[Probe],
    seeds: Sequence[int],
    render: Callable,
    concepts: Sequence[str],
    scorer=None,
    settings: Optional[dict] = None,
    eraser: Optional[dict] = None,
    adversarial: Optional[dict] = None,
    notes: Sequence[str] = (),
    no_score_reason: str = NO_SCORE,
    upscale: int = 1,
    progress: Optional[Callable] = None,
) -> CheckResult:
    """Render every probe before and after for every seed, score, lay out the grid, write the report."""
    probes, seeds = list(probes), [int(s) for s in seeds]
    if not probes or not seeds:
        raise ValueError(f"The check needs probes and seeds; found {len(probes)} probes and {len(seeds)} seeds.")
    total, done = 2 * len(seeds) * len(probes), 0
    images = {}
    for side in SIDES:
        per_seed = []
        for seed in seeds:
            batch = render(side, probes, seed)
            if batch.dim() != 4 or batch.shape[0] != len(probes) or batch.shape[-1] != 3:
                raise ValueError(
                    f"The renderer returned {tuple(batch.shape)} for {len(probes)} probes; expected "
                    f"({len(probes)}, H, W, 3) images in [0, 1]."
                )
            per_seed.append(batch.detach().to("cpu", torch.float32).clamp(0, 1))
            done += len(probes)
            if progress is not None:
                progress(done, total)
        images[side] = torch.stack(per_seed, dim=1)  # (rows, seeds, H, W, 3)
    rows_img = torch.stack([images["before"], images["after"]], dim=2)  # (rows, seeds, 2, H, W, 3)
    n_rows, n_seeds, _, h, w, _ = rows_img.shape
    labels = column_labels(seeds)
    grid = compose_grid(rows_img.reshape(n_rows, 2 * n_seeds, h, w, 3), [p.label for p in probes], labels, upscale)
    rows = []
    for i, probe in enumerate(probes):
        scored = score_row(scorer, probe, concepts, images["before"][i], images["after"][i])
        rows.append({"index": i, **probe.to_dict(), "images": n_seeds, **scored})
    computed = scorer is not None and any(
        r["concept_share"]["before"] is not None or r["subject_share"]["before"] is not None for r in rows
    )
    geometry = grid_geometry(n_rows, 2 * n_seeds, h, w, upscale).to_dict()
    report = {
        "schema": SCHEMA,
        "concepts": list(concepts),
        "settings": {"seeds": seeds, "width": w, "height": h, **(settings or {})},
        "eraser": dict(eraser or {"kind": "unknown"}),
        "score": {
            "computed": bool(computed),
            "scorer": getattr(scorer, "name", None) if computed else None,
            "reason": None if computed else (no_score_reason if scorer is None else f"{no_score_reason}"),
            "threshold": float(getattr(scorer, "threshold", 0.5)),
        },
        "rows": rows,
        "summary": summarise(rows),
        "adversarial": dict(adversarial or {}),
        "grid": {**geometry, "column_labels": labels},
        "notes": list(notes),
    }
    return CheckResult(grid, report, images)


def eraser_summary(methods: Sequence[str], **extra) -> dict:
    """The report's "eraser" entry for the methods found upstream (their kinds; 'mixed' for several)."""
    kinds = sorted({eraser_kind(m) for m in methods}) or ["unknown"]
    return {"kind": kinds[0] if len(kinds) == 1 else "mixed", "methods": list(methods), **extra}
