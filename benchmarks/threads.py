"""Intra-op threads on a CPU: each workload at each thread count, on an idle machine and with
other work on some of its cores (busy loops this script starts and stops).

Workloads, each as the product runs it:

- ``toy stream``: the shipped default model streaming the README's prompt, 21 latent frames
  chunk-wise (what ``generate`` and each ``serve`` viewer run; mp4 writing excluded);
- ``toy frame-wise``: the toy preset, one latent frame per chunk (``bench --preset toy``);
- ``toy eval``: the shipped model, a batch of 8 videos of 12 frames (``eval``'s batch);
- ``toy training``: one Self Forcing + DMD iteration of the toy preset (``bench --training``);
- ``mid stream``: the ``mid`` preset, DiT only, 9 latent frames chunk-wise (``bench --preset mid``).

Run: ``python benchmarks/threads.py [--repeats 3] [--threads 1 2] [--busy 0 1]`` (figures
and the rule chosen from them in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfforcing.bench import bench_one, random_pipeline, seconds_per_iteration, toy_trainer
from selfforcing.cli import DEFAULT_MODEL
from selfforcing.inference.pipeline import StreamingPipeline

PROMPT = "a red circle bouncing on a dark blue background"
CPU = torch.device("cpu")


@contextlib.contextmanager
def busy_cores(count: int):
    """``count`` processes spinning on the CPU for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)  # let them start
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


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
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="cores kept busy, a column each")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    cells: dict[tuple[str, int, int], str] = {}
    for busy in args.busy:
        with busy_cores(busy):
            for name in args.workloads:
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    cells[name, threads, busy] = WORKLOADS[name](args.repeats)
                    print(f"{name}, {threads} threads, {busy} busy: {cells[name, threads, busy]}", flush=True)
    columns = ["idle" if b == 0 else f"{b} core{'s' if b > 1 else ''} busy" for b in args.busy]
    print(f"\nCommand: `{shlex.join(['python', f'benchmarks/{Path(__file__).name}', *sys.argv[1:]])}`  ")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; median of {args.repeats}\n")
    print("| workload | threads | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name in args.workloads:
        for threads in args.threads:
            print(f"| {name} | {threads} | " + " | ".join(cells[name, threads, b] for b in args.busy) + " |")


if __name__ == "__main__":
    main()
