"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import glob
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from selfforcing.errors import SelfForcingError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()

# A write of ``NAME`` goes to ``.NAME.RANDOM.tmp[.SUFFIX]`` (a file, or a directory), owned by
# ``.NAME.RANDOM.lock``: the writer holds an exclusive flock on that file from before the temporary
# exists until after it is renamed or removed. The kernel drops the lock when the writer dies, however
# it dies (SIGKILL runs no cleanup), so a lock that can be taken marks a leftover, and one that cannot
# a live write, whichever PID namespace, container or host (NFS passes flock on) the writer runs in.
_RANDOM = r"[0-9a-f]{8}"


# Of ``final``'s name, what a temporary's name keeps: with the random part and the suffix it must
# stay under the file system's 255 bytes, as a 244-character name does.
_NAME_KEPT = 200


def _open_locked(path: Path, flags: int) -> int | None:
    """Open ``path`` (``os.open`` ``flags``, read-write) and take an exclusive flock on it without
    waiting: the descriptor; None if its holder removed the file in the instant before our lock
    (open it afresh). ``BlockingIOError`` if another process holds it. On a file system without
    locks the descriptor comes back unlocked: nobody else can take a lock there either."""
    fd = os.open(path, flags | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK and kin: no locks here
        return fd
    if _same_file(path, fd):
        return fd
    os.close(fd)
    return None


def _new_lock(directory: Path, prefix: str) -> tuple[str, int]:
    """Create and lock ``prefix + RANDOM + ".lock"`` in ``directory``; return ``prefix + RANDOM`` and the
    descriptor holding the lock."""
    while True:
        stem = prefix + secrets.token_hex(4)
        try:
            fd = _open_locked(directory / f"{stem}.lock", os.O_CREAT | os.O_EXCL)
        except (FileExistsError, BlockingIOError):  # the name is taken, or a cleaner looks at it: another name
            continue
        if fd is not None:
            return stem, fd


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if it is held, or locks are unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: another writer's; ENOLCK and kin: cannot tell, so treat it as held
        return False
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def temporary_beside(final: Path, directory: bool = False) -> Iterator[Path]:
    """A new temporary file (or directory) beside ``final``, live for the ``with`` block and removed
    after it unless renamed onto ``final`` inside it; the leftovers of earlier, killed writes of
    ``final`` are removed first. A place that cannot be written is the user's error, named before
    anything is written."""
    name = final.name[:_NAME_KEPT]
    suffix = "" if directory or len(final.suffix) > 16 else final.suffix  # kept: writers read the format from it
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, re.escape(name))
        stem, lock_fd = _new_lock(final.parent, f".{name}.")
    except OSError as e:
        raise SelfForcingError(f"cannot write {final}: {e.strerror or e}; choose another path") from None
    path = final.parent / f"{stem}.tmp{suffix}"
    try:
        try:
            if directory:
                path.mkdir(mode=0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            raise SelfForcingError(f"cannot write {final}: {e.strerror or e}; choose another path") from None
        yield path
    finally:  # what is left of the temporary, then its lock: a leftover is never unowned
        _remove(path)
        (final.parent / f"{stem}.lock").unlink(missing_ok=True)
        os.close(lock_fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(directory: Path, names: str) -> None:
    """Remove the temporaries in ``directory`` of the final paths whose names match the regular
    expression ``names``, where no live writer holds their lock."""
    if not directory.is_dir():
        return
    lock_name = re.compile(rf"\.(?:{names})\.{_RANDOM}\.lock")
    for lock in directory.iterdir():
        if lock_name.fullmatch(lock.name):
            _remove_if_unowned(lock)


def _remove_if_unowned(lock: Path) -> None:
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:  # gone already (its writer finished), or not ours to open
        return
    try:
        if _try_lock(fd) and _same_file(lock, fd):
            stem = lock.name.removesuffix(".lock")
            for temporary in lock.parent.glob(glob.escape(stem) + ".tmp*"):
                _remove(temporary)
            lock.unlink(missing_ok=True)  # last, while still locked: a leftover is never unowned
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made for the block, removed after it); raise
    ``SelfForcingError(busy)`` at once if another process holds it (two runs writing one place)."""
    fd = None
    while fd is None:
        try:
            fd = _open_locked(path, os.O_CREAT)
        except BlockingIOError:
            raise SelfForcingError(busy) from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so a waiting opener sees a removed file
        os.close(fd)


class _Staging:
    """A :func:`replaced_together` block: the folder its files go to, where they wait, and which."""

    def __init__(self, directory: Path, staging: Path):
        self.directory, self.staging = directory, staging
        self.written: dict[Path, None] = {}  # final paths, in the order their writes completed


_STAGING: contextvars.ContextVar[_Staging | None] = contextvars.ContextVar("staging", default=None)


@contextlib.contextmanager
def atomic_path(final: str | Path, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.
    A symlink at ``final`` is written through and anything but a regular file refused (see
    :func:`output_file`); but a file the program ``owned`` (a pointer in its own folder) replaces
    whatever is there, so that a link planted there is never written through.

    A crash or an exception mid-write leaves the previous ``final`` (if any) untouched and
    no half-written file behind; a kill -9 leaves a temporary that the next write of ``final``
    removes. Inside :func:`replaced_together` the rename waits for the end of that block.
    """
    final = Path(final) if owned else output_file(Path(final))
    group = _STAGING.get()
    if group is not None and final.parent.resolve() == group.directory:
        staged = group.staging / final.name
        try:
            yield staged
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        group.written[final] = None
        return
    with temporary_beside(final) as tmp:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)  # made 0600; give the result the mode a plain write would
        os.replace(tmp, final)


@contextlib.contextmanager
def replaced_together(directory: str | Path) -> Iterator[None]:
    """Files written into ``directory`` with :func:`atomic_path` inside the block replace what
    is there together at its end, once every one is complete (an evaluation report, a latent cache
    and its index): an error or a signal before then leaves every earlier file as it was, never a
    mix of two runs. They wait in one temporary folder beside ``directory``."""
    directory = Path(directory).resolve()  # the real place: a rename cannot cross file systems
    with temporary_beside(directory, directory=True) as staging:
        group = _Staging(directory, staging)
        token = _STAGING.set(group)
        try:
            yield
        finally:
            _STAGING.reset(token)
        directory.mkdir(parents=True, exist_ok=True)
        with _signals_deferred():  # Ctrl-C or SIGTERM between two renames would leave a mix
            for final in group.written:
                staged = staging / final.name
                staged.chmod(0o666 & ~_UMASK)
                os.replace(staged, final)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving in the block take effect right after it."""
    if threading.current_thread() is not threading.main_thread():  # Python runs handlers in the main thread only
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


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
