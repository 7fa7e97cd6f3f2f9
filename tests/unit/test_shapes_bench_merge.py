"""``bench shapes --merge``: rows of an earlier run join a new one only when both runs are comparable."""

import copy

import pytest

from erasers_dev.bench import shapes


def _run(methods, total=60.0, exact=0.9):
    settings = {k: 1 for k in shapes.SAME_RUN_KEYS}
    settings["params"] = {}
    row = {"erased": {"exact": 0.0}, "fidelity": {"related": 1.0}}
    base = {"erased": {"exact": exact}, "fidelity": {"related_accuracy": 0.9}}
    scaling = [{"method": m, "axis": "shape", "concepts": ["circle"]} for m in methods if m in shapes.CLOSED_FORM]
    return {
        "settings": settings,
        "base": base,
        "methods": {m: dict(row, name=m) for m in methods},
        "skipped": {},
        "scaling": scaling,
        "total_seconds": total,
    }


def test_merge_keeps_rows_not_rerun_and_says_where_they_come_from():
    old = _run(["uce", "rece", "sld"], total=600)
    old["skipped"] = {"lora": "not there yet"}
    new = _run(["rece", "lora"])
    merged = shapes.merge_results(new, old)
    assert list(merged["methods"]) == ["uce", "rece", "lora", "sld"]  # the table's usual order
    assert merged["methods"]["rece"] is new["methods"]["rece"]  # re-run rows win
    assert merged["skipped"] == {}  # lora ran now
    assert [r["method"] for r in merged["scaling"]] == ["uce", "rece"]
    sources = merged["settings"]["row_sources"]
    assert sources["rece"] == sources["lora"] == "this run" and sources["uce"] == "an earlier run (10.0 min)"
    note = shapes.merged_note(merged["settings"])
    assert "this run: RECE" in note and "SLD" in note


def test_merge_refuses_runs_that_are_not_comparable():
    old, new = _run(["uce"]), _run(["rece"])
    other = copy.deepcopy(new)
    other["settings"]["seed"] = 2
    with pytest.raises(ValueError, match="settings differ"):
        shapes.merge_results(other, old)
    with pytest.raises(ValueError, match="base model"):
        shapes.merge_results(_run(["rece"], exact=0.5), old)
