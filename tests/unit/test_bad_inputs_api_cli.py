"""Bad inputs through the CLI and the Python API, table-driven (issue 13): each is refused cleanly.

Every case asserts (1) the error: exit code 2 with exactly one ``error: …`` line on stderr and no traceback
for the CLI, the pack's error class for the API; (2) that the message names the offending thing (file,
parameter, layer); (3) that the tiny model's state-dict hash is unchanged; (4) that no file in the case
folder changed (every file hashed before and after, names included: no stray temporary file either).
The model and the files are built once per module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from erasers.config import ArgumentTypeError, ConfigError  # noqa: E402
from erasers.edits.eraser import compute_eraser  # noqa: E402
from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.errors import (  # noqa: E402
    BadEraserFile,
    EmptyConceptList,
    EraserAlreadyApplied,
    EraserError,
    FamilyMismatch,
    NonFiniteResult,
    RefusedPath,
)
from erasers.files.eraser_file import load_eraser as raw_load_eraser  # noqa: E402  (no factor check)
from erasers.files.eraser_file import to_state_dict  # noqa: E402
from erasers.files.families import Family  # noqa: E402
from erasers_dev.testing import ToyTextEncoder, layer_weights  # noqa: E402
from erasers_dev.tiny_diffusers import state_hash, tiny_pipe  # noqa: E402
from erasers_diffusers import api, cli  # noqa: E402
from erasers_diffusers.apply import DiffusersMembranes, load_for_unet, membrane_from_file  # noqa: E402
from erasers_diffusers.tokenizer import vocab_from_bpe, write_vocab  # noqa: E402

MERGES = ["#version: 0.2", "r e", "re d</w>", "s q", "sq u", "a r", "ar e</w>", "squ are</w>"]


@dataclass
class World:
    root: pathlib.Path
    pipe: object
    eraser: object
    layer: str  # the damaged layer's canonical key


def write_eraser_file(path, eraser, edit=None, metadata_edit=None):
    tensors, metadata = to_state_dict(eraser)
    if edit:
        edit(tensors)
    if metadata_edit:
        metadata_edit(metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    pipe = tiny_pipe()
    eraser = api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square"]))
    api.save_eraser(eraser, root / "good.safetensors")
    tensors, _ = to_state_dict(eraser)
    layers = json.loads(to_state_dict(eraser)[1]["eraser.layers"])
    stem = sorted(layers)[4]

    def cut_rank(t):
        down = t[f"{stem}.lora_down.weight"]
        t[f"{stem}.lora_down.weight"] = torch.cat([down, down])

    def poison(t):
        t[f"{stem}.lora_up.weight"] = t[f"{stem}.lora_up.weight"].clone()
        t[f"{stem}.lora_up.weight"][0, 0] = math.nan

    write_eraser_file(root / "damaged.safetensors", eraser, edit=cut_rank)
    write_eraser_file(root / "nan.safetensors", eraser, edit=poison)
    write_eraser_file(
        root / "badlayers.safetensors", eraser, metadata_edit=lambda m: m.update({"eraser.layers": "{x"})
    )
    write_eraser_file(
        root / "badconfig.safetensors", eraser, metadata_edit=lambda m: m.update({"eraser.config": "[1"})
    )
    sd1 = compute_eraser(UCEConfig(concepts=["x"]), ToyTextEncoder(dim=768), layer_weights(Family.SD1))
    write_eraser_file(root / "sd1.safetensors", sd1)
    torch.save({"state_dict": {}}, root / "model.ckpt")
    good = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "notes.safetensors").write_text("just some text, not a tensor file\n")
    (root / "latin.txt").write_bytes("café\nvan gogh\n".encode("latin-1"))
    (root / "existing.safetensors").write_bytes(good)
    (root / "a_file").write_text("x")
    (root / "folder").mkdir()
    for name, text in (
        ("badjson", "{not json"),
        ("notdict", "[1, 2]"),
        ("badentry", json.dumps({"unet": "UNet2DConditionModel"})),
        ("okindex", json.dumps({"_class_name": "StableDiffusionPipeline"})),
    ):
        (root / name).mkdir()
        (root / name / "model_index.json").write_text(text)
    # a single-file SD1 checkpoint whose UNet holds a NaN (the file itself is readable)
    weights = layer_weights(Family.UNET, seed=1, context_dim=32)
    nan_key = sorted(weights)[3]
    weights[nan_key][0, 0] = math.nan
    ckpt = {"model.diffusion_model." + k: v.contiguous() for k, v in weights.items()}
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    ckpt["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 32)
    save_file(ckpt, str(root / "nan_ckpt.safetensors"))
    write_vocab(str(root / "tokenizer"), *vocab_from_bpe(MERGES))
    return World(root, pipe, eraser, layers[stem])


@pytest.fixture(autouse=True)
def no_tokenizer_anywhere(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("erasers_diffusers.tokenizer.BPE_PACKAGES", ())


def folder_hash(root: pathlib.Path) -> dict:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in dirnames + files:
            path = pathlib.Path(dirpath) / name
            rel = str(path.relative_to(root))
            out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -- the table -------------------------------------------------------------------------------------


@dataclass
class Cli:
    name: str
    argv: Sequence[str]  # "{d}" is the case folder
    names: Sequence[str]  # fragments the error line must contain
    absent: Sequence[str] = ()  # fragments it must not contain (misleading old messages)


@dataclass
class Api:
    name: str
    call: Callable  # (world) -> None, must raise
    error: type
    names: Sequence[str]
    also: Optional[type] = None  # a second class the error must also be (TypeError for wrong types)


ERASE = ["erase", "--checkpoint", "{d}/good.safetensors", "--out", "{d}/new.safetensors"]
GEN = ["generate", "--model", "{d}/okindex", "--prompt", "a red square"]

CLI_CASES = [
    Cli("blank concept", ERASE + ["--concept", "   "], ["concept"]),
    Cli("lam=inf", ERASE + ["--concept", "x", "--param", "lam=inf"], ["lam", "inf"]),
    Cli("lam=-1", ERASE + ["--concept", "x", "--param", "lam=-1"], ["lam"]),
    Cli("lam=abc", ERASE + ["--concept", "x", "--param", "lam=abc"], ["lam", "abc"], ["Optional"]),
    Cli("unknown param", ERASE + ["--concept", "x", "--param", "nonsense=1"], ["nonsense"]),
    Cli("param without =", ERASE + ["--concept", "x", "--param", "lam"], ["key=value", "lam"]),
    Cli(
        "rece epochs=x",
        ERASE + ["--method", "rece", "--concept", "x", "--param", "epochs=x"],
        ["epochs", "whole number"],
        ["Optional[int]", "a Optional"],
    ),
    Cli("rank cap 0", ERASE + ["--concept", "x", "--rank-cap", "0"], ["rank_cap"]),
    Cli("rank cap abc", ERASE + ["--concept", "x", "--rank-cap", "abc"], ["--rank-cap", "abc"]),
    Cli("tolerance nan", ERASE + ["--concept", "x", "--file-tolerance", "nan"], ["--file-tolerance"]),
    Cli("tolerance -1", ERASE + ["--concept", "x", "--file-tolerance", "-1"], ["--file-tolerance"]),
    Cli("tolerance 2", ERASE + ["--concept", "x", "--file-tolerance", "2"], ["--file-tolerance"]),
    Cli("Latin-1 concepts file", ERASE + ["--concepts-file", "{d}/latin.txt"], ["latin.txt", "UTF-8"]),
    Cli("missing concepts file", ERASE + ["--concepts-file", "{d}/nope.txt"], ["nope.txt"]),
    Cli(
        "preserve file is a folder",
        ERASE + ["--concept", "x", "--preserve-file", "{d}/folder"],
        ["folder", "a folder"],
    ),
    Cli(
        "out is the input",
        ["erase", "--checkpoint", "{d}/good.safetensors", "--concept", "x", "--out", "{d}/good.safetensors"],
        ["good.safetensors", "input"],
    ),
    Cli(
        "out exists",
        ["erase", "--checkpoint", "{d}/good.safetensors", "--concept", "x", "--out", "{d}/existing.safetensors"],
        ["existing.safetensors", "--force"],
    ),
    Cli(
        "out folder missing",
        ["erase", "--checkpoint", "{d}/good.safetensors", "--concept", "x", "--out", "{d}/nodir/"],
        ["nodir", "does not exist"],
    ),
    Cli(
        "pickled checkpoint",
        ["erase", "--checkpoint", "{d}/model.ckpt", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["model.ckpt", "pickled"],
    ),
    Cli(
        "truncated checkpoint",
        ["erase", "--checkpoint", "{d}/truncated.safetensors", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["truncated.safetensors"],
    ),
    Cli(
        "missing checkpoint",
        ["erase", "--checkpoint", "{d}/gone.safetensors", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["gone.safetensors"],
    ),
    Cli(
        "bad model_index.json",
        ["erase", "--diffusers", "{d}/badjson", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["model_index.json", "JSON"],
    ),
    Cli(
        "model_index.json not an object",
        ["erase", "--diffusers", "{d}/notdict", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["model_index.json", "object"],
    ),
    Cli(
        "model_index.json bad entry",
        ["erase", "--diffusers", "{d}/badentry", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["model_index.json", "unet"],
    ),
    Cli(
        "folder without model_index.json",
        ["erase", "--diffusers", "{d}/folder", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["folder", "model_index.json"],
    ),
    Cli(
        "NaN in the checkpoint",
        [
            "erase",
            "--checkpoint",
            "{d}/nan_ckpt.safetensors",
            "--tokenizer",
            "{d}/tokenizer",
            "--concept",
            "x",
            "--out",
            "{d}/o.safetensors",
        ],
        ["nan_ckpt.safetensors", "attn2", "NaN", "λ has nothing to do"],
        ["raise λ"],
    ),
    Cli(
        "no tokenizer anywhere",
        ["erase", "--checkpoint", "{d}/nan_ckpt.safetensors", "--concept", "x", "--out", "{d}/o.safetensors"],
        ["--tokenizer"],
    ),
    Cli("unknown method", ERASE + ["--concept", "x", "--method", "nope"], ["--method", "nope"]),
    Cli("unknown concept type", ERASE + ["--concept", "x", "--concept-type", "weird"], ["weird"]),
    Cli("no --out", ["erase", "--checkpoint", "{d}/good.safetensors", "--concept", "x"], ["--out"]),
    Cli(
        "two sources",
        ERASE + ["--diffusers", "{d}/okindex", "--concept", "x"],
        ["--diffusers", "--checkpoint"],
    ),
    Cli(
        "anchors do not match",
        ERASE + ["--concept", "a", "--concept", "b", "--concept", "c", "--anchor", "x", "--anchor", "y"],
        ["anchor"],
    ),
    Cli("erased and preserved", ERASE + ["--concept", "cat", "--preserve", "cat"], ["cat", "both"]),
    Cli("info missing file", ["info", "{d}/gone.safetensors"], ["gone.safetensors"]),
    Cli("info pickle", ["info", "{d}/model.ckpt"], ["model.ckpt", "pickled"]),
    Cli("info truncated", ["info", "{d}/truncated.safetensors"], ["truncated.safetensors"]),
    Cli("info damaged ranks", ["info", "{d}/damaged.safetensors"], ["damaged.safetensors", "rank", "must match"]),
    Cli("info NaN", ["info", "{d}/nan.safetensors"], ["nan.safetensors", "NaN"]),
    Cli("info broken layers metadata", ["info", "{d}/badlayers.safetensors"], ["badlayers", "eraser.layers"]),
    Cli("info broken config metadata", ["info", "{d}/badconfig.safetensors"], ["badconfig", "eraser.config"]),
    Cli("info on a folder", ["info", "{d}/folder"], ["folder"]),
    Cli("info on a text file", ["info", "{d}/notes.safetensors"], ["notes.safetensors", ".safetensors"]),
    Cli("bench unknown", ["bench", "nope"], ["nope", "closed-form", "soak"]),
    Cli("unknown command", ["frobnicate"], ["frobnicate"]),
    Cli("generate model missing", ["generate", "--model", "{d}/nomodel", "--prompt", "x"], ["nomodel"]),
    Cli("generate steps 0", GEN + ["--steps", "0"], ["--steps"]),
    Cli("generate steps x", GEN + ["--steps", "x"], ["--steps", "'x'"]),
    Cli("generate cfg nan", GEN + ["--cfg", "nan"], ["--cfg"]),
    Cli("generate size 30", GEN + ["--size", "30"], ["--size", "8"]),
    Cli(
        "generate too many strengths",
        GEN + ["--spm", "{d}/good.safetensors", "--strength", "1", "2"],
        ["--strength", "2 value"],
    ),
    Cli("generate strength inf", GEN + ["--lora", "{d}/good.safetensors", "--strength", "inf"], ["--strength"]),
    Cli("generate spm missing", GEN + ["--spm", "{d}/gone.safetensors"], ["gone.safetensors"]),
    Cli("generate lora pickle", GEN + ["--lora", "{d}/model.ckpt"], ["model.ckpt", "pickled"]),
    Cli("generate out is a file", GEN + ["--out", "{d}/a_file"], ["a_file", "folder"]),
    Cli("generate blank prompt", ["generate", "--model", "{d}/okindex", "--prompt", "  "], ["prompt"]),
    Cli("generate bad device", GEN + ["--device", "toaster"], ["--device", "toaster"]),
    Cli("generate model folder without index", ["generate", "--model", "{d}/folder", "--prompt", "x"], ["folder"]),
    Cli("demo unknown concept", ["demo", "--concept", "banana", "--out", "{d}/demo"], ["--concept", "banana"]),
    Cli("demo unknown method", ["demo", "--methods", "uce,nope", "--out", "{d}/demo"], ["--methods", "nope"]),
    Cli("demo steps 0", ["demo", "--steps", "0", "--out", "{d}/demo"], ["--steps"]),
    Cli("demo weights wrong file", ["demo", "--weights", "{d}/good.safetensors"], ["--weights", "good.safetensors"]),
    Cli("demo weights missing", ["demo", "--weights", "{d}/gone.safetensors"], ["gone.safetensors"]),
    Cli("demo out is a file", ["demo", "--out", "{d}/a_file"], ["a_file"]),
]


def twice(w):
    handle = api.apply_eraser(w.pipe, w.eraser)
    try:
        api.apply_eraser(w.pipe, w.eraser)
    finally:
        api.remove_eraser(w.pipe, handle)


def nan_weights(_w):
    weights = layer_weights(Family.SD1)
    weights[sorted(weights)[0]][0, 0] = math.inf
    compute_eraser(UCEConfig(concepts=["x"]), ToyTextEncoder(dim=768), weights)


API_CASES = [
    Api("strength nan", lambda w: api.apply_eraser(w.pipe, w.eraser, math.nan), ConfigError, ["strength", "nan"]),
    Api("strength inf", lambda w: api.apply_eraser(w.pipe, w.eraser, math.inf), ConfigError, ["strength", "inf"]),
    Api("strength 'x'", lambda w: api.apply_eraser(w.pipe, w.eraser, "x"), ArgumentTypeError, ["strength"], TypeError),
    Api(
        "strength True", lambda w: api.apply_eraser(w.pipe, w.eraser, True), ArgumentTypeError, ["strength"], TypeError
    ),
    Api(
        "erased() strength nan",
        lambda w: api.erased(w.pipe, w.eraser, math.nan).__enter__(),
        ConfigError,
        ["strength"],
    ),
    Api("a path for an eraser", lambda w: api.apply_eraser(w.pipe, "good.safetensors"), ArgumentTypeError, ["eraser"]),
    Api(
        "eraser of another family",
        lambda w: api.apply_eraser(w.pipe, api.load_eraser(w.root / "sd1.safetensors")),
        FamilyMismatch,
        ["sd1.safetensors", "SD1"],
    ),
    Api("applied twice", twice, EraserAlreadyApplied, ["already applied", "remove_eraser"]),
    Api(
        "damaged ranks, with pipe",
        lambda w: api.load_eraser(w.root / "damaged.safetensors", w.pipe),
        BadEraserFile,
        ["damaged.safetensors", "rank", "{layer}"],
    ),
    Api(
        "damaged ranks, applied",
        lambda w: api.apply_eraser(
            w.pipe,
            raw_load_eraser(str(w.root / "damaged.safetensors")),
        ),
        BadEraserFile,
        ["damaged.safetensors", "{layer}"],
    ),
    Api("load path int", lambda w: api.load_eraser(42), ArgumentTypeError, ["path", "int"], TypeError),
    Api(
        "load missing Path",
        lambda w: api.load_eraser(w.root / "gone.safetensors"),
        BadEraserFile,
        ["gone.safetensors"],
    ),
    Api(
        "load NaN file",
        lambda w: api.load_eraser(w.root / "nan.safetensors"),
        BadEraserFile,
        ["nan.safetensors", "NaN"],
    ),
    Api("load pickle", lambda w: api.load_eraser(w.root / "model.ckpt"), BadEraserFile, ["model.ckpt", "pickled"]),
    Api(
        "save over existing",
        lambda w: api.save_eraser(w.eraser, w.root / "existing.safetensors"),
        RefusedPath,
        ["existing.safetensors", "overwrite=True"],
    ),
    Api("save path float", lambda w: api.save_eraser(w.eraser, 3.5), ArgumentTypeError, ["path", "float"], TypeError),
    Api("save a non-eraser", lambda w: api.save_eraser("e", w.root / "x.safetensors"), ArgumentTypeError, ["eraser"]),
    Api("config is a string", lambda w: api.compute_eraser_for_pipeline(w.pipe, "uce"), ArgumentTypeError, ["config"]),
    Api("concepts [3]", lambda w: UCEConfig(concepts=[3]), ArgumentTypeError, ["concepts", "int"], TypeError),
    Api("concepts 5", lambda w: UCEConfig(concepts=5), ArgumentTypeError, ["concepts"], TypeError),
    Api("lam '0.5'", lambda w: UCEConfig(concepts=["a"], lam="0.5"), ArgumentTypeError, ["lam"], TypeError),
    Api("lam nan", lambda w: UCEConfig(concepts=["a"], lam=math.nan), ConfigError, ["lam"]),
    Api("rank_cap 2.5", lambda w: UCEConfig(concepts=["a"], rank_cap=2.5), ConfigError, ["rank_cap", "2.5"]),
    Api("no concepts", lambda w: UCEConfig(concepts=[]), EmptyConceptList, ["concept"]),
    Api("concept type", lambda w: UCEConfig(concepts=["a"], concept_type="paint"), ConfigError, ["concept_type"]),
    Api("erased and preserved", lambda w: UCEConfig(concepts=["a"], preserve="a"), ConfigError, ["'a'", "both"]),
    Api(
        "unknown config key",
        lambda w: UCEConfig.from_dict({"concepts": ["a"], "bogus": 1}),
        ConfigError,
        ["bogus"],
    ),
    Api(
        "membrane strength nan",
        lambda w: membrane_from_file(w.pipe.unet, w.root / "good.safetensors", strength=math.nan, kind="lora"),
        ConfigError,
        ["strength"],
    ),
    Api("membrane path int", lambda w: membrane_from_file(w.pipe.unet, 42), ArgumentTypeError, ["path"], TypeError),
    Api(
        "membrane kind",
        lambda w: membrane_from_file(w.pipe.unet, w.root / "good.safetensors", kind="lyco"),
        ConfigError,
        ["kind", "lyco"],
    ),
    Api(
        "membrane concepts int",
        lambda w: membrane_from_file(w.pipe.unet, w.root / "good.safetensors", kind="lora", concepts=7),
        ArgumentTypeError,
        ["concepts"],
    ),
    Api("load_for_unet bytes", lambda w: load_for_unet(w.pipe.unet, b"x.safetensors"), ArgumentTypeError, ["path"]),
    Api(
        "load_for_unet NaN",
        lambda w: load_for_unet(w.pipe.unet, w.root / "nan.safetensors"),
        BadEraserFile,
        ["nan.safetensors", "NaN"],
    ),
    Api("remove with a string", lambda w: api.remove_eraser(w.pipe, "h"), ArgumentTypeError, ["handle"]),
    Api("hooks with a string", lambda w: DiffusersMembranes(w.pipe, membranes=["x"]), ArgumentTypeError, ["Membrane"]),
    Api("NaN base weights", nan_weights, NonFiniteResult, ["input_blocks", "λ has nothing to do"]),
]


def test_the_table_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 45
    assert len({c.name for c in CLI_CASES}) == len(CLI_CASES) and len({c.name for c in API_CASES}) == len(API_CASES)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_cli_bad_input(world, case, capsys):
    files, model = folder_hash(world.root), state_hash(world.pipe.unet)
    argv = [a.format(d=world.root) for a in case.argv]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in case.names:
        assert fragment in err, (fragment, err)
    for fragment in case.absent:
        assert fragment not in err, (fragment, err)
    assert state_hash(world.pipe.unet) == model
    assert folder_hash(world.root) == files


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.name)
def test_api_bad_input(world, case):
    files, model = folder_hash(world.root), state_hash(world.pipe.unet)
    with pytest.raises(EraserError) as info:
        case.call(world)
    assert isinstance(info.value, case.error), (type(info.value), info.value)
    if case.also:
        assert isinstance(info.value, case.also)
    message = str(info.value)
    for fragment in case.names:
        fragment = fragment.format(layer=world.layer)
        assert fragment in message, (fragment, message)
    assert state_hash(world.pipe.unet) == model
    assert getattr(world.pipe.unet, api.HANDLE_ATTR, None) is None
    assert folder_hash(world.root) == files


def test_debug_shows_the_traceback(world):
    with pytest.raises(BadEraserFile):
        cli.main(["--debug", "info", str(world.root / "damaged.safetensors")])


def test_info_flags_a_damaged_file_on_stdout_and_passes_a_good_one(world, capsys):
    assert cli.main(["info", str(world.root / "damaged.safetensors")]) == 2
    out, _ = capsys.readouterr()
    assert "PROBLEM:" in out and "rank" in out
    assert cli.main(["info", str(world.root / "good.safetensors")]) == 0
    out, _ = capsys.readouterr()
    assert "checks:      ok" in out and "finite" in out
    assert cli.main(["info", "--json", str(world.root / "nan.safetensors")]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["values_checked"] is True and any("NaN" in p for p in data["problems"])


def test_info_into_a_closed_pipe_is_quiet(world):
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        f"{sys.executable} -m erasers info --layers {world.root / 'good.safetensors'} | head -n 1",
        shell=True,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.stdout.startswith("file:") and done.stderr == "", done.stderr


def test_broken_pipe_ends_quietly(world, monkeypatch, capsys):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert cli.main(["info", str(world.root / "good.safetensors")]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
