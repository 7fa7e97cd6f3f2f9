"""erasers/files/writing.py: outputs never replace an input or an existing file unasked, never half-written."""

import os

import pytest
import torch

from erasers.errors import RefusedPath
from erasers.files.writing import atomic_write, atomic_write_text, save_safetensors_atomic


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_existing_file_kept_unless_overwrite(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RefusedPath, match="already exists"):
        atomic_write_text(str(path), "new")
    assert path.read_text() == "old"
    atomic_write_text(str(path), "new", overwrite=True)
    assert path.read_text() == "new" and leftovers(tmp_path) == []


def test_input_is_never_the_output_even_with_overwrite(tmp_path):
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights")
    link = tmp_path / "alias.safetensors"
    link.symlink_to(source)
    hard = tmp_path / "hard.safetensors"
    os.link(source, hard)
    for target in (source, link, hard, tmp_path / "sub" / ".." / "model.safetensors"):
        with pytest.raises(RefusedPath, match="is the input file"):
            atomic_write_text(str(target), "x", overwrite=True, inputs=[str(source)])
    assert source.read_bytes() == b"weights"


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_changes_nothing(tmp_path, exc):
    """Killed while writing (an exception, Ctrl-C): the old file is intact and no temporary file is left."""
    path = tmp_path / "e.safetensors"
    save_safetensors_atomic({"w": torch.ones(3)}, str(path))
    before = path.read_bytes()

    def half_then_fail(tmp):
        with open(tmp, "wb") as out:
            out.write(before[: len(before) // 2])
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(str(path), half_then_fail, overwrite=True)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_folder_is_not_a_file_name(tmp_path):
    with pytest.raises(RefusedPath, match="is a folder"):
        atomic_write_text(str(tmp_path), "x", overwrite=True)


def test_atomic_write_gives_the_mode_a_plain_open_would_and_keeps_a_replaced_files_mode(tmp_path):
    """mkstemp's private 0600 must not leak into the result: a host running as another user reads it."""
    import os
    import stat

    from erasers.files.writing import atomic_write_text

    old = os.umask(0o022)
    try:
        fresh = atomic_write_text(str(tmp_path / "new.json"), "{}")
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        os.chmod(kept, 0o640)
        atomic_write_text(str(kept), "new", overwrite=True)
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(old)
