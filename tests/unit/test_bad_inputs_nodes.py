"""Bad inputs through the ComfyUI glue (fakes of ModelPatcher and CLIP; the real tier is tests/comfyui).

Each case: the pack's error class, a message that names the offending thing, the model's weights and
patch lists hash-equal before and after, and no byte changed in the folder of files the case touches.
The CLI and Python API half of the table is test_bad_inputs_api_cli.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import pytest
import torch
from pack_import import pack_module
from safetensors.torch import save_file
from test_comfy_adapters import FakeCLIP, fake_model, sd1_eraser

adapters = pack_module("nodes.adapters")
fail_closed = pack_module("nodes.fail_closed")
spm_runtime = pack_module("nodes.spm_runtime")
errors = pack_module("erasers.errors")
config_mod = pack_module("erasers.config")
families = pack_module("erasers.files.families")
spm = pack_module("erasers.membranes.spm")
Family = families.Family

EraserError = errors.EraserError


def model_hash(model) -> str:
    h = hashlib.sha256()
    for key in sorted(model.weights):
        t = model.weights[key].contiguous()
        h.update(key.encode() + t.view(torch.uint8).numpy().tobytes() if t.dim() else key.encode())
    h.update(repr(sorted((k, len(v)) for k, v in model.patches.items())).encode())
    return h.hexdigest()


def folder_hash(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sd1():
    model = fake_model(Family.SD1)
    return model, sd1_eraser(model)


@pytest.fixture
def files(tmp_path):
    """A folder with one good membrane-like file and the bad files the loader cases read."""
    save_file({"a": torch.ones(2)}, str(tmp_path / "good.safetensors"))
    save_file({"a": torch.tensor([1.0, float("nan")])}, str(tmp_path / "nan.safetensors"))
    save_file({"a": torch.tensor([float("inf")])}, str(tmp_path / "inf.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:20])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    return tmp_path


def config_case(params, match):
    return (
        "config",
        lambda m, e, f: adapters.build_config("uce", "cat", params=params),
        config_mod.ConfigError,
        match,
    )


def strength_case(value, match):
    return ("apply", lambda m, e, f: adapters.apply_eraser(m, e, value), EraserError, match)


def load_case(name, cls, match):
    return ("file", lambda m, e, f: spm_runtime.load_file(str(f / name)), cls, match)


def with_delta(eraser, key_change=None, value=None):
    """A copy of the eraser with one layer renamed or one value replaced (the cached original untouched)."""
    import copy

    bad = copy.deepcopy(eraser)
    key = bad.keys()[0]
    if key_change:
        bad.deltas[key.replace("input_blocks.1", key_change)] = bad.deltas.pop(key)
    if value is not None:
        delta = bad.deltas[key]
        up = getattr(delta, "up", None)
        (up if up is not None else delta).view(-1)[0] = value
    return bad


def unknown_key(m, e, f):
    return adapters.apply_eraser(m, with_delta(e, key_change="input_blocks.99"), 1.0)


def other_family(m, e, f):
    return adapters.apply_eraser(fake_model(Family.SDXL), e, 1.0)


def sdxl_clip_on_sd1(m, e, f):
    return sd1_eraser(m, FakeCLIP(keys=("g", "l")))


def long_concept(m, e, f):
    return sd1_eraser(m, concepts=(" ".join(["word"] * 120),))


def empty_concepts(m, e, f):
    return adapters.build_config("uce", " \n # only a comment\n")


def cannot_without_pass_through(m, e, f):
    fail_closed.cannot("SAFREE", "no prompt in the workflow.", False)


CASES = [
    config_case("lam=nan", "lam"),
    config_case("lam=inf", "lam"),
    config_case("lam=-1", "lam"),
    config_case("lam=-inf", "lam"),
    config_case("erase_scale=nan", "erase_scale"),
    config_case("erase_scale=-2", "erase_scale"),
    config_case("preserve_scale=-1", "preserve_scale"),
    config_case("preserve_scale=inf", "preserve_scale"),
    config_case('{"lam": "lots"}', "lam"),
    config_case("lambda=3", "unknown parameters"),
    config_case("{not json", "not valid JSON"),
    config_case("[1, 2]", "name=value"),
    config_case("concepts=dog", "own inputs"),
    config_case("rank_cap=3", "own inputs"),
    config_case("variant=1999", "variant"),
    ("config", lambda m, e, f: adapters.build_config("uce", "cat", rank_cap=-1), config_mod.ConfigError, "rank"),
    ("config", lambda m, e, f: adapters.build_config("nope", "cat"), EraserError, "nope"),
    ("config", empty_concepts, errors.EmptyConceptList, "concept"),
    strength_case(float("nan"), "strength"),
    strength_case(float("inf"), "strength"),
    strength_case(-math.inf, "strength"),
    strength_case("1.0", "strength"),
    strength_case(True, "strength"),
    strength_case(None, "strength"),
    ("apply", other_family, errors.FamilyMismatch, "SD1"),
    ("apply", unknown_key, errors.UnknownKeys, "input_blocks.99"),
    (
        "apply",
        lambda m, e, f: adapters.apply_eraser(m, with_delta(e, value=float("nan")), 1.0),
        EraserError,
        "NaN or Inf",
    ),
    ("encode", sdxl_clip_on_sd1, errors.FamilyMismatch, "2048"),
    ("encode", long_concept, errors.ConceptTooLong, "word"),
    load_case("nan.safetensors", errors.BadEraserFile, "nan.safetensors"),
    load_case("inf.safetensors", errors.BadEraserFile, "inf.safetensors"),
    load_case("model.ckpt", errors.BadEraserFile, "model.ckpt"),
    load_case("truncated.safetensors", errors.BadEraserFile, "truncated.safetensors"),
    load_case("empty.safetensors", errors.BadEraserFile, "empty.safetensors"),
    load_case("text.safetensors", errors.BadEraserFile, "text.safetensors"),
    load_case("missing.safetensors", (errors.BadEraserFile, FileNotFoundError), "missing.safetensors"),
    ("fail-closed", cannot_without_pass_through, fail_closed.ErasureNotApplied, "no prompt"),
]


@pytest.mark.parametrize("where, call, error, match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_and_changes_nothing(sd1, files, where, call, error, match):
    model, eraser = sd1
    before_model, before_files = model_hash(model), folder_hash(files)
    with pytest.raises(error, match=match):
        call(model, eraser, files)
    assert model_hash(model) == before_model, f"{where}: the model changed"
    assert folder_hash(files) == before_files, f"{where}: a file changed"


def test_at_least_the_cases_the_issue_asks_for():
    assert len(CASES) >= 35


def test_pass_through_only_when_asked(caplog):
    with caplog.at_level(logging.WARNING):
        fail_closed.cannot("SLD", "cfg is 1.", True, unique_id=None)
    assert "passing the model through unerased" in caplog.text


def test_graph_reading_nodes_always_re_run():
    value = fail_closed.rerun_every_queue(None)
    assert value != value  # NaN: ComfyUI's IS_CHANGED convention for "changed on every queue"


def test_transport_gate_opens_fully_for_a_prompt_it_cannot_read():
    """A conditioning whose text is not in the workflow cannot be judged harmless: the gate opens fully."""
    deltas = {"k": torch.zeros(2, 2)}
    membrane = spm.Membrane(deltas, spm.Gate(spm.GATE_FT, ["snoopy"]), 0.8, name="m")

    class Encoder:
        def conditioning(self, text):
            return torch.ones(3, 4)

    mset = spm_runtime.MembraneSet().with_entry(membrane, Encoder(), ["a known prompt"], "official")
    unknown = torch.full((1, 3, 4), 2.0)
    mset.prepare([unknown])
    assert torch.equal(mset.row_rates(unknown, [0]), torch.tensor([[0.8]]))
    # and a row never prepared (looked up during the forward) is treated the same way
    assert torch.equal(mset.row_rates(torch.full((1, 3, 4), 5.0), [0]), torch.tensor([[0.8]]))
