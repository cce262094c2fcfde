"""Intra-op threads on a CPU: each workload at each thread count, on an idle machine and with
other work on some of its cores (busy loops this script starts and stops).

Workloads, each as the product runs it:

- ``toy stream``: the shipped default model streaming the README's prompt, 21 latent frames
  chunk-wise (what ``generate`` and each ``serve`` viewer run; mp4 writing excluded);
- ``toy frame-wise``: the toy preset, one latent frame per chunk (``bench --preset toy``);
- ``toy eval``: the shipped model, a batch of 8 videos of 12 frames (``eval``'s batch);
- ``toy training``: one Self Forcing + DMD iteration of the toy preset (``bench --training``);
- ``mid stream``: the ``mid`` preset, DiT only, 9 latent frames chunk-wise (``bench --preset mid``).

Run: ``python benchmarks/threads.py [--repeats 3] [--threads 1 2 policy] [--busy 0 0.33 1]`` (figures
and the rule chosen from them in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfforcing import threads
from selfforcing.bench import bench_one, random_pipeline, seconds_per_iteration, toy_trainer
from selfforcing.cli import DEFAULT_MODEL
from selfforcing.inference.pipeline import StreamingPipeline

PROMPT = "a red circle bouncing on a dark blue background"
CPU = torch.device("cpu")
TORCH_DEFAULT = torch.get_num_threads()  # the policy never exceeds it: each policy row starts from it


# Spins for ``share`` of every 30 ms and sleeps the rest: a program using that share of a core.
SPINNER = """
import sys, time
share = float(sys.argv[1])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.03 * share:
        pass
    time.sleep(0.03 * (1 - share))
"""


@contextlib.contextmanager
def busy_cores(load: float):
    """Other programs using ``load`` cores (a whole one each, then the fraction left) for as
    long as the block runs."""
    shares = [1.0] * int(load) + ([load % 1] if load % 1 else [])
    # Started through sh, so that they are not this process's children, whose time the thread
    # policy counts as this command's own work.
    pids = [int(subprocess.check_output(["sh", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(SPINNER)} "
                                         f"{share} >/dev/null 2>&1 & echo $!"])) for share in shares]
    try:
        time.sleep(0.5 if pids else 0)  # let them start
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def thread_count(count: str):
    """``count`` threads, or ``policy``: the commands' own choice, which each stream re-reads
    at its chunks and a training run settles at its start, after a first reading of the load."""
    if count != "policy":
        torch.set_num_threads(int(count))
        yield
        return
    torch.set_num_threads(TORCH_DEFAULT)  # not the count a row before left
    with threads.policy():
        time.sleep(2 * threads.MIN_WINDOW_S)
        threads.settle(CPU)
        yield


def toy_stream(repeats: int) -> str:
    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL, device=CPU)
    pipe.early_first_frame = True  # as generate streams
    timing = bench_one(pipe, pipe.sampling.kv_cache_frames, repeats)
    return f"{timing.fps:.1f} FPS, {timing.first_frame_s:.3f} s"


def toy_framewise(repeats: int) -> str:
    timing = bench_one(random_pipeline("toy", 1, CPU), 21, repeats)
    return f"{timing.fps:.1f} FPS, {timing.first_frame_s:.3f} s"


def toy_eval(repeats: int) -> str:
    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL, device=CPU)
    pipe.generate([PROMPT] * 8, 12)  # warm-up
    rates = []
    for seed in range(repeats):
        start = time.perf_counter()
        pipe.generate([PROMPT] * 8, 12, seed=seed)
        rates.append(8 * 12 / (time.perf_counter() - start))
    return f"{statistics.median(rates):.1f} frames/s"


def toy_training(repeats: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        seconds = seconds_per_iteration(toy_trainer("self_forcing", Path(tmp), CPU), repeats)
    return f"{seconds:.3f} s/it"


def mid_stream(repeats: int) -> str:
    timing = bench_one(random_pipeline("mid", 3, CPU), 9, repeats)
    return f"{timing.fps:.2f} FPS, {timing.first_frame_s:.3f} s"


WORKLOADS = {"toy stream": toy_stream, "toy frame-wise": toy_framewise, "toy eval": toy_eval,
             "toy training": toy_training, "mid stream": mid_stream}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", nargs="+", default=["1", str(os.cpu_count()), "policy"],
                        help="thread counts, a row each; policy: what the commands choose (selfforcing.threads)")
    parser.add_argument("--busy", type=float, nargs="+", default=[0, 1],
                        help="cores other programs keep busy, a column each (0.33: a third of one)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    cells: dict[tuple[str, str, float], str] = {}
    for busy in args.busy:
        with busy_cores(busy):
            for name in args.workloads:
                for count in args.threads:
                    with thread_count(count):
                        cells[name, count, busy] = WORKLOADS[name](args.repeats)
                    print(f"{name}, {count} threads, {busy} busy: {cells[name, count, busy]}", flush=True)
    columns = ["idle" if b == 0 else f"{b:g} core{'s' if b > 1 else ''} busy" for b in args.busy]
    print(f"\nCommand: `{shlex.join(['python', f'benchmarks/{Path(__file__).name}', *sys.argv[1:]])}`  ")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; median of {args.repeats}\n")
    print("| workload | threads | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name in args.workloads:
        for count in args.threads:
            print(f"| {name} | {count} | " + " | ".join(cells[name, count, b] for b in args.busy) + " |")


if __name__ == "__main__":
    main()
