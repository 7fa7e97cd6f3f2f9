"""``python -m erasers_dev.bench.soak_comfy --comfyui PATH``: soak the pack inside a real ComfyUI (CPU).

Two parts, each printing a markdown table; nothing is downloaded and nothing is asserted on speed.

(a) **patcher** — 1,000 (``--cycles``) apply/remove cycles through ComfyUI's own ``ModelPatcher`` on the
random-weight SD1.5 checkpoint the real-ComfyUI tests use. The patched models come from the pack's nodes
(``EraserClosedForm`` UCE at three strengths, ``EraserLoRALoad`` with a kohya LoRA carrying UNet and
``lora_te_*`` text-encoder keys at two strengths, and a LoRA stacked on a closed-form eraser). Each cycle
takes a fresh ``clone()`` of a random variant and a random route:

* ``direct``   — ``patch_model()`` then ``unpatch_model()``;
* ``managed``  — ``model_management.load_models_gpu([clone])`` then ``unload_all_models()``;
* ``switch``   — load one variant, then another of the same base (ComfyUI unpatches the first lazily,
  by patch uuid), then ``unload_all_models()``;
* ``dropped``  — load a clone, drop every reference to it and ``gc.collect()`` while it is loaded
  (ComfyUI's ``LoadedModel`` falls back to the parent patcher), then ``unload_all_models()``.

While patched, every key the variant patches must differ from the base; after removal those keys must
have their old bits again (checked every cycle), and the whole UNet + CLIP state dict is compared bit for
bit every ``--full-check-every`` cycles and at the end. Bits, not values: SD1.5 checkpoints store no
``clip_l`` text projection, so ComfyUI leaves it uninitialised and it may hold NaN (issue 13).

(b) **server** — a ``--cpu`` ComfyUI server (started the way ``tests/comfyui/comfy_harness.py`` does,
this repository symlinked into ``custom_nodes``) runs ``--workflows`` (50) queued prompts. Each prompt is
one fixed txt2img graph with a random set of the pack's eraser nodes switched on, their settings taken
from ``example_workflows/`` (at most one sampling-time eraser — SAFREE, SLD, concept guidance, token
suppression — plus any of closed-form, erasure LoRA, SPM and saved-eraser loading, strengths drawn at
random); about a third have every eraser switched off (the baseline). Every baseline image must be
bit-identical (decoded pixels) to the baseline a fresh server renders first (``--no-fresh-server``
uses the soak server's own first prompt instead). The server's resident memory (VmRSS) is printed after
each prompt and summarised. A baseline whose KSampler came from ComfyUI's cache proves nothing, so
baselines never follow a baseline and the table counts how many really sampled.

Arguments: ``--comfyui`` (required; a ComfyUI checkout importable with ``--cpu``), ``--only
patcher|server``, ``--cycles``, ``--workflows``, ``--full-check-every``, ``--seed``, ``--cache-dir``
(where the 630 MB random checkpoint is kept; default ``$CE_TEST_CACHE_DIR`` or a temporary folder),
``--prompt-timeout`` (seconds per queued prompt), ``--keep`` (keep the server's base folder),
``--no-fresh-server``. Exit code 1 when any bit-identity check failed. Run with the same Python
environment as the real-ComfyUI tests (tests/comfyui/README.md), e.g. for ComfyUI 0.3.64
``PYTHONPATH=/work/comfy064_site:/work/stubs`` and for 0.29 ``PYTHONPATH=/work/stubs``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = REPO_ROOT / "tests" / "comfyui"
PACK = "concept_erasers"
PROMPT, NEGATIVE, SEED = "a painting by Van Gogh", "", 3
TE_LAYERS = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.5.mlp.fc1")


def harness():
    """tests/comfyui's helpers (server start, random checkpoint, UI→API conversion, bitwise compare)."""
    if str(HARNESS_DIR) not in sys.path:
        sys.path.insert(0, str(HARNESS_DIR))
    return importlib.import_module("comfy_harness")


def import_pack():
    """The repository imported as the custom-node package ComfyUI would load (``concept_erasers``)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def rss_mb(pid: Optional[int] = None) -> float:
    """Resident set size in MB of ``pid`` (this process by default), from /proc; ru_maxrss as a fallback."""
    try:
        with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid is None else float("nan")


def checkpoint(comfy, cache_dir: Optional[str]) -> Path:
    """The random SD1.5 checkpoint of the real-ComfyUI tests (same cache key as tests/comfyui/conftest.py)."""
    h = harness()
    config = h.unet_config_from_env()
    folder = Path(cache_dir or tempfile.mkdtemp(prefix="ce_soak_ckpt_"))
    key = hashlib.sha1(json.dumps([config, comfy.version], sort_keys=True).encode()).hexdigest()[:12]
    path = folder / f"ce_test_sd15_{key}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # a per-process partial name: two processes writing the cache at once never share a file
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        print(f"writing the random SD1.5 checkpoint to {path} (about 630 MB) ...", flush=True)
        h.write_random_sd15_checkpoint(comfy, tmp, unet_config=config)
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# (a) apply/remove cycles through the real ModelPatcher
# --------------------------------------------------------------------------------------------------


def write_lora(model, clip, path: Path, seed: int = 4) -> None:
    """A kohya LoRA: rank 2 on two CLIP layers (``lora_te_*``) and rank 1 on every attn2 to_k/to_v."""
    from safetensors.torch import save_file

    kohya_name = importlib.import_module(f"{PACK}.erasers.files.keys").kohya_name
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    te = clip.cond_stage_model.state_dict()
    for module in TE_LAYERS:
        w = te[f"clip_l.transformer.{module}.weight"]
        stem = "lora_te_" + module.replace(".", "_")
        tensors[stem + ".lora_up.weight"] = 0.2 * torch.randn(w.shape[0], 2, generator=g)
        tensors[stem + ".lora_down.weight"] = 0.2 * torch.randn(2, w.shape[1], generator=g)
        tensors[stem + ".alpha"] = torch.tensor(1.0)
    for key, w in model.model.diffusion_model.state_dict().items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            tensors[kohya_name(key) + ".lora_up.weight"] = 0.1 * torch.randn(w.shape[0], 1, generator=g)
            tensors[kohya_name(key) + ".lora_down.weight"] = 0.1 * torch.randn(1, w.shape[1], generator=g)
    save_file(tensors, str(path))


def patched_keys(patcher) -> list:
    return sorted({k[0] if isinstance(k, tuple) else k for k in patcher.patches})


def build_variants(comfy, model, clip, folder: Path) -> dict:
    """name → patcher (a UNet ModelPatcher or a CLIP's patcher), each made by one of the pack's nodes."""
    import_pack()
    closed_form = importlib.import_module(f"{PACK}.nodes.closed_form")
    lora = importlib.import_module(f"{PACK}.nodes.lora")
    write_lora(model, clip, folder / "soak_lora.safetensors")
    comfy.folder_paths.add_model_folder_path("loras", str(folder))
    variants = {}
    for strength in (0.5, 1.0, 2.0):
        out = closed_form.EraserClosedForm.execute(model, clip, "uce", "Van Gogh", "", "", strength)
        variants[f"closed-form uce x{strength}"] = out.args[0]
    for strength in (0.8, -1.0):
        m, c = lora.EraserLoRALoad.execute(model, "soak_lora.safetensors", strength, "always", clip=clip).result
        variants[f"lora unet x{strength}"] = m
        variants[f"lora clip x{strength}"] = c.patcher
    stacked = lora.EraserLoRALoad.execute(
        variants["closed-form uce x1.0"], "soak_lora.safetensors", 0.5, "always", clip=clip
    ).result[0]
    variants["closed-form x1.0 + lora x0.5"] = stacked
    for name, patcher in variants.items():
        if not patcher.patches:
            raise RuntimeError(f"the pack's node gave no weight patches for the soak variant '{name}'")
    return variants


class BaseWeights:
    """Bitwise snapshot of the base UNet and CLIP; cheap per-key checks and a full comparison."""

    def __init__(self, model, clip):
        h = harness()
        self.h = h
        self.modules = {"unet": model.model, "clip": clip.cond_stage_model}
        self.snap = {name: h.snapshot(m.state_dict()) for name, m in self.modules.items()}

    def owner(self, patcher) -> str:
        return "clip" if patcher.model is self.modules["clip"] else "unet"

    def differing(self, patcher, keys) -> list:
        """Of ``keys`` (the patcher's state-dict names), those whose current bits differ from the base."""
        name = self.owner(patcher)
        sd = self.modules[name].state_dict()
        return self.h.changed_keys({k: self.snap[name][k] for k in keys}, {k: sd[k] for k in keys})

    def full_changes(self) -> list:
        changed = []
        for name, module in self.modules.items():
            changed += [f"{name}:{k}" for k in self.h.changed_keys(self.snap[name], module.state_dict())]
        return changed


def patcher_soak(comfy, ckpt: Path, cycles: int, full_every: int, seed: int) -> dict:
    model, clip, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), output_vae=True, output_clip=True, embedding_directory=None
    )[:3]
    return patcher_cycles(comfy, model, clip, cycles, full_every, seed)


def patcher_cycles(comfy, model, clip, cycles: int, full_every: int, seed: int) -> dict:
    """Part (a) on an already loaded (UNet ModelPatcher, CLIP); returns the figures and the failures."""
    mm = comfy.model_management
    cpu = torch.device("cpu")
    mm.unload_all_models()
    folder = Path(tempfile.mkdtemp(prefix="ce_soak_loras_"))
    t0 = time.monotonic()
    variants = build_variants(comfy, model, clip, folder)
    build_s = time.monotonic() - t0
    mm.unload_all_models()
    base = BaseWeights(model, clip)
    keys = {name: patched_keys(p) for name, p in variants.items()}
    names = sorted(variants)
    rng = random.Random(seed)
    routes = ("direct", "managed", "switch", "dropped")
    stats = {r: {"cycles": 0, "patched_ok": 0, "restored_ok": 0, "seconds": 0.0} for r in routes}
    failures, full_checks, full_failures = [], 0, 0
    gc.collect()
    rss0 = rss_mb()
    t_start = time.monotonic()
    for i in range(cycles):
        route, name = rng.choice(routes), rng.choice(names)
        t = time.monotonic()
        clone = variants[name].clone()
        if route == "direct":
            clone.patch_model(device_to=cpu)
        else:
            mm.load_models_gpu([clone])
        first_only = []
        if route == "switch":  # a second variant of the same base replaces the first, lazily unpatched
            same_base = [n for n in names if variants[n].model is variants[name].model and n != name]
            first, name = name, rng.choice(same_base)
            first_only = sorted(set(keys[first]) - set(keys[name]))
            clone = variants[name].clone()
            mm.load_models_gpu([clone])
        moved = base.differing(clone, keys[name])
        # every key the variant patches differs from the base; the first variant's other keys are back
        patched_ok = moved == keys[name] and not base.differing(clone, first_only)
        if route == "direct":
            clone.unpatch_model(device_to=cpu)
        elif route == "dropped":
            owner = clone.model
            del clone
            gc.collect()
            mm.unload_all_models()
            clone = variants[next(n for n in names if variants[n].model is owner)]
        else:
            mm.unload_all_models()
        left = base.differing(clone, keys[name])
        s = stats[route]
        s["cycles"] += 1
        s["patched_ok"] += patched_ok
        s["restored_ok"] += not left
        s["seconds"] += time.monotonic() - t
        if not patched_ok or left:
            failures.append((i, route, name, "not patched" if not patched_ok else f"left patched: {left[:3]}"))
        del clone
        if (i + 1) % full_every == 0 or i + 1 == cycles:
            full_checks += 1
            changed = base.full_changes()
            if changed:
                full_failures += 1
                failures.append((i, route, name, f"full state dict differs: {changed[:3]}"))
    total_s = time.monotonic() - t_start
    mm.unload_all_models()
    gc.collect()
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "version": comfy.version,
        "variants": {n: len(k) for n, k in keys.items()},
        "build_s": build_s,
        "stats": stats,
        "cycles": cycles,
        "total_s": total_s,
        "full_checks": full_checks,
        "full_failures": full_failures,
        "failures": failures,
        "rss_growth_mb": rss_mb() - rss0,
        "ok": not failures,
    }


def print_patcher(result: dict) -> None:
    print(f"\n## (a) ModelPatcher soak — ComfyUI {result['version']}, {result['cycles']} cycles\n")
    print(f"variants (patched keys each), built by the pack's nodes in {result['build_s']:.1f} s:")
    for name, n in result["variants"].items():
        print(f"  - {name}: {n} keys")
    print("\n| route | cycles | patched while loaded | restored bit for bit | ms / cycle |")
    print("|---|---:|---:|---:|---:|")
    for route, s in result["stats"].items():
        per = 1000 * s["seconds"] / s["cycles"] if s["cycles"] else float("nan")
        print(f"| {route} | {s['cycles']} | {s['patched_ok']} | {s['restored_ok']} | {per:.1f} |")
    total = {k: sum(s[k] for s in result["stats"].values()) for k in ("cycles", "patched_ok", "restored_ok")}
    print(
        f"| **all** | {total['cycles']} | {total['patched_ok']} | {total['restored_ok']} | "
        f"{1000 * result['total_s'] / max(1, result['cycles']):.1f} |"
    )
    print(
        f"\nfull UNet + CLIP state-dict comparisons (bits): {result['full_checks'] - result['full_failures']}"
        f"/{result['full_checks']} identical; RSS growth of this process {result['rss_growth_mb']:+.1f} MB "
        f"over the cycles; total {result['total_s']:.1f} s"
    )
    for f in result["failures"][:10]:
        print(f"  FAIL cycle {f[0]} ({f[1]}, {f[2]}): {f[3]}")


# --------------------------------------------------------------------------------------------------
# (b) a --cpu server running queued workflows that toggle random erasers
# --------------------------------------------------------------------------------------------------

#: eraser nodes that act at sampling time (attention / guidance); at most one per soak workflow
SAMPLING_ERASERS = {"EraserSAFREE", "EraserSLD", "EraserConceptGuidance", "EraserTokenSuppress"}
#: eraser nodes that add weight patches (or a gate) and compose freely
WEIGHT_ERASERS = {"EraserClosedForm", "EraserLoRALoad", "EraserSPMLoad", "EraserLoad"}
#: examples the soak draws eraser settings from (not: savers, DiT graphs needing Flux weights)
SKIP_EXAMPLES = {"erase_then_save.json", "load_then_apply.json"}


def eraser_settings(server, examples: list) -> list:
    """(example name, class_type, widget inputs) of every eraser node in the SD1.5 example workflows."""
    h = harness()
    ui_to_api = importlib.import_module("ui_to_api")
    object_info = server.object_info()
    found = []
    for path in examples:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        if path.name in SKIP_EXAMPLES or any(n["type"] == "UNETLoader" for n in workflow["nodes"]):
            continue
        for node in workflow["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                node["widgets_values"][0] = h.CHECKPOINT_NAME
        prompt = ui_to_api.to_api(workflow, object_info)
        # the example's own prompt texts (SAFREE takes the prompt as a widget): the soak graph's instead
        texts = {}
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                for slot, text in (("positive", PROMPT), ("negative", NEGATIVE)):
                    source = prompt.get(str(node["inputs"][slot][0]), {})
                    if source.get("class_type") == "CLIPTextEncode":
                        texts[source["inputs"]["text"]] = text
        for node in prompt.values():
            if node["class_type"] in SAMPLING_ERASERS | WEIGHT_ERASERS:
                widgets = {
                    k: texts.get(v, v) if isinstance(v, str) else v
                    for k, v in node["inputs"].items()
                    if not isinstance(v, list)
                }
                found.append((path.stem, node["class_type"], widgets))
    return found


def io_slots(object_info: dict, class_type: str) -> tuple:
    """(input names of type MODEL / CLIP, output index of MODEL, output index of CLIP or None)."""
    info = object_info[class_type]
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    model_in = [n for n, spec in inputs.items() if spec[0] == "MODEL"]
    clip_in = [n for n, spec in inputs.items() if spec[0] == "CLIP"]
    outputs = list(info["output"])
    return model_in, clip_in, outputs.index("MODEL"), (outputs.index("CLIP") if "CLIP" in outputs else None)


def soak_prompt(erasers: list, object_info: dict, prefix: str) -> dict:
    """The baseline txt2img graph with ``erasers`` ((class_type, inputs) in order) on the MODEL/CLIP path."""
    h = harness()
    prompt = h.txt2img_prompt(PROMPT, NEGATIVE, seed=SEED, steps=2, size=64, prefix=prefix)
    model_src, clip_src = ["1", 0], ["1", 1]
    for i, (class_type, widgets) in enumerate(erasers):
        nid = str(20 + i)
        model_in, clip_in, model_out, clip_out = io_slots(object_info, class_type)
        inputs = dict(widgets)
        inputs.update({n: model_src for n in model_in})
        inputs.update({n: clip_src for n in clip_in})
        prompt[nid] = {"class_type": class_type, "inputs": inputs}
        model_src = [nid, model_out]
        if clip_out is not None:
            clip_src = [nid, clip_out]
    prompt["5"]["inputs"]["model"] = model_src
    prompt["2"]["inputs"]["clip"] = prompt["3"]["inputs"]["clip"] = clip_src
    return prompt


def strength_range(object_info: dict, class_type: str) -> tuple:
    inputs = object_info[class_type]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}.get("strength")
    opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return opts.get("min", float("-inf")), opts.get("max", float("inf"))


def draw_erasers(rng: random.Random, settings: list, object_info: dict, allow_baseline: bool) -> list:
    """A random toggle of the erasers: none (the baseline) about a third of the time when allowed;
    strengths drawn from 0.5 / 1 / 1.5 within each node's own range."""
    if allow_baseline and rng.random() < 1 / 3:
        return []
    while True:
        by_class = {}
        for example, class_type, widgets in settings:
            by_class.setdefault(class_type, []).append(widgets)
        chosen = []
        weight = sorted(c for c in by_class if c in WEIGHT_ERASERS)
        for class_type in weight:
            if rng.random() < 0.4:
                chosen.append((class_type, dict(rng.choice(by_class[class_type]))))
        sampling = sorted(c for c in by_class if c in SAMPLING_ERASERS)
        if sampling and rng.random() < 0.7:
            class_type = rng.choice(sampling)
            chosen.append((class_type, dict(rng.choice(by_class[class_type]))))
        for class_type, widgets in chosen:
            if isinstance(widgets.get("strength"), (int, float)) and not isinstance(widgets["strength"], bool):
                low, high = strength_range(object_info, class_type)
                allowed = [v for v in (0.5, 1.0, 1.5) if low <= v <= high]
                widgets["strength"] = rng.choice(allowed) if allowed else widgets["strength"]
        if chosen:
            return chosen


def image_digest(server, entry: dict, save_node: str = "7") -> Optional[str]:
    """sha256 of the decoded pixels of the image the SaveImage node wrote (PNG metadata holds the graph)."""
    import numpy as np
    from PIL import Image

    images = entry.get("outputs", {}).get(save_node, {}).get("images", [])
    if not images:
        return None
    img = images[0]
    path = server.base_dir / "output" / img.get("subfolder", "") / img["filename"]
    with Image.open(path) as im:
        return hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest()


def sampled(entry: dict, node: str = "5") -> bool:
    """Whether the KSampler really ran in this prompt (not served from ComfyUI's output cache)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached" and node in data.get("nodes", []):
            return False
    return True


def start_server(comfy, ckpt: Path, base: Path):
    h = harness()
    server = h.ComfyServer(comfy.path, base, checkpoint=ckpt)
    server.start(timeout=240)
    if server.pack_import_error():
        server.stop()
        raise RuntimeError(f"ComfyUI could not import the pack: {server.pack_import_error()}")
    return server


def prepare_files(comfy, server, object_info_examples: list) -> None:
    """SPM / LoRA files the examples name (random, rank 1) and the eraser file load_then_sample reads."""
    h = harness()
    sys.path.insert(0, str(HARNESS_DIR))
    write_adapter_files = importlib.import_module("test_example_workflows_run").write_adapter_files
    workflows = [json.loads(p.read_text(encoding="utf-8")) for p in object_info_examples]
    write_adapter_files(comfy, h.unet_config_from_env(), server.base_dir / "models", workflows)
    ui_to_api = importlib.import_module("ui_to_api")
    saver = json.loads((REPO_ROOT / "example_workflows" / "erase_then_save.json").read_text(encoding="utf-8"))
    for node in saver["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = h.CHECKPOINT_NAME
    entry = server.run_prompt(ui_to_api.to_api(saver, server.object_info()), timeout=600)
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"erase_then_save failed: {entry['status']}")


def fresh_baseline(comfy, ckpt: Path, root: Path, timeout: float) -> tuple:
    """(pixel digest, seconds) of the baseline rendered by a server that has run nothing else."""
    server = start_server(comfy, ckpt, root / "fresh")
    try:
        t0 = time.monotonic()
        entry = server.run_prompt(harness().txt2img_prompt(PROMPT, NEGATIVE, seed=SEED, prefix="fresh"), timeout)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"the fresh server's baseline failed: {entry['status']}\n{server.log_tail()}")
        return image_digest(server, entry), time.monotonic() - t0
    finally:
        server.stop()


def server_soak(comfy, ckpt: Path, workflows: int, seed: int, timeout: float, fresh: bool, keep: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ce_soak_server_"))
    reference, ref_s = fresh_baseline(comfy, ckpt, root, timeout) if fresh else (None, 0.0)
    examples = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
    server = start_server(comfy, ckpt, root / "soak")
    rows, rss = [], []
    try:
        prepare_files(comfy, server, examples)
        object_info = server.object_info()
        settings = eraser_settings(server, examples)
        rng = random.Random(seed)
        previous_baseline = False
        for i in range(workflows):
            if i == 0:
                erasers = []  # the soak server's own first image is a baseline too
            else:
                erasers = draw_erasers(rng, settings, object_info, allow_baseline=not previous_baseline)
            prompt = soak_prompt(erasers, object_info, prefix=f"soak{i:03d}")
            t0 = time.monotonic()
            try:
                entry = server.run_prompt(prompt, timeout=timeout)
                status = entry["status"]["status_str"]
            except (RuntimeError, TimeoutError) as e:
                entry, status = {}, f"error: {str(e).splitlines()[0][:120]}"
            seconds = time.monotonic() - t0
            digest = image_digest(server, entry) if status == "success" else None
            if i == 0 and reference is None:
                reference = digest
            rss.append(rss_mb(server.proc.pid))
            rows.append(
                {
                    "i": i,
                    "erasers": [c.replace("Eraser", "") for c, _ in erasers] or ["(baseline)"],
                    "status": status,
                    "seconds": seconds,
                    "baseline": not erasers,
                    "sampled": sampled(entry) if entry else False,
                    "digest": digest,
                    "rss_mb": rss[-1],
                    "error": _first_error(entry),
                }
            )
            previous_baseline = not erasers
            r = rows[-1]
            mark = ("same" if digest == reference else "DIFFERENT") if r["baseline"] else ""
            print(
                f"  [{i + 1:3d}/{workflows}] {'+'.join(r['erasers']):<45} {status:<8} {seconds:5.1f} s "
                f"RSS {rss[-1]:7.0f} MB {mark}",
                flush=True,
            )
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"server folders kept in {root}")
    baselines = [r for r in rows if r["baseline"] and r["status"] == "success"]
    return {
        "version": comfy.version,
        "rows": rows,
        "reference": reference,
        "reference_from": "a fresh server" if fresh else "the soak server's first prompt",
        "reference_s": ref_s,
        "baselines": len(baselines),
        "baselines_sampled": sum(r["sampled"] for r in baselines),
        "baselines_identical": sum(r["digest"] == reference for r in baselines),
        "rss": rss,
        "ok": bool(baselines) and all(r["digest"] == reference for r in baselines),
    }


def _first_error(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {str(data.get('exception_message', '')).strip()[:160]}"
    return ""


def print_server(result: dict) -> None:
    rows, rss = result["rows"], result["rss"]
    print(f"\n## (b) server soak — ComfyUI {result['version']}, {len(rows)} queued workflows (--cpu)\n")
    by_set = {}
    for r in rows:
        key = " + ".join(r["erasers"])
        d = by_set.setdefault(key, {"n": 0, "ok": 0, "s": 0.0, "errors": set()})
        d["n"] += 1
        d["ok"] += r["status"] == "success"
        d["s"] += r["seconds"]
        if r["error"]:
            d["errors"].add(r["error"])
    print("| erasers switched on | runs | succeeded | mean s |")
    print("|---|---:|---:|---:|")
    for key, d in sorted(by_set.items(), key=lambda kv: (-kv[1]["n"], kv[0])):
        print(f"| {key} | {d['n']} | {d['ok']} | {d['s'] / d['n']:.1f} |")
    errors = sorted({e for d in by_set.values() for e in d["errors"]})
    for e in errors[:8]:
        print(f"  error seen: {e}")
    print("\n| check | value |")
    print("|---|---|")
    print(f"| baseline reference | {result['reference_from']} ({(result['reference'] or 'none')[:16]}…) |")
    print(
        f"| baselines bit-identical to it | {result['baselines_identical']} / {result['baselines']} "
        f"({result['baselines_sampled']} re-sampled, not cached) |"
    )
    ok = [r for r in rows if r["status"] == "success"]
    print(f"| workflows succeeded | {len(ok)} / {len(rows)} |")
    if rss:
        half = rss[len(rss) // 2]
        print(
            f"| server RSS after first / last workflow | {rss[0]:.0f} MB / {rss[-1]:.0f} MB "
            f"(growth {rss[-1] - rss[0]:+.0f} MB; second half {rss[-1] - half:+.0f} MB; max {max(rss):.0f} MB) |"
        )
    print(f"| wall time of the queued workflows | {sum(r['seconds'] for r in rows):.0f} s |")


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m erasers_dev.bench.soak_comfy", description=__doc__.split("\n\n")[0].split(": ", 1)[-1]
    )
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout (imported in-process with --cpu)")
    parser.add_argument("--only", choices=("patcher", "server"), help="run one part only (default both)")
    parser.add_argument("--cycles", type=int, default=1000, help="apply/remove cycles in part (a) (default 1000)")
    parser.add_argument("--full-check-every", type=int, default=100, help="full state-dict check interval")
    parser.add_argument("--workflows", type=int, default=50, help="queued workflows in part (b) (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random eraser/route choices")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("CE_TEST_CACHE_DIR") or None,
        help="folder for the random SD1.5 checkpoint (default $CE_TEST_CACHE_DIR or a temp dir)",
    )
    parser.add_argument("--prompt-timeout", type=float, default=600.0, help="seconds allowed per queued prompt")
    parser.add_argument(
        "--no-fresh-server",
        action="store_true",
        help="compare baselines with the soak server's first image instead of a fresh server's",
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' base folders (logs, images)")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.workflows < 1 or args.full_check_every < 1:
        parser.error("--cycles, --workflows and --full-check-every must be at least 1")
    comfy = harness().import_comfy(args.comfyui)
    ckpt = checkpoint(comfy, args.cache_dir)
    print(
        f"ComfyUI {comfy.version} at {comfy.path}; checkpoint {ckpt}; torch {torch.__version__}; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    ok = True
    if args.only in (None, "patcher"):
        result = patcher_soak(comfy, ckpt, args.cycles, args.full_check_every, args.seed)
        print_patcher(result)
        ok &= result["ok"]
    if args.only in (None, "server"):
        result = server_soak(
            comfy, ckpt, args.workflows, args.seed, args.prompt_timeout, not args.no_fresh_server, args.keep
        )
        print_server(result)
        ok &= result["ok"]
    print("\nresult:", "all bit-identity checks passed" if ok else "FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
