"""The Eraser Check on the shapes world (issue #17): the shipped UCE settings erasing "circle", scored by
the pack's shapes classifier through the diffusers host of the check (erasers_diffusers/check.py).

Targets from the issue: the concept row ≥ 85 % circles before and ≤ 10 % after; unrelated rows unchanged.
2 seeds, 10 DDIM steps: a few seconds on 2 cores.
"""

import pytest
import torch

from erasers.check import grid_geometry, validate_report

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def check():
    from erasers_dev.bench.shapes import closed_form_config
    from erasers_dev.demo import auto_threads
    from erasers_dev.shapes import load_default
    from erasers_diffusers import api
    from erasers_diffusers.check import ShapesScorer, check_pipeline, shapes_probe_options

    threads = torch.get_num_threads()
    torch.set_num_threads(auto_threads())
    try:
        pipe = load_default().clone()
        eraser = api.compute_eraser_for_pipeline(pipe, closed_form_config("uce", ["circle"]))
        snapshot = {k: w.clone() for k, w in api.canonical_weights(pipe).items()}
        result = check_pipeline(
            pipe,
            eraser,
            ["circle"],
            seeds=[0, 1],
            steps=10,
            cfg=4.0,
            scorer=ShapesScorer(),
            probe_options=shapes_probe_options(),
        )
        restored = all(torch.equal(w, snapshot[k]) for k, w in api.canonical_weights(pipe).items())
    finally:
        torch.set_num_threads(threads)
    return result, restored


def rows(report, kind):
    return [r for r in report["rows"] if r["kind"] == kind]


def test_concept_row_erased(check):
    result, _ = check
    (row,) = rows(result.report, "concept")
    assert row["prompt"] == "circle"
    assert row["concept_share"]["before"] >= 0.85, row
    assert row["concept_share"]["after"] <= 0.10, row
    for row in rows(result.report, "phrasing"):
        assert row["concept_share"]["after"] <= 0.10, row


def test_unrelated_rows_unchanged(check):
    result, _ = check
    unrelated = rows(result.report, "unrelated")
    assert len(unrelated) == 2
    for row in unrelated:
        assert row["concept_share"] == {"before": 0.0, "after": 0.0}, row
        assert row["subject_share"]["before"] == row["subject_share"]["after"], row
        assert row["changed"] == 0.0, row


def test_report_and_grid(check):
    result, restored = check
    report = result.report
    assert restored, "the check left the eraser applied"
    assert validate_report(report) == []
    assert report["score"]["computed"] and report["score"]["scorer"] == "shapes classifier"
    assert report["eraser"]["kind"] == "weight" and len(rows(report, "adversarial")) == 1
    assert set(report["adversarial"]["circle"]) == {"plain", "c_prime"}
    g = grid_geometry(len(report["rows"]), 4, 16, 16, upscale=8)
    assert tuple(result.grid.shape) == (g.height, g.width, 3)
