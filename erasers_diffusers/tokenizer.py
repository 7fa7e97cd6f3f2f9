"""Find CLIP's BPE tokenizer on this machine, never downloading anything.

A single-file checkpoint carries text-encoder weights but no tokenizer. Every SD family's CLIP towers
share one BPE vocabulary (49408 entries), so any local copy will do. Places searched, in order:
  1. an explicit folder (``--tokenizer DIR``): ``vocab.json`` + ``merges.txt``, or a diffusers model
     folder whose ``tokenizer/`` has them;
  2. a diffusers model folder given for the model itself;
  3. ComfyUI (``COMFYUI_PATH``): it ships ``comfy/sd1_tokenizer/``;
  4. an installed package shipping CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (open_clip, clip); the
     vocabulary is rebuilt from it (see ``vocab_from_bpe``) into a cache folder;
  5. the Hugging Face cache, if a CLIP tokenizer was downloaded there earlier.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from typing import Iterable, Optional

from erasers.errors import MissingTokenizer

log = logging.getLogger(__name__)

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: packages known to ship CLIP's BPE merges file (package, path inside it)
BPE_PACKAGES = (("open_clip", BPE_NAME), ("clip", BPE_NAME))
#: CLIP keeps the first 49152 − 256 − 2 merges of the 16e6 file (line 0 is a header)
N_MERGES = 49152 - 256 - 2
HF_CLIP_REPOS = (
    "models--openai--clip-vit-large-patch14",
    "models--runwayml--stable-diffusion-v1-5",
    "models--stable-diffusion-v1-5--stable-diffusion-v1-5",
)


def has_vocab(directory: Optional[str]) -> bool:
    return bool(directory) and all(os.path.isfile(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt"))


def bytes_to_unicode() -> dict:
    """CLIP/GPT-2's reversible byte → printable-unicode table. Its *order* is the vocabulary's: first
    the printable bytes (mapped to themselves), then the other bytes in byte order, mapped to code
    points from 256 up."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def vocab_from_bpe(merge_lines: list) -> tuple:
    """(vocab dict, merges list) from the lines of CLIP's ``bpe_simple_vocab_16e6.txt``.

    The well-known construction: the 256 byte symbols, the same with the end-of-word mark ``</w>``, then
    each of the first ``N_MERGES`` merges joined, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    merges = [tuple(line.split()) for line in merge_lines[1 : N_MERGES + 1] if line.strip()]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab(out_dir: str, vocab: dict, merges: list) -> str:
    """Write ``vocab.json`` + ``merges.txt`` in the Hugging Face layout (atomically per file)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".tmp{os.getpid()}")
    with open(tmp + ".json", "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(tmp + ".txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    os.replace(tmp + ".txt", os.path.join(out_dir, "merges.txt"))
    os.replace(tmp + ".json", os.path.join(out_dir, "vocab.json"))
    return out_dir


def write_vocab_from_bpe(bpe_path: str, out_dir: str) -> str:
    """Write ``vocab.json`` + ``merges.txt`` derived from a BPE .txt.gz file (once; reused after)."""
    if has_vocab(out_dir):
        return out_dir
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    return write_vocab(out_dir, *vocab_from_bpe(lines))


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "concept-erasers", "clip_tokenizer")


def package_bpe_files(packages: Optional[Iterable] = None) -> list:
    found = []
    for package, name in BPE_PACKAGES if packages is None else packages:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                found.append(path)
    return found


def hf_cache_dirs() -> list:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    out = []
    for repo in HF_CLIP_REPOS:
        snapshots = os.path.join(hub, repo, "snapshots")
        if os.path.isdir(snapshots):
            for snap in sorted(os.listdir(snapshots)):
                out += [os.path.join(snapshots, snap), os.path.join(snapshots, snap, "tokenizer")]
    return out


def candidates(
    tokenizer_dir: Optional[str] = None, diffusers_dir: Optional[str] = None, comfyui_path: Optional[str] = None
) -> list:
    """(description, folder) pairs searched in order; folders need not exist."""
    out = []
    if tokenizer_dir:
        out += [("--tokenizer", tokenizer_dir), ("--tokenizer", os.path.join(tokenizer_dir, "tokenizer"))]
    if diffusers_dir:
        out.append(("diffusers folder", os.path.join(diffusers_dir, "tokenizer")))
    comfy = comfyui_path if comfyui_path is not None else os.environ.get("COMFYUI_PATH")
    if comfy:
        out.append(("COMFYUI_PATH", os.path.join(comfy, "comfy", "sd1_tokenizer")))
    return out


def find_tokenizer_dir(
    tokenizer_dir: Optional[str] = None,
    diffusers_dir: Optional[str] = None,
    comfyui_path: Optional[str] = None,
    search_packages: bool = True,
) -> str:
    """A folder with CLIP's ``vocab.json`` and ``merges.txt``, or ``MissingTokenizer`` saying what to do."""
    searched = []
    for what, folder in candidates(tokenizer_dir, diffusers_dir, comfyui_path):
        if has_vocab(folder):
            log.info("CLIP tokenizer from %s: %s", what, folder)
            return folder
        searched.append(f"{folder} ({what})")
    if tokenizer_dir:
        # an explicit folder that does not hold a tokenizer is a mistake, not a reason to look elsewhere
        raise MissingTokenizer(
            f"--tokenizer {tokenizer_dir}: expected vocab.json and merges.txt in it (or in its tokenizer/ "
            f"subfolder), found neither. Point it at a diffusers model's tokenizer/ folder or at ComfyUI's "
            f"comfy/sd1_tokenizer/."
        )
    if search_packages:
        for bpe in package_bpe_files():
            log.info("CLIP tokenizer rebuilt from %s", bpe)
            return write_vocab_from_bpe(bpe, cache_dir())
        searched.append(f"installed packages {' / '.join(p for p, _ in BPE_PACKAGES) or '(none)'} ({BPE_NAME})")
        for folder in hf_cache_dirs():
            if has_vocab(folder):
                return folder
        searched.append("the Hugging Face cache (openai/clip-vit-large-patch14)")
    raise MissingTokenizer(
        "A single-file checkpoint has no tokenizer, and no CLIP tokenizer (vocab.json + merges.txt) was "
        f"found on this machine. Searched: {'; '.join(searched) or 'nothing (no hints given)'}. Supply one "
        "with --tokenizer DIR (a diffusers model's tokenizer/ folder, or any folder with vocab.json and "
        "merges.txt), or set COMFYUI_PATH to a ComfyUI install, or pass a diffusers model folder."
    )


def load_clip_tokenizer(pad_token: Optional[str] = None, **where):
    """``transformers.CLIPTokenizer`` from ``find_tokenizer_dir(**where)``."""
    from .clip_text import clip_tokenizer

    return clip_tokenizer(find_tokenizer_dir(**where), pad_token=pad_token)
