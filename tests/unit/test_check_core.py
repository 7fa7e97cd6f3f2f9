"""Eraser Check core (issue #17): probes per eraser kind, the c′ probe, grid geometry and labels, report schema."""

import json

import pytest
import torch

from erasers.check import (
    SCHEMA,
    adversarial_context,
    build_probes,
    compose_grid,
    eraser_kind,
    grid_geometry,
    report_table,
    report_text,
    response_gap,
    run_check,
    validate_report,
)
from erasers.check.font import CELL_H, CELL_W, GLYPHS, glyph, text_mask
from erasers.check.score import zero_shot_scores
from erasers.errors import EmptyConceptList, FamilyMismatch

# -- probes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,kind", [("uce", "weight"), ("RECE", "weight"), ("lora", "weight"), ("spm", "membrane"), ("sld", "guard")]
)
def test_eraser_kinds(method, kind):
    assert eraser_kind(method) == kind


def test_c_prime_probe_only_for_weight_edits():
    for method in ("uce", "rece", "speed", "mace", "spm", "sld", "safree", "token_suppress"):
        probes = build_probes(["Van Gogh", "Monet"], weight_edit=eraser_kind(method) == "weight")
        adversarial = [p for p in probes if p.kind == "adversarial"]
        if eraser_kind(method) == "weight":
            assert [p.prompt for p in adversarial] == ["Van Gogh", "Monet"]
            assert all(p.expect == "erased" and p.concept == p.prompt for p in adversarial)
        else:
            assert adversarial == []


def test_probe_order_kinds_and_expectations():
    probes = build_probes(
        ["Van Gogh"],
        concept_type="art",
        n_phrasings=3,
        extra="starry night\n\nstarry night\n",
        neighbours=["Monet", "Van Gogh"],
        n_unrelated=2,
        weight_edit=True,
    )
    kinds = [p.kind for p in probes]
    assert kinds == ["concept"] + ["phrasing"] * 3 + ["extra", "neighbour", "unrelated", "unrelated", "adversarial"]
    assert probes[0].prompt == "Van Gogh" and "Van Gogh" in probes[1].prompt and "style" in probes[1].prompt
    # duplicates dropped: the concept itself is not a neighbour row; the extra prompt appears once
    assert [p.prompt for p in probes if p.kind == "neighbour"] == ["Monet"]
    assert {p.expect for p in probes if p.kind in ("neighbour", "unrelated")} == {"kept"}
    assert {p.expect for p in probes if p.kind in ("concept", "phrasing", "extra", "adversarial")} == {"erased"}
    assert probes[-1].label.startswith("c' probe")


def test_probes_need_a_concept_and_a_known_type():
    with pytest.raises(EmptyConceptList):
        build_probes(["  ", ""])
    with pytest.raises(ValueError, match="concept_type"):
        build_probes(["x"], concept_type="celebrity")


# -- the c′ probe ------------------------------------------------------------------------------------


def kv_pair(d=16, out=24, layers=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(out, d, generator=gen) / d**0.5 for _ in range(layers)]


def test_c_prime_is_the_concept_when_nothing_was_edited():
    w0 = kv_pair()
    c = torch.randn(5, 16)
    cp = adversarial_context(c, w0, w0, regular_scale=1e-8)
    torch.testing.assert_close(cp, c, atol=1e-4, rtol=1e-4)


def test_c_prime_solves_the_regularised_least_squares():
    w0 = kv_pair(seed=1)
    w = [x + 0.3 * torch.randn_like(x) for x in w0]
    c, lam = torch.randn(3, 16), 0.1
    cp = adversarial_context(c, w, w0, regular_scale=lam).double()
    # gradient of Σ‖W c′ − W⁰ c‖² + λ‖c′‖² vanishes at c′
    grad = sum((cp @ a.double().T - c.double() @ b.double().T) @ a.double() for a, b in zip(w, w0)) + lam * cp
    assert grad.abs().max() < 1e-4  # c′ comes back in float32


def test_c_prime_gets_back_what_an_erasure_removed():
    """An edit that projects the concept direction out of every layer: the concept's own context no
    longer reaches the original response, c′ does (the edit is invertible on the other directions)."""
    w0 = kv_pair(seed=2)
    c = torch.randn(1, 16)
    u = c[0] / c[0].norm()
    # W = W⁰ (I − ½ u uᵀ): the concept's response halved, everything orthogonal to it untouched
    w = [x @ (torch.eye(16) - 0.5 * torch.outer(u, u)) for x in w0]
    cp = adversarial_context(c, w, w0, regular_scale=1e-6)
    gap = response_gap(c, cp, w, w0)
    assert gap["plain"] > 0.3 and gap["c_prime"] < 1e-3


def test_c_prime_refuses_mismatched_models():
    with pytest.raises(FamilyMismatch):
        adversarial_context(torch.randn(2, 16), kv_pair(layers=3), kv_pair(layers=4))
    with pytest.raises(FamilyMismatch):
        adversarial_context(torch.randn(2, 8), kv_pair(), kv_pair())


# -- font and grid -----------------------------------------------------------------------------------


def test_font_covers_printable_ascii():
    assert set(GLYPHS) == {chr(i) for i in range(32, 127)}
    assert not glyph(" ").any() and glyph("A").any()
    assert torch.equal(glyph("é"), glyph("?"))
    m = text_mask("Abc", 3)
    assert m.shape == (CELL_H * 3, CELL_W * 3 * 3)


@pytest.mark.parametrize("rows,cols,h,w,up", [(1, 2, 16, 16, 8), (9, 4, 64, 48, 1), (3, 6, 512, 512, 1)])
def test_grid_size_and_tile_placement(rows, cols, h, w, up):
    images = torch.rand(rows, cols, h, w, 3)
    labels = [f"row {r} with a fairly long label that wraps over lines" for r in range(rows)]
    columns = [f"seed {c // 2} {'after' if c % 2 else 'before'}" for c in range(cols)]
    grid = compose_grid(images, labels, columns, upscale=up)
    g = grid_geometry(rows, cols, h, w, up)
    s = g.scale
    assert grid.shape == (g.height, g.width, 3)
    assert g.width == (CELL_W * s * 28 + 4 * s) + cols * (w * up + 2 * s) + 2 * s
    assert g.height == (CELL_H * s + 4 * s) + rows * (h * up + 2 * s) + 2 * s
    for r in range(rows):
        for c in range(cols):
            y, x = g.tile_origin(r, c)
            tile = grid[y : y + h * up : up, x : x + w * up : up]
            torch.testing.assert_close(tile, images[r, c])
    # labels are drawn: ink in the header and beside every row
    assert (grid[: g.header, g.label_w :] < 0.5).any()
    for r in range(rows):
        y, _ = g.tile_origin(r, 0)
        assert (grid[y : y + CELL_H * s, : g.label_w] < 0.5).any()


def test_grid_refuses_wrong_labels():
    with pytest.raises(ValueError, match="labels"):
        compose_grid(torch.rand(2, 2, 8, 8, 3), ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="rows, columns"):
        compose_grid(torch.rand(2, 8, 8, 3), ["a", "b"], ["c", "d"])


# -- running and the report --------------------------------------------------------------------------


class RedScorer:
    """An image 'shows' the concept when it is mostly red; texts other than the concept are not scored."""

    name = "red"
    threshold = 0.5

    def __init__(self, concept):
        self.concept = concept

    def __call__(self, images, text):
        if text != self.concept:
            return None
        return (images[..., 0].mean(dim=(1, 2)) > 0.5).float()


def fake_render(side, probes, seed):
    """Concept rows red before, blue after; every other row green on both sides (a perfect erasure)."""
    out = torch.zeros(len(probes), 8, 8, 3)
    for i, p in enumerate(probes):
        out[i, ..., 0 if (p.expect == "erased" and side == "before") else (2 if p.expect == "erased" else 1)] = 1
    return out


def test_report_shares_schema_and_table():
    probes = build_probes(["fire"], neighbours=["water"], weight_edit=True)
    calls = []
    result = run_check(
        probes,
        [0, 7],
        fake_render,
        ["fire"],
        scorer=RedScorer("fire"),
        settings={"steps": 3, "cfg": 5.0},
        adversarial={"fire": {"plain": 0.5, "c_prime": 0.1}},
        progress=lambda done, total: calls.append((done, total)),
    )
    report = result.report
    assert validate_report(report) == []
    assert report["schema"] == SCHEMA and report["score"]["computed"] and report["score"]["scorer"] == "red"
    for row in report["rows"]:
        want = (1.0, 0.0) if row["expect"] == "erased" else (0.0, 0.0)
        assert (row["concept_share"]["before"], row["concept_share"]["after"]) == want, row
        assert row["images"] == 2
    assert report["summary"] == {"erased_before": 1.0, "erased_after": 0.0, "kept_changed": 0.0}
    assert calls[-1] == (2 * 2 * len(probes), 2 * 2 * len(probes))
    assert report["grid"]["column_labels"] == ["seed 0 before", "seed 0 after", "seed 7 before", "seed 7 after"]
    assert list(result.grid.shape[:2]) == report["grid"]["size"]
    assert json.loads(json.dumps(report)) == report
    table = report_table(report)
    assert "concept: fire" in table and "100% -> 0%" in table and "c' probe for 'fire'" in table
    text = report_text(report)
    assert json.loads(text[text.index("{") :]) == report


def test_without_a_scorer_the_report_says_no_score_was_computed():
    probes = build_probes(["fire"])
    report = run_check(probes, [0], fake_render, ["fire"]).report
    assert validate_report(report) == []
    assert report["score"]["computed"] is False and "no score was computed" in report["score"]["reason"]
    assert all(r["concept_share"] == {"before": None, "after": None} for r in report["rows"])
    assert "no score was computed" in report_table(report)


def test_validate_report_finds_problems():
    probes = build_probes(["fire"])
    report = run_check(probes, [0], fake_render, ["fire"]).report
    report["rows"][0]["concept_share"]["after"] = 1.5
    report["score"]["reason"] = None
    problems = validate_report(report)
    assert any("1.5" in p for p in problems) and any("why no score" in p for p in problems)


def test_renderer_returning_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="renderer returned"):
        run_check(build_probes(["fire"]), [0], lambda side, probes, seed: torch.zeros(1, 8, 8, 3), ["fire"])


def test_zero_shot_scores():
    concept = torch.tensor([1.0, 0.0, 0.0])
    neutrals = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    images = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.2]])
    s = zero_shot_scores(images, concept, neutrals)
    assert s[0] > 0.99 and s[1] < 0.01
    with pytest.raises(ValueError, match="does not match"):
        zero_shot_scores(torch.rand(2, 4), concept, neutrals)
