"""``selfforcing bench``: streaming throughput, time to first frame and peak memory.

Speed does not depend on weight values, so presets are built with random weights at their
real shapes. Text encoding is excluded (a fixed embedding stands in for the encoder); the
VAE decode is included. Results print as a table and can be appended to a markdown file
together with the machine and the command that produced them.
"""

from __future__ import annotations

import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from selfforcing.errors import SelfForcingError
from selfforcing.inference.pipeline import SamplingConfig, StreamingPipeline
from selfforcing.models.vae import PixelCodec, WanVAE
from selfforcing.models.wan import CausalWanModel, preset


class FixedTextEncoder:
    """Stands in for the text encoder in benchmarks: zeros of the right shape, no cost."""

    def __init__(self, dim: int, max_length: int):
        self.dim, self.max_length = dim, max_length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), self.max_length, self.dim)


def random_pipeline(name: str, frames_per_chunk: int, device: torch.device) -> StreamingPipeline:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = CausalWanModel(preset(name)).to(device, dtype)
    if name == "toy":
        vae = PixelCodec(patch=2)
        text = FixedTextEncoder(model.config.text_dim, 32)
        sampling = SamplingConfig(frames_per_chunk=frames_per_chunk, height=32, width=32)
    elif name == "wan2.1-1.3b":
        from diffusers import AutoencoderKLWan

        vae = WanVAE(AutoencoderKLWan()).to(device, dtype)
        text = FixedTextEncoder(model.config.text_dim, 512)
        sampling = SamplingConfig(frames_per_chunk=frames_per_chunk)
    else:
        raise SelfForcingError(f"no benchmark preset {name!r}; choose toy or wan2.1-1.3b")
    return StreamingPipeline(model, text, vae, sampling)


@dataclass
class BenchResult:
    preset: str
    frames_per_chunk: int
    video_frames: int
    fps: float
    first_frame_s: float
    peak_memory_gib: float


def bench_one(pipe: StreamingPipeline, latent_frames: int, repeats: int) -> tuple[float, float, int]:
    num_frames = pipe.video_frames(latent_frames)
    for _ in pipe.stream(["warm-up"], pipe.video_frames(pipe.sampling.frames_per_chunk)):
        pass
    fps, first = [], []
    for seed in range(repeats):
        for _ in pipe.stream(["benchmark"], num_frames, seed=seed):
            _sync(pipe.device)
        fps.append(pipe.stats.fps)
        first.append(pipe.stats.first_frame_s)
    return statistics.median(fps), statistics.median(first), num_frames


def run_bench(preset: str, device: torch.device, frames_per_chunk: list[int], latent_frames: int,
              repeats: int, output: Path | None) -> list[BenchResult]:
    results = []
    for n in frames_per_chunk:
        pipe = random_pipeline(preset, n, device)
        if latent_frames % n:
            raise SelfForcingError(f"--latent-frames {latent_frames} is not a multiple of frames per chunk {n}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fps, first, frames = bench_one(pipe, latent_frames, repeats)
        results.append(BenchResult(preset, n, frames, fps, first, _peak_memory_gib(device)))
    table = _markdown(results, device)
    print(table)
    if output is not None:
        with open(output, "a") as f:
            f.write("\n" + table + "\n")
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _markdown(results: list[BenchResult], device: torch.device) -> str:
    memory = "peak GPU memory (GiB)" if device.type == "cuda" else "peak process RSS (GiB)"
    lines = [
        f"Command: `{' '.join(shlex.quote(a) for a in ['selfforcing', *sys.argv[1:]])}`  ",
        f"Machine: {_machine(device)}; {time.strftime('%Y-%m-%d')}; random weights, text encoding excluded, VAE decode included",
        "",
        f"| preset | frames/chunk | video frames | throughput (FPS) | first frame (s) | {memory} |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.preset} | {r.frames_per_chunk} | {r.video_frames} | {r.fps:.1f} | "
                     f"{r.first_frame_s:.3f} | {r.peak_memory_gib:.2f} |")
    return "\n".join(lines)


def run_train_bench(preset_name: str, device: torch.device, steps: int, output: Path | None) -> dict[str, float]:
    """Seconds per training iteration of SF / TF / DF (+ DMD) at an equal config (paper Fig. 6).

    Uses a random teacher of the same architecture: iteration time does not depend on weights.
    """
    import tempfile

    from selfforcing.training.config import config_from_dict
    from selfforcing.training.trainer import Trainer

    if preset_name != "toy":
        raise SelfForcingError("the training benchmark runs the toy preset (use a GPU config for larger models)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        CausalWanModel(preset("toy")).save_pretrained(Path(tmp) / "teacher")
        for paradigm in ("self_forcing", "teacher_forcing", "diffusion_forcing"):
            cfg = config_from_dict({
                "name": f"bench-{paradigm}", "output_dir": str(Path(tmp) / paradigm), "steps": steps + 1,
                "device": device.type, "model": {"preset": "toy"}, "teacher": {"path": str(Path(tmp) / "teacher")},
                "data": {"source": "toy", "batch_size": 2, "num_frames": 12, "height": 32, "width": 32},
                "paradigm": {"name": paradigm, "frames_per_chunk": 3}, "loss": {"name": "dmd", "generator_every": 1},
                "logging": {"progress": False, "tensorboard": False, "checkpoint_every": 10_000},
            })
            trainer = Trainer(cfg)
            trainer.train_step()  # warm-up
            trainer.step += 1
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
                trainer.step += 1
            _sync(device)
            results[paradigm] = (time.perf_counter() - start) / steps
    lines = [
        f"Command: `{' '.join(shlex.quote(a) for a in ['selfforcing', *sys.argv[1:]])}`  ",
        f"Machine: {_machine(device)}; {time.strftime('%Y-%m-%d')}; toy preset, batch 2, 12 latent frames, "
        "chunk 3, generator + critic (DMD) update every iteration",
        "",
        "| paradigm (+ DMD) | seconds / iteration | relative to Self Forcing |",
        "|---|---|---|",
    ]
    for name, sec in results.items():
        lines.append(f"| {name} | {sec:.3f} | {sec / results['self_forcing']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if output is not None:
        with open(output, "a") as f:
            f.write("\n" + table + "\n")
    return results
