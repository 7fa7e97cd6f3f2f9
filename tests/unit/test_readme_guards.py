"""The README's guard table (#14) carries the committed measurement: every number in it equals the one in
erasers_dev/bench/results/guards/DIAGNOSTICS.md (per concept) or, for the attack, the shapes bench's
RESULTS.md — so a re-run that changes the measurement fails here until the README is regenerated."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DIAGNOSTICS = ROOT / "erasers_dev" / "bench" / "results" / "guards" / "DIAGNOSTICS.md"
SHAPES = ROOT / "erasers_dev" / "bench" / "results" / "shapes" / "RESULTS.md"
CONCEPTS = ("circle", "square", "red")
#: README guard row → the shapes bench's row for the same (default) setting, whose attack column it quotes
ATTACK_ROW = {
    "SAFREE (paper window)": "SAFREE",
    "SLD medium (paper default)": "SLD",
    "concept guidance (paper, σ_end 4)": "concept guidance",
    "token suppression (defaults)": "token suppression",
}


def cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def readme_rows() -> dict:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- guards-table", 1)[1].split("<!-- /guards-table -->", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")][2:]  # header and rule
    return {cells(line)[0]: cells(line) for line in lines}


def diagnostics_rows(concept: str) -> dict:
    text = DIAGNOSTICS.read_text(encoding="utf-8")
    section = re.split(r"\n## ", text.split(f"## Shapes-bench guard rows — {concept}", 1)[1])[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return {cells(line)[0]: cells(line) for line in lines}


def test_readme_guard_rows_equal_the_committed_measurement():
    rows = readme_rows()
    measured = {c: diagnostics_rows(c) for c in CONCEPTS}
    assert set(rows) == set(measured["circle"]), "every measured guard setting has one README row"
    shapes = {cells(line)[0]: cells(line) for line in SHAPES.read_text(encoding="utf-8").splitlines() if "|" in line}
    for name, row in rows.items():
        for k, concept in enumerate(CONCEPTS):
            m = measured[concept][name]  # guard, exact, synonyms, related, unrelated, ms, targets
            assert row[1 + k] == f"{m[1]} / {m[2]}", (name, concept, row[1 + k], m[1:3])
        circle = measured["circle"][name]
        assert row[4] == f"{circle[3]} / {circle[4]}", (name, row[4])
        attack = shapes[ATTACK_ROW[name]][4].replace("†", "").strip() if name in ATTACK_ROW else "—"
        assert row[5] == attack, (name, row[5], attack)
        assert row[6] and row[7], f"{name}: what it stops and what it does not must both be stated"
