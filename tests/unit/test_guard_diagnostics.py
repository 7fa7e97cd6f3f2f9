"""The guard diagnostics bench (issue #14) on a tiny random shapes model: every section runs in seconds
and its measurements obey what the mechanisms guarantee (numbers on a random model mean nothing else)."""

import pytest

pytest.importorskip("diffusers")

from erasers_dev.bench import guard_diagnostics as gd  # noqa: E402  (after importorskip)


@pytest.fixture(scope="module")
def result():
    args = gd.parse_args(["--tiny", "--steps", "4", "--sections", ",".join(gd.SECTIONS)])
    return gd.run(args)


def test_every_section_reports(result):
    assert set(gd.SECTIONS) <= set(result)
    text = gd.markdown(result)
    for title in ("## Schedule", "## SAFREE", "## SLD", "## Concept guidance", "## Token suppression"):
        assert title in text


def test_schedule_switch_rates_are_rates(result):
    s = result["schedule"]
    assert len(s["sigmas_20"]) == 20 and s["sigmas_20"] == sorted(s["sigmas_20"], reverse=True)
    assert all(0 <= r["rate"] <= 1 and 0 <= r["late"] <= 1 for r in s["switch"])
    assert 0 < s["range_sigma_ge_4"]["sd1"] < 1


def test_safree_rows_and_windows(result):
    s = result["safree"]
    for rows in s["groups"].values():
        for r in rows:
            assert r["steps_on_20"] <= 20 and r["steps_on_50"] <= 50
            assert 0 <= r["fraction"] <= 1
            assert (r["fraction"] == 0) == (r["steps_on_20"] == 0)
    assert all(0 <= v <= 1 + 1e-9 for v in s["subspace"].values())


def test_sld_is_silent_during_warmup(result):
    rows = result["sld"]["per_step"]["exact"]
    warmup = result["sld"]["warmup"]["medium"][20] * len(rows) // 20  # rescaled to the tiny run's steps
    for r in rows:
        assert 0 <= r["admitted"] <= 1
        if r["step"] < warmup:
            assert r["active"] == 0 and r["ratio"] == 0


def test_guidance_on_follows_sigma_end(result):
    g = result["guidance"]
    for r in g["per_step"]["exact"]:
        assert r["on"] == (r["sigma"] >= g["sigma_end"])
        assert r["move"] >= 0


def test_token_suppression_leaves_no_mass_on_flagged_prompts(result):
    m = result["token"]["mass"]
    for group, flagged in result["token"]["flagged"].items():
        total = sum(m[group][f"before_{c}"] for c in ("concept", "eos", "pad", "other"))
        assert total == pytest.approx(1.0, abs=1e-4)
        if flagged == 1.0:
            assert m[group]["after_eos"] < 1e-4 and m[group]["after_pad"] < 1e-4


def test_bench_rows_score_every_guard_variant(result):
    b = result["bench"]
    assert set(b["rows"]) == set(gd.bench_variants("circle"))
    for r in b["rows"].values():
        assert 0 <= r["erased"]["exact"] <= 1 and set(r["targets"]) == {"exact", "synonyms", "unrelated", "related"}
