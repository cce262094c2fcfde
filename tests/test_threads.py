"""The thread policy: the cores other work leaves free, read from the machine's load; fixed by
--threads or OMP_NUM_THREADS; shared by streams side by side; never a change to the output."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfforcing import threads
from selfforcing.cli import DEFAULT_MODEL, main
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.threads import ThreadPolicy, _Usage, free_cores

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def usage(wall: float, others: float, own: float = 0.0) -> _Usage:
    """A reading after ``wall`` seconds in which other programs used ``others`` cores."""
    return _Usage(wall, (others + own) * wall, own * wall)


@pytest.mark.parametrize("others,cores,free", [
    (0.0, 2, 2), (0.05, 2, 2), (0.15, 2, 2),  # the machine's daemons, or a tick's noise, take no core
    (0.33, 2, 1), (1.0, 2, 1),  # a light load (a server at a third of a core) takes one, as does a busy loop
    (1.5, 4, 2), (3.9, 4, 1), (7.0, 4, 1),  # at least one is left
])
def test_a_core_is_taken_once_others_use_a_fifth_of_it(others, cores, free):
    assert free_cores(usage(0.0, 0.0), usage(1.0, others, own=1.7), cores) == free


@pytest.fixture(autouse=True)
def torch_threads_as_they_were():
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


@pytest.fixture
def machine(monkeypatch):
    """A machine whose clock and load the test sets: ``advance(seconds, others)`` lets the time
    pass with other programs using ``others`` cores (this process's own time stays out)."""
    state = {"wall": 0.0, "busy": 0.0}

    def advance(seconds: float, others: float = 0.0) -> None:
        state["wall"] += seconds
        state["busy"] += others * seconds

    monkeypatch.setattr(threads, "_clock", lambda: state["wall"])
    monkeypatch.setattr(threads, "_usage", lambda cores: _Usage(state["wall"], state["busy"], 0.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return advance


def test_the_policy_follows_the_load_once_two_windows_agree(machine, monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: {0, 1})
    torch.set_num_threads(2)
    policy = ThreadPolicy()
    machine(0.1)  # too short a window to read a light load: torch's count stands
    assert policy.adapt(CPU) is None and torch.get_num_threads() == 2
    machine(0.5, others=1.0)  # the first window read is taken as it is
    assert policy.adapt(CPU) == 1 and torch.get_num_threads() == 1
    machine(0.5)  # one idle window may be a lull: kept at one thread
    assert policy.adapt(CPU) == 1
    machine(0.5, others=1.0)
    assert policy.adapt(CPU) == 1
    machine(0.5)
    assert policy.adapt(CPU) == 1
    machine(0.5)  # two idle windows in a row: both cores
    assert policy.adapt(CPU) == 2 and torch.get_num_threads() == 2
    machine(20.0)  # a stale window (a server between viewers) is read afresh
    assert policy.adapt(CPU) == 2
    machine(0.6, others=1.0)
    assert policy.adapt(CPU) == 2
    machine(0.6, others=1.0)
    assert policy.adapt(CPU) == 1


def test_streams_side_by_side_share_the_free_cores(machine, monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: {0, 1, 2, 3})
    torch.set_num_threads(4)
    policy = ThreadPolicy()
    machine(1.0)
    with policy.stream():
        assert policy.adapt(CPU) == 4
        with policy.stream():
            assert policy.adapt(CPU) == 2
    assert policy.adapt(CPU) == 4


def test_never_more_threads_than_torchs_default_which_leaves_out_hyper_threads(machine, monkeypatch):
    monkeypatch.setattr(threads, "_cores", lambda: set(range(8)))  # 4 cores, 8 hyper-threads
    torch.set_num_threads(4)
    policy = ThreadPolicy()
    machine(1.0, others=0.5)
    assert policy.adapt(CPU) == 3


def test_threads_and_omp_num_threads_fix_the_count_and_the_gpu_keeps_torchs(machine, monkeypatch):
    fixed = ThreadPolicy(requested=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from_env = ThreadPolicy()
    monkeypatch.delenv("OMP_NUM_THREADS")
    gpu = ThreadPolicy()
    machine(1.0, others=1.0)
    assert fixed.adapt(CPU) is None and torch.get_num_threads() == 1
    assert from_env.adapt(CPU) is None and gpu.adapt(CUDA) is None


def test_a_command_runs_under_its_policy_and_leaves_torch_as_it_found_it(tmp_path, monkeypatch):
    seen = []
    stream = StreamingPipeline.stream

    def recording(self, *args, **kwargs):
        for chunk in stream(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            yield chunk

    monkeypatch.setattr(StreamingPipeline, "stream", recording)
    torch.set_num_threads(2)
    outer = threads._policy  # the test suite's own
    assert main(["generate", "a red circle bouncing on a dark blue background", "-o", str(tmp_path / "a.mp4"),
                 "--frames", "6", "--quiet", "--threads", "1"]) == 0
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    assert threads._policy is outer


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads the load from /proc/stat (Linux)")
def test_a_busy_core_read_from_the_machine_leaves_the_others(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # Another program's busy loop, not this process's child (a child's time is this command's own work).
    pid = int(subprocess.check_output(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"]))
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # torch's default here: one a core
    try:
        time.sleep(0.3)  # let it start
        policy = ThreadPolicy()
        time.sleep(0.5)
        assert policy.adapt(CPU) <= max(1, cores - 1)  # less where other programs run too
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_thread_count_changes_a_stream_by_rounding_at_most(batch):
    """The policy may change the count mid-stream: the shipped model streams the same latents, to
    float32 rounding (on the development machine: identical at batch 1, 2e-5 apart at batch 2)."""
    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL)
    latents = {}
    for count in (1, 2):
        torch.set_num_threads(count)
        latents[count] = torch.cat([c.latents for c in pipe.stream(["a red circle moving left"] * batch, 12)], dim=2)
    torch.testing.assert_close(latents[1], latents[2], rtol=0, atol=1e-4)
