"""`selfforcing eval`: stream videos from a model for held-out toy-world prompts and score
them against real toy-world clips of the same scenes, frame by frame."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from selfforcing.data.toy_world import caption, render, sample_scene, video_seed
from selfforcing.errors import SelfForcingError
from selfforcing.eval.metrics import evaluate_videos
from selfforcing.eval.report import write_report, write_sample_strips
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.utils import progress_bar, replaced_together

EVAL_SEED = 2  # scene seed of held-out prompts (training draws seed 0, ODE-pair prompts seed 1)
SAMPLE_ROWS = 3  # prompts shown in samples.png


def eval_scenes(n: int, seed: int = EVAL_SEED, **scene_options):
    return [sample_scene(video_seed(seed, i), **scene_options) for i in range(n)]


def generate_videos(pipe: StreamingPipeline, prompts: list[str], num_frames: int, batch_size: int,
                    seed: int, teacher_steps: int | None = None,
                    guidance_scale: float = 3.0) -> tuple[torch.Tensor, float]:
    """(N, T, H, W, 3) uint8, generated in batches with the streaming pipeline (or, with
    ``teacher_steps``, the bidirectional many-step sampler), and the throughput in video frames
    per second over all batches."""
    def batch(i: int) -> Iterator[torch.Tensor]:
        if teacher_steps is None:
            return (c.frames for c in pipe.stream(prompts[i:i + batch_size], num_frames, seed=seed + i))
        return iter([pipe.generate_bidirectional(prompts[i:i + batch_size], num_frames, teacher_steps,
                                                 guidance_scale, seed=seed + i)])

    return _in_batches(batch, len(prompts), num_frames, batch_size)


def _in_batches(batch, count: int, num_frames: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """``batch(i)`` (the chunks of the videos from index i on, ``batch_size`` of them, each
    (B, t, H, W, 3)) over all ``count`` videos of ``num_frames``, concatenated, and the throughput
    in video frames per second. A progress bar counts the frames made."""
    start = time.perf_counter()
    videos = []
    with progress_bar(total=count * num_frames, unit="frame", desc=f"generating {count} videos") as bar:
        for i in range(0, count, batch_size):
            chunks = []
            for chunk in batch(i):
                chunks.append(chunk)
                bar.update(chunk.shape[0] * chunk.shape[1])
            videos.append(torch.cat(chunks, dim=1))
    videos = torch.cat(videos)
    return videos, videos.shape[0] * videos.shape[1] / (time.perf_counter() - start)


def generate_from_real_context(pipe: StreamingPipeline, prompts: list[str], real: torch.Tensor, batch_size: int,
                               seed: int) -> tuple[torch.Tensor, float]:
    """Like ``generate_videos``, but chunk k of every video continues the *real* clip's frames
    before it (the KV cache filled with ground truth, as Teacher Forcing trains; chunk 0 has no
    context). Scored against the free-running stream, which continues its own outputs, this
    measures exposure bias (paper §1, §3): what a model loses at inference because its context
    is its own. Each chunk gets the noise it gets in the free stream of the same seed (one
    generator drawn on across the chunks), so the context is the only difference."""
    if pipe.vae.temporal_ratio != 1:
        raise SelfForcingError("real-context evaluation needs a codec with one latent frame per video frame "
                               f"(this VAE packs {pipe.vae.temporal_ratio} frames into one)")
    if pipe.sampling.context_noise:
        raise SelfForcingError("real-context evaluation needs context_noise 0 (noising the context draws noise "
                               "the free stream does not, so the chunks' noise would no longer match)")
    pipe.latent_frames(real.shape[1])  # a clear error for a length the stream cannot make in whole chunks
    n = pipe.sampling.frames_per_chunk

    def batch(i: int) -> Iterator[torch.Tensor]:
        latents = pipe.encode_video(real[i:i + batch_size])
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        for start in range(0, real.shape[1], n):
            prefix = latents[:, :, :start] if start else None
            yield from (c.frames for c in pipe.stream(prompts[i:i + batch_size], n, generator,
                                                     initial_latents=prefix))

    return _in_batches(batch, len(prompts), real.shape[1], batch_size)


def evaluate_model(model: str | Path, out_dir: str | Path, n: int = 32, num_frames: int | None = None,
                   seed: int = 0, batch_size: int = 8, device: str = "cpu", window: int = 4,
                   loras: list[tuple[Path, float]] = (), scene_options: dict | None = None,
                   teacher_steps: int | None = None, guidance_scale: float = 3.0,
                   checkpoint: str | Path | None = None, context: str = "own", sampling: dict | None = None) -> dict:
    """Generate ``n`` videos of ``num_frames`` (default: the model's cache length) and write
    ``results.json``, per-frame plots and ``samples.png`` (the first prompts' videos above their
    real clips) into ``out_dir``. ``loras`` (file, scale) are fused
    into the model first; ``scene_options`` (``shapes``, ``colors``) go to ``sample_scene`` (default:
    the trained shapes and colours).
    ``teacher_steps`` scores a bidirectional teacher as it samples (every frame at once, that many
    Euler steps with CFG ``guidance_scale``) instead of streaming. ``checkpoint`` replaces the
    model's transformer weights (a training checkpoint, scored without exporting it). ``context``
    ``"real"`` generates every chunk from the real clip's earlier frames instead of the model's
    own (``generate_from_real_context``: the exposure-bias check). ``sampling`` changes keys of
    the model's sampling config (``eval --sampling``: sink, window, context noise, ...)."""
    if context not in ("own", "real"):
        raise SelfForcingError(f"context must be 'own' (the model's outputs) or 'real' (the real clip's), got {context!r}")
    if context == "real" and teacher_steps is not None:
        raise SelfForcingError("a bidirectional teacher samples every frame at once: it has no context to replace")
    scenes = eval_scenes(n, **(scene_options or {}))  # an unknown shape or colour fails before the model loads
    pipe = StreamingPipeline.from_pretrained(model, device=device, checkpoint=checkpoint)
    pipe.sampling = pipe.sampling.updated(sampling or {})
    pipe.load_loras(list(loras))
    s = pipe.sampling
    if num_frames is None:
        num_frames = pipe.video_frames(s.kv_cache_frames)
    if n < 2:
        raise SelfForcingError("evaluation needs at least 2 videos (the Fréchet distance uses covariances)")
    prompts = [caption(scene) for scene in scenes]
    real = torch.stack([torch.as_tensor(render(scene, num_frames, s.height, s.width)) for scene in scenes])
    if context == "real":
        generated, fps = generate_from_real_context(pipe, prompts, real, batch_size, seed)
    else:
        generated, fps = generate_videos(pipe, prompts, num_frames, batch_size, seed, teacher_steps, guidance_scale)
    results = evaluate_videos(generated, prompts, real, window=window)
    results["model"] = str(model) if checkpoint is None else f"{model} + {checkpoint}"
    results["stream"] = {"fps": fps, "batch_size": batch_size}
    results["context"] = context
    if sampling:
        results["sampling"] = dict(sampling)
    if teacher_steps is not None:
        results["sampler"] = {"bidirectional_euler_steps": teacher_steps, "guidance_scale": guidance_scale}
    shown = min(SAMPLE_ROWS, n)
    with replaced_together(out_dir):  # an earlier report there stays whole until this one is
        write_report(results, out_dir)
        write_sample_strips({"generated": generated[:shown], "real": real[:shown]}, prompts[:shown],
                            Path(out_dir) / "samples.png", every=max(1, num_frames // 12))
    return results
