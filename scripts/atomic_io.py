"""Writing files so that a reader never sees half of one: write aside in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_atomically", "write_atomically"]


def replace_atomically(
    path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp", durable: bool = True
) -> None:
    """Let ``write`` fill a temporary file next to ``path``, then ``os.replace`` it into ``path``.

    An interrupted or failing write leaves ``path`` as it was (absent or the previous version) and no
    temporary file.

    Args:
        path: the file to create or replace; its folder is created if needed.
        write: called with the temporary file's path; writes the whole content there.
        suffix: ending of the temporary name, for writers that choose the format by it (``".tmp.nii.gz"``).
        durable: ``fsync`` before the rename, so the content survives a crash of the machine too. Entries
            that can be recomputed (a cache) may skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the mode any new file of this user gets
        os.chmod(tmp, _new_file_mode())
        if durable:
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _new_file_mode() -> int:
    """0666 less the process umask, as ``open(path, "w")`` would create it."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda tmp: Path(tmp).write_text(text))
