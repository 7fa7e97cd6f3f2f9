"""The shapes benchmark end to end on a tiny random model: every eraser runs or says why it is skipped,
weights come back bit for bit, the attacks return contexts of the right shape, the report is written.
(Numbers on a random model mean nothing; test_shapes_bench.py checks them on the shipped weights.)"""

import pytest
import torch

from erasers_dev.bench import shapes
from erasers_dev.shapes import model as shapes_model
from erasers_dev.shapes.classifier import ShapesClassifier


@pytest.fixture(scope="module")
def tiny():
    cfg = shapes_model.tiny_config()
    pipe = shapes_model.random_pipeline(0, cfg)
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    torch.manual_seed(0)
    clf = ShapesClassifier(width=8).eval().requires_grad_(False)
    return pipe, clf


def test_bench_runs_every_eraser_or_says_why(tiny, tmp_path):
    pipe, clf = tiny
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    args = shapes.parse_args(
        [
            "--methods",
            "uce,token,safree,sld,spm,lora",
            "--steps",
            "2",
            "--reps",
            "1",
            "--attack-steps",
            "1",
            "--attack-reps",
            "1",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    results = shapes.run(args, pipe=pipe, classifier=clf)
    # "lora": the UCE eraser written as a kohya file and read back through the LoRA loader, on any model;
    # "spm": the shipped membrane was trained on the shipped model, so on this one it says why it is skipped
    assert set(results["methods"]) == {"uce", "token", "safree", "sld", "lora"}
    assert set(results["skipped"]) == {"spm"}
    assert "spm_circle_membrane.safetensors" in results["skipped"]["spm"]
    assert results["methods"]["lora"]["edit_seconds"] > 0 and "kohya file" in results["methods"]["lora"]["detail"]
    for name, r in results["methods"].items():
        assert 0 <= r["erased"]["exact"] <= 1 and r["fidelity"]["n_related"] > 0, name
        assert r["attacks"]["gradient"] is not None
        # the closed-form attack needs a weight edit; sampling-time methods report none
        assert (r["attacks"]["closed_form"] is None) == (name not in shapes.CLOSED_FORM)
    # multi-concept scaling: 1, 3 and all-but-one shapes (3 of 4 = the same set) and colours, per closed form
    sets = {tuple(r["concepts"]) for r in results["scaling"]}
    assert ("circle",) in sets and ("circle", "square", "triangle") in sets
    assert ("red",) in sets and ("red", "green", "blue", "yellow") in sets
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    shapes.write_outputs(results, str(tmp_path), "pytest")
    text = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert "| SPM membrane | skipped:" in text and "| SLD |" in text and "| erasure LoRA (UCE file" in text
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "results.json").is_file()


def test_closed_form_attack_is_identity_without_an_edit(tiny):
    from erasers_dev.bench.shapes_attacks import closed_form_context, snapshot_projections

    pipe, _ = tiny
    originals = snapshot_projections(pipe)
    prompts = ["a red circle", "a blue square"]
    context = closed_form_context(pipe, originals, prompts, lam_r=0.0)
    torch.testing.assert_close(context, pipe.encode_prompts(prompts), atol=1e-4, rtol=1e-4)


def test_suppression_sampler_matches_the_pipeline_when_inert(tiny):
    """Token suppression of a word absent from every prompt changes nothing: same noise, same images."""
    from erasers_dev.bench.shapes_suppression import ShapesSuppression

    pipe, _ = tiny
    prompts = ["a red square", "a blue cross"]
    method = ShapesSuppression(pipe, "token", ["circle"])
    method.config.similarity = 1.01  # exact token matches only
    ours = method.sample(prompts, steps=2, guidance=4.0, seed=3)
    theirs = pipe(prompts, steps=2, guidance=4.0, seed=3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
