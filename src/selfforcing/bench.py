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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from selfforcing.errors import SelfForcingError
from selfforcing.inference.pipeline import SamplingConfig, StreamingPipeline
from selfforcing.models.vae import PixelCodec, WanVAE
from selfforcing.models.wan import CausalWanModel, WanConfig, preset
from selfforcing.utils import synchronize

if TYPE_CHECKING:
    from selfforcing.models.tiny_vae import TinyVAE
    from selfforcing.training.trainer import Trainer


class FixedTextEncoder:
    """Stands in for the text encoder in benchmarks: zeros of the right shape, no cost."""

    def __init__(self, dim: int, max_length: int):
        self.dim, self.max_length = dim, max_length

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), self.max_length, self.dim)


class LatentsOnly:
    """Stands in for the VAE where the DiT alone is measured: decoding costs nothing, and a
    chunk counts the video frames a causal VAE of ``temporal_ratio`` would give it
    (1 + r (n - 1) for the first chunk, r n after)."""

    spatial_ratio = 8

    def __init__(self, latent_channels: int, temporal_ratio: int = 1):
        self.latent_channels, self.temporal_ratio = latent_channels, temporal_ratio

    def stream_decoder(self) -> "LatentsOnly":
        decoder = LatentsOnly(self.latent_channels, self.temporal_ratio)
        decoder.first = True
        return decoder

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        r, n = self.temporal_ratio, latents.shape[2]
        frames = 1 + r * (n - 1) if self.first else r * n
        self.first = False
        return latents.new_zeros(latents.shape[0], 3, frames, 1, 1)


# A DiT-dominated shape between the toy and Wan: 16-channel 30x52 latents (240x416 behind a
# Wan VAE), dim 384, 6 layers, a 9-frame cache; measured DiT-only.
MID = WanConfig(num_attention_heads=6, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=512,
                freq_dim=256, ffn_dim=1536, num_layers=6)
ENGINES = ("eager", "fast", "fast+compile", "fast+graphs")  # fast+graphs: compiled, replayed as CUDA graphs
COMPILED_ENGINES = ("fast+compile", "fast+graphs")


def random_wan_vae(device: torch.device) -> WanVAE:
    """The Wan2.1 VAE with random weights (diffusers' default config), bf16 on CUDA."""
    from diffusers import AutoencoderKLWan

    return WanVAE(AutoencoderKLWan()).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def random_tiny_vae(device: torch.device) -> "TinyVAE":
    """A TAEHV tiny VAE of ``taew2_1``'s shape (Wan 2.1 latents) with random weights, bf16 on CUDA."""
    from selfforcing.models.tiny_vae import TinyVAE

    torch.manual_seed(0)
    return TinyVAE().to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def random_pipeline(name: str, frames_per_chunk: int, device: torch.device, engine: str = "fast",
                    dit_only: bool = False, compile_mode: str | None = "default-for-device",
                    attention_backend: str | None = None, compile_scope: str = "default-for-device",
                    sampling_changes: dict | None = None) -> StreamingPipeline:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if name == "toy":
        model = CausalWanModel(preset("toy"))
        vae, text = PixelCodec(patch=2), FixedTextEncoder(model.config.text_dim, 32)
        sampling = SamplingConfig(frames_per_chunk=frames_per_chunk, height=32, width=32)
    elif name == "mid":
        model = CausalWanModel(MID)
        vae, text = LatentsOnly(MID.in_channels), FixedTextEncoder(MID.text_dim, 64)
        sampling = SamplingConfig(frames_per_chunk=frames_per_chunk, height=240, width=416, kv_cache_frames=9)
    elif name == "wan2.1-1.3b":
        model = CausalWanModel(preset(name))
        text = FixedTextEncoder(model.config.text_dim, 512)
        vae = LatentsOnly(model.config.in_channels, temporal_ratio=4) if dit_only else random_wan_vae(device)
        if isinstance(vae, WanVAE) and device.type == "cuda":
            vae.tune_convs()  # as vae_from_config loads it there
        sampling = SamplingConfig(frames_per_chunk=frames_per_chunk)
    else:
        raise SelfForcingError(f"no benchmark preset {name!r}; choose toy, mid or wan2.1-1.3b")
    if engine not in ENGINES:
        raise SelfForcingError(f"no engine {engine!r}; choose from {', '.join(ENGINES)}")
    sampling = sampling.updated(sampling_changes or {})  # (bench --sampling: a long-video option's cost, say)
    # The first frame as the live server hands it over: alone, as soon as it is decoded.
    pipe = StreamingPipeline(model.to(device, dtype), text, vae, sampling, engine=engine.split("+")[0],
                             early_first_frame=True)
    pipe.model.set_attention_backend(attention_backend)
    if engine in COMPILED_ENGINES:
        pipe.compile(compile_mode, cuda_graphs=engine == "fast+graphs", scope=compile_scope)
    return pipe


@dataclass
class BenchResult:
    preset: str
    engine: str
    frames_per_chunk: int
    video_frames: int
    fps: float
    first_frame_s: float
    warm_up_s: float  # the untimed warm-up stream: includes compiling and captures
    peak_memory_gib: float


class StreamTiming(NamedTuple):
    fps: float  # median over the timed streams
    first_frame_s: float  # median
    warm_up_s: float  # the untimed warm-up stream (compiling and captures included)
    video_frames: int  # per stream
    latents: torch.Tensor  # of the seed-0 stream, to compare engines


def bench_one(pipe: StreamingPipeline, latent_frames: int, repeats: int) -> StreamTiming:
    num_frames = pipe.video_frames(latent_frames)
    # Every state the timed streams meet, untimed: compiling, and with CUDA graphs one capture
    # per attended length (not only the first two chunks', which left the rest to the first
    # timed stream, and with two repeats to half the median).
    warm_up = pipe.warm_up(latent_frames)
    fps, first, latents = [], [], None
    for seed in range(repeats):
        chunks = []
        for chunk in pipe.stream(["benchmark"], num_frames, seed=seed):
            synchronize(pipe.device)
            chunks.append(chunk.latents)
        fps.append(pipe.stats.fps)
        first.append(pipe.stats.first_frame_s)
        latents = torch.cat(chunks, dim=2).float() if latents is None else latents
    return StreamTiming(statistics.median(fps), statistics.median(first), warm_up, num_frames, latents)


def run_bench(preset: str, device: torch.device, frames_per_chunk: list[int], latent_frames: int,
              repeats: int, output: Path | None, engines: list[str] = ("fast",),
              command: Sequence[str] = ("selfforcing", "bench"),
              attention_backend: str | None = None,
              compile_scopes: Sequence[str] = ("default-for-device",),
              sampling_changes: dict | None = None) -> list[BenchResult]:
    """Stream every engine at every chunk size (a compiled engine once per compile scope,
    labelled with it unless it is the whole step); print the table and append it to
    ``output``, headed by ``command`` (the command line that measured it) and the machine.
    ``sampling_changes`` apply to every row (``bench --sampling``)."""
    runs = [(engine, scope) for engine in engines
            for scope in (compile_scopes if engine in COMPILED_ENGINES else ("default-for-device",))]
    results = []
    for n in frames_per_chunk:
        if latent_frames % n:
            raise SelfForcingError(f"--latent-frames {latent_frames} is not a multiple of frames per chunk {n}")
        for engine, scope in runs:
            pipe = random_pipeline(preset, n, device, engine, attention_backend=attention_backend, compile_scope=scope,
                                   sampling_changes=sampling_changes)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = bench_one(pipe, latent_frames, repeats)
            label = engine if pipe.compile_scope in (None, "step") else f"{engine} ({pipe.compile_scope})"
            results.append(BenchResult(preset, label, n, timing.video_frames, timing.fps, timing.first_frame_s,
                                       timing.warm_up_s, _peak_memory_gib(device)))
            torch._dynamo.reset()  # each compiled engine starts from scratch
    _report(_markdown(results, device, command, dit_only=preset == "mid"), output)
    return results


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _heading(command: Sequence[str], device: torch.device, conditions: str) -> list[str]:
    """What a table of figures opens with: the command that measured them, the machine and the day."""
    return [f"Command: `{shlex.join(command)}`  ",
            f"Machine: {_machine(device)}; {time.strftime('%Y-%m-%d')}; {conditions}", ""]


def _report(table: str, output: Path | None) -> None:
    print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a") as f:
            f.write("\n" + table + "\n")


def _markdown(results: list[BenchResult], device: torch.device, command: Sequence[str], dit_only: bool = False) -> str:
    memory = "peak GPU memory (GiB)" if device.type == "cuda" else "process peak RSS so far (GiB)"
    decode = "DiT only (decode excluded, FPS = latent frames/s)" if dit_only else "VAE decode included"
    lines = [
        *_heading(command, device, f"random weights, text encoding excluded, {decode}"),
        f"| preset | engine | frames/chunk | video frames | throughput (FPS) | vs eager | first frame (s) | "
        f"warm-up stream (s) | {memory} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {r.frames_per_chunk: r.fps for r in results if r.engine == "eager"}
    for r in results:
        ratio = f"{r.fps / eager[r.frames_per_chunk]:.2f}x" if r.frames_per_chunk in eager else "-"
        lines.append(f"| {r.preset} | {r.engine} | {r.frames_per_chunk} | {r.video_frames} | {r.fps:.2f} | {ratio} | "
                     f"{r.first_frame_s:.3f} | {r.warm_up_s:.1f} | {r.peak_memory_gib:.2f} |")
    return "\n".join(lines)


def run_train_bench(preset_name: str, device: torch.device, steps: int, output: Path | None,
                    command: Sequence[str] = ("selfforcing", "bench", "--training")) -> dict[str, float]:
    """Seconds per training iteration of SF / TF / DF (+ DMD) at an equal config (paper Fig. 6).

    Uses a random teacher of the same architecture: iteration time does not depend on weights.
    """
    import tempfile

    if preset_name != "toy":
        raise SelfForcingError("the training benchmark runs the toy preset (use a GPU config for larger models)")
    with tempfile.TemporaryDirectory() as tmp:
        results = {paradigm: seconds_per_iteration(toy_trainer(paradigm, Path(tmp), device), steps)
                   for paradigm in ("self_forcing", "teacher_forcing", "diffusion_forcing")}
    lines = [
        *_heading(command, device, "toy preset, batch 2, 12 latent frames, chunk 3, generator + critic (DMD) "
                  "update every iteration"),
        "| paradigm (+ DMD) | seconds / iteration | relative to Self Forcing |",
        "|---|---|---|",
    ]
    for name, sec in results.items():
        lines.append(f"| {name} | {sec:.3f} | {sec / results['self_forcing']:.2f}x |")
    _report("\n".join(lines), output)
    return results


def toy_trainer(paradigm: str, root: Path, device: torch.device) -> "Trainer":
    """A toy-preset trainer of ``paradigm`` + DMD (generator and critic every iteration, batch
    2, 12 latent frames, chunk 3) against a random teacher saved under ``root``."""
    from selfforcing.training.config import config_from_dict
    from selfforcing.training.trainer import Trainer

    teacher = root / "teacher"
    if not teacher.exists():
        torch.manual_seed(0)
        CausalWanModel(preset("toy")).save_pretrained(teacher)
    return Trainer(config_from_dict({
        "name": f"bench-{paradigm}", "output_dir": str(root / paradigm), "steps": 10**9,
        "device": device.type, "model": {"preset": "toy"}, "teacher": {"path": str(teacher)},
        "data": {"source": "toy", "batch_size": 2, "num_frames": 12, "height": 32, "width": 32},
        "paradigm": {"name": paradigm, "frames_per_chunk": 3}, "loss": {"name": "dmd", "generator_every": 1},
        "logging": {"progress": False, "tensorboard": False, "checkpoint_every": 10**9},
    }))


def seconds_per_iteration(trainer: "Trainer", steps: int) -> float:
    """Mean wall time of ``steps`` training iterations, after one untimed warm-up iteration."""
    trainer.train_step()  # warm-up
    trainer.step += 1
    synchronize(trainer.env.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
        trainer.step += 1
    synchronize(trainer.env.device)
    return (time.perf_counter() - start) / steps
