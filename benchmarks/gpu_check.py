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
import sys
import time

import torch

from selfforcing.bench import bench_one, random_pipeline

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
ENGINES = [("eager", "eager", None), ("fast", "fast", None), ("fast compiled", "fast+compile", None),
           ("fast + CUDA graphs", "fast+compile", "reduce-overhead")]


def dit_flops(pipe, latent_frames: int) -> float:
    """Model FLOPs of the DiT for one stream: per forward, 2 x tokens x the linear weights
    (self q/k/v/o, cross q/o, FFN) plus attention (4 x queries x keys x dim, self over the
    cache + chunk, cross over the text tokens); one forward per denoising step and one cache
    fill per chunk (the cross K/V are computed once per prompt)."""
    c, s = pipe.model.config, pipe.sampling
    n, steps, d = s.frames_per_chunk, len(s.denoising_steps), c.dim
    ratio = pipe.vae.spatial_ratio * c.patch_size[1]
    tpf, text = (s.height // ratio) * (s.width // ratio), pipe.text_encoder.max_length
    linear = c.num_layers * (6 * d * d + 2 * d * c.ffn_dim)
    total, held = 0.0, 0
    for _ in range(latent_frames // n):
        q, k = n * tpf, (held + n) * tpf
        total += (steps + 1) * (2 * q * linear + c.num_layers * 4 * q * (k + text) * d)
        held = min(s.kv_cache_frames, held + n)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420, help="skip rows once this much time has passed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent-frames", type=int, default=21, help="21: the paper's 81-frame videos")
    parser.add_argument("--device", default="cuda", help="cpu runs the same check (a dry run of this script)")
    parser.add_argument("--preset", default="wan2.1-1.3b", help="mid: a small shape for a dry run")
    args = parser.parse_args()
    device, start = torch.device(args.device), time.perf_counter()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)
    try:
        import diffusers  # noqa: F401  (the Wan VAE)
        with_vae = args.preset == "wan2.1-1.3b"
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
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            pipe = random_pipeline(args.preset, n, device, engine, dit_only=True,
                                   compile_mode=mode if device.type == "cuda" else "default-for-device")
            fps, first, _, _, latents = bench_one(pipe, args.latent_frames, args.repeats)
            seconds = pipe.video_frames(args.latent_frames) / fps
            mfu = dit_flops(pipe, args.latent_frames) / seconds / peak
            if reference is None:
                reference, error = latents, 0.0
            else:
                error = ((latents - reference).norm() / reference.norm()).item()
                if error > 2e-2:
                    failures.append(f"{label}, {n} frames/chunk: relative L2 {error:.3g} vs eager")
            vae_fps = "n/a (no diffusers)" if args.preset == "wan2.1-1.3b" else "n/a (DiT-only preset)"
            if with_vae:
                vae_pipe = random_pipeline(args.preset, n, device, "eager")
                vae_pipe.model, vae_pipe.engine = pipe.model, pipe.engine  # the same (compiled) transformer
                vae_fps = f"{bench_one(vae_pipe, args.latent_frames, args.repeats).fps:.1f}"
            gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append(f"| {label} | {n} | {vae_fps} | {fps:.2f} | {first:.3f} | {100 * mfu:.1f} % | {gib:.1f} | "
                        f"{error:.2e} |")
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"GPU check: {name}, torch {torch.__version__}; {args.preset} shape, random weights, "
          f"{args.latent_frames} latent frames, 4 steps, {time.strftime('%Y-%m-%d')}; "
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
