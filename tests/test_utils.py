"""Atomic writes (all or nothing, with the mode a plain write would give, no leftovers of killed
writes), output paths and devices checked before any work."""

import io
import os
import stat
import sys

import pytest

from factories import Terminal, killed_write
from selfforcing.errors import SelfForcingError
from selfforcing.utils import (
    atomic_path,
    check_writable,
    progress_bar,
    replaced_together,
    temporary_beside,
    torch_device,
)


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


def test_a_write_removes_the_temporaries_of_killed_writes_and_keeps_live_ones(tmp_path):
    stale_file = killed_write(tmp_path / "out.txt")
    assert stale_file.read_bytes() == b"half"
    stale_dir = killed_write(tmp_path / "out.txt", directory=True)  # whose start removed the killed file write's
    assert not stale_file.exists() and (stale_dir / "student.safetensors").is_file()
    other = killed_write(tmp_path / "other.txt")  # not this output's: left to its own next write
    with temporary_beside(tmp_path / "out.txt") as live:  # another write, still going: its lock is held
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("done")
        left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([live.name, live.name.replace(".tmp.txt", ".lock"), other.name,
                           other.name.replace(".tmp.txt", ".lock"), "out.txt"])
    assert not live.exists()  # the end of a write removes its temporary and its lock


def test_an_unwritable_place_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SelfForcingError, match="cannot write .*afile/out.txt"):
        with atomic_path(tmp_path / "afile" / "out.txt"):
            pass
    with pytest.raises(SelfForcingError, match="afile is a file, not a directory"):
        check_writable(tmp_path / "afile" / "sub" / "out.txt")
    check_writable(tmp_path / "new" / "dir" / "out.txt")  # missing directories are fine: they will be made
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name,message", [("gpu", "unknown device 'gpu'"), ("meta", "unknown device 'meta'"),
                                          ("cuda:99", "cuda:99")])
def test_devices_must_exist(name, message):
    with pytest.raises(SelfForcingError, match=message):
        torch_device(name)
    assert torch_device("cpu").type == "cpu"


@pytest.mark.parametrize("terminal,quiet,shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bars_draw_on_a_terminal_only(monkeypatch, terminal, quiet, shown):
    """A pipe or a log file gets no bar: each redraw would add a copy of it there."""
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(total=3, desc="work", quiet=quiet) as bar:
        for _ in range(3):
            bar.update(1)
    assert ("work" in err.getvalue()) == shown and ("3/3" in err.getvalue()) == shown


def test_a_symlinked_output_is_written_through_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_not_a_regular_file_is_refused_not_replaced(tmp_path, kind):
    """As root, renaming onto /dev/null would replace the system's device with a text file."""
    special = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(special)
    elif os.geteuid() == 0:
        os.mknod(special, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    else:
        pytest.skip("making a device file needs root")
    mode = special.lstat().st_mode
    with pytest.raises(SelfForcingError, match="special: it is not a regular file"):
        check_writable(special)
    with pytest.raises(SelfForcingError, match="not a regular file"), atomic_path(special) as tmp:
        tmp.write_text("never")
    from selfforcing.cli import main

    assert main(["data", "toy-prompts", "--out", str(special), "--n", "3"]) == 2
    assert special.lstat().st_mode == mode and os.listdir(tmp_path) == ["special"]


def test_a_long_file_name_the_file_system_takes_is_written(tmp_path):
    final = tmp_path / ("v" * 240 + ".mp4")  # 244 characters: the temporary's name must stay under 255
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole" and os.listdir(tmp_path) == [final.name]


def test_files_replaced_together_replace_nothing_until_all_are_complete(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    for name in ("results.json", "plot.png", "mine.txt"):
        (report / name).write_text(f"old {name}")
    with pytest.raises(KeyboardInterrupt), replaced_together(report):
        with atomic_path(report / "results.json") as tmp:
            tmp.write_text("new results")
        assert (report / "results.json").read_text() == "old results.json"  # waits for the rest
        raise KeyboardInterrupt  # stopped before the plot
    assert {p.name: p.read_text() for p in report.iterdir()} == {n: f"old {n}" for n in ("results.json", "plot.png",
                                                                                        "mine.txt")}
    with replaced_together(report):
        for name in ("results.json", "plot.png"):
            with atomic_path(report / name) as tmp:
                tmp.write_text(f"new {name}")
        with atomic_path(tmp_path / "elsewhere.txt") as tmp:  # outside the folder: written at once
            tmp.write_text("now")
        assert (tmp_path / "elsewhere.txt").exists() and (report / "plot.png").read_text() == "old plot.png"
    assert {p.name: p.read_text() for p in report.iterdir()} == {
        "results.json": "new results.json", "plot.png": "new plot.png", "mine.txt": "old mine.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "report"]
