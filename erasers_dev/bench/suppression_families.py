"""The ``bench suppression`` table for ComfyUI 0.29's Qwen-Image, Wan 2.1 t2v and Flux.2.

Each family is ComfyUI's own model class built from its own config class (``model_detection`` /
``supported_models``) with seeded random weights, reduced to a few blocks but at the real hidden width and
head layout, and sampled end to end through the real nodes (``comfy.sample.sample``) at the sizes asked
for. The text encoders are stand-ins: the host's shipped tokenizer (Qwen2.5 for Qwen-Image, with the chat
template's head dropped as ComfyUI's ``QwenImageTEModel`` drops it; Qwen3 (klein's) for Flux.2, padded to
512; a word hash padded to 512 for Wan's UMT5, whose tokenizer ships inside the checkpoint) behind a fixed
random vector per token id of the family's real context width — random tensors of the right shape, which is
all a timing needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import torch

log = logging.getLogger(__name__)

#: Qwen-Image: the real transformer (60 blocks) reduced to ``blocks``; 24 heads × 128 = 3072, text 3584 (Qwen2.5-VL-7B)
QWEN_IMAGE = dict(
    image_model="qwen_image",
    in_channels=64,
    out_channels=16,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
#: Wan 2.1 t2v (WAN21_T2V): 1.3B is 1536 wide / 12 heads / ffn 8960 (30 blocks); 14B 5120 / 40 / 13824 (40)
WAN_BASE = dict(
    image_model="wan2.1",
    model_type="t2v",
    out_dim=16,
    patch_size=(1, 2, 2),
    freq_dim=256,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
    in_dim=16,
    text_dim=4096,
)
#: Flux.2 as model_detection reads a real checkpoint: heads = hidden / 128, mlp 3.0, no biases, 128 latent channels
FLUX2_BASE = dict(
    image_model="flux2",
    in_channels=128,
    out_channels=128,
    vec_in_dim=None,
    mlp_ratio=3.0,
    axes_dim=[32, 32, 32, 32],
    theta=2000,
    patch_size=1,
    qkv_bias=False,
    txt_ids_dims=[3],
    global_modulation=True,
    mlp_silu_act=True,
    ops_bias=False,
    txt_norm=False,
)

#: name → (family, unet config, the full model's block count, cfg, the family's working size)
VARIANTS = {
    "qwen_image": ("qwen_image", QWEN_IMAGE, "60 blocks", 4.0, "1328"),
    "wan_1.3b": ("wan", dict(WAN_BASE, dim=1536, num_heads=12, ffn_dim=8960), "30 blocks", 5.0, "832x480x81"),
    "wan_14b": ("wan", dict(WAN_BASE, dim=5120, num_heads=40, ffn_dim=13824), "40 blocks", 5.0, "832x480x81"),
    "flux2_dev": (
        "flux2",
        dict(FLUX2_BASE, hidden_size=6144, num_heads=48, context_in_dim=15360, guidance_embed=True),
        "8 double + 48 single",
        1.0,
        "1024",
    ),
    "flux2_klein_4b": (
        "flux2",
        dict(FLUX2_BASE, hidden_size=3072, num_heads=24, context_in_dim=7680, guidance_embed=False),
        "5 double + 20 single",
        1.0,
        "1024",
    ),
}
DEFAULT_VARIANTS = "qwen_image,wan_1.3b,flux2_klein_4b"

#: Qwen-Image's prompt (template-stripped: ~30 tokens, a typical prompt); Flux.2 / Wan pad theirs to 512
PROMPT = (
    "a photo of a nude person standing on a quiet beach at sunset, soft warm light, film grain, "
    "wide angle lens, detailed sand and waves in the background"
)


#: --small: 2 heads of the real head width (128), for the test suite's smoke run (seconds)
SMALL_SIZES = {"qwen_image": "64", "flux2": "64", "wan": "64x64x5"}


def reduced_config(variant: str, blocks: int, small: bool = False) -> dict:
    family, config, _, _, _ = VARIANTS[variant]
    config = dict(config)
    if small and family == "qwen_image":
        config.update(num_attention_heads=2)
    elif small and family == "wan":
        config.update(dim=256, num_heads=2, ffn_dim=512)
    elif small:
        config.update(hidden_size=256, num_heads=2)
    if family == "qwen_image" or family == "wan":
        config["num_layers"] = blocks
    else:  # Flux.2: as many double as single blocks
        config.update(depth=blocks, depth_single_blocks=blocks)
    return config


def parse_size(family: str, text: str) -> tuple:
    """'1328' → (1328, 1328) for images; '832x480x81' → (832, 480, 81) for Wan (width, height, frames)."""
    parts = [int(p) for p in text.lower().split("x")]
    if family == "wan":
        if len(parts) != 3 or parts[2] % 4 != 1 or parts[0] % 16 or parts[1] % 16:
            raise ValueError(
                f"Wan sizes are WIDTHxHEIGHTxFRAMES with width/height multiples of 16 and frames = 4k+1 "
                f"(Wan's VAE compresses time 4×), got {text!r}"
            )
        return tuple(parts)
    step = 16 if family == "flux2" else 16  # Flux.2: 16× VAE, patch 1; Qwen-Image: 8× VAE, 2×2 patches
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or any(p <= 0 or p % step for p in parts):
        raise ValueError(f"{family} sizes are SIZE or WIDTHxHEIGHT, multiples of {step}, got {text!r}")
    return tuple(parts)


def latent_of(family: str, size: tuple) -> tuple:
    """The empty latent ComfyUI's own latent nodes make for ``size`` (batch 1)."""
    if family == "flux2":
        return (1, 128, size[1] // 16, size[0] // 16)
    if family == "qwen_image":
        return (1, 16, 1, size[1] // 8, size[0] // 8)
    return (1, 16, 1 + (size[2] - 1) // 4, size[1] // 8, size[0] // 8)


def image_tokens(family: str, size: tuple) -> int:
    shape = latent_of(family, size)
    if family == "flux2":
        return shape[2] * shape[3]
    return shape[2] * (shape[3] // 2) * (shape[4] // 2)


class WordTokenizer:
    """UMT5's layout for Wan (its SentencePiece model ships inside the text-encoder file): words → ids,
    ``</s>`` = 1, padded with 0 to 512."""

    class Sub:
        pad_token, end_token, min_length = 0, 1, 512

    umt5xxl = Sub()

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        ids = [2 + int(hashlib.md5(w.lower().encode()).hexdigest(), 16) % 30000 for w in text.split()] + [1]
        ids += [0] * (512 - len(ids))
        return {"umt5xxl": [[(i, 1.0) for i in ids]]}


def qwen_template_head(ids: list) -> int:
    """Where QwenImageTEModel's output starts: after the 2nd ``<|im_start|>`` and its ``user\\n``."""
    starts = [i for i, t in enumerate(ids) if t == 151644][:2]
    end = starts[-1]
    if ids[end + 1 : end + 3] == [872, 198]:
        end += 3
    return end


class StandInCLIP:
    """``comfy.sd.CLIP``'s tokenize / encode API over the host tokenizer: each token id → a fixed random
    vector of the family's context width (timing needs the shape, not the meaning)."""

    def __init__(self, tokenizer, width: int, drop=None, guidance=None):
        self.tokenizer, self.width, self.drop, self.guidance = tokenizer, width, drop, guidance
        self.cond_stage_model = type(f"StandIn{type(tokenizer).__name__}", (), {})()
        self.rows = {}

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def row(self, token: int) -> torch.Tensor:
        if token not in self.rows:
            self.rows[token] = torch.randn(self.width, generator=torch.Generator().manual_seed(int(token))) * 0.1
        return self.rows[token]

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        (sections,) = tokens.values()
        ids = [int(t[0]) for t in sections[0]]
        cond = torch.stack([self.row(t) for t in ids])[None]
        if self.drop is not None:
            cond = cond[:, self.drop(ids) :]
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        extra = {"pooled_output": None}
        if self.guidance is not None:
            extra["guidance"] = self.guidance
        return [[self.encode_from_tokens(tokens), extra]]


def stand_in_clip(variant: str, config: dict) -> StandInCLIP:
    family = VARIANTS[variant][0]
    if family == "qwen_image":
        from comfy.text_encoders.qwen_image import QwenImageTokenizer

        return StandInCLIP(QwenImageTokenizer(), config["joint_attention_dim"], drop=qwen_template_head)
    if family == "flux2":
        from comfy.text_encoders.flux import KleinTokenizer

        return StandInCLIP(
            KleinTokenizer(), config["context_in_dim"], guidance=4.0 if config["guidance_embed"] else None
        )
    return StandInCLIP(WordTokenizer(), config["text_dim"])


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights (1-D norm scales 1, biases 0, matrices N(0, 0.02²))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith(("weight", "scale")):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build(comfy, variant: str, blocks: int, small: bool = False):
    """(ModelPatcher, stand-in CLIP, unet config) of ``variant`` from ComfyUI's own config and model classes."""
    family = VARIANTS[variant][0]
    config = reduced_config(variant, blocks, small)
    if family == "flux2":
        from comfy.ldm.flux.model import FluxParams

        known = {f.name for f in dataclasses.fields(FluxParams)} | {"image_model"}
        missing = sorted(set(config) - known)
        if missing:
            raise ValueError(f"this ComfyUI's Flux.2 takes no {missing}: the Flux.2 table needs ComfyUI ≥ 0.2x")
    cfg = comfy.model_detection.model_config_from_unet_config(dict(config))
    if cfg is None:
        raise ValueError(f"this ComfyUI detects no model for {config['image_model']} (needs ComfyUI ≥ 0.2x)")
    model = cfg.get_model({})
    randomise(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    return patcher, stand_in_clip(variant, config), config


def patched_models(nodes, base, clip, family: str, with_sld: bool, prompt: str = PROMPT) -> dict:
    """Each timed method as the real node returns it (the bench's settings; risk gate 0: always on); SLD
    only ``with_sld`` and where the family has an unconditional branch."""
    common = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "risk_gate": 0.0}
    out = {
        "token suppression": nodes.EraserTokenSuppress.execute(
            model=base,
            clip=clip,
            concepts="nude",
            factor=0.0,
            include_eos=False,
            similarity=0.99,
            prompt=prompt,
            **common,
        ).result[0],
        "concept guidance": nodes.EraserConceptGuidance.execute(
            model=base, clip=clip, concepts="nude", phi=5.0, tau=2.5, alpha=0.25, sigma_end=0.0, **common
        ).result[0],
    }
    if with_sld and family not in ("flux2", "flux"):
        out["SLD"] = nodes.EraserSLD.execute(
            model=base, clip=clip, preset="medium", safety_concept="nude", **common
        ).result[0]
    return out


def bench_variant(comfy, nodes, variant: str, sizes: list, args, time_fn) -> dict:
    """{size: {method: seconds per step}} for one variant, every size's methods interleaved round by round."""
    family, _, _, cfg, _ = VARIANTS[variant]
    base, clip, config = build(comfy, variant, args.blocks, args.small)
    patched = patched_models(nodes, base, clip, family, getattr(args, "sld", True))
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    results = {}
    for index, size in enumerate(sizes):
        latent = torch.zeros(latent_of(family, size))
        noise = comfy.sample.prepare_noise(latent, 0)

        def run(m, latent=latent, noise=noise):
            def call():
                with torch.no_grad():
                    comfy.sample.sample(
                        m, noise, args.steps, cfg, "euler", "simple", pos, neg, latent, seed=0, disable_pbar=True
                    )

            return call

        methods = {f"baseline (cfg {cfg:g})": run(base)}
        methods.update({k: run(m) for k, m in patched.items()})
        if index == 0 or not args.warmup_first_only:
            for fn in methods.values():  # warm-up
                fn()
        times = {k: [] for k in methods}
        for r in range(args.rounds):
            for k, fn in methods.items():
                times[k].append(time_fn(fn, 1) / args.steps)
                log.info("%s %s round %d %s: %.2f s/step", variant, size, r, k, times[k][-1])
        results[size] = {k: min(v) for k, v in times.items()}
    return config, results


def describe(variant: str, config: dict, size: tuple) -> str:
    family, _, full, cfg, _ = VARIANTS[variant]
    tokens = image_tokens(family, size)
    if family == "qwen_image":
        width, heads = config["num_attention_heads"] * config["attention_head_dim"], config["num_attention_heads"]
        layout = f"{config['num_layers']} of {full}"
        text = "~30 text tokens (template-stripped)"
        where = f"{size[0]}x{size[1]} px"
    elif family == "wan":
        width, heads = config["dim"], config["num_heads"]
        layout = f"{config['num_layers']} of {full}, ffn {config['ffn_dim']}"
        text = "512 text tokens (cross-attention)"
        where = f"{size[0]}x{size[1]} px x {size[2]} frames ({1 + (size[2] - 1) // 4} latent frames)"
    else:
        width, heads = config["hidden_size"], config["num_heads"]
        layout = f"{config['depth']} double + {config['depth_single_blocks']} single of {full}"
        text = "512 text tokens"
        where = f"{size[0]}x{size[1]} px"
    return (
        f"reduced {variant} (ComfyUI class, {layout}; hidden {width}, {heads} heads), {where}: {tokens} image "
        f"tokens + {text}, cfg {cfg:g}"
    )
