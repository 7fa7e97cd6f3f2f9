"""nodes/routes.py (path validation, presets) and erasers/files/file_info.py (header-only reader), no ComfyUI."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from pack_import import pack_module  # shared test helper
from safetensors.torch import save_file

routes = pack_module("nodes.routes")
file_info = pack_module("erasers.files.file_info")
errors = pack_module("erasers.errors")


class FakeFolderPaths:
    """ComfyUI's folder_paths as far as the route uses it. ``get_full_path`` joins naively, exactly as
    the host does, so only ``resolve_model_file``'s own checks stand between a name and the disk."""

    def __init__(self, folders):
        self.folder_names_and_paths = {name: ([str(d)], {".safetensors"}) for name, d in folders.items()}
        self.calls = []

    def get_folder_paths(self, name):
        return self.folder_names_and_paths[name][0]

    def get_full_path(self, name, filename):
        self.calls.append((name, filename))
        for d in self.get_folder_paths(name):
            path = os.path.join(d, filename)
            if os.path.isfile(path):
                return path
        return None


@pytest.fixture
def model_dirs(tmp_path):
    models = tmp_path / "models"
    dirs = {name: models / name for name in ("erasers", "spm", "loras", "checkpoints")}
    for d in dirs.values():
        d.mkdir(parents=True)
    (dirs["erasers"] / "sub").mkdir()
    for path in (
        dirs["erasers"] / "a.safetensors",
        dirs["erasers"] / "sub" / "b.safetensors",
        dirs["checkpoints"] / "ckpt.safetensors",
        tmp_path / "secret.safetensors",
    ):
        save_file({"x": torch.zeros(2)}, str(path))
    return tmp_path, dirs


def test_resolve_serves_plain_and_subfolder_names(model_dirs):
    _, dirs = model_dirs
    fp = FakeFolderPaths(dirs)
    assert routes.resolve_model_file("erasers", "a.safetensors", fp) == str(dirs["erasers"] / "a.safetensors")
    assert routes.resolve_model_file("erasers", "sub/b.safetensors", fp).endswith("b.safetensors")
    with pytest.raises(FileNotFoundError):
        routes.resolve_model_file("erasers", "nope.safetensors", fp)


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",
        "../../secret.safetensors",
        "sub/../../secret.safetensors",
        "..",
        "./a.safetensors",
        "sub//b.safetensors",
    ],
)
def test_resolve_refuses_traversal(model_dirs, name):
    _, dirs = model_dirs
    fp = FakeFolderPaths(dirs)
    with pytest.raises(errors.RefusedPath):
        routes.resolve_model_file("erasers", name, fp)
    assert fp.calls == [], "a refused name must never reach folder_paths"


def test_resolve_refuses_absolute_paths_backslashes_and_other_files(model_dirs):
    tmp, dirs = model_dirs
    fp = FakeFolderPaths(dirs)
    for name in (
        str(tmp / "secret.safetensors"),
        "/etc/passwd",
        "C:\\models\\x.safetensors",
        "C:/x.safetensors",
        "..\\secret.safetensors",
        "sub\\b.safetensors",
        "a.safetensors\x00.txt",
        "",
        "   ",
        "model.ckpt",
        "a.pt",
    ):
        with pytest.raises(errors.RefusedPath):
            routes.resolve_model_file("erasers", name, fp)
    with pytest.raises(errors.RefusedPath):
        routes.resolve_model_file("erasers", None, fp)
    assert fp.calls == []


@pytest.mark.parametrize("folder", ["checkpoints", "../erasers", "", "ERASERS", "custom_nodes"])
def test_resolve_refuses_unknown_folders(model_dirs, folder):
    _, dirs = model_dirs
    fp = FakeFolderPaths(dirs)
    with pytest.raises(errors.RefusedPath, match="Unknown folder"):
        routes.resolve_model_file(folder, "ckpt.safetensors", fp)


def test_resolve_refuses_a_host_answer_outside_the_folder(model_dirs):
    tmp, dirs = model_dirs

    class Escaping(FakeFolderPaths):
        def get_full_path(self, name, filename):
            return str(tmp / "secret.safetensors")

    with pytest.raises(errors.RefusedPath, match="outside"):
        routes.resolve_model_file("erasers", "a.safetensors", Escaping(dirs))


def test_a_symlink_out_of_the_folder_is_refused_but_a_linked_folder_works(model_dirs):
    tmp, dirs = model_dirs
    (dirs["erasers"] / "escape.safetensors").symlink_to(tmp / "secret.safetensors")
    with pytest.raises(errors.RefusedPath, match="outside"):
        routes.resolve_model_file("erasers", "escape.safetensors", FakeFolderPaths(dirs))
    # the whole models/spm folder a link to another disk (a common set-up) keeps working
    elsewhere = tmp / "other_disk" / "spm"
    elsewhere.mkdir(parents=True)
    save_file({"x": torch.zeros(2)}, str(elsewhere / "m.safetensors"))
    dirs["spm"].rmdir()
    dirs["spm"].symlink_to(elsewhere, target_is_directory=True)
    assert routes.resolve_model_file("spm", "m.safetensors", FakeFolderPaths(dirs)).endswith("m.safetensors")


def test_unregistered_folder_is_not_found(model_dirs):
    _, dirs = model_dirs
    fp = FakeFolderPaths({"erasers": dirs["erasers"]})
    with pytest.raises(FileNotFoundError, match="spm"):
        routes.resolve_model_file("spm", "x.safetensors", fp)


# --- header-only reader ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eraser_path(tmp_path_factory):
    compute_eraser = pack_module("erasers.edits.eraser").compute_eraser
    save_eraser = pack_module("erasers.files.eraser_file").save_eraser
    testing = pack_module("erasers_dev.testing")
    Family = pack_module("erasers.files.families").Family
    UCEConfig = pack_module("erasers.edits.uce").UCEConfig
    eraser = compute_eraser(
        UCEConfig(concepts=["Van Gogh", "Monet"], concept_type="art", variant="2023"),
        testing.ToyTextEncoder(),
        testing.layer_weights(Family.SD1),
    )
    return save_eraser(eraser, str(tmp_path_factory.mktemp("erasers") / "vg.safetensors")), eraser


def test_eraser_header_matches_describe_file(eraser_path):
    path, eraser = eraser_path
    info = file_info.describe_header(path)
    full = pack_module("erasers.files.eraser_file").describe_file(path)
    assert info["kind"] == "eraser"
    for key in ("method", "family", "concepts", "layers", "size_bytes", "pack_version", "base_fingerprint"):
        assert info[key] == full[key], key
    assert info["concepts"] == ["Van Gogh", "Monet"]
    assert info["rank"] == full["max_rank"]
    assert info["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def test_reader_never_loads_tensors(eraser_path, tmp_path, monkeypatch):
    """Cut the tensor data off: a header-only reader still describes the file; any tensor load fails."""
    path, _ = eraser_path
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: 8 + header_len + 16])
    import safetensors.torch

    def boom(*args, **kwargs):
        raise AssertionError("tensors were loaded")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(safetensors, "safe_open", boom)
    info = file_info.describe_header(str(cut))
    assert info["concepts"] == ["Van Gogh", "Monet"] and info["kind"] == "eraser"


def test_spm_and_plain_lora_headers(tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    spm = tmp_path / "snoopy.safetensors"
    save_file(
        {f"{stem}.lora_down.weight": torch.zeros(1, 768), f"{stem}.lora_up.weight": torch.zeros(320, 1)},
        str(spm),
        metadata={"prompts": "snoopy, mickey", "rank": "1", "alpha": "1.0"},
    )
    info = file_info.describe_header(str(spm))
    assert (info["kind"], info["method"], info["concepts"], info["family"], info["rank"]) == (
        "spm",
        "spm",
        ["snoopy", "mickey"],
        "sd1",
        1,
    )
    xl = tmp_path / "xl.safetensors"
    save_file(
        {f"{stem}.lora_down.weight": torch.zeros(4, 2048), f"{stem}.lora_up.weight": torch.zeros(640, 4)}, str(xl)
    )
    info = file_info.describe_header(str(xl))
    assert (info["kind"], info["concepts"], info["family"], info["rank"]) == ("lora", [], "sdxl", 4)


def test_reader_refuses_broken_and_foreign_files(tmp_path):
    bad = {
        "tiny.safetensors": b"\x01\x02",
        "huge_header.safetensors": struct.pack("<Q", 10**9) + b"{}",
        "not_json.safetensors": struct.pack("<Q", 4) + b"nope",
        "list.safetensors": struct.pack("<Q", 2) + b"[]",
        "model.pt": b"PK\x03\x04 pickle inside",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(errors.BadEraserFile):
            file_info.describe_header(str(tmp_path / name))


def test_hash_cache_follows_file_changes(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    first = file_info.sha256_short(str(path))
    save_file({"x": torch.ones(3)}, str(path))
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    second = file_info.sha256_short(str(path))
    assert first != second
    assert second == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


# --- presets --------------------------------------------------------------------------------------


def test_presets_from_text_and_json_files(tmp_path, caplog):
    text_dir, json_dir = tmp_path / "txt", tmp_path / "json"
    text_dir.mkdir()
    json_dir.mkdir()
    (text_dir / "nudity.txt").write_text("# SAFREE keywords\nNudity\n\n# more\nSexual Acts\n", encoding="utf-8")
    (json_dir / "a.json").write_text(
        json.dumps(
            {
                "painters": ["Van Gogh", " Monet ", ""],
                "sld": {"concepts": ["an image showing hate, violence"], "description": "SLD default"},
                "nudity": ["duplicate name"],
                "broken": 3,
                "empty": [],
            }
        ),
        encoding="utf-8",
    )
    (json_dir / "b.json").write_text("{not json", encoding="utf-8")
    presets = {p["name"]: p for p in routes.load_presets(text_dir, json_dir)}
    assert presets["nudity"]["concepts"] == ["Nudity", "Sexual Acts"]
    assert presets["nudity"]["description"] == "SAFREE keywords more"
    assert presets["painters"]["concepts"] == ["Van Gogh", "Monet"]
    assert presets["sld"]["description"] == "SLD default"
    assert set(presets) == {"nudity", "painters", "sld"}
    assert "b.json" in caplog.text and "duplicate" not in str(presets["nudity"])


def test_the_repositorys_presets_load():
    presets = routes.load_presets()
    assert presets, "erasers/data/presets/ should ship at least one .txt and one .json preset"
    names = [p["name"] for p in presets]
    assert len(names) == len(set(names))
    assert all(p["concepts"] for p in presets)


def test_any_folder_searches_erasers_spm_loras_in_turn(model_dirs):
    _, dirs = model_dirs
    save_file({"x": torch.zeros(2)}, str(dirs["loras"] / "l.safetensors"))
    save_file({"x": torch.zeros(2)}, str(dirs["spm"] / "a.safetensors"))
    fp = FakeFolderPaths(dirs)
    assert routes.locate_model_file("any", "l.safetensors", fp) == (str(dirs["loras"] / "l.safetensors"), "loras")
    assert routes.locate_model_file("any", "a.safetensors", fp)[1] == "erasers", "erasers comes first"
    with pytest.raises(FileNotFoundError):
        routes.locate_model_file("any", "ckpt.safetensors", fp)  # checkpoints is never searched
    with pytest.raises(errors.RefusedPath):
        routes.locate_model_file("any", "../secret.safetensors", fp)
    assert routes.file_info("any", "l.safetensors", fp)["folder"] == "loras"
