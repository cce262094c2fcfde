"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from selfforcing.errors import SelfForcingError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()

# ``.NAME.PID.RANDOM.tmp[.SUFFIX]``: the writer's process id tells a live write from the
# leftover of a killed one (SIGKILL runs no cleanup, so only the next run can remove it).
_TEMPORARY = re.compile(r"\.(\d+)\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


# Of ``final``'s name, what a temporary's name keeps: with the writer's pid, a random part and
# the suffix it must stay under the file system's 255 bytes, as a 244-character name does.
_NAME_KEPT = 200


def temporary_beside(final: Path, directory: bool = False) -> Path:
    """A new temporary file (or directory) beside ``final``, to be renamed onto it when complete;
    the leftovers of earlier, killed writes of ``final`` are removed first. A place that cannot
    be written is the user's error, named before anything is written."""
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    name = final.name[:_NAME_KEPT]
    suffix = "" if directory or len(final.suffix) > 16 else final.suffix  # kept: writers read the format from it
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, f".{name}.")
        made = make(prefix=f".{name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=final.parent)
    except OSError as e:
        raise SelfForcingError(f"cannot write {final}: {e.strerror or e}; choose another path") from None
    if not directory:
        os.close(made[0])
        made = made[1]
    return Path(made)


def remove_stale_temporaries(directory: Path, prefix: str) -> None:
    """Remove the temporaries named ``prefix...`` in ``directory`` whose writing process is gone."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        match = _TEMPORARY.search(path.name)
        if path.name.startswith(prefix) and match and not _running(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid: leave it be
        pass
    return True


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    A crash or an exception mid-write leaves the previous ``final`` (if any) untouched and
    no half-written file behind; a kill -9 leaves a temporary that the next write of ``final``
    removes.
    """
    final = output_file(Path(final))
    tmp = temporary_beside(final)
    try:
        yield tmp
        if tmp.exists():  # mkstemp creates it 0600; give the result the usual umask-derived mode
            tmp.chmod(0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def output_file(path: Path) -> Path:
    """The file a write of ``path`` replaces: a symlink's target (the link itself stays), and
    only ever a regular file. A device, pipe, socket or directory there is refused by name, not
    replaced (as root, renaming onto /dev/null would replace the system's device)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise SelfForcingError(f"cannot write {path}: it is {kind}; choose another path")
    return path


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output path that cannot be created: its nearest existing
    ancestor must be a writable directory (and the path itself, or a symlink's target, a
    regular file where it exists)."""
    path = output_file(Path(path))
    ancestor = path.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SelfForcingError(f"cannot write {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK):
        raise SelfForcingError(f"cannot write {path}: {ancestor} is not writable; choose another path")


def progress_bar(*args, quiet: bool = False, **kwargs):
    """A tqdm bar on a terminal. Off with ``quiet``, and where stderr is piped or redirected:
    there each redraw would add a copy of the bar to the log instead of replacing it."""
    from tqdm import tqdm

    return tqdm(*args, disable=True if quiet else None, **kwargs)  # None: off unless stderr is a TTY


def synchronize(device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA), so that wall time counts it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_device(name: str):
    """``name`` as a torch device that exists on this machine, or an error saying which do."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise SelfForcingError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SelfForcingError(f"device {name!r} requested but MPS is not available; use cpu")
    count = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and count == 0:
        raise SelfForcingError(f"device {name!r} requested but CUDA is not available; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise SelfForcingError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
    return device
