"""Writing files without losing any: never the input, never an existing file unasked, never half a file.

A safety tool's output is often written next to the model it came from; a typo in ``--out`` must not
replace the checkpoint, and a crash (or Ctrl-C) while writing must leave either the old file or the new
one, never a truncated mix. So every writer in the pack goes through ``atomic_write``: checks first,
then a temporary file in the same folder, flushed to disk, then ``os.replace`` (atomic on POSIX and
Windows when both are on one volume).
"""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable, Iterable, Optional

from ..errors import RefusedPath


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name one file (symlinks, relative paths and hard links included)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: str, inputs: Iterable[Optional[str]] = (), overwrite: bool = False) -> None:
    """Refuse ``path`` when it is one of ``inputs``, or exists and ``overwrite`` is off (RefusedPath)."""
    for source in inputs:
        if source and os.path.exists(source) and same_file(path, source):
            raise RefusedPath(
                f"The output '{path}' is the input file '{source}'. The pack never writes over its input; "
                f"choose another output name."
            )
    if os.path.isdir(path):
        raise RefusedPath(f"The output '{path}' is a folder; give a file name.")
    if os.path.exists(path) and not overwrite:
        raise RefusedPath(
            f"'{path}' already exists and was left as it is. Choose another name, or ask to replace it "
            f"(CLI: --force; Python: overwrite=True; ComfyUI: the node's overwrite switch)."
        )


def _mode_for(path: str) -> int:
    """The replaced file's permission bits, else 0666 less the process umask (what ``open(path, "w")`` gives)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)  # the only portable way to read it
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(
    path: str, write: Callable[[str], None], inputs: Iterable[Optional[str]] = (), overwrite: bool = False
) -> str:
    """Call ``write(temporary_path)`` and move the result onto ``path`` in one step; returns ``path``.

    Nothing at ``path`` changes unless ``write`` finishes; the temporary file is removed on any failure.
    """
    check_output_path(path, inputs, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the result must get the mode any new file gets here
        # (or the replaced file's), or a ComfyUI/A1111 running as another user could not read it
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb+") as flushed:
            os.fsync(flushed.fileno())
        # re-checked just before the move: another process may have created the file meanwhile
        check_output_path(path, inputs, overwrite)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str, text: str, overwrite: bool = False, inputs: Iterable[Optional[str]] = ()) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)

    return atomic_write(path, write, inputs, overwrite)


def save_safetensors_atomic(
    tensors: dict,
    path: str,
    metadata: Optional[dict] = None,
    overwrite: bool = False,
    inputs: Iterable[Optional[str]] = (),
) -> str:
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), inputs, overwrite)
