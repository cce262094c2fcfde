"""Atomic writes: all or nothing, with the mode a plain write would give."""

import os
import stat

import pytest

from selfforcing.utils import atomic_path


def test_atomic_write_replaces_only_on_success_with_the_umask_mode(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
