"""Reduced random-weight models built from ComfyUI's own classes, stand-in CLIPs and fixtures shared by
the suppression tests against a real ComfyUI (``COMFYUI_PATH``; checked with v0.3.64).

SD1.5: a reduced SD1.5 UNet (detected as SD15) plus ComfyUI's own SD1 CLIP with random weights. SDXL:
ComfyUI's SDXL model class on a reduced UNet config (2048-d context, 2816-d ADM) and a stand-in CLIP-L ⊕
CLIP-G. SD3: the SD3 class with 2 joint blocks. Flux: the Flux class with 2 double and 2 single blocks.
The stand-in text encoders map each word to a fixed random vector (the issue allows a random tensor of the
right shape); the CLIP stand-in is causal (position i mixes tokens 0..i) so SAFREE's masked-prompt test
has something to detect.
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
ROOT = Path(__file__).resolve().parents[2]

SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "transformer_depth_middle": 1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "num_heads": 8,
}
FLUX_DIT = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 256,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 28, 28],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}


def flux_config(config: dict) -> dict:
    """The Flux unet config for the ComfyUI at hand: newer ComfyUI (0.2x) requires ``txt_ids_dims`` (which
    text-position axes carry RoPE ids; [] for Flux.1), which 0.3.64's FluxParams does not accept."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        return dict(config, txt_ids_dims=[])
    return dict(config)


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
    return import_guard_pack()


def import_guard_pack():
    """(nodes.suppression, nodes.suppression_hooks) of the pack imported once under its own name (ComfyUI
    must be importable: the ``comfy`` fixture)."""
    name = "concept_erasers_suppression_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.suppression"), importlib.import_module(
        f"{name}.nodes.suppression_hooks"
    )


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
        for name, b in module.named_buffers():
            # buffers a checkpoint would fill start as torch.empty (SD3's pos_embed): garbage, sometimes NaN
            if b.is_floating_point() and b.ndim > 1:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


def random_patcher(comfy, model_config, seed: int):
    """A CPU ModelPatcher around the model of ``model_config`` with seeded random weights."""
    model = model_config.get_model({})
    randomise(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def sd15(comfy):
    cfg = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    patcher = random_patcher(comfy, cfg, 0)
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
    cfg = comfy.model_detection.model_config_from_unet_config(flux_config(FLUX_DIT))
    patcher = random_patcher(comfy, cfg, 2)
    return patcher, FakeT5Clip()


def sample(comfy, model, clip, prompt, negative="", steps=2, cfg=5.0, channels=4, size=8):
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(negative))
    latent = torch.zeros(1, channels, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=42, disable_pbar=True
    )


@pytest.fixture
def counts(pack, monkeypatch):
    _, hooks = pack
    calls = {"nag": 0, "biased": 0, "dit": 0, "sld_pass": 0, "safree_swap": 0}
    nag, suppressed = hooks.cg.nag, hooks.ts.suppressed_attention
    sld_pass, tile_to = hooks._comfy_calc, hooks.tile_to

    def count_sld_pass(*a, **k):
        calls["sld_pass"] += 1
        return sld_pass(*a, **k)

    def count_swap(*a, **k):
        calls["safree_swap"] += 1
        return tile_to(*a, **k)

    def count_nag(*a, **k):
        calls["nag"] += 1
        return nag(*a, **k)

    def count_suppressed(*a, **k):
        calls["biased"] += 1
        return suppressed(*a, **k)

    monkeypatch.setattr(hooks.cg, "nag", count_nag)
    monkeypatch.setattr(hooks.ts, "suppressed_attention", count_suppressed)
    monkeypatch.setattr(hooks, "_comfy_calc", count_sld_pass)
    monkeypatch.setattr(hooks, "tile_to", count_swap)
    return calls


PROMPT = "a photo of a nude person on a beach"
COMMON = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "risk_gate": 0.0}


#: the SAFREE node's settings in these tests (self-validation off: the projection acts in its whole window)
SAFREE_ARGS = dict(
    concepts="nude", preset="nudity", alpha=0.01, include_eos=True, self_validating=False, keywords_as_negative=False
)


def run_node(node, **kw):
    return node.execute(**kw).result[0]


def makers(nodes, model, clip, safety_concept="nude", prompt=PROMPT):
    """Each suppression node on ``model`` as a function of its strength (the tests' default settings);
    ``prompt`` is the one SAFREE analyses and token suppression locates the concept in."""
    return {
        "safree": lambda s: run_node(
            nodes.EraserSAFREE,
            model=model,
            clip=clip,
            prompt=prompt,
            **SAFREE_ARGS,
            **dict(COMMON, strength=s),
        ),
        "sld": lambda s: run_node(
            nodes.EraserSLD,
            model=model,
            clip=clip,
            preset="max",
            safety_concept=safety_concept,
            **dict(COMMON, strength=s),
        ),
        "guidance": lambda s: run_node(
            nodes.EraserConceptGuidance,
            model=model,
            clip=clip,
            concepts="nude",
            phi=5.0,
            tau=2.5,
            alpha=0.25,
            sigma_end=0.0,
            **dict(COMMON, strength=s),
        ),
        "tokens": lambda s: run_node(
            nodes.EraserTokenSuppress,
            model=model,
            clip=clip,
            concepts="nude",
            factor=0.0,
            include_eos=True,
            similarity=0.99,
            prompt=prompt,
            **dict(COMMON, strength=s),
        ),
    }


SD3_DIT = {
    "in_channels": 16,
    "out_channels": 16,
    "pos_embed_scaling_factor": None,
    "depth": 2,
    "patch_size": 2,
    "adm_in_channels": 2048,
    "pos_embed_max_size": 16,
    "num_patches": 256,
    "qk_norm": "rms",
    "x_block_self_attn_layers": [0],
    "x_block_self_attn": True,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
}


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
    patcher = random_patcher(comfy, cfg, 3)
    return patcher, FakeSD3Clip()


# -- SDXL: ComfyUI's SDXL class on a reduced UNet (the detector needs the full depth, so the config class
#    is instantiated directly) -------------------------------------------------------------------------

SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 32,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


class FakeSDXLClip:
    """Stand-in for SDXL's CLIP-L ⊕ CLIP-G: ids by word hash (BOS 49406, EOS/pad 49407), a fixed random
    2048-d vector per id, made causal by a running mean; pooled (1, 1280) = the G half at the EOS."""

    BOS, EOS = 49406, 49407

    def _id(self, word):
        return 1000 + int(hashlib.md5(word.lower().encode()).hexdigest(), 16) % 40000

    def tokenize(self, text, **kw):
        ids = [self.BOS] + [self._id(w) for w in text.replace(",", " ").split()][:75] + [self.EOS]
        ids += [self.EOS] * (77 - len(ids))
        row = [(i, 1.0) for i in ids]
        return {"l": [list(row)], "g": [list(row)]}

    def encode_from_tokens(self, tokens, return_pooled=False, **kw):
        ids = [t[0] for t in tokens["l"][0]]
        rows = torch.stack([torch.randn(2048, generator=torch.Generator().manual_seed(i)) for i in ids])
        causal = rows.cumsum(0) / torch.arange(1, rows.shape[0] + 1)[:, None]
        cond = causal[None]
        eos = ids.index(self.EOS)
        pooled = cond[:, eos, 768:]
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **kw):
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def sdxl(comfy):
    import comfy.supported_models

    cfg = comfy.supported_models.SDXL(dict(SDXL_UNET))
    patcher = random_patcher(comfy, cfg, 4)
    return patcher, FakeSDXLClip()
