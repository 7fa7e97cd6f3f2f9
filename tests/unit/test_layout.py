"""The layout the README draws: a host-free core, one import mode per adapter, dev parts off host paths."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: what the core must never import (at module level or lazily inside a function)
HOSTS = (
    "comfy",
    "comfy_api",
    "comfy_extras",
    "folder_paths",
    "server",
    "nodes",
    "modules",
    "gradio",
    "launch",
    "diffusers",
    "transformers",
    "erasers_diffusers",
    "erasers_dev",
    "a1111_erasers",
)
#: what the ComfyUI / A1111 adapters must never import: the parts their installs do not need
NOT_ON_HOST_PATH = ("erasers_dev", "erasers_diffusers", "diffusers", "transformers")


def imports_of(path: Path):
    """(absolute module name or None, level, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield node.module, node.level, node.lineno


def python_files(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def core_files():
    # __main__ is the command's entry point (python -m erasers), never imported by a host: it hands over
    # to erasers_diffusers.cli inside its `if __name__ == "__main__"` guard
    return [p for p in python_files("erasers") if p.name != "__main__.py"]


def test_core_imports_no_host_statically():
    found = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in core_files()
        for name, level, line in imports_of(p)
        if level == 0 and name and name.split(".")[0] in HOSTS
    ]
    assert not found, "the core (erasers/) must stay host-free:\n" + "\n".join(found)


def test_core_imports_no_host_at_run_time():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in core_files()]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HOSTS!r})\n"
        "print(','.join(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing the core loaded host modules: {done.stdout.strip()}"


@pytest.mark.parametrize("folder", ["nodes", "a1111_erasers", "scripts"])
def test_host_adapters_do_not_import_dev_or_diffusers_parts(folder):
    files = python_files(folder) + ([ROOT / "__init__.py", ROOT / "preload.py"] if folder == "nodes" else [])
    found = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in files
        for name, level, line in imports_of(p)
        if level == 0 and name and name.split(".")[0] in NOT_ON_HOST_PATH
    ]
    assert not found, "\n".join(found)


def test_nodes_import_the_core_one_way_only():
    """Inside ComfyUI the pack is a package: nodes/ reach the core as ``..erasers`` and never fall back to a
    top-level ``erasers`` (two import modes would mean two class identities)."""
    found = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in python_files("nodes")
        for name, level, line in imports_of(p)
        if level == 0 and name and name.split(".")[0] == "erasers"
    ]
    assert not found, "absolute erasers imports in nodes/: " + ", ".join(found)


def test_one_presets_home():
    assert not (ROOT / "presets").exists(), "presets live in erasers/data/presets/ only"
    home = ROOT / "erasers" / "data" / "presets"
    assert list(home.glob("*.txt")) and list(home.glob("*.json"))


def test_requirements_txt_is_generated_from_pyproject():
    done = subprocess.run(
        [sys.executable, "tools/sync_requirements.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_every_declared_dependency_is_imported():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_") for d in deps}
    imported = {name.split(".")[0] for p in core_files() for name, level, _ in imports_of(p) if level == 0 and name}
    assert names <= imported, f"declared but never imported by the core: {sorted(names - imported)}"


def test_model_folders_use_the_hosts_public_call():
    """register_model_folders goes through folder_paths.add_model_folder_path: an extra_model_paths.yaml entry
    is extended (its paths kept, first), a missing folder is added, and only .safetensors are listed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pack_folders", ROOT / "nodes" / "folders.py")
    folders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(folders)

    class FolderPaths:  # the semantics of ComfyUI's folder_paths.add_model_folder_path (v0.3.64 and v0.29)
        def __init__(self, models_dir):
            self.models_dir = models_dir
            self.folder_names_and_paths = {"erasers": (["/yaml/erasers"], set())}
            self.calls = []

        def add_model_folder_path(self, name, path, is_default=False):
            self.calls.append(name)
            if name in self.folder_names_and_paths:
                paths = self.folder_names_and_paths[name][0]
                if path not in paths:
                    paths.append(path)
            else:
                self.folder_names_and_paths[name] = ([path], set())

    import tempfile

    with tempfile.TemporaryDirectory() as models:
        fp = FolderPaths(models)
        folders.register_model_folders(fp)
        folders.register_model_folders(fp)
        assert fp.calls == ["erasers", "spm"] * 2
        assert fp.folder_names_and_paths["erasers"][0] == ["/yaml/erasers", str(Path(models) / "erasers")]
        assert fp.folder_names_and_paths["spm"] == ([str(Path(models) / "spm")], {".safetensors"})
        assert fp.folder_names_and_paths["erasers"][1] == {".safetensors"}
