"""The Eraser Check's optional CLIP_VISION score with ComfyUI's own objects (issue #17), in-process.

The vision model is ComfyUI's ``ClipVisionModel`` built from its own ``clip_vision_config_vitl.json``,
reduced (2 layers, 64 wide; the projection width kept at ViT-L's 768) and given random weights through
``load_sd``, exactly as ``load_clipvision_from_sd`` loads a file. The text tower is the random SD1.5
checkpoint's CLIP-L loaded into ComfyUI's ``SDClipModel`` *with* its text projection (the layout of a
CLIP-L that carries one), so the node's scorer runs for real: the scores are meaningless (random
weights) but must be finite shares in [0, 1], reach the report, and a vision model of another width must
be refused with a clear reason. Skipped without COMFYUI_PATH.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from test_check_comfy import check_module, report_of  # noqa: F401  (fixture)
from test_closed_form_nodes import pack  # noqa: F401  (fixture)

from erasers.check import validate_report


def reduced_vision(comfy, tmp_path, projection_dim=768, seed=0):
    clip_vision = importlib.import_module("comfy.clip_vision")  # (an `import comfy.…` would shadow the fixture)
    config = json.loads(Path(comfy.path, "comfy", "clip_vision_config_vitl.json").read_text(encoding="utf-8"))
    config.update(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    config["projection_dim"] = projection_dim
    path = tmp_path / f"clip_vision_vitl_reduced_{projection_dim}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    vision = clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in vision.get_sd().items()}
    missing, unexpected = vision.load_sd(sd)
    assert not missing and not unexpected
    return vision


@pytest.fixture(scope="module")
def projected_clip(comfy, sd15_loaded):
    """The checkpoint's CLIP-L weights in a ComfyUI CLIP whose tower returns the projected pooled output."""
    sd1_clip = importlib.import_module("comfy.sd1_clip")
    base = importlib.import_module("comfy.supported_models_base")

    class ProjectedSD1Clip(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=sd1_clip.SDClipModel)

    target = base.ClipTarget(sd1_clip.SD1Tokenizer, ProjectedSD1Clip)
    clip = comfy.sd.CLIP(target, embedding_directory=None)
    # CLIP.get_sd() names keys from cond_stage_model; SDClipModel.load_sd reads them without that prefix
    prefix = "clip_l.transformer."
    sd = {k[len(prefix) :]: v for k, v in sd15_loaded[1].get_sd().items() if k.startswith(prefix)}
    sd["text_projection.weight"] = 0.03 * torch.randn(768, 768, generator=torch.Generator().manual_seed(1))
    missing, unexpected = clip.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    loaded = clip.get_sd()
    assert all(torch.isfinite(v).all() for v in loaded.values() if v.is_floating_point())
    tower = clip.cond_stage_model.clip_l
    assert tower.options_default[2], "the tower should return its projected pooled output"
    return clip


def test_the_scorer_scores_images_with_real_comfy_models(comfy, tmp_path, projected_clip, check_module):
    vision = reduced_vision(comfy, tmp_path)
    scorer = check_module.ClipVisionScorer(vision, projected_clip)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    scores = scorer(images, "Van Gogh")
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    # the concept competes with the neutral prompts: a different concept text gives different shares
    assert not torch.equal(scores, scorer(images, "a bowl of soup"))


def test_a_vision_model_of_another_width_is_refused(comfy, tmp_path, projected_clip, check_module):
    vision = reduced_vision(comfy, tmp_path, projection_dim=512)
    with pytest.raises(ValueError, match="embeds images 512 wide but this CLIP's text projection gives 768"):
        check_module.ClipVisionScorer(vision, projected_clip)


def run_node(comfy, check_module, model, clip, vae, clip_vision, tmp_path):
    comfy.folder_paths.set_temp_directory(str(tmp_path / "temp"))  # PreviewImage writes its file there
    out = check_module.EraserCheck.execute(
        erased_model=model,
        original_model=model,
        clip=clip,
        vae=vae,
        concepts="Van Gogh",
        extra_prompts="",
        keep="a cat",
        concept_type="art",
        seed=0,
        seeds=1,
        steps=1,
        cfg=7.0,
        width=64,
        height=64,
        sampler_name="euler",
        scheduler="normal",
        clip_vision=clip_vision,
    )
    text = out.args[1] if hasattr(out, "args") else out[1]
    return report_of(text)


def test_the_node_puts_clip_vision_scores_in_its_report(comfy, tmp_path, sd15_loaded, projected_clip, check_module):
    model, _, vae = sd15_loaded
    report = run_node(comfy, check_module, model, projected_clip, vae, reduced_vision(comfy, tmp_path), tmp_path)
    assert validate_report(report) == []
    score = report["score"]
    assert score["computed"] is True and score["scorer"] == "CLIP vision zero-shot" and score["reason"] is None
    for row in report["rows"]:
        for side in ("before", "after"):
            share = row["concept_share"][side]
            assert share is not None and 0.0 <= share <= 1.0, row
    assert report["summary"]["erased_before"] is not None and report["summary"]["erased_after"] is not None


def test_the_node_reports_why_a_mismatched_vision_model_gives_no_score(
    comfy, tmp_path, sd15_loaded, projected_clip, check_module
):
    model, _, vae = sd15_loaded
    vision = reduced_vision(comfy, tmp_path, projection_dim=512)
    report = run_node(comfy, check_module, model, projected_clip, vae, vision, tmp_path)
    assert validate_report(report) == []
    assert report["score"]["computed"] is False
    assert "embeds images 512 wide" in report["score"]["reason"]
    assert all(r["concept_share"]["before"] is None for r in report["rows"])
