"""What a ``.safetensors`` adapter file is, from its header alone (eraser, SPM membrane or other LoRA).

Only the JSON header is read (8-byte length + header), never the tensors, so describing a large LoRA
costs one small read; the SHA-256 streams the bytes once and is cached per (path, size, mtime).
The header alone also shows an inconsistent file (``problems``: lora_up / lora_down ranks that differ, a
factor without its partner, layers the metadata lists but the file lacks, metadata that is not JSON).
Whether the values are finite needs the tensors: ``check_values=True`` reads them (``values_checked``).
Pure Python: used by the ComfyUI route and usable by any host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading

from .safetensors_header import read_safetensors_header  # noqa: F401  (re-exported for hosts)

#: short hash = the first 10 hex digits of SHA-256 (A1111's "AutoV2" length, so both hosts agree)
SHORT_HASH = 10

_hash_cache: dict = {}
_hash_lock = threading.Lock()

# width of the text context read by attn2.to_k → family (erasers/files/families.py CONTEXT_DIM, UNets only)
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def sha256_short(path: str, length: int = SHORT_HASH) -> str:
    """SHA-256 of the file's bytes (first ``length`` hex digits), cached until the file changes."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key][:length]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    full = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = full
    return full[:length]


def _json_list(text, default=()):
    try:
        value = json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return list(default)
    return [str(v) for v in value] if isinstance(value, list) else list(default)


def guess_family(tensors: dict, metadata: dict):
    """Family from the attn2 ``to_k`` input width (768 / 1024 / 2048), else from kohya metadata."""
    for key, entry in tensors.items():
        shape = entry["shape"]
        low = key.lower()
        if (
            "attn2" in low
            and "to_k" in low
            and len(shape) == 2
            and ("down" in low or "lora_a" in low or low.endswith("to_k.weight"))
        ):
            family = _CONTEXT_FAMILY.get(int(shape[1]))
            if family:
                return family
    base = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    for marker, family in (
        ("sdxl", "sdxl"),
        ("xl", "sdxl"),
        ("v2", "sd2"),
        ("sd_v1", "sd1"),
        ("v1", "sd1"),
        ("flux", "flux"),
        ("sd3", "sd3"),
    ):
        if marker in base:
            return family
    return None


#: (suffix, role) of the low-rank factor spellings: kohya lora_up/lora_down, PEFT lora_B/lora_A
_FACTORS = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
)
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _json_object(metadata: dict, key: str, problems: list):
    """``json.loads(metadata[key])`` or None; text that is not JSON becomes a problem, not a crash."""
    text = metadata.get(key)
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        problems.append(f"metadata {key} is not valid JSON ({str(text)[:40]!r}…): the header is damaged")
        return None


def header_problems(tensors: dict, metadata: dict) -> list:
    """What makes a file inconsistent, read from its header only (empty list: none found)."""
    problems = []
    factors = {}
    for key, entry in tensors.items():
        for suffix, role in _FACTORS:
            if key.endswith(suffix):
                factors.setdefault(key[: -len(suffix)], {})[role] = (key, entry)
                break
        dtype = entry.get("dtype")
        if dtype and dtype not in _FLOAT_DTYPES and not key.endswith(("alpha", "position_ids")):
            problems.append(f"{key} is stored as {dtype}, not a float type")
    for stem, parts in sorted(factors.items()):
        if set(parts) != {"up", "down"}:
            have = next(iter(parts.values()))[0]
            problems.append(f"layer {stem}: {have} has no {'lora_down' if 'up' in parts else 'lora_up'} partner")
            continue
        up, down = parts["up"][1], parts["down"][1]
        if len(up["shape"]) < 2 or len(down["shape"]) < 2:
            problems.append(f"layer {stem}: factors of shapes {up['shape']} and {down['shape']} are not matrices")
        elif up["shape"][1] != down["shape"][0]:
            problems.append(
                f"layer {stem}: lora_up {up['shape']} has rank {up['shape'][1]} but lora_down {down['shape']} has "
                f"rank {down['shape'][0]}; they must match"
            )
        alpha = tensors.get(f"{stem}.alpha")
        if alpha is not None and alpha["shape"] not in ([], [1]):
            problems.append(f"layer {stem}: alpha has shape {alpha['shape']}, expected a single number")
    if metadata.get("eraser.format_version") is not None:
        layers = _json_object(metadata, "eraser.layers", problems)
        if layers is not None and not isinstance(layers, dict):
            problems.append("metadata eraser.layers is not a JSON object: the header is damaged")
        elif layers:
            stems = set(factors) | {k[: -len(".diff")] for k in tensors if k.endswith(".diff")}
            missing = sorted(set(layers) - stems)
            extra = sorted(s for s in stems - set(layers))
            if missing:
                problems.append(f"metadata lists {len(missing)} layer(s) the file does not hold, e.g. {missing[0]}")
            if extra:
                problems.append(f"the file holds {len(extra)} layer(s) its metadata does not list, e.g. {extra[0]}")
        for key in ("eraser.concepts", "eraser.config"):
            _json_object(metadata, key, problems)
    return problems


def non_finite_tensors(path: str) -> list:
    """Names of the floating-point tensors holding NaN or Inf (reads every tensor, one at a time)."""
    import torch
    from safetensors import safe_open

    bad = []
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad.append(key)
    return sorted(bad)


#: the module a low-rank layer adapts, read off the end of its stem (kohya ``_`` or diffusers ``.`` spelling)
_MODULE = re.compile(
    r"(attn[12][._]to_(q|k|v|out[._]0)|proj_in|proj_out|"
    r"ff[._]net[._]0[._]proj|ff[._]net[._]2|self_attn[._](q|k|v|out)_proj|mlp[._]fc[12]|"
    r"(img|txt)_attn[._](qkv|proj)|attn[._]to_(q|k|v|out[._]0)|attn[._]add_(q|k|v)_proj|attn[._]to_add_out|"
    r"proj_mlp|ff[._]net[._]\d[._]proj|norm1?[._]linear|to_(k|v))$"
)
#: which text encoder a text-encoder stem belongs to, by its prefix
_TEXT_ENCODERS = (
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("cond_stage_model.", "cond_stage_model"),
    ("conditioner.", "conditioner"),
)
_WEIGHT_FORMATS = ("uce_weights", "esd")


#: module names whose own underscores stay (everything else in a kohya stem is a path separator)
_JOINED = (
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "self_attn",
    "proj_in",
    "proj_out",
    "proj_mlp",
    "img_attn",
    "txt_attn",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
)


def module_name(stem: str) -> str:
    """``…_transformer_blocks_0_attn2_to_k`` / ``….attn2.to_k`` → ``attn2.to_k`` (``other`` when unknown)."""
    match = _MODULE.search(stem)
    if not match:
        return "other"
    name = match.group(0).replace("_", ".")
    for joined in _JOINED:
        name = name.replace(joined.replace("_", "."), joined)
    return name


def text_encoder_of(stem: str):
    return next((name for prefix, name in _TEXT_ENCODERS if stem.startswith(prefix)), None)


def adapter_layout(tensors: dict, metadata: dict) -> dict:
    """Format, layers, modules, ranks and text-encoder keys of an adapter that is not one of the pack's own
    eraser files: the loaders' own recognisers (``erasers/membranes/formats``) run on shape stand-ins of the
    header entries, so ``info`` names exactly the format a loader would read the file as."""
    from types import SimpleNamespace

    from ..errors import UnknownFormat
    from ..membranes.formats import FORMATS, detect_format
    from ..membranes.formats._common import group_factors, strip_weight_prefix

    stand_ins = {k: SimpleNamespace(shape=tuple(e["shape"])) for k, e in tensors.items()}
    try:
        fmt = detect_format(stand_ins, metadata)
    except UnknownFormat:
        fmt = None
    groups, rest = group_factors(stand_ins)
    if fmt is not None and fmt.NAME in _WEIGHT_FORMATS:  # whole replacement weights: one layer per weight
        stems = [k[: -len(".weight")] for k in rest if k.endswith(".weight")]
    else:
        stems = list(groups) + [k[: -len(".diff")] for k in rest if k.endswith(".diff")]
    text = [s for s in stems if text_encoder_of(s)]
    unet = [s for s in stems if not text_encoder_of(s)]
    ranks = sorted({int(p["down"].shape[0]) for p in groups.values() if "down" in p and p["down"].shape})
    modules: dict = {}
    for stem in unet:
        name = module_name(strip_weight_prefix(stem))
        modules[name] = modules.get(name, 0) + 1
    out = {
        "format": fmt.NAME if fmt is not None else None,
        "format_title": fmt.TITLE if fmt is not None else None,
        "layers": len(stems),
        "unet_layers": len(unet),
        "text_encoder_layers": len(text),
        "text_encoders": sorted({text_encoder_of(s) for s in text}),
        "modules": dict(sorted(modules.items())),
        "ranks": ranks,
    }
    if fmt is None:
        out["note"] = (
            "no loader of the pack recognises this layout; tried: " + "; ".join(f.TITLE for f in FORMATS) + "."
        )
    return out


def describe_header(path, with_hash: bool = True, check_values: bool = False) -> dict:
    """Method, concepts, family, size and short hash of an eraser / SPM / LoRA file, from its header.

    ``problems`` lists what makes it inconsistent (header only). ``check_values=True`` also reads the
    tensors and adds a problem per non-finite tensor (``values_checked`` says whether it did)."""
    path = os.fspath(path)
    tensors, metadata = read_safetensors_header(path)
    problems = header_problems(tensors, metadata)
    ranks = [
        e["shape"][0]
        for k, e in tensors.items()
        if (k.endswith("lora_down.weight") or k.endswith("lora_A.weight")) and e["shape"]
    ]
    info = {
        "file": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "tensors": len(tensors),
        "rank": max(ranks) if ranks else None,
        "family": guess_family(tensors, metadata),
        "method": None,
        "concepts": [],
        "problems": problems,
        "values_checked": False,
    }
    if metadata.get("eraser.format_version") is not None:
        layers = _json_object(metadata, "eraser.layers", [])
        info.update(
            kind="eraser",
            method=metadata.get("eraser.method"),
            concepts=_json_list(metadata.get("eraser.concepts")),
            anchors=_json_list(metadata.get("eraser.anchors")),
            preserve=_json_list(metadata.get("eraser.preserve")),
            family=metadata.get("eraser.family") or info["family"],
            layers=len(layers) if isinstance(layers, dict) else None,
            pack_version=metadata.get("eraser.pack_version"),
            base_fingerprint=metadata.get("eraser.base_fingerprint"),
        )
    else:
        layout = adapter_layout(tensors, metadata)
        if layout["ranks"]:
            info["rank"] = max(layout["ranks"])
        if layout["format"] == "eraseanything" and info["family"] is None:
            info["family"] = "flux"  # its stems are Flux transformer blocks (the loader's recogniser)
        info.update(layout)
        if metadata.get("prompts") or layout["format"] == "spm":
            # SPM membranes (Con6924/SPM): comma-joined targets in `prompts` (spm.md §3.1)
            prompts = metadata.get("prompts") or ""
            info.update(kind="spm", method="spm", concepts=[p.strip() for p in prompts.split(",") if p.strip()])
        else:
            # other erasure LoRAs usually carry no concept metadata; show the trainer's name if any
            info.update(kind="lora", title=metadata.get("modelspec.title") or metadata.get("ss_output_name"))
    if check_values:
        try:
            bad = non_finite_tensors(path)
        except Exception as exc:  # the header parsed but the data does not (truncated): a problem, not a crash
            problems.append(f"the tensor data could not be read ({str(exc)[:80]}): the file is truncated or damaged")
        else:
            info["values_checked"] = True
            if bad:
                problems.append(f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}")
    if with_hash:
        info["sha256"] = sha256_short(path)
    return info
