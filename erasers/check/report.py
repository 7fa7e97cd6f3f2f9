"""The check's report: one JSON-serialisable dict (schema below) and a readable table of it.

    {
      "schema": "concept-erasers/check/1",
      "concepts": [str],
      "settings": {...},                     # what the host rendered with: seeds, steps, size, cfg, sampler
      "eraser": {"kind": "weight" | "membrane" | "guard" | "unknown" | "mixed", ...},
      "score": {"computed": bool, "scorer": str | null, "reason": str | null, "threshold": float},
      "rows": [{
          "index": int, "kind": str, "label": str, "prompt": str, "concept": str,
          "expect": "erased" | "kept", "images": int,            # images per column side (= seeds)
          "concept_share": {"before": float | null, "after": float | null},   # images with the erased concept
          "subject_share": {"before": float | null, "after": float | null},   # kept rows: their own subject
          "changed": float | null                                 # share of images whose concept verdict flipped
      }],
      "summary": {"erased_before": float | null, "erased_after": float | null, "kept_changed": float | null},
      "adversarial": {concept: {"plain": float, "c_prime": float}},   # response gaps (adversarial.response_gap)
      "grid": {"rows": int, "columns": int, "tile": [h, w], "size": [h, w], "column_labels": [str]},
      "notes": [str]
    }
Shares are fractions in [0, 1] (null when nothing was scored).
"""

from __future__ import annotations

import json
from typing import Optional

SCHEMA = "concept-erasers/check/1"
NO_SCORE = (
    "no score was computed: connect a CLIP_VISION model (and a CLIP text tower whose projection matches it) "
    "to score the images; the grid shows what was rendered"
)
ROW_KEYS = ("index", "kind", "label", "prompt", "concept", "expect", "images", "concept_share", "subject_share")


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return None if not values else sum(values) / len(values)


def summarise(rows: list) -> dict:
    erased = [r for r in rows if r["expect"] == "erased"]
    kept = [r for r in rows if r["expect"] == "kept"]
    return {
        "erased_before": mean(r["concept_share"]["before"] for r in erased),
        "erased_after": mean(r["concept_share"]["after"] for r in erased),
        "kept_changed": mean(r.get("changed") for r in kept),
    }


def validate_report(report: dict) -> list:
    """Problems with a report dict (empty list = valid against the schema above)."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("concepts", "settings", "eraser", "score", "rows", "summary", "grid", "notes"):
        if key not in report:
            problems.append(f"missing '{key}'")
    score = report.get("score", {})
    if not isinstance(score.get("computed"), bool):
        problems.append("score.computed must be true or false")
    elif not score["computed"] and not score.get("reason"):
        problems.append("score.reason must say why no score was computed")
    for i, row in enumerate(report.get("rows", [])):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            problems.append(f"row {i} lacks {missing}")
            continue
        if row["expect"] not in ("erased", "kept"):
            problems.append(f"row {i}: expect is {row['expect']!r}")
        for key in ("concept_share", "subject_share"):
            for side in ("before", "after"):
                v = row[key].get(side)
                if v is not None and not (0.0 <= v <= 1.0):
                    problems.append(f"row {i}: {key}.{side} = {v} is not a share in [0, 1]")
    grid = report.get("grid", {})
    if grid and grid.get("rows") != len(report.get("rows", [])):
        problems.append(f"grid has {grid.get('rows')} rows but the report {len(report.get('rows', []))}")
    try:
        json.dumps(report)
    except (TypeError, ValueError) as exc:
        problems.append(f"not JSON-serialisable: {exc}")
    return problems


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report_table(report: dict) -> str:
    """A plain-text table of the report (monospace; what the node shows and the CLI prints)."""
    s, score = report["settings"], report["score"]
    head = [
        f"Eraser Check - concepts: {', '.join(report['concepts'])} ({report['eraser'].get('kind', 'unknown')} eraser)",
        f"{len(s.get('seeds', []))} seed(s) {s.get('seeds', [])}, {s.get('steps', '?')} steps, "
        f"{s.get('width', '?')}x{s.get('height', '?')}, cfg {s.get('cfg', '?')}",
        f"score: {score['scorer']} (concept present = score >= {score.get('threshold', 0.5):g})"
        if score["computed"]
        else f"score: {score['reason']}",
        "",
    ]
    width = min(48, max([len(r["label"]) for r in report["rows"]] + [5]))
    lines = [f"{'row':<{width}}  expect  concept before -> after  changed  subject before -> after"]
    lines.append("-" * len(lines[0]))
    for r in report["rows"]:
        label = r["label"] if len(r["label"]) <= width else r["label"][: width - 2] + ".."
        c, sub = r["concept_share"], r["subject_share"]
        lines.append(
            f"{label:<{width}}  {r['expect']:<6}  {pct(c['before']):>14} -> {pct(c['after']):<5}  "
            f"{pct(r.get('changed')):>7}  {pct(sub['before']):>14} -> {pct(sub['after'])}"
        )
    summary = report["summary"]
    tail = [""]
    if score["computed"]:
        tail.append(
            f"rows that should lose the concept: {pct(summary['erased_before'])} before -> "
            f"{pct(summary['erased_after'])} after; rows that must stay: {pct(summary['kept_changed'])} changed"
        )
    for concept, gap in (report.get("adversarial") or {}).items():
        tail.append(
            f"c' probe for '{concept}': the edited projections miss the original response to it by "
            f"{100 * gap['plain']:.0f}% with the concept's own context and {100 * gap['c_prime']:.0f}% with c'"
        )
    tail += report.get("notes", [])
    return "\n".join(head + lines + tail).rstrip() + "\n"


def report_text(report: dict) -> str:
    """The node's STRING output: the table, then the JSON."""
    return report_table(report) + "\n" + json.dumps(report, indent=1, ensure_ascii=False) + "\n"
