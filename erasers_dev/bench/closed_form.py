"""``python -m erasers bench closed-form [--quick]``: cost of every closed-form method on SD1.5 shapes.

SD1.5-shaped text projections (``erasers_dev.testing.layer_weights(Family.SD1)``: 16 cross-attention layers ×
to_k/to_v) and an SD1.5-shaped CLIP text encoder (ViT-L/14 text tower: 12 layers, width 768, 77
positions) with random weights; 1 / 10 / 100 artist names. For each method in ``erasers.edits.methods.METHODS``:
text-encoding time, solve time, total, peak resident-memory growth and eraser file size. Prints a
markdown table; nothing is downloaded. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from typing import Optional

import torch

import erasers

TARGETS = (
    "solve for 100 concepts ≤ 1 s for UCE and SPEED, ≤ 3 s for RECE; whole edit incl. text encoding "
    "≤ 5 s for UCE/SPEED; 10-concept SD1.5 eraser file ≤ 5 MB"
)
SOLVE_TARGET = {"uce": 1.0, "speed": 1.0, "rece": 3.0}
TOTAL_TARGET = {"uce": 5.0, "speed": 5.0}
FILE_TARGET_MB = 5.0


def artist_names(n: int) -> list:
    """The first ``n`` names of erasers/data/artists_sd.txt (the role after a comma dropped)."""
    path = os.path.join(os.path.dirname(os.path.abspath(erasers.__file__)), "data", "artists_sd.txt")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    names = []
    for line in lines:
        name = line.split(",")[0].strip()
        if name and name not in names:
            names.append(name)
        if len(names) == n:
            break
    return names


def sd15_text_encoder(seed: int = 0):
    """(encoder, note): random-weight SD1.5 CLIP text tower with the real tokenizer if one is on disk."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasers.errors import MissingTokenizer
    from erasers_diffusers.clip_text import ClipTextEncoder, Tower, WordHashTokenizer, clip_tokenizer
    from erasers_diffusers.tokenizer import find_tokenizer_dir

    try:
        folder = find_tokenizer_dir()
        tokenizer, note = clip_tokenizer(folder), f"CLIP BPE tokenizer from {folder}"
    except MissingTokenizer:
        tokenizer = WordHashTokenizer()
        note = (
            "no CLIP tokenizer on this machine: a deterministic word-hash tokenizer stands in (one token "
            "per word, so prompts are a little shorter than with CLIP's BPE)"
        )
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.device("meta"):  # transformers' own initialisation of 123M weights takes ~20 s on 2 cores
        model = CLIPTextModel(config)
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:  # like CLIP's init scale: small normal weights
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        for name, _ in list(model.named_buffers()):  # to_empty left the position ids uninitialised
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(77).expand(1, -1), persistent=False)
    return ClipTextEncoder("sd1", [Tower(tokenizer, model, "last")]), note


class PeakRSS:
    """Peak resident-set growth over a block, sampled every 2 ms from /proc (torch allocations included,
    which tracemalloc cannot see). Falls back to ru_maxrss growth where /proc is missing."""

    def __init__(self):
        self.peak = self.base = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def run_one(method, count: int, encoder, weights, out_dir: str) -> dict:
    from erasers.edits.eraser import compute_eraser
    from erasers.files.eraser_file import save_eraser
    from erasers.files.families import Family

    config = method.config_class(concepts=artist_names(count), concept_type="art")
    with PeakRSS() as memory:
        started = time.perf_counter()
        eraser = compute_eraser(config, encoder, weights, Family.SD1)
        total = time.perf_counter() - started
    path = save_eraser(eraser, os.path.join(out_dir, f"{method.name}-{count}.safetensors"))
    return {
        "encode": eraser.timings.get("encode_s", 0.0),
        "solve": eraser.timings.get("solve_s", 0.0) + eraser.timings.get("compress_s", 0.0),
        "total": total,
        "peak_mb": memory.growth_mb,
        "file_mb": os.path.getsize(path) / 1e6,
        "rank": max(d.rank for d in eraser.deltas.values()),
    }


#: whole-edit targets of #16 for the published style presets with the full artist list (SD1.5 shapes)
PRESET_TARGET = {"speed": 5.0, "rece": 120.0}
PRESETS = (("speed", "styles"), ("rece", "art"))
PRESET_CONCEPT = "Vincent Van Gogh"


def run_preset(method, preset: str, encoder, weights, concepts=(PRESET_CONCEPT,)) -> dict:
    """The whole edit (text encoding included) of a published preset with its own preserve list."""
    from erasers.edits.eraser import compute_eraser
    from erasers.files.families import Family

    config = method.config_class.from_preset(preset, concepts=list(concepts))
    with PeakRSS() as memory:
        started = time.perf_counter()
        eraser = compute_eraser(config, encoder, weights, Family.SD1)
        total = time.perf_counter() - started
    return {
        "preserve": len(config.preserve),
        "encode": eraser.timings.get("encode_s", 0.0),
        "solve": eraser.timings.get("solve_s", 0.0) + eraser.timings.get("compress_s", 0.0),
        "total": total,
        "peak_mb": memory.growth_mb,
    }


# -- 100 concepts on each family's real widths ------------------------------------------------------------

#: (label, family, canonical key pattern, (out, in), layers, where the widths come from)
FAMILY_WIDTHS = (
    (
        "Flux.2 dev",
        "flux2",
        "txt_in.weight",
        (6144, 15360),
        1,
        "txt_in 15360 = 3×5120 (Mistral-3-24B layers, erasers/families/flux.py); 6144 = 48 heads × 128 "
        "(ComfyUI 0.29 model_detection.py: num_heads 48 for flux2, hidden_size = txt_in.weight.shape[0])",
    ),
    (
        "Flux.2 klein 4B",
        "flux2",
        "txt_in.weight",
        (3072, 7680),
        1,
        "7680 = 3×2560 (Qwen3-4B, erasers/families/flux.py); 3072 assumed (24 heads × 128; ComfyUI reads it "
        "from the checkpoint, not in its sources: unverified)",
    ),
    (
        "Flux.2 klein 9B",
        "flux2",
        "txt_in.weight",
        (4096, 12288),
        1,
        "12288 = 3×4096 (Qwen3-8B, erasers/families/flux.py); 4096 assumed (32 heads × 128; unverified)",
    ),
    (
        "Chroma",
        "chroma",
        "txt_in.weight",
        (3072, 4096),
        1,
        "T5-XXL 4096 → hidden 3072 (ComfyUI 0.29 model_detection.py Flux/Chroma defaults; ldm/chroma)",
    ),
    (
        "Qwen-Image",
        "qwen_image",
        "txt_in.weight",
        (3072, 3584),
        1,
        "joint_attention_dim 3584 → 24 heads × 128 (ComfyUI 0.29 ldm/qwen_image/model.py)",
    ),
    (
        "Z-Image",
        "zimage",
        "cap_embedder.1.weight",
        (3840, 2560),
        1,
        "cap_feat_dim 2560 (Qwen3-4B, erasers/families/mmdit.py) → dim 3840 (ComfyUI 0.29 model_detection.py)",
    ),
    (
        "Lumina 2",
        "lumina2",
        "cap_embedder.1.weight",
        (2304, 2304),
        1,
        "Gemma-2-2B 2304 → dim 2304 (ComfyUI 0.29 model_detection.py 'Original Lumina 2')",
    ),
    (
        "HiDream-I1",
        "hidream",
        "caption_projection.{i}.linear.weight",
        (2560, 4096),
        49,
        "48 Llama-fed + 1 T5-fed caption projections 4096 → 2560 = 20 heads × 128 (ComfyUI 0.29 "
        "model_detection.py HiDream); solved here as one stream (the pack solves each Llama layer's and T5's "
        "projections with that stream's keys: the same per-Linear solves)",
    ),
    (
        "AuraFlow",
        "auraflow",
        "cond_seq_linear.weight",
        (3072, 2048),
        1,
        "Pile-T5-XL 2048 (supported_models.AuraFlow cond_seq_dim) → MMDiT dim 3072 (ComfyUI 0.29 ldm/aura/mmdit.py "
        "default; the checkpoint's width is read at load)",
    ),
    (
        "Wan 2.1 14B",
        "wan",
        "blocks.{i}.cross_attn.{kv}.weight",
        (5120, 5120),
        80,
        "40 blocks × cross_attn k/v 5120→5120 reading text_embedding(UMT5 4096→5120) (ComfyUI 0.29 "
        "ldm/wan/model.py; dim and depth are read from the checkpoint: the 14B release's 5120 / 40)",
    ),
)
#: the 100-concept UCE solve target of #16
FAMILY_SOLVE_TARGET = 1.0


class RandomRowsEncoder:
    """Deterministic random token rows of a given width (no text model: the family table times the solve).

    Each prompt gets ``words + 1`` rows (no start token, an end token, as T5/LLM encoders) padded to
    ``context_length`` with the end row's neighbourhood, seeded by the prompt text.
    """

    def __init__(self, dim: int, family: str, context_length: int = 32):
        self.dim, self.family, self.context_length, self.context_dim = dim, family, context_length, dim

    def encode(self, prompts):
        import hashlib

        from erasers.text import PromptEncoding

        hidden, lengths, ids = [], [], []
        for p in prompts:
            seed = int(hashlib.md5(p.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            hidden.append(torch.randn(self.context_length, self.dim, generator=gen))
            n = min(len(p.split()) + 1, self.context_length)
            lengths.append(n)
            ids.append(list(range(n)))
        return PromptEncoding(torch.stack(hidden), torch.tensor(lengths), ids, None, has_bos=False)


def family_weights(key: str, shape: tuple, layers: int, seed: int = 0) -> dict:
    """Random weights (std 1/√in); a many-layer family shares one tensor between its keys (80 × 5120² float32
    would be 8.4 GB), which changes no arithmetic of the solve."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    if layers == 1:
        return {key: w}
    if "{kv}" in key:  # K and V of every block
        return {key.format(i=i, kv=kv): w for i in range(layers // 2) for kv in "kv"}
    return {key.format(i=i): w for i in range(layers)}


def run_family(label, family_name, key, shape, layers, method_name: str, count: int) -> dict:
    from erasers.edits.eraser import compute_eraser
    from erasers.edits.methods import METHODS
    from erasers.files.families import Family

    method = METHODS[method_name]
    family = Family(family_name)
    weights = family_weights(key, shape, layers)
    encoder = RandomRowsEncoder(shape[1], family_name)
    config = method.config_class(concepts=artist_names(count))
    eraser = compute_eraser(config, encoder, weights, family)
    return {
        "solve": eraser.timings.get("solve_s", 0.0) + eraser.timings.get("compress_s", 0.0),
        "encode": eraser.timings.get("encode_s", 0.0),
        "layers": len(eraser.deltas),
        "rank": max(d.rank for d in eraser.deltas.values()),
    }


#: method → largest context width it is run at in the family table (cost of its d×d parts on 2 cores)
FAMILY_MAX_WIDTH = {"uce": 10**9, "speed": 4096, "rece": 2560}


def family_table(methods: list, count: int, quick: bool, labels: Optional[list] = None) -> None:
    rows = [r for r in FAMILY_WIDTHS if r[0] == "Lumina 2"] if quick else FAMILY_WIDTHS
    if labels:
        rows = [r for r in FAMILY_WIDTHS if r[0] in labels]
    print()
    print(f"{count} concepts on each family's real widths (random weights, random {'{'}words+1{'}'} token rows):")
    print()
    print("| family | edited layers (out × in) | method | solve s | max rank | target |")
    print("|---|---|---|---:|---:|---|")
    for label, family_name, key, shape, layers, _ in rows:
        for name in methods:
            if shape[1] > FAMILY_MAX_WIDTH.get(name, 0) or (name != "uce" and layers > 1):
                print(
                    f"| {label} | {layers} × {shape[0]}×{shape[1]} | {name} | – | – | not run: d×d float64 "
                    f"parts ({shape[1]}² × 8 B = {shape[1] ** 2 * 8 / 1e9:.2f} GB per system) are not cheap |"
                )
                continue
            try:
                row = run_family(label, family_name, key, shape, layers, name, count)
            except Exception as exc:  # one family failing must not hide the others
                print(f"| {label} | {layers} × {shape[0]}×{shape[1]} | {name} | – | – | failed: {exc!s:.80} |")
                continue
            target = ""
            if name == "uce" and count == 100:
                target = f"{'✓' if row['solve'] <= FAMILY_SOLVE_TARGET else '✗'} ≤{FAMILY_SOLVE_TARGET:g}s"
            print(
                f"| {label} | {row['layers']} × {shape[0]}×{shape[1]} | {name} | {row['solve']:.3f} | "
                f"{row['rank']} | {target} |",
                flush=True,
            )
    print()
    print("Widths and where they come from:")
    for label, _, _, shape, layers, source in rows:
        print(f"- {label}: {source}.")


def verdict(name: str, count: int, row: dict) -> str:
    notes = []
    if count == 100 and name in SOLVE_TARGET:
        notes.append(f"solve {'✓' if row['solve'] <= SOLVE_TARGET[name] else '✗'} ≤{SOLVE_TARGET[name]:g}s")
    if count == 100 and name in TOTAL_TARGET:
        notes.append(f"total {'✓' if row['total'] <= TOTAL_TARGET[name] else '✗'} ≤{TOTAL_TARGET[name]:g}s")
    if count == 10:
        notes.append(f"file {'✓' if row['file_mb'] <= FILE_TARGET_MB else '✗'} ≤{FILE_TARGET_MB:g}MB")
    return ", ".join(notes)


def main(argv: Optional[list] = None) -> int:
    from erasers.edits.methods import METHODS
    from erasers.files.families import Family

    from ..testing import layer_weights

    parser = argparse.ArgumentParser(prog="python -m erasers bench closed-form", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--quick", action="store_true", help="1 and 10 concepts, UCE only (well under a minute; nothing downloaded)"
    )
    parser.add_argument("--counts", default=None, help="comma-separated concept counts (default 1,10,100)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument(
        "--presets",
        default=None,
        help="published presets with their full preserve lists, e.g. speed:styles,rece:art (default both; "
        "'none' skips them; --quick skips them)",
    )
    parser.add_argument(
        "--families",
        default=None,
        help="methods for the real-widths family table, e.g. uce,speed,rece (default uce,speed,rece; "
        "--quick: uce on one family; 'none' skips it)",
    )
    parser.add_argument(
        "--family-rows", default=None, help="only these rows of the family table, by label (e.g. HiDream-I1,AuraFlow)"
    )
    args = parser.parse_args(argv)

    labels = [r.strip() for r in args.family_rows.split(",") if r.strip()] if args.family_rows else None
    unknown_rows = sorted(set(labels or ()) - {r[0] for r in FAMILY_WIDTHS})
    if labels is not None and (unknown_rows or not labels):
        found = f"unknown row(s) {unknown_rows}" if unknown_rows else "no row named"
        parser.error(f"--family-rows: {found}; the rows are {', '.join(r[0] for r in FAMILY_WIDTHS)}")
    counts = [int(c) for c in (args.counts or ("1,10" if args.quick else "1,10,100")).split(",")]
    names = [m.strip() for m in (args.methods or ("uce" if args.quick else ",".join(METHODS))).split(",")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    presets = PRESETS if not args.quick else ()
    if args.presets:
        presets = () if args.presets == "none" else tuple(tuple(p.split(":", 1)) for p in args.presets.split(","))
    bad = [p for p in presets if len(p) != 2 or p[0] not in METHODS or p[1] not in METHODS[p[0]].config_class.PRESETS]
    if bad:
        parser.error(f"unknown preset(s) {bad}; give method:preset, e.g. speed:styles,rece:art")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    built = time.perf_counter()
    encoder, note = sd15_text_encoder()
    weights = layer_weights(Family.SD1, seed=0)
    encoder.encode(["warm up"])  # first-call overheads (thread pools, kernels) stay out of the table
    built = time.perf_counter() - built

    print(
        "| method | concepts | text encoding s | solve s | total s | peak RSS growth MB | file MB | max rank "
        "| targets |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as out_dir:
        for name in names:
            for count in counts:
                try:
                    row = run_one(METHODS[name], count, encoder, weights, out_dir)
                except Exception as exc:  # a method failing must not hide the others' rows
                    print(
                        f"| {name} | {count} | – | – | – | – | – | – | failed: {type(exc).__name__}: "
                        f"{str(exc)[:80]} |",
                        flush=True,
                    )
                    continue
                print(
                    f"| {name} | {count} | {row['encode']:.2f} | {row['solve']:.3f} | {row['total']:.2f} | "
                    f"{row['peak_mb']:.0f} | {row['file_mb']:.2f} | {row['rank']} | {verdict(name, count, row)} |",
                    flush=True,
                )
    if presets:
        print()
        print(f"Published presets with their own preserve lists, erasing '{PRESET_CONCEPT}' (whole edit):")
        print()
        print("| method | preset | preserved | text encoding s | solve s | total s | peak RSS growth MB | target |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for name, preset in presets:
            row = run_preset(METHODS[name], preset, encoder, weights)
            target = PRESET_TARGET.get(name)
            mark = f"{'✓' if row['total'] <= target else '✗'} ≤{target:g}s" if target else ""
            print(
                f"| {name} | {preset} | {row['preserve']} | {row['encode']:.2f} | {row['solve']:.2f} | "
                f"{row['total']:.2f} | {row['peak_mb']:.0f} | {mark} |",
                flush=True,
            )
    family_methods = ["uce"] if args.quick else ["uce", "speed", "rece"]
    if args.families:
        family_methods = [] if args.families == "none" else [m.strip() for m in args.families.split(",")]
    if family_methods:
        family_table(family_methods, 10 if args.quick else 100, args.quick, labels)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(
        "SD1.5 shapes, random weights: 32 projections (16 attn2 × to_k/to_v), CLIP ViT-L/14 text tower "
        "(12 layers, 768, 77 positions); artist names from erasers/data/artists_sd.txt; concept type 'art'."
    )
    print(f"Tokenizer: {note}.")
    print(f"Targets: {TARGETS}.")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads; load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after"
        if load_before
        else ""
    )
    print(
        f"Set-up (encoder + weights, not in the table): {built:.1f} s. Text encoding is one batched pass "
        f"per prompt list (identical prompts encoded once); solve = closed form + low-rank compression."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
