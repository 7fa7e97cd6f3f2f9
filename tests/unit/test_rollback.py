"""apply_eraser is all or nothing: a failure at any layer leaves every weight bit-identical (issue 13).

Failures are injected at the one place a weight is written (``api.write_weight``) for every layer index k
of a tiny pipeline's edit set; the error must propagate and the UNet's state dict must equal the one from
before, tensor by tensor (``torch.equal``). Damaged files, non-finite strengths, deltas and solves are
refused before anything is written.
"""

import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("diffusers")

from erasers.config import ArgumentTypeError, ConfigError  # noqa: E402
from erasers.edits.eraser import compute_eraser  # noqa: E402
from erasers.edits.uce import UCEConfig  # noqa: E402
from erasers.errors import BadEraserFile, EraserError, NonFiniteResult  # noqa: E402
from erasers.lowrank import LowRankDelta  # noqa: E402
from erasers_dev.testing import ToyTextEncoder  # noqa: E402
from erasers_dev.tiny_diffusers import state_hash, tiny_pipe  # noqa: E402
from erasers_diffusers import api  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


@pytest.fixture(scope="module")
def eraser(pipe):
    return api.compute_eraser_for_pipeline(pipe, UCEConfig(concepts=["red square", "blue circle"]))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(module, before):
    now = module.state_dict()
    assert set(now) == set(before)
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, changed[:5]


def assert_no_handle(pipe):
    assert getattr(pipe.unet, api.HANDLE_ATTR, None) is None


class Injected(RuntimeError):
    pass


def failing_at(k, original, exc=Injected):
    calls = {"n": 0}

    def write(param, value):
        if calls["n"] == k:
            # a write that fails half-way: part of the tensor is already changed
            param.data.view(-1)[: max(1, param.numel() // 2)] = 7.0
            raise exc(f"injected failure at write {k}")
        calls["n"] += 1
        original(param, value)

    return write


def test_failure_at_every_layer_restores_all_weights(pipe, eraser, monkeypatch):
    n = len(eraser.deltas)
    assert n == 12  # the tiny UNet's attn2 to_k / to_v layers (2 down, 1 mid, 3 up attentions)
    before = state(pipe.unet)
    original = api.write_weight
    for k in range(n):
        monkeypatch.setattr(api, "write_weight", failing_at(k, original))
        with pytest.raises(Injected, match=f"write {k}"):
            api.apply_eraser(pipe, eraser, strength=1.0)
        assert_same(pipe.unet, before)
        assert_no_handle(pipe)
    monkeypatch.setattr(api, "write_weight", original)
    # nothing stuck: the same eraser applies and removes cleanly afterwards
    handle = api.apply_eraser(pipe, eraser)
    assert not torch.equal(pipe.unet.state_dict()[handle.written[0]], before[handle.written[0]])
    api.remove_eraser(pipe, handle)
    assert_same(pipe.unet, before)


def test_interrupt_mid_apply_restores(pipe, eraser, monkeypatch):
    before = state(pipe.unet)
    monkeypatch.setattr(api, "write_weight", failing_at(5, api.write_weight, KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        api.apply_eraser(pipe, eraser)
    assert_same(pipe.unet, before)
    assert_no_handle(pipe)


def test_handle_is_attached_before_the_first_write(pipe, eraser, monkeypatch):
    seen = []
    original = api.write_weight

    def spy(param, value):
        seen.append(getattr(pipe.unet, api.HANDLE_ATTR, None))
        original(param, value)

    monkeypatch.setattr(api, "write_weight", spy)
    handle = api.apply_eraser(pipe, eraser)
    try:
        assert seen and all(h is handle for h in seen)
        assert len(handle.backup) == len(eraser.deltas)
    finally:
        api.remove_eraser(pipe, handle)


def test_float16_overflow_at_a_late_layer_rolls_back():
    pipe16 = tiny_pipe(dtype=torch.float16)
    eraser = api.compute_eraser_for_pipeline(pipe16, UCEConfig(concepts=["red square"]))
    keys = sorted(eraser.deltas)
    # only the last layer overflows in float16: the first 11 are written, then the 12th is refused
    deltas = dict(eraser.deltas)
    deltas[keys[-1]] = LowRankDelta(deltas[keys[-1]].up * 1e9, deltas[keys[-1]].down)
    big = api.Eraser(deltas, eraser.family, eraser.config, eraser.base_fingerprint)
    before = state(pipe16.unet)
    with pytest.raises(NonFiniteResult, match="non-finite in torch.float16"):
        api.apply_eraser(pipe16, big)
    assert_same(pipe16.unet, before)
    assert_no_handle(pipe16)


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf, "x", "1.0", True, None, [1.0]])
def test_bad_strength_refused_before_any_write(pipe, eraser, strength):
    before = state_hash(pipe.unet)
    with pytest.raises(EraserError, match="strength") as info:
        api.apply_eraser(pipe, eraser, strength=strength)
    if not isinstance(strength, float):
        assert isinstance(info.value, TypeError) and isinstance(info.value, ArgumentTypeError)
    else:
        assert isinstance(info.value, ConfigError)
    assert state_hash(pipe.unet) == before
    assert_no_handle(pipe)


def test_non_finite_delta_in_memory_refused(pipe, eraser):
    key = sorted(eraser.deltas)[3]
    deltas = dict(eraser.deltas)
    up = deltas[key].up.clone()
    up[0, 0] = math.nan
    deltas[key] = LowRankDelta(up, deltas[key].down)
    bad = api.Eraser(deltas, eraser.family, eraser.config, eraser.base_fingerprint)
    before = state_hash(pipe.unet)
    with pytest.raises(NonFiniteResult, match=key.replace(".", r"\.")):
        api.apply_eraser(pipe, bad)
    assert state_hash(pipe.unet) == before


def damaged_copy(path, out, layer_stem):
    """The same eraser file with one layer's lora_down cut to rank 0 < rank of lora_up (a damaged file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    down = tensors[f"{layer_stem}.lora_down.weight"]
    tensors[f"{layer_stem}.lora_down.weight"] = torch.cat([down, down])  # rank 2r against up's r
    save_file(tensors, str(out), metadata=metadata)


def test_damaged_file_with_mismatched_ranks_is_refused(pipe, eraser, tmp_path):
    path = api.save_eraser(eraser, tmp_path / "good.safetensors")  # a pathlib.Path is a path
    layers = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["eraser.layers"])
    stem = sorted(layers)[7]
    damaged = tmp_path / "damaged.safetensors"
    damaged_copy(path, damaged, stem)
    before = state_hash(pipe.unet)
    for call in (lambda: api.load_eraser(damaged, pipe), lambda: api.load_eraser(str(damaged))):
        with pytest.raises(BadEraserFile) as info:
            call()
        message = str(info.value)
        assert "damaged.safetensors" in message and layers[stem] in message and "rank" in message
    # the core reader refuses it too (the ComfyUI nodes and A1111 read through it)
    from erasers.files.eraser_file import load_eraser as core_load

    with pytest.raises(BadEraserFile, match="rank"):
        core_load(str(damaged))
    # an eraser damaged in memory, never checked, still cannot be applied
    import copy

    from erasers.lowrank import LowRankDelta

    unchecked = copy.copy(eraser)
    unchecked.deltas = dict(eraser.deltas)
    broken = unchecked.deltas[layers[stem]]
    unchecked.deltas[layers[stem]] = LowRankDelta(broken.up[:, :-1].contiguous(), broken.down)
    with pytest.raises(BadEraserFile, match="rank"):
        api.apply_eraser(pipe, unchecked)
    assert state_hash(pipe.unet) == before
    assert_no_handle(pipe)


def test_pathlike_paths_round_trip(pipe, eraser, tmp_path):
    path = api.save_eraser(eraser, pathlib.Path(tmp_path) / "e.safetensors")
    loaded = api.load_eraser(pathlib.Path(path), pipe)
    assert loaded.keys() == eraser.keys()
    with pytest.raises(ArgumentTypeError, match="path"):
        api.load_eraser(42)
    with pytest.raises(ArgumentTypeError, match="eraser"):
        api.apply_eraser(pipe, str(path))


def test_nan_in_base_weights_named_not_blamed_on_lambda():
    from erasers.files.families import Family
    from erasers_dev.testing import layer_weights

    weights = layer_weights(Family.SD1)
    key = sorted(weights)[2]
    weights[key][0, 0] = math.nan
    with pytest.raises(NonFiniteResult) as info:
        compute_eraser(UCEConfig(concepts=["red square"]), ToyTextEncoder(dim=768), weights)
    assert key in str(info.value) and "λ has nothing to do" in str(info.value)


def test_nan_text_encoder_named():
    from erasers.files.families import Family
    from erasers_dev.testing import layer_weights

    encoder = ToyTextEncoder(dim=768)
    encoder.mix[0, 0] = math.nan
    with pytest.raises(NonFiniteResult, match="text encoder produced NaN"):
        compute_eraser(UCEConfig(concepts=["red square"]), encoder, layer_weights(Family.SD1))


def test_bare_string_concept_is_one_concept():
    assert UCEConfig(concepts="circle").concepts == ["circle"]
    assert UCEConfig(concepts=["a"], preserve="blue square").preserve == ["blue square"]
    assert UCEConfig(concepts="circle", anchors="shape").anchors == ["shape"]
