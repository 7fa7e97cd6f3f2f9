"""The quick shapes benchmark with the shipped weights: UCE erasing "circle" meets the issue's targets.

Targets for closed-form methods on one concept: the erased concept is still drawn for ≤ 10 % of
exact-word prompts; fidelity relative to the base model ≥ 95 % on unrelated concepts (colours, styles)
and ≥ 85 % on related ones (the other shapes). A few minutes on 2 CPU cores.
"""

import pytest

from erasers_dev.shapes.classifier import DEFAULT_CLASSIFIER
from erasers_dev.shapes.model import DEFAULT_T2I

pytestmark = pytest.mark.skipif(
    not (DEFAULT_T2I.is_file() and DEFAULT_CLASSIFIER.is_file()),
    reason=f"shipped shapes weights not in this checkout ({DEFAULT_T2I.name}, {DEFAULT_CLASSIFIER.name}); "
    f"train them with `python -m erasers shapes train`",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from erasers_dev.bench import shapes

    out = tmp_path_factory.mktemp("bench_shapes")
    args = shapes.parse_args(["--quick", "--quiet", "--out", str(out)])
    results = shapes.run(args)
    shapes.write_outputs(results, str(out), "pytest")
    return results, out


def test_quick_bench_uce_meets_targets(quick):
    results, _ = quick
    uce = results["methods"]["uce"]
    base = results["base"]
    # the base model does draw circles when asked, so erasing them is a real change
    assert base["erased"]["exact"] >= 0.8, base["erased"]
    assert uce["erased"]["exact"] <= 0.10, uce["erased"]
    assert uce["fidelity"]["unrelated"] >= 0.95, uce["fidelity"]
    assert uce["fidelity"]["related"] >= 0.85, uce["fidelity"]
    assert all(uce["targets"].values())


def test_quick_bench_writes_its_report(quick):
    results, out = quick
    text = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert "| UCE |" in text and (out / "grid.png").stat().st_size > 0
    from PIL import Image

    with Image.open(out / "grid.png") as img:
        # one labelled column for base and one for UCE, one row per grid prompt
        assert img.width > 2 * 16 * 5 and img.height > len(results["grid_rows"]) * 16 * 5
