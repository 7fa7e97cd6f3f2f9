"""Suppression nodes inside a real ComfyUI (opt-in: ``COMFYUI_PATH``; checked with v0.3.64).

SD1.5: a reduced random-weight SD1.5 UNet (detected as SD15) plus ComfyUI's own SD1 CLIP with random
weights, sampled with ``comfy.sample.sample``. Flux: ComfyUI's own Flux class with 2 double and 2 single
blocks (hidden 256) and a stand-in CLIP whose T5 conditioning is a deterministic random (1, 256, 4096)
tensor per token.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "").strip()
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped")
ROOT = Path(__file__).resolve().parents[2]

SD15_UNET = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320, "context_dim": 768,
             "use_linear_in_transformer": False, "transformer_depth_middle": 1, "use_temporal_resblock": False,
             "use_temporal_attention": False, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "num_heads": 8}
FLUX_DIT = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
            "axes_dim": [8, 28, 28], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


@pytest.fixture(scope="module")
def comfy():
    sys.path.insert(0, COMFYUI_PATH)
    saved = sys.argv
    sys.argv = [saved[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.sample
        import comfy.sd
    finally:
        sys.argv = saved
    return comfy


@pytest.fixture(scope="module")
def pack(comfy):
    name = "concept_erasers_suppression_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.suppression"), importlib.import_module(f"{name}.nodes.suppression_hooks")


def randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith(("weight", "scale")):  # norm scales (1-D weights are only norms)
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@pytest.fixture(scope="module")
def sd15(comfy):
    cfg = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    model = cfg.get_model({})
    randomise(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    clip = comfy.sd.CLIP(target=cfg.clip_target())
    randomise(clip.cond_stage_model, 1)
    return patcher, clip


class FakeT5Clip:
    """Stand-in for Flux's CLIP-L + T5-XXL: word → id by hash, a fixed random 4096-d vector per id."""

    def _id(self, word):
        return 2 + int(hashlib.md5(word.lower().encode()).hexdigest(), 16) % 30000

    def tokenize(self, text, **kw):
        ids = [self._id(w) for w in text.replace(",", " ").split()] + [1]
        ids += [0] * (256 - len(ids))
        return {"l": [[(49406, 1.0), (49407, 1.0)] + [(49407, 1.0)] * 75], "t5xxl": [[(i, 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens, return_pooled=False, **kw):
        ids = [t[0] for t in tokens["t5xxl"][0]]
        rows = [torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in ids]
        cond = torch.stack(rows)[None] * 0.1
        pooled = cond[0, : max(ids.index(1) if 1 in ids else 1, 1)].mean(0)[:768][None]
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **kw):
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, "guidance": 3.5}]]


@pytest.fixture(scope="module")
def flux(comfy):
    cfg = comfy.model_detection.model_config_from_unet_config(dict(FLUX_DIT))
    model = cfg.get_model({})
    randomise(model.diffusion_model, 2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return patcher, FakeT5Clip()


def sample(comfy, model, clip, prompt, negative="", steps=2, cfg=5.0, channels=4, size=8):
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros(1, channels, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=42,
                               disable_pbar=True)


@pytest.fixture
def counts(pack, monkeypatch):
    _, hooks = pack
    calls = {"nag": 0, "biased": 0, "dit": 0}
    nag, suppressed = hooks.cg.nag, hooks.ts.suppressed_attention

    def count_nag(*a, **k):
        calls["nag"] += 1
        return nag(*a, **k)

    def count_suppressed(*a, **k):
        calls["biased"] += 1
        return suppressed(*a, **k)

    monkeypatch.setattr(hooks.cg, "nag", count_nag)
    monkeypatch.setattr(hooks.ts, "suppressed_attention", count_suppressed)
    return calls


PROMPT = "a photo of a nude person on a beach"
COMMON = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "risk_gate": 0.0}


def run_node(node, **kw):
    return node.execute(**kw).result[0]


def test_sd15_each_node_samples_and_strength_zero_is_bit_identical(comfy, pack, sd15, counts):
    nodes, _ = pack
    model, clip = sd15
    base = sample(comfy, model, clip, PROMPT)
    assert torch.isfinite(base).all()
    variants = {
        "safree": lambda s: run_node(nodes.EraserSAFREE, model=model, clip=clip, prompt=PROMPT, concepts="nude",
                                     preset="nudity", alpha=0.01, include_eos=True, self_validating=False,
                                     keywords_as_negative=False, **dict(COMMON, strength=s)),
        "sld": lambda s: run_node(nodes.EraserSLD, model=model, clip=clip, preset="max", safety_concept="nudity",
                                  **dict(COMMON, strength=s)),
        "guidance": lambda s: run_node(nodes.EraserConceptGuidance, model=model, clip=clip, concepts="nude",
                                       phi=5.0, tau=2.5, alpha=0.25, sigma_end=0.0, **dict(COMMON, strength=s)),
        "tokens": lambda s: run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0,
                                     include_eos=True, similarity=0.99, prompt=PROMPT, **dict(COMMON, strength=s)),
    }
    for name, make in variants.items():
        off = sample(comfy, make(0.0), clip, PROMPT)
        assert torch.equal(off, base), f"{name}: strength 0 must leave the output bit-identical"
        on = sample(comfy, make(1.0), clip, PROMPT)
        assert torch.isfinite(on).all(), name
        if name != "safree":  # SAFREE may legitimately flag nothing on a random-weight CLIP
            assert not torch.equal(on, base), f"{name} had no effect"
    assert counts["nag"] > 0 and counts["biased"] > 0


def test_sd15_outside_window_and_benign_prompt_are_bit_identical(comfy, pack, sd15):
    nodes, _ = pack
    model, clip = sd15
    benign = "a red house"
    base = sample(comfy, model, clip, benign)
    # token suppression with exact matching only: the benign prompt has no concept token → untouched
    m = run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0, include_eos=True,
                 similarity=1.0, prompt=benign, **COMMON)
    assert torch.equal(sample(comfy, m, clip, benign), base)
    # a window that no step of this schedule falls into
    m = run_node(nodes.EraserConceptGuidance, model=model, clip=clip, concepts="nude", phi=5.0, tau=2.5, alpha=0.25,
                 sigma_end=1e6, **COMMON)
    assert torch.equal(sample(comfy, m, clip, PROMPT), sample(comfy, model, clip, PROMPT))


def test_methods_compose(comfy, pack, sd15, counts):
    nodes, _ = pack
    model, clip = sd15
    m = run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0, include_eos=True,
                 similarity=0.99, prompt=PROMPT, **COMMON)
    m = run_node(nodes.EraserConceptGuidance, model=m, clip=clip, concepts="nude", phi=5.0, tau=2.5, alpha=0.25,
                 sigma_end=0.0, **COMMON)
    out = sample(comfy, m, clip, PROMPT)
    assert torch.isfinite(out).all() and counts["nag"] > 0 and counts["biased"] > 0


def test_flux_concept_guidance_and_token_suppression(comfy, pack, flux, counts, monkeypatch):
    nodes, hooks = pack
    model, clip = flux
    seen = []
    original = hooks.DitDispatch.__call__

    def spy(self, args, extra):
        seen.append((self.kind, self.index))
        return original(self, args, extra)

    monkeypatch.setattr(hooks.DitDispatch, "__call__", spy)
    base = sample(comfy, model, clip, PROMPT, cfg=1.0, channels=16)
    m = run_node(nodes.EraserConceptGuidance, model=model, clip=clip, concepts="nude", phi=5.0, tau=2.5, alpha=0.25,
                 sigma_end=0.0, **COMMON)
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert {("double", 0), ("double", 1), ("single", 0), ("single", 1)} <= set(seen)
    assert counts["nag"] >= 4
    m = run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0, include_eos=False,
                 similarity=0.99, prompt=PROMPT, **COMMON)
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert torch.isfinite(out).all() and not torch.equal(out, base) and counts["biased"] >= 4  # image rows of every block
    off = run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0, include_eos=False,
                   similarity=0.99, prompt=PROMPT, **dict(COMMON, strength=0.0))
    assert torch.equal(sample(comfy, off, clip, PROMPT, cfg=1.0, channels=16), base)


def test_flux_safree_projects_t5_and_sld_is_refused(comfy, pack, flux):
    nodes, _ = pack
    model, clip = flux
    m = run_node(nodes.EraserSAFREE, model=model, clip=clip, prompt=PROMPT, concepts="nude", preset="nudity",
                 alpha=0.01, include_eos=True, self_validating=False, keywords_as_negative=False, **COMMON)
    out = sample(comfy, m, clip, PROMPT, cfg=1.0, channels=16)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Flux"):
        run_node(nodes.EraserSLD, model=model, clip=clip, preset="medium", safety_concept="nudity", **COMMON)


SD3_DIT = {"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "depth": 2, "patch_size": 2,
           "adm_in_channels": 2048, "pos_embed_max_size": 16, "num_patches": 256, "qk_norm": "rms",
           "x_block_self_attn_layers": [0], "x_block_self_attn": True,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}}}


class FakeSD3Clip(FakeT5Clip):
    """SD3 conditioning: 77 CLIP positions (random, fixed) then 77 T5 tokens; pooled (1, 2048)."""

    def tokenize(self, text, **kw):
        tokens = super().tokenize(text)
        tokens["t5xxl"] = [tokens["t5xxl"][0][:77]]
        tokens["g"] = tokens["l"]
        return tokens

    def encode_from_tokens(self, tokens, return_pooled=False, **kw):
        t5, _ = super().encode_from_tokens(tokens, return_pooled=True)
        clip_part = torch.randn(1, 77, 4096, generator=torch.Generator().manual_seed(7)) * 0.1
        cond = torch.cat([clip_part, t5], 1)
        pooled = torch.cat([t5[0, :4].mean(0)[:1024], t5[0, :4].mean(0)[1024:2048]])[None]
        return (cond, pooled) if return_pooled else cond


@pytest.fixture(scope="module")
def sd3(comfy):
    cfg = comfy.model_detection.model_config_from_unet_config(dict(SD3_DIT))
    assert type(cfg).__name__.startswith("SD3"), cfg
    model = cfg.get_model({})
    randomise(model.diffusion_model, 3)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return patcher, FakeSD3Clip()


def test_sd3_joint_blocks_all_methods(comfy, pack, sd3, counts):
    nodes, _ = pack
    model, clip = sd3
    base = sample(comfy, model, clip, PROMPT, channels=16)
    made = {
        "guidance": run_node(nodes.EraserConceptGuidance, model=model, clip=clip, concepts="nude", phi=5.0, tau=2.5,
                             alpha=0.25, sigma_end=0.0, **COMMON),
        "tokens": run_node(nodes.EraserTokenSuppress, model=model, clip=clip, concepts="nude", factor=0.0,
                           include_eos=False, similarity=0.99, prompt=PROMPT, **COMMON),
        "sld": run_node(nodes.EraserSLD, model=model, clip=clip, preset="max", safety_concept="nudity", **COMMON),
        "safree": run_node(nodes.EraserSAFREE, model=model, clip=clip, prompt=PROMPT, concepts="nude", preset="nudity",
                           alpha=0.01, include_eos=True, self_validating=False, keywords_as_negative=False, **COMMON),
    }
    for name, m in made.items():
        out = sample(comfy, m, clip, PROMPT, channels=16)
        assert torch.isfinite(out).all(), name
        if name != "safree":
            assert not torch.equal(out, base), f"{name} had no effect on SD3"
    assert counts["nag"] > 0 and counts["biased"] > 0
