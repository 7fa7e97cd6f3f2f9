"""The world-2 bench end to end on a tiny trained world (seconds): every row runs or says why it is skipped,
weight edits are undone bit for bit, RESULTS.md / grid / json are written, targets are checked."""

import json

import pytest

from erasers_dev.bench import world2 as bench


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from erasers_dev.world2.train import TrainConfig, train_all

    out = tmp_path_factory.mktemp("w2")
    train_all(TrainConfig.tiny(seed=0), out_dir=out, threads=1, skip_eval=True)
    return out


def test_every_eraser_row_runs_or_says_why(tiny_world, tmp_path, monkeypatch):
    # the shipped adapters were trained on the shipped world-2 model; this tiny world has none
    monkeypatch.setattr(bench, "weights_dir", lambda: tmp_path)
    out = tmp_path / "results"
    argv = [
        "--t2i", str(tiny_world / "world2_t2i.safetensors"),
        "--judges", str(tiny_world / "world2_judges.safetensors"),
        "--tasks", "one-artist,unsafe-proxy",
        "--reps", "1", "--steps", "2", "--attack-steps", "1",
        "--out", str(out), "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    rows = results["rows"]["one-artist"]
    assert set(rows) == set(bench.DEFAULT_METHODS)
    for name in bench.CLOSED_FORM + bench.GUARDS:
        row = rows[name]
        assert "skipped" not in row, (name, row)
        rates = {k: v for k, v in row["efficacy"].items() if k != "seconds_per_image"}
        assert set(rates) == {"exact", "phrasings", "described"} and all(0 <= v <= 1 for v in rates.values())
        assert row["efficacy"]["seconds_per_image"] > 0
        assert set(row["relative"]) == {"related", "unrelated"}
        assert row["attack"]["gradient"] is not None
        # c′ exists only for weight edits
        assert (row["attack"]["closed_form"] is not None) == (name in bench.CLOSED_FORM)
        assert isinstance(row["misses"], list)
    # no adapters were trained for this tiny world: the rows say so instead of inventing numbers
    for name in bench.TRAINED:
        assert "skipped" in rows[name] and "train" in rows[name]["skipped"]
    # the unsafe proxy has no attack rows and no related fidelity (there is one unsafe class)
    proxy = results["rows"]["unsafe-proxy"]["uce"]
    assert "attack" not in proxy and set(proxy["relative"]) == {"unrelated"}
    markdown = (out / "RESULTS.md").read_text()
    assert "python -m erasers bench world2" in markdown and "| targets |" in markdown
    for label in ("UCE", "SAFREE", "token suppression", "MACE-CFR (paper defaults)"):
        assert f"| {label} |" in markdown, label
    assert (out / "grid.png").stat().st_size > 0


def test_misses_name_the_target_and_the_value():
    row = {
        "efficacy": {"exact": 0.5, "phrasings": 0.0, "seconds_per_image": 3.0},
        "relative": {"related": 0.5, "unrelated": 1.0},
        "attack": {"closed_form": None, "gradient": 0.4},
    }
    assert bench.misses(row) == ["exact 50% > 5%", "related 50% < 90%", "attack 40% > 30%"]
    row = {"efficacy": {"exact": 0.0}, "relative": {"unrelated": 0.99}}
    assert bench.misses(row) == []


def test_trained_adapter_rows_read_the_files_trained_on_world2(tiny_world, tmp_path):
    """--train-adapters writes an SPM membrane and an ESD-x LoRA that the rows then load and run."""
    import argparse

    from erasers_dev.world2 import world
    from erasers_dev.world2.judges import load_judges
    from erasers_dev.world2.model import load_pipeline

    pipe = load_pipeline(tiny_world / "world2_t2i.safetensors")
    judges = load_judges(tiny_world / "world2_judges.safetensors")
    artist = world.ARTISTS[1]
    written = bench.train_adapters(pipe, artist, tmp_path, iterations=2, rollout_steps=2, batch_size=1)
    assert len(written) == 2
    task = [t for t in bench.build_tasks(reps=1) if t.name == "one-artist"][0]
    assert task.concepts == [artist]
    args = argparse.Namespace(steps=2, guidance=4.0, seed=0, attack_steps=-1, lam_r=0.1, attack_lr=0.05)
    original = bench.weights_dir
    bench.weights_dir = lambda: tmp_path
    try:
        results = bench.run(pipe, judges, list(bench.TRAINED), [task], args)
    finally:
        bench.weights_dir = original
    for name in bench.TRAINED:
        row = results["rows"]["one-artist"][name]
        assert "skipped" not in row, row
        assert row["note"].endswith("layers") and 0 <= row["efficacy"]["exact"] <= 1
