"""The shapes benchmark's metrics on synthetic classifier outputs (no model, no sampling)."""

import pytest
import torch

from erasers_dev.bench import shapes_eval as ev
from erasers_dev.shapes import world


@pytest.fixture(scope="module")
def es():
    return ev.build_eval_set(canonical_reps=2, synonym_reps=1, paraphrase_reps=1, style_reps=1, seed=0)


def perfect(es):
    """Predictions equal to the prompted labels (unprompted axes: class 0)."""
    return {a: es.label(a).clamp(min=0) for a in ev.AXES}


def test_eval_set_labels_match_prompts(es):
    for prompt, kind, s, c, st in zip(es.prompts, es.kinds, *(es.labels[a] for a in ev.AXES)):
        words = prompt.split()
        assert any(w in world.SYNONYMS[world.SHAPES[s]] for w in words), prompt
        assert any(w in world.SYNONYMS[world.COLOURS[c]] for w in words), prompt
        if kind == "style":
            assert world.STYLES[st] in words
        else:
            assert st == -1
        if kind == "canonical":
            assert prompt == f"a {world.COLOURS[c]} {world.SHAPES[s]}"
        if kind == "synonym":
            # one of the two words is a synonym, the other canonical
            assert (world.SHAPES[s] in words) != (world.COLOURS[c] in words), prompt
    kinds = set(es.kinds)
    assert kinds == {"canonical", "synonym", "paraphrase", "style"}
    # every (shape, colour) pair appears canonically, with the requested repeats
    assert sum(k == "canonical" for k in es.kinds) == 2 * len(world.SHAPES) * len(world.COLOURS)


def test_perfect_base_and_untouched_eraser(es):
    base = perfect(es)
    r = ev.score(base, base, es, ["circle"])
    assert r["erased"]["exact"] == 1.0 and r["erased"]["synonym"] == 1.0
    assert r["fidelity"]["related"] == 1.0 and r["fidelity"]["unrelated"] == 1.0
    assert ev.meets_targets(r) == {"exact": False, "unrelated": True, "related": True}


def test_a_perfect_eraser_of_circle(es):
    base = perfect(es)
    pred = {a: v.clone() for a, v in base.items()}
    circle = es.label("shape") == world.SHAPES.index("circle")
    pred["shape"][circle] = world.SHAPES.index("square")  # every circle prompt now draws a square
    r = ev.score(pred, base, es, ["circle"])
    assert r["erased"]["exact"] == 0.0 and r["erased"]["synonym_paraphrase"] == 0.0
    # nothing else changed: the other shapes and every colour/style are as in the base model
    assert r["fidelity"]["related"] == 1.0 and r["fidelity"]["unrelated"] == 1.0
    assert all(ev.meets_targets(r).values())


def test_rates_count_exactly(es):
    base = perfect(es)
    pred = {a: v.clone() for a, v in base.items()}
    shape = es.label("shape")
    exact = torch.tensor([k in ev.EXACT_KINDS for k in es.kinds])
    circle_exact = torch.nonzero((shape == 0) & exact).flatten()
    pred["shape"][circle_exact[: len(circle_exact) // 4]] = 1  # a quarter of exact circle prompts erased
    squares = torch.nonzero(shape == 1).flatten()
    pred["shape"][squares[:3]] = 2  # collateral damage on 3 square images
    r = ev.score(pred, base, es, ["circle"])
    n = len(circle_exact)
    assert r["erased"]["exact"] == pytest.approx((n - n // 4) / n)
    assert r["erased"]["synonym"] == 1.0
    related = (shape != 0).sum().item()
    assert r["fidelity"]["n_related"] == related
    assert r["fidelity"]["related"] == pytest.approx((related - 3) / related)
    assert r["fidelity"]["unrelated"] == 1.0


def test_fidelity_is_relative_to_base(es):
    labels = perfect(es)
    base = {a: v.clone() for a, v in labels.items()}
    colour = es.label("colour")
    others = torch.nonzero(es.label("shape") != 0).flatten()
    # the base model gets half of the non-circle colours wrong; the erased model the same ones
    wrong = others[::2]
    base["colour"][wrong] = (colour[wrong] + 1) % len(world.COLOURS)
    pred = {a: v.clone() for a, v in base.items()}
    r = ev.score(pred, base, es, ["circle"])
    assert r["fidelity"]["unrelated"] == 1.0
    assert r["fidelity"]["unrelated_accuracy"] < 1.0
    # worse than base on colour → below 1
    pred["colour"][others[1::2][:10]] = (colour[others[1::2][:10]] + 1) % len(world.COLOURS)
    assert ev.score(pred, base, es, ["circle"])["fidelity"]["unrelated"] < 1.0


def test_colour_axis_and_multi_concept(es):
    base = perfect(es)
    pred = {a: v.clone() for a, v in base.items()}
    colour = es.label("colour")
    red = world.COLOURS.index("red")
    pred["colour"][colour == red] = world.COLOURS.index("blue")
    r = ev.score(pred, base, es, ["red", "green"])
    assert r["axis"] == "colour"
    # red is gone, green still drawn: half the named prompts (red and green are equally frequent)
    assert r["erased"]["exact"] == pytest.approx(0.5)
    # the related axis excludes the erased colours; shape/style untouched
    assert r["fidelity"]["related"] == 1.0 and r["fidelity"]["unrelated"] == 1.0
    with pytest.raises(ValueError):
        ev.score(pred, base, es, ["red", "circle"])


def test_empty_masks_give_none():
    es = ev.EvalSet()
    es.add("a red square", "canonical", 1, 0)
    base = {"shape": torch.tensor([1]), "colour": torch.tensor([0]), "style": torch.tensor([0])}
    r = ev.score(base, base, es, ["circle"])
    assert r["erased"]["exact"] is None and r["erased"]["synonym"] is None
    assert r["fidelity"]["related"] == 1.0
    assert ev.meets_targets(r)["exact"] is False  # unmeasured is not a pass
