"""Benchmark: per-step cost of the sampling-time suppression methods (``bench suppression``).

Each method is timed against the same unpatched model in the same run, interleaved round by round, and
reported as a ratio of per-step times (the fastest round: robust to other load on the machine). The
tables of one run:

* UNet: a random-weight SD1.5-shaped diffusers ``UNet2DConditionModel`` at 256 px (32×32 latent), CFG
  batch of 2, the methods through ``erasers_diffusers.suppression``;
* Flux: ComfyUI's own Flux class reduced to 2 double + 4 single blocks (hidden 512) with random weights,
  sampled end to end through the real nodes (needs ``COMFYUI_PATH`` and an interpreter that can import
  ComfyUI; ``--no-flux`` skips it). SLD is refused on Flux (no unconditional branch), SAFREE is not timed
  there (its per-step work is a conditioning swap, as on the UNet);
* families (``--families``, needs ComfyUI 0.29): Qwen-Image, Wan 2.1 t2v and Flux.2, each ComfyUI's own class
  reduced to ``--blocks`` blocks at the real width and head layout, sampled through the real nodes at
  ``--qwen-sizes`` / ``--wan-sizes`` / ``--flux2-sizes`` (``suppression_families.py``); ``--no-unet`` skips
  the UNet table.

Targets (issue 4): token suppression ≤ 1.10, concept guidance ≤ 1.35, SAFREE ≤ 1.10 after its one-off
prompt analysis, SLD ≤ 1.60 (one extra pass is inherent).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time

import torch

from erasers.guards import safree, sld
from erasers.guards import token_suppress as ts
from erasers_diffusers.suppression import SuppressionProcessors, SuppressionState, safree_embeds

log = logging.getLogger(__name__)

TARGETS = {"token suppression": 1.10, "concept guidance": 1.35, "SAFREE": 1.10, "SLD": 1.60}

SD15_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


#: ComfyUI Flux config reduced to a few blocks (the full model: 19 double + 38 single, hidden 3072)
FLUX_DIT = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 512,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 4,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="UNet calls per method per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the fastest is reported)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size/8)")
    parser.add_argument("--small", action="store_true", help="a reduced UNet (quick smoke run)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="per-step time from wall clock or process CPU time (auto: cpu with 1 torch thread, "
        "robust to other load; wall otherwise)",
    )
    parser.add_argument(
        "--no-flux",
        dest="flux",
        action="store_false",
        help="skip the reduced ComfyUI Flux table (it needs COMFYUI_PATH)",
    )
    parser.add_argument("--flux", dest="flux", action="store_true", help=argparse.SUPPRESS)  # old spelling
    parser.add_argument(
        "--flux-sizes",
        default="256,512,1024",
        help="image sizes for the Flux table, comma-separated (default 256,512,1024: the UNet's "
        "size up to Flux's native one; the text/image token ratio, and with it the cost of "
        "the text-stream branches, depends on the size)",
    )
    parser.set_defaults(flux=True)
    parser.add_argument("--no-unet", dest="unet", action="store_false", help="skip the UNet table")
    from .suppression_families import DEFAULT_VARIANTS, VARIANTS

    parser.add_argument(
        "--families",
        default=DEFAULT_VARIANTS,
        help=f"ComfyUI 0.29 family tables, comma-separated, from {', '.join(VARIANTS)}; 'none' skips them "
        f"(default {DEFAULT_VARIANTS}; they need COMFYUI_PATH)",
    )
    parser.add_argument(
        "--blocks", type=int, default=1, help="blocks per family model (Flux.2: as many double as single)"
    )
    parser.add_argument("--qwen-sizes", default="512,1328", help="Qwen-Image sizes in px (SIZE or WxH)")
    parser.add_argument("--flux2-sizes", default="512,1024", help="Flux.2 sizes in px (SIZE or WxH)")
    parser.add_argument(
        "--wan-sizes", default="832x480x5,832x480x17", help="Wan sizes WIDTHxHEIGHTxFRAMES (frames = 4k+1)"
    )
    parser.add_argument(
        "--no-family-sld", dest="sld", action="store_false", help="skip SLD in the family tables (slow)"
    )
    parser.add_argument(
        "--warmup",
        choices=("first", "all"),
        default="first",
        help="family tables: warm every method up at the first size only (default; the rounds' minimum "
        "absorbs a later size's first-call cost) or at every size",
    )


class _HashTokenizer:
    """Deterministic word → id stand-in so the one-off SAFREE analysis runs a real CLIP text model offline."""

    model_max_length = 77
    pad_token_id = 49407

    def __call__(self, text, truncation=True, max_length=77):
        ids = [49406] + [1000 + int(hashlib.md5(w.encode()).hexdigest(), 16) % 40000 for w in text.split()] + [49407]
        return {"input_ids": ids[:max_length]}


def _unet(small: bool):
    from diffusers import UNet2DConditionModel

    cfg = dict(SD15_UNET)
    if small:
        cfg.update(block_out_channels=(64, 128, 256, 256), layers_per_block=1, attention_head_dim=4)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


#: the clock the per-step times are read from (set by ``run`` from --clock)
CLOCK = {"name": "wall", "fn": time.perf_counter}


def _time(fn, steps: int) -> float:
    clock = CLOCK["fn"]
    start = clock()
    for _ in range(steps):
        fn()
    return (clock() - start) / steps


def _pick_clock(choice: str) -> None:
    """cpu = this process's CPU time: with one torch thread it counts only our own work, so the ratios
    hold on a machine shared with other jobs; wall = elapsed time (what a user waits for)."""
    if choice == "auto":
        choice = "cpu" if torch.get_num_threads() == 1 else "wall"
    CLOCK.update(name=choice, fn=time.process_time if choice == "cpu" else time.perf_counter)


def bench_unet(args) -> tuple:
    unet = _unet(args.small)
    ctl = SuppressionProcessors(unet).install()
    gen = torch.Generator().manual_seed(1)
    lat = args.size // 8
    x = torch.randn(1, 4, lat, lat, generator=gen)
    uncond, cond, safety, concept = (torch.randn(1, 77, 768, generator=gen) for _ in range(4))
    t = torch.tensor([500])
    mask = torch.zeros(77, dtype=torch.bool)
    mask[5:] = True  # a concept word and every later (EOS/padding) position
    bias = torch.stack([torch.zeros(77), ts.logit_bias(mask, 0.0)])
    ctx2 = torch.cat([uncond, cond])
    x2 = torch.cat([x, x])
    x3, ctx3 = torch.cat([x, x, x]), torch.cat([uncond, cond, safety])
    sld_cfg = sld.SLDConfig(preset="medium")
    sld_state = sld.SLDState()

    @torch.no_grad()
    def cfg_call():
        ctl.state = None
        unet(x2, t, encoder_hidden_states=ctx2)

    @torch.no_grad()
    def token_call():
        ctl.state = SuppressionState(token_bias=bias)
        unet(x2, t, encoder_hidden_states=ctx2)

    @torch.no_grad()
    def nag_call():
        ctl.state = SuppressionState(nag_context=concept, nag_rows=torch.tensor([1]))
        unet(x2, t, encoder_hidden_states=ctx2)

    projected = cond.clone()
    projected[0, 5:] *= 0.5  # stands for the SAFREE-projected conditioning: same shape, same cost

    @torch.no_grad()
    def safree_call():
        ctl.state = None
        unet(x2, t, encoder_hidden_states=torch.cat([uncond, projected]))

    @torch.no_grad()
    def sld_call():
        ctl.state = None
        eps_u, eps_p, eps_s = unet(x3, t, encoder_hidden_states=ctx3).sample.chunk(3)
        sld.sld_combine(eps_u, eps_p, eps_s, 7.5, sld_state, sld_cfg, 0)

    methods = {
        "baseline (CFG)": cfg_call,
        "token suppression": token_call,
        "concept guidance": nag_call,
        "SAFREE": safree_call,
        "SLD": sld_call,
    }
    for fn in methods.values():  # warm-up
        fn()
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(_time(fn, args.steps))
    ctl.remove()
    per_step = {name: min(v) for name, v in times.items()}  # min over rounds: robust to other load
    # SAFREE's one-off prompt analysis with a real (random-weight) CLIP-L text model
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasers_diffusers.suppression import DiffusersTextEncoder

    torch.manual_seed(2)
    text_model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    ).eval()
    enc = DiffusersTextEncoder(_HashTokenizer(), text_model)
    start = CLOCK["fn"]()
    safree_embeds(enc, "a photo of a nude woman standing on a beach at sunset", safree.SAFREEConfig())
    analysis = CLOCK["fn"]() - start
    return per_step, analysis


def comfy_and_pack():
    """(comfy, the pack's suppression nodes, its hooks module) imported as ComfyUI imports a custom node, or
    a string saying why not (``COMFYUI_PATH`` unset, or ComfyUI not importable by this interpreter)."""
    import os
    import sys

    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        return "COMFYUI_PATH is not set (point it at a ComfyUI checkout)"
    if path not in sys.path:
        sys.path.insert(0, path)
    saved = sys.argv
    # --use-pytorch-cross-attention: the host attention is torch's SDPA, ComfyUI's default on NVIDIA GPUs. On
    # CPU ComfyUI would otherwise pick its sub-quadratic attention, slower than the fused kernel that
    # concept guidance's shared image attention runs on, and the ratio would flatter the method.
    sys.argv = [saved[0], "--cpu", "--use-pytorch-cross-attention"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.sample
    except ImportError as exc:
        return f"ComfyUI at {path} cannot be imported by {sys.executable} ({exc}); run the bench with ComfyUI's Python"
    finally:
        sys.argv = saved
    import importlib
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    name = "concept_erasers_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return (
        comfy,
        importlib.import_module(f"{name}.nodes.suppression"),
        importlib.import_module(f"{name}.nodes.suppression_hooks"),
    )


def bench_flux(args):
    loaded = comfy_and_pack()
    if isinstance(loaded, str):
        return loaded
    comfy, nodes, hooks = loaded
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    config = dict(FLUX_DIT)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # ComfyUI 0.2x requires it
        config["txt_ids_dims"] = []
    cfg = comfy.model_detection.model_config_from_unet_config(config)
    model = cfg.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.diffusion_model.named_parameters():
            p.copy_(
                torch.ones_like(p)
                if p.ndim == 1 and pname.endswith(("weight", "scale"))
                else (torch.zeros_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=gen) * 0.02)
            )
    base = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    class Clip:  # T5 conditioning: a deterministic random (1, 256, 4096) tensor per token
        def tokenize(self, text, **kw):
            ids = [2 + int(hashlib.md5(w.encode()).hexdigest(), 16) % 30000 for w in text.split()] + [1]
            return {"t5xxl": [[(i, 1.0) for i in ids + [0] * (256 - len(ids))]]}

        def encode_from_tokens(self, tokens, return_pooled=False, **kw):
            ids = [t[0] for t in tokens["t5xxl"][0]]
            cond = (
                torch.stack([torch.randn(4096, generator=torch.Generator().manual_seed(i)) for i in ids])[None] * 0.1
            )
            pooled = cond[0, : ids.index(1) + 1].mean(0)[:768][None]  # stands for CLIP-L's pooled vector
            return (cond, pooled) if return_pooled else cond

        def encode_from_tokens_scheduled(self, tokens, **kw):
            c, p = self.encode_from_tokens(tokens, True)
            return [[c, {"pooled_output": p, "guidance": 3.5}]]

    clip = Clip()
    prompt = "a photo of a nude person"
    from .suppression_families import patched_models

    patched = patched_models(nodes, base, clip, "flux", with_sld=False, prompt=prompt)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    per_size = {}
    for size in flux_sizes(args):
        latent = torch.zeros(1, 16, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(latent, 0)

        def run(m, latent=latent, noise=noise):
            return lambda: comfy.sample.sample(
                m, noise, args.steps, 1.0, "euler", "simple", pos, pos, latent, seed=0, disable_pbar=True
            )

        methods = {"baseline (Flux, cfg 1)": run(base)}
        methods.update({k: run(m) for k, m in patched.items()})
        for fn in methods.values():
            fn()
        times = {k: [] for k in methods}
        stream = []
        for _ in range(args.rounds):
            for k, fn in methods.items():
                with _StreamClock(hooks.DitDispatch) as clock:
                    times[k].append(_time(fn, 1) / args.steps)
                if k == "concept guidance":
                    stream.append(clock.total / args.steps)
        per_size[size] = {k: min(v) for k, v in times.items()}
        per_size[size]["_concept stream"] = min(stream)
    return per_size


class _StreamClock:
    """Accumulates the time concept guidance spends carrying the concept's own text stream through the
    blocks (``DitDispatch.advance_concept_stream``): the part of its cost that exact NAG cannot avoid."""

    def __init__(self, dispatch_class):
        self.cls, self.total = dispatch_class, 0.0

    def __enter__(self):
        self.original = self.cls.advance_concept_stream
        clock, original = CLOCK["fn"], self.original

        def timed(inner_self, *a, **k):
            start = clock()
            try:
                return original(inner_self, *a, **k)
            finally:
                self.total += clock() - start

        self.cls.advance_concept_stream = timed
        return self

    def __exit__(self, *exc):
        self.cls.advance_concept_stream = self.original
        return False


def flux_sizes(args) -> list:
    sizes = [int(s) for s in str(getattr(args, "flux_sizes", "") or args.size).split(",") if s.strip()]
    bad = [s for s in sizes if s <= 0 or s % 16]
    if bad:
        raise ValueError(f"--flux-sizes expects positive multiples of 16 (8× VAE, 2×2 patches), got {bad}")
    return sizes


def _table(title: str, per_step: dict) -> list:
    names = list(per_step)
    base = per_step[names[0]]
    rows = []
    print(f"\n{title}")
    print(f"{'method':<24} {'ms/step':>10} {'ratio':>7} {'target':>7}  ok    ({CLOCK['name']} clock)")
    for name in names:
        ratio = per_step[name] / base
        target = TARGETS.get(name)
        ok = "" if target is None else ("yes" if ratio <= target else "NO")
        print(
            f"{name:<24} {1000 * per_step[name]:>10.1f} {ratio:>7.2f} {'' if target is None else f'{target:.2f}':>7}  {ok}"  # noqa: E501
        )
        rows.append(
            {
                "table": title,
                "method": name,
                "ms_per_step": 1000 * per_step[name],
                "ratio": ratio,
                "target": target,
                "clock": CLOCK["name"],
            }
        )
    return rows


def run(args) -> list:
    """Print the table(s); return the rows (method, ms/step, ratio vs baseline, target)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    _pick_clock(getattr(args, "clock", "auto"))
    rows = []
    if getattr(args, "unet", True):
        per_step, analysis = bench_unet(args)
        kind = "reduced" if args.small else "SD1.5-shaped"
        rows += _table(
            f"{kind} UNet, {args.size} px ({args.size // 8}x{args.size // 8} latent), CFG batch 2, CPU, "
            f"{torch.get_num_threads()} threads",
            per_step,
        )
        print(
            f"SAFREE one-off prompt analysis (12 masked copies + 17 keywords, random CLIP-L): {analysis:.2f} s "
            f"({CLOCK['name']} clock)"
        )
        rows.append({"table": "safree", "method": "SAFREE one-off analysis", "seconds": analysis})
    if getattr(args, "flux", True):
        flux = bench_flux(args)
        if isinstance(flux, str):
            print(f"\nFlux: skipped: {flux}")
            rows.append({"table": "flux", "method": "skipped", "reason": flux})
        else:
            d = FLUX_DIT
            for size, per_step_flux in flux.items():
                tokens = (size // 16) ** 2
                stream = per_step_flux.pop("_concept stream")
                rows += _table(
                    f"reduced Flux (ComfyUI class, {d['depth']} double + {d['depth_single_blocks']} "
                    f"single blocks, hidden {d['hidden_size']}), {size} px ({tokens} image + 256 text "
                    f"tokens), cfg 1, CPU, {torch.get_num_threads()} threads, host attention SDPA",
                    per_step_flux,
                )
                base = per_step_flux["baseline (Flux, cfg 1)"]
                extra = per_step_flux["concept guidance"] - base
                print(
                    f"concept guidance account: +{1000 * extra:.1f} ms/step over the baseline, of which "
                    f"{1000 * stream:.1f} ms ({stream / base:.2f} of the baseline) carry the concept's own "
                    f"256-token text stream through every block; the rest (shared image attention, "
                    f"concept-key attention, NAG) {(extra - stream) / base:.2f}"
                )
                rows.append(
                    {
                        "table": f"flux {size}",
                        "method": "concept stream",
                        "ms_per_step": 1000 * stream,
                        "ratio": stream / base,
                        "target": None,
                        "clock": CLOCK["name"],
                    }
                )
            print("SLD on Flux: refused by the node (guidance-distilled, no unconditional branch)")
    rows += family_tables(args)
    return rows


def family_tables(args) -> list:
    """The ComfyUI 0.29 family tables (Qwen-Image, Wan 2.1, Flux.2): one table per variant and size."""
    from . import suppression_families as fam

    chosen = [v.strip() for v in str(getattr(args, "families", "none")).split(",") if v.strip()]
    if chosen in ([], ["none"]):
        return []
    unknown = [v for v in chosen if v not in fam.VARIANTS]
    if unknown:
        raise ValueError(f"--families: unknown {unknown}; expected some of {', '.join(fam.VARIANTS)} or 'none'")
    loaded = comfy_and_pack()
    if isinstance(loaded, str):
        print(f"\nFamily tables: skipped: {loaded}")
        return [{"table": "families", "method": "skipped", "reason": loaded}]
    comfy, nodes, _ = loaded
    args.warmup_first_only = getattr(args, "warmup", "first") == "first"
    rows = []
    for variant in chosen:
        family = fam.VARIANTS[variant][0]
        text = (
            fam.SMALL_SIZES[family]
            if args.small
            else getattr(args, f"{'qwen' if family == 'qwen_image' else family}_sizes")
        )
        sizes = [fam.parse_size(family, t.strip()) for t in text.split(",") if t.strip()]
        config, results = fam.bench_variant(comfy, nodes, variant, sizes, args, _time)
        for size, per_step in results.items():
            rows += _table(
                f"{fam.describe(variant, config, size)}, CPU, {torch.get_num_threads()} threads, host attention SDPA",
                per_step,
            )
        if family == "flux2":
            print("SLD on Flux.2: refused by the node (guidance-distilled, no unconditional branch)")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench suppression", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
