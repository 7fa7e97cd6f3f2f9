"""Eraser files: exact low-rank storage, round trips, stock kohya key mapping, refusals."""

import os
import pickle

import pytest
import torch

from erasers.edits.eraser import compute_eraser
from erasers.edits.uce import UCEConfig
from erasers.errors import BadEraserFile, FamilyMismatch, UnknownKeys
from erasers.files.eraser_file import describe_file, load_eraser, save_eraser
from erasers.files.families import Family
from erasers.files.keys import canonical_to_diffusers, kohya_name
from erasers.lowrank import LowRankDelta, compress
from erasers_dev.testing import ToyTextEncoder, layer_shapes, layer_weights


@pytest.fixture(scope="module")
def sd1_eraser():
    return compute_eraser(
        UCEConfig(concepts=["Van Gogh", "Monet"], concept_type="art", variant="2023"),
        ToyTextEncoder(),
        layer_weights(Family.SD1),
    )


def dense_reference(concepts, variant="2023"):
    """ΔW computed densely with (★) per layer, independent of the factored path."""
    from erasers.edits.closed_form import apply_ridge
    from erasers.edits.uce import aligned_token_rows, erase_pairs, retain_prompts

    cfg = UCEConfig(concepts=concepts, concept_type="art", variant=variant)
    enc = ToyTextEncoder()
    c, g = erase_pairs(cfg)
    keys, targets = aligned_token_rows(enc.encode(c), enc.encode(g))
    p = enc.encode(retain_prompts(cfg)).hidden.reshape(-1, 768)
    eta_p = cfg.effective_preserve_scale(1)
    weights = layer_weights(Family.SD1)
    out = {}
    for key in list(weights)[:3]:
        w0 = weights[key].double()
        all_keys = torch.cat([keys, p]).double()
        all_targets = torch.cat([targets.double() @ w0.T, p.double() @ w0.T])
        om = torch.cat([torch.ones(len(keys), dtype=torch.float64), torch.full((len(p),), eta_p, dtype=torch.float64)])
        out[key] = apply_ridge(w0, cfg.lam, all_keys, all_targets, om) - w0
    return out


def test_low_rank_storage_reconstructs_the_dense_delta(sd1_eraser):
    reference = dense_reference(["Van Gogh", "Monet"])
    for key, dense in reference.items():
        got = sd1_eraser.deltas[key].dense(torch.float64)
        rel = (got - dense).norm() / dense.norm()
        assert rel < 1e-5, (key, float(rel))


def test_save_load_round_trip_is_exact(tmp_path, sd1_eraser):
    path = save_eraser(sd1_eraser, str(tmp_path / "vg"))
    assert path.endswith(".safetensors")
    loaded = load_eraser(path)
    assert loaded.family == Family.SD1 and loaded.concepts == ["Van Gogh", "Monet"]
    assert loaded.config == sd1_eraser.config
    assert loaded.base_fingerprint == sd1_eraser.base_fingerprint
    for key, delta in sd1_eraser.deltas.items():
        assert torch.equal(loaded.deltas[key].up, delta.up)
        assert torch.equal(loaded.deltas[key].down, delta.down)
    info = describe_file(path)
    assert info["method"] == "uce" and info["layers"] == 32


def test_file_uses_stock_kohya_keys_that_resolve_by_module_path(tmp_path, sd1_eraser):
    """A stock kohya loader maps lora_unet_<path with _> to a module; check both LDM and diffusers routes."""
    from safetensors.torch import load_file

    tensors = load_file(save_eraser(sd1_eraser, str(tmp_path / "e.safetensors")))
    shapes = layer_shapes(Family.SD1)
    # the generic kohya rule of ComfyUI / A1111: replace '.' with '_' in the module path
    stock_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in shapes}
    stems = {k.split(".")[0] for k in tensors}
    assert stems <= set(stock_map)
    for stem in stems:
        key = stock_map[stem]
        up, down, alpha = (
            tensors[f"{stem}.lora_up.weight"],
            tensors[f"{stem}.lora_down.weight"],
            tensors[f"{stem}.alpha"],
        )
        stock_delta = (float(alpha) / down.shape[0]) * up.double() @ down.double()  # kohya: (α/r)·up·down
        assert torch.allclose(stock_delta, sd1_eraser.deltas[key].dense(torch.float64), atol=1e-12)
        assert canonical_to_diffusers(key) is not None  # also reachable through the diffusers naming
    assert (
        kohya_name("middle_block.1.transformer_blocks.0.attn2.to_v.weight")
        == "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v"
    )


def test_wrong_family_file_is_refused(tmp_path, sd1_eraser):
    loaded = load_eraser(save_eraser(sd1_eraser, str(tmp_path / "e.safetensors")))
    with pytest.raises(FamilyMismatch, match="SD1.x.*SDXL"):
        loaded.check_model(layer_shapes(Family.SDXL))


def test_missing_layers_are_listed(sd1_eraser):
    shapes = layer_shapes(Family.SD1)
    del shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(UnknownKeys, match="middle_block.1"):
        sd1_eraser.check_model(shapes, family=Family.SD1)


def test_unknown_keys_in_file_are_listed(tmp_path, sd1_eraser):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_eraser(sd1_eraser, str(tmp_path / "e.safetensors"))
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors["lora_unet_bogus_layer.lora_up.weight"] = torch.zeros(2, 1)
    tensors["lora_unet_bogus_layer.lora_down.weight"] = torch.zeros(1, 2)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(UnknownKeys, match="lora_unet_bogus_layer"):
        load_eraser(str(tmp_path / "bad.safetensors"))


def test_pickled_and_truncated_files_are_refused(tmp_path, sd1_eraser):
    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(BadEraserFile, match="pickled"):
        load_eraser(str(pt))
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(BadEraserFile, match="not a .safetensors"):
        load_eraser(str(renamed))
    good = save_eraser(sd1_eraser, str(tmp_path / "good.safetensors"))
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadEraserFile, match="truncated"):
        load_eraser(str(cut))
    with pytest.raises(BadEraserFile, match="No file"):
        load_eraser(str(tmp_path / "missing.safetensors"))


def test_plain_lora_without_eraser_metadata_points_to_the_lora_loader(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(BadEraserFile, match="Load Erasure LoRA"):
        load_eraser(str(tmp_path / "l.safetensors"))


def test_compress_is_exact_below_the_tolerance_and_caps_rank():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    dup = LowRankDelta(torch.cat([up, up], 1), torch.cat([down, down], 0))  # rank 6 stored as 12
    small, err = compress(dup)
    assert small.rank == 6 and err < 1e-7
    assert torch.allclose(small.dense(torch.float64), dup.dense(torch.float64), rtol=1e-5, atol=1e-5)
    capped, err = compress(dup, rank_cap=2)
    assert capped.rank == 2 and 0 < err < 1


def test_rank_cap_reports_error_and_shrinks_file(tmp_path, caplog):
    weights = layer_weights(Family.SD1)
    enc = ToyTextEncoder()
    full = compute_eraser(UCEConfig(concepts=["a b", "c d", "e f"], variant="2023"), enc, weights)
    capped = compute_eraser(UCEConfig(concepts=["a b", "c d", "e f"], variant="2023", rank_cap=4), enc, weights)
    assert max(d.rank for d in capped.deltas.values()) == 4
    assert capped.reconstruction_error > 0
    assert os.path.getsize(save_eraser(capped, str(tmp_path / "c"))) < os.path.getsize(
        save_eraser(full, str(tmp_path / "f"))
    )


def test_full_rank_deltas_are_stored_dense_under_the_stock_diff_key(tmp_path):
    from safetensors.torch import load_file

    from erasers.edits.eraser import Eraser

    g = torch.Generator().manual_seed(0)
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    full = LowRankDelta(torch.randn(320, 768, generator=g), torch.randn(768, 768, generator=g))  # rank 768
    eraser = Eraser({key: full}, Family.SD1, UCEConfig(concepts=["x"]).to_dict())
    path = save_eraser(eraser, str(tmp_path / "dense.safetensors"))
    tensors = load_file(path)
    assert set(tensors) == {kohya_name(key) + ".diff"}  # 320×768 floats instead of (320+768)×768
    loaded = load_eraser(path)
    assert torch.equal(loaded.dense(key), tensors[kohya_name(key) + ".diff"])
    assert torch.allclose(loaded.dense(key, torch.float64), full.dense(torch.float64), rtol=1e-6, atol=1e-4)


def decaying(out, inn, ratio=0.9, seed=0):
    """A full-rank out×inn delta with singular values ratio**i (so its exact factors are not smaller)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inn)
    u = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(inn, k, generator=g, dtype=torch.float64))[0]
    s = ratio ** torch.arange(k, dtype=torch.float64)
    return LowRankDelta((u * s).float(), v.T.float()), s


@pytest.mark.parametrize("shape", [(320, 768), (1280, 768)])  # both Gram sides
def test_truncate_keeps_the_smallest_rank_within_tolerance(shape):
    from erasers.lowrank import truncate

    delta, s = decaying(*shape)
    tail = lambda k: float(s[k:].norm() / s.norm())  # Eckart–Young error of the best rank k
    for tol in (1e-2, 1e-3):
        short, err = truncate(delta, tol)
        assert err <= tol and tail(short.rank - 1) > tol  # within the tolerance, and one less would not be
        assert abs(err - tail(short.rank)) < 1e-5  # the optimum (the delta is float32: ~1e-7 noise)
        measured = (short.dense(torch.float64) - delta.dense(torch.float64)).norm() / delta.dense(torch.float64).norm()
        assert abs(float(measured) - err) < 1e-6


def test_full_rank_deltas_are_truncated_in_files_unless_exact(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from erasers.edits.eraser import Eraser
    from erasers.files.eraser_file import FILE_TOLERANCE

    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    delta, _ = decaying(320, 768)
    eraser = Eraser({key: delta}, Family.SD1, UCEConfig(concepts=["x"]).to_dict())
    assert eraser.deltas[key].rank == 320  # (320+768)·320 > 320·768: the exact factors are not smaller
    path = save_eraser(eraser, str(tmp_path / "short.safetensors"))
    tensors, name = load_file(path), kohya_name(key)
    assert set(tensors) == {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
    rank = tensors[f"{name}.lora_down.weight"].shape[0]
    assert rank < 320 * 768 / (320 + 768)
    stock = (
        float(tensors[f"{name}.alpha"])
        / rank
        * tensors[f"{name}.lora_up.weight"].double()
        @ tensors[f"{name}.lora_down.weight"].double()
    )  # the stock kohya reading
    exact = delta.dense(torch.float64)
    error = float((stock - exact).norm() / exact.norm())
    assert error <= FILE_TOLERANCE
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    storage = json.loads(meta["eraser.storage"])
    assert storage["tolerance"] == FILE_TOLERANCE and storage["truncated"][name]["rank"] == rank
    assert abs(float(meta["eraser.reconstruction_error"]) - error) < 1e-3 * error
    assert abs(load_eraser(path).reconstruction_error - error) < 1e-3 * error
    assert eraser.deltas[key] is delta  # the in-memory eraser is untouched
    # exact=True: the dense delta under the stock `.diff` key, no truncation recorded
    path = save_eraser(eraser, str(tmp_path / "exact.safetensors"), exact=True)
    tensors = load_file(path)
    assert set(tensors) == {f"{name}.diff"}
    assert torch.allclose(tensors[f"{name}.diff"].double(), exact, atol=1e-6)
    with safe_open(path, framework="pt") as handle:
        assert json.loads(handle.metadata()["eraser.storage"]) == {"tolerance": None, "truncated": {}}


def test_core_readers_take_pathlike(tmp_path):
    """os.PathLike is a path everywhere in the core (pathlib.Path used to crash on .lower())."""
    import pathlib

    import torch
    from safetensors.torch import save_file

    from erasers.files.eraser_file import read_safetensors
    from erasers.files.safetensors_header import read_safetensors_header

    path = pathlib.Path(tmp_path) / "x.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"k": "v"})
    tensors, metadata = read_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(2)) and metadata["k"] == "v"
    assert read_safetensors_header(path)[0]["a"]["shape"] == [2]


@pytest.mark.parametrize("tolerance", [float("nan"), -1.0, 1.0, float("inf"), "0.1"])
def test_core_save_refuses_a_tolerance_outside_0_1_and_writes_nothing(tmp_path, sd1_eraser, tolerance):
    from erasers.errors import EraserError

    with pytest.raises(EraserError, match="tolerance"):
        save_eraser(sd1_eraser, str(tmp_path / "e.safetensors"), tolerance=tolerance)
    assert list(tmp_path.iterdir()) == []


def test_core_reader_refuses_factor_ranks_that_differ_naming_the_layer(tmp_path, sd1_eraser):
    """The core reader (used by the ComfyUI nodes and A1111, not only the API) checks the factors."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_eraser(sd1_eraser, str(tmp_path / "good.safetensors"))
    tensors = load_file(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    key = sorted(k for k in tensors if k.endswith(".lora_down.weight"))[0]
    tensors[key] = tensors[key][:-1].contiguous()  # one rank fewer than its lora_up
    damaged = str(tmp_path / "damaged.safetensors")
    save_file(tensors, damaged, metadata=metadata)
    with pytest.raises(BadEraserFile, match="rank .* must match"):
        load_eraser(damaged)
    tensors = load_file(path)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, damaged, metadata=metadata)
    with pytest.raises(BadEraserFile, match="non-finite"):
        load_eraser(damaged)


def test_a_layer_the_edit_left_unchanged_round_trips_as_zero(tmp_path, sd1_eraser):
    """A rank-0 delta (ΔW = 0) is written as rank-1 zeros (alpha / rank must not divide by 0 in any LoRA
    reader) and read back as exactly zero; a rank-0 pair written by another tool also reads as zero."""
    from dataclasses import replace

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = sorted(sd1_eraser.deltas)[0]
    out_f, in_f = sd1_eraser.deltas[key].shape
    zero = LowRankDelta(torch.zeros(out_f, 0), torch.zeros(0, in_f))
    eraser = replace(sd1_eraser, deltas={**sd1_eraser.deltas, key: zero})
    path = save_eraser(eraser, str(tmp_path / "zero.safetensors"))
    tensors = load_file(path)
    stem = kohya_name(key)
    assert tensors[f"{stem}.lora_down.weight"].shape == (1, in_f) and float(tensors[f"{stem}.alpha"]) == 1.0
    back = load_eraser(path)
    assert torch.equal(back.deltas[key].dense(), torch.zeros(out_f, in_f))
    other = sorted(k for k in sd1_eraser.deltas if k != key)[0]
    assert torch.equal(back.deltas[other].dense(), sd1_eraser.deltas[other].dense())

    tensors[f"{stem}.lora_up.weight"] = torch.zeros(out_f, 0)
    tensors[f"{stem}.lora_down.weight"] = torch.zeros(0, in_f)
    tensors[f"{stem}.alpha"] = torch.tensor(0.0)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    foreign = str(tmp_path / "rank0.safetensors")
    save_file(tensors, foreign, metadata=metadata)
    assert torch.equal(load_eraser(foreign).deltas[key].dense(), torch.zeros(out_f, in_f))
