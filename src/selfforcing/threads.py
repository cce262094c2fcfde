"""Intra-op CPU threads: as many as the cores that other work leaves free, re-read as a command runs.

Why (docs/PERFORMANCE.md, "Threads on a shared machine"): torch's OpenMP threads meet at a
barrier after every parallel region. On an idle 2-core machine two threads beat one in the
workloads measured, from the toy stream to the ``mid`` preset (1.3-1.8x). With one core busy
with another program, the thread that shares its core is preempted for whole scheduler slices
while the other waits, and two threads lost to one in every workload, by 1.2x (``mid``) to 3x
(toy frame-wise). So the count follows the load, not the model's size: on the CPU, each stream
or training loop uses the cores that other processes leave free, read from ``/proc/stat`` over
the last half second or more (a change once two such windows agree), and re-read at each chunk
of a stream; a training run keeps the count it starts with. On CUDA and MPS torch's own default
stands (the host threads only launch kernels).

``--threads N`` fixes the count, and so does ``OMP_NUM_THREADS`` where it is set. A thread
count changes what torch computes by float rounding at most (the shipped model's latents: the
same at batch 1, 2e-5 apart at batch 2; a test bounds it), so the policy changes speed, not
what a video shows; fix the count for bit-exact reruns under different loads.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Iterator, NamedTuple

# A window shorter than this reads too few of /proc/stat's 10 ms ticks to tell a light load
# (the server at a third of a core that made two threads 8x slower on the machine) from
# none: each reading is off by up to a tick a core, 0.04 of a core over half a second.
MIN_WINDOW_S = 0.5
# A window longer than this (a server between viewers) no longer says what the load is now.
MAX_WINDOW_S = 10.0
# Other work of less than this many cores (the machine's daemons: about 0.01) takes no core.
TOLERANCE_CORES = 0.2


_clock = time.monotonic


class _Usage(NamedTuple):
    wall_s: float
    busy_s: float  # CPU time of the cores this process may run on, all their programs
    own_s: float  # CPU time of this process (all its threads) and of its children


def _cores() -> set[int] | None:
    """The cores this process may run on (its affinity); None where the OS does not say."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _usage(cores: set[int] | None) -> _Usage | None:
    """CPU time now, of ``cores`` (``/proc/stat``'s per-core lines) and of this process; None
    where ``/proc/stat`` is not there."""
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu"):
                    break
                if name != "cpu" and (cores is None or int(name[3:]) in cores):
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                    busy += user + nice + system + irq + softirq + steal  # guest time is within user
    except (OSError, ValueError):
        return None
    return _Usage(_clock(), busy / os.sysconf("SC_CLK_TCK"), _own_cpu_s())


def _own_cpu_s() -> float:
    """CPU time of this process, its ended children and its running ones (the mp4 writer's
    ffmpeg is this command's work, not another program's), in clock ticks as ``/proc/stat``
    counts: against its ticks, ``time.process_time`` read up to 0.15 of a core of noise over
    quarter-second windows on an idle machine; these readings, under 0.02 in the windows measured."""
    total = _process_ticks("self")
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        total += sum(_process_ticks(pid) for pid in children)
    return total / os.sysconf("SC_CLK_TCK")


def _process_ticks(pid: str) -> int:
    """utime + stime + cutime + cstime of ``/proc/PID/stat`` (0 for a process gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


def free_cores(before: _Usage, after: _Usage, cores: int) -> int:
    """Of ``cores``, those other programs left free between two readings (at least one): a
    core counts as taken once others used more than ``TOLERANCE_CORES`` of one on average."""
    wall = after.wall_s - before.wall_s
    others = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / wall
    taken = max(0, math.ceil(others - TOLERANCE_CORES))
    return max(1, cores - taken)


class ThreadPolicy:
    """The thread count of this process's CPU work: ``requested`` (``--threads``), else
    ``OMP_NUM_THREADS``, else the cores other programs leave free (never more than torch's own
    default, which leaves out hyper-threads), shared by the streams running at once."""

    def __init__(self, requested: int | None = None):
        self.fixed = requested if requested is not None else env_threads()
        self._cores = _cores()
        self._lock = threading.Lock()
        self._since = _usage(self._cores)
        self._free: int | None = None  # none read yet
        self._pending: int | None = None  # a change one window has read
        self._streams = 0
        self.torch_default: int | None = None  # torch's count before this policy first set one
        if requested is not None:
            self._set(requested)

    def adapt(self, device) -> int | None:
        """At a chunk or step boundary: re-read the load if a window has passed, and set the
        calling thread's count (torch keeps one per thread). The count set, or None."""
        if self.fixed is not None or device.type != "cpu" or self._since is None:
            return None
        with self._lock:
            window = _clock() - self._since.wall_s
            now = _usage(self._cores) if window >= MIN_WINDOW_S else None  # /proc read twice a second at most
            if now is not None and window > MAX_WINDOW_S:
                self._since = now  # stale: read afresh from here
            elif now is not None:
                self._read(free_cores(self._since, now, self._capacity()))
                self._since = now
            if self._free is None:
                return None  # torch's count stands until a window is read
            threads = max(1, self._free // max(1, self._streams))
        self._set(threads)
        return threads

    def _read(self, free: int) -> None:
        """A window's free cores: the first taken as read, a change once two windows in a row
        agree on it (one window's change may be a burst, or a tick's noise, and every change
        costs torch a new thread team)."""
        if self._free is None or free == self._pending:
            self._free = free
        self._pending = free if free != self._free else None

    def _capacity(self) -> int:
        import torch

        default = self.torch_default or torch.get_num_threads()
        return min(default, len(self._cores)) if self._cores else default

    def _set(self, threads: int) -> None:
        import torch

        current = torch.get_num_threads()
        if self.torch_default is None:
            self.torch_default = current
        if current != threads:
            torch.set_num_threads(threads)

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """While a stream runs: streams running side by side (the server's) share the free cores."""
        with self._lock:
            self._streams += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1


def env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


_policy: ThreadPolicy | None = None  # set by policy(); library use without it keeps torch's default


@contextlib.contextmanager
def policy(requested: int | None = None) -> Iterator[ThreadPolicy]:
    """The policy for the block (a command: its first window is its loading), then torch's
    thread count and the policy as they were before it."""
    global _policy
    before = _policy
    _policy = ThreadPolicy(requested)
    try:
        yield _policy
    finally:
        if _policy.torch_default is not None:
            import torch

            torch.set_num_threads(_policy.torch_default)
        _policy = before


def settle(device, recorded: int | None = None) -> int | None:
    """The count of CPU work that must repeat bit for bit (a training run, which its resumes
    repeat): ``recorded`` by the run being resumed, else the policy's now, to be kept for the
    whole run (``--threads`` and ``OMP_NUM_THREADS`` still win). The count in use on the CPU,
    None on another device (where it does not touch the results)."""
    import torch

    if device.type != "cpu":
        return None
    if _policy is not None and _policy.fixed is None:
        if recorded is None:
            _policy.adapt(device)
        else:
            _policy._set(recorded)
    return torch.get_num_threads()


def adapt(device) -> int | None:
    """``ThreadPolicy.adapt`` of the configured policy; nothing where none is configured."""
    return None if _policy is None else _policy.adapt(device)


@contextlib.contextmanager
def stream() -> Iterator[None]:
    """``ThreadPolicy.stream`` of the configured policy."""
    with _policy.stream() if _policy is not None else contextlib.nullcontext():
        yield
