"""The GPU check: Wan2.1-T2V-1.3B at 832x480 with random weights in bf16, one process.

1. Equivalence: the fast engine, compiled and captured as CUDA graphs, must give the eager
   reference loop's latents within bf16 tolerance (chunk-wise and frame-wise).
2. Speed: a markdown table per engine (eager, fast, fast compiled, fast + CUDA graphs) and
   chunk size: FPS with the Wan VAE decode (when diffusers is installed), DiT-only FPS,
   first-frame latency, DiT model-FLOPs utilisation and peak memory.

Needs only torch and this repository (``scripts/gpu_check.sh``). Speed does not depend on
weight values. Rows that would not finish inside the time budget are skipped and say so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from selfforcing.bench import random_pipeline
from selfforcing.models.wan import preset

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
LATENT_FRAMES = 21  # the paper's 81-frame videos
ENGINES = [("eager", "eager", None), ("fast", "fast", None), ("fast compiled", "fast+compile", None),
           ("fast + CUDA graphs", "fast+compile", "reduce-overhead")]


def dit_flops(frames_per_chunk: int, cache_frames: int, steps: int = 4) -> float:
    """Model FLOPs of the DiT for one 21-latent-frame stream: per forward, 2 x tokens x the
    linear weights (self q/k/v/o, cross q/o, FFN) plus attention (4 x queries x keys x dim,
    self over the cache + chunk, cross over 512 text tokens); ``steps`` denoising forwards and
    one cache fill per chunk (the cross K/V are computed once per prompt)."""
    c = preset("wan2.1-1.3b")
    d, tpf, text = c.dim, 30 * 52, 512
    linear = c.num_layers * (6 * d * d + 2 * d * c.ffn_dim)
    total, held = 0.0, 0
    for _ in range(LATENT_FRAMES // frames_per_chunk):
        q = frames_per_chunk * tpf
        k = (held + frames_per_chunk) * tpf
        per_forward = 2 * q * linear + c.num_layers * 4 * q * (k + text) * d
        total += (steps + 1) * per_forward
        held = min(cache_frames, held + frames_per_chunk)
    return total


def stream(pipe, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(video FPS, first-frame seconds) medians over ``repeats`` seeded streams after a two-chunk
    warm-up, and the latents of seed 0."""
    num_frames = pipe.video_frames(LATENT_FRAMES)
    for _ in pipe.stream(["warm-up"], pipe.video_frames(2 * pipe.sampling.frames_per_chunk)):
        torch.cuda.synchronize()
    fps, first, latents = [], [], None
    for seed in range(repeats):
        chunks = []
        for chunk in pipe.stream(["check"], num_frames, seed=seed):
            torch.cuda.synchronize()
            chunks.append(chunk.latents)
        fps.append(pipe.stats.fps)
        first.append(pipe.stats.first_frame_s)
        latents = latents if latents is not None else torch.cat(chunks, dim=2).float()
    return statistics.median(fps), statistics.median(first), latents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420, help="skip rows once this much time has passed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    device, start = torch.device("cuda"), time.perf_counter()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)
    try:
        import diffusers  # noqa: F401  (the Wan VAE)
        with_vae = True
    except ImportError:
        with_vae = False
    rows, failures = [], []
    for n in (3, 1):
        reference = None
        for label, engine, mode in ENGINES:
            if time.perf_counter() - start > args.budget_s:
                rows.append(f"| {label} | {n} | skipped: over the {args.budget_s:.0f} s budget | | | | | |")
                continue
            torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats(device)
            pipe = random_pipeline("wan2.1-1.3b", n, device, engine, dit_only=True, compile_mode=mode)
            fps, first, latents = stream(pipe, args.repeats)
            seconds = pipe.video_frames(LATENT_FRAMES) / fps
            mfu = dit_flops(n, pipe.sampling.kv_cache_frames) / seconds / peak
            if reference is None:
                reference, error = latents, 0.0
            else:
                error = ((latents - reference).norm() / reference.norm()).item()
                if error > 2e-2:
                    failures.append(f"{label}, {n} frames/chunk: relative L2 {error:.3g} vs eager")
            vae_fps = "n/a (no diffusers)"
            if with_vae:
                vae_pipe = random_pipeline("wan2.1-1.3b", n, device, engine, compile_mode=mode)
                vae_pipe.model = pipe.model  # the same (already compiled) transformer
                vae_fps = f"{stream(vae_pipe, args.repeats)[0]:.1f}"
            gib = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(f"| {label} | {n} | {vae_fps} | {fps:.1f} | {first:.3f} | {100 * mfu:.1f} % | {gib:.1f} | "
                        f"{error:.2e} |")
            del pipe
            torch.cuda.empty_cache()
    print(f"GPU check: {name}, torch {torch.__version__}; Wan2.1-T2V-1.3B shape, random weights, bf16, "
          f"{LATENT_FRAMES} latent frames (81 video frames) at 832x480, 4 steps, {time.strftime('%Y-%m-%d')}; "
          f"`bash scripts/gpu_check.sh`; {time.perf_counter() - start:.0f} s in all\n")
    print("| engine | frames/chunk | FPS with VAE decode | DiT-only FPS | first frame (s, DiT) | DiT MFU | "
          "peak GiB | latents vs eager (rel. L2) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for failure in failures:
        print(f"MISMATCH: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
