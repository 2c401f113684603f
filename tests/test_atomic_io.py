"""Atomic writes: a failed write leaves the old file and no temporary file behind."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.atomic_io import replace_atomically, write_atomically


def test_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_atomically(path, "old")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "entry.npy"
    replace_atomically(path, lambda tmp: np.save(tmp, np.arange(3.0)), suffix=".tmp.npy", durable=False)

    def fail_halfway(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise error

    with pytest.raises(type(error)):
        replace_atomically(path, fail_halfway, suffix=".tmp.npy")
    np.testing.assert_array_equal(np.load(path), np.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["entry.npy"]


def test_written_files_get_the_mode_of_a_new_file(tmp_path):
    """Not mkstemp's owner-only 0600: a released or shared output must be readable like any new file."""
    (tmp_path / "new").write_text("")
    write_atomically(tmp_path / "summary.json", "{}")
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == (tmp_path / "new").stat().st_mode & 0o777
