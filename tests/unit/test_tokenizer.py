"""Finding CLIP's BPE tokenizer offline, and rebuilding it from the .txt.gz merges file."""

import gzip
import json
import os

import pytest

from erasers.errors import MissingTokenizer
from erasers_diffusers import tokenizer as tk

MERGES = ["r e", "re d</w>", "s q", "sq u", "a r", "ar e</w>", "squ are</w>"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tk, "BPE_PACKAGES", ())


def write_bpe_gz(path, merges, extra=0):
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + list(merges) + [f"x{i} y{i}" for i in range(extra)]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def test_byte_table_is_a_bijection_in_vocabulary_order():
    table = tk.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    symbols = list(table.values())
    assert symbols[0] == "!" and symbols[93] == "~"  # printable ASCII first, in order
    assert table[ord(" ")] == chr(256 + 32)  # space is the 33rd non-printable byte → U+0120 'Ġ'


def test_vocab_construction_layout():
    vocab, merges = tk.vocab_from_bpe(["header"] + MERGES)
    assert len(vocab) == 512 + len(MERGES) + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["re"] == 512 and vocab["square</w>"] == 512 + len(MERGES) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert merges[0] == ("r", "e")


def test_only_the_first_clip_merges_are_kept():
    lines = ["header"] + [f"a{i} b{i}" for i in range(tk.N_MERGES + 10)]
    vocab, merges = tk.vocab_from_bpe(lines)
    assert len(merges) == tk.N_MERGES == 48894 and len(vocab) == 49408


def test_rebuilt_tokenizer_from_an_installed_package(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    package = tmp_path / "site" / "fakeclip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_bpe_gz(package / tk.BPE_NAME, MERGES)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(tk, "BPE_PACKAGES", (("fakeclip", tk.BPE_NAME),))
    folder = tk.find_tokenizer_dir()
    assert folder == tk.cache_dir() and tk.has_vocab(folder)
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as handle:
        assert json.load(handle) == tk.vocab_from_bpe(["h"] + MERGES)[0]
    tok = tk.load_clip_tokenizer()
    ids = tok(["red square"])["input_ids"][0]
    vocab = tk.vocab_from_bpe(["h"] + MERGES)[0]
    assert ids == [vocab["<|startoftext|>"], vocab["red</w>"], vocab["square</w>"], vocab["<|endoftext|>"]]


def test_search_order_explicit_then_diffusers_then_comfyui(tmp_path, monkeypatch):
    vocab, merges = tk.vocab_from_bpe(["h"] + MERGES)
    explicit = tk.write_vocab(str(tmp_path / "mine"), vocab, merges)
    diffusers_model = tmp_path / "sd15"
    tk.write_vocab(str(diffusers_model / "tokenizer"), vocab, merges)
    comfy = tmp_path / "ComfyUI"
    tk.write_vocab(str(comfy / "comfy" / "sd1_tokenizer"), vocab, merges)
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert tk.find_tokenizer_dir(tokenizer_dir=explicit, diffusers_dir=str(diffusers_model)) == explicit
    # a diffusers model folder given as --tokenizer works through its tokenizer/ subfolder
    assert tk.find_tokenizer_dir(tokenizer_dir=str(diffusers_model)) == str(diffusers_model / "tokenizer")
    assert tk.find_tokenizer_dir(diffusers_dir=str(diffusers_model)) == str(diffusers_model / "tokenizer")
    assert tk.find_tokenizer_dir() == str(comfy / "comfy" / "sd1_tokenizer")


def test_missing_tokenizer_says_what_and_how(tmp_path):
    with pytest.raises(MissingTokenizer) as info:
        tk.find_tokenizer_dir(comfyui_path=str(tmp_path / "no_comfy"))
    message = str(info.value)
    for fragment in (
        "vocab.json",
        "merges.txt",
        "--tokenizer DIR",
        "COMFYUI_PATH",
        "diffusers",
        str(tmp_path / "no_comfy"),
    ):
        assert fragment in message
    with pytest.raises(MissingTokenizer, match="--tokenizer"):
        tk.find_tokenizer_dir(tokenizer_dir=str(tmp_path))  # an explicit folder without files is an error


def test_hugging_face_cache_snapshot_is_found(tmp_path, monkeypatch):
    vocab, merges = tk.vocab_from_bpe(["h"] + MERGES)
    snapshot = tmp_path / "hf" / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    tk.write_vocab(str(snapshot), vocab, merges)
    assert tk.find_tokenizer_dir() == str(snapshot)
