"""The GPU check: Wan2.1-T2V-1.3B at 832x480 with random weights in bf16, one process.

1. Equivalence: the fast engine, compiled and captured as CUDA graphs, must give the eager
   reference loop's latents within bf16 tolerance (chunk-wise and frame-wise).
2. Speed, in this order:
   - with ``--vae-variant all``, the Wan VAE decode alone in each setting (``VAE_VARIANTS``,
     when diffusers is installed; by default it decodes as the product does on CUDA, untimed
     alone); the TAEHV tiny VAE's (``taew2_1``'s shape; the released demo's ``--use_taehv``)
     as loaded and tuned (``TINY_VARIANTS``);
   - each SDPA backend (flash, memory-efficient, cuDNN) alone at the stream's largest
     self-attention, chunk-wise and frame-wise, on contiguous tensors and in the engine's layout;
   - a markdown table per engine (eager and fast + CUDA graphs by default; fast and fast
     compiled on request) and chunk size, printed row by row as they finish: DiT-only FPS,
     first-frame latency, DiT model-FLOPs utilisation, peak memory and, for the last engine,
     FPS and first-frame latency with the VAE decode in its setting, decoding after the DiT
     and (a second row) beside it on a side stream (``overlap_decode``), then the same two
     with the TAEHV decoder (rows ", TAEHV"; ``--decoders`` picks); the first frame is handed over
     alone, as soon as it is decoded (``early_first_frame``, as ``serve`` does); with
     ``--attention-backend`` the fast engines put that SDPA kernel first (eager keeps torch's order);
     ``--compile-scope step blocks`` gives each compiled engine a row per scope (the whole step
     compiled, or one block for all), whose row times show the compile times; ``--profile``
     adds a table of where each row's time goes (attention, matmuls, convs, the rest);
   - while the time budget lasts, the VAE decode alone once more, its decoder compiled.

Needs only torch and this repository (``scripts/gpu_check.sh``). Speed does not depend on
weight values. Rows that would not finish inside the time budget are skipped and say so; one
still running 30 s past it gets every thread's stack printed (stderr), to show where it is.
``--save-compile-cache`` / ``--load-compile-cache`` carry the compiled code from one
machine to a fresh one of the same kind, so a later call need not compile again.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import re
import shlex
import sys
import time
import zlib
from pathlib import Path

import torch

from selfforcing.bench import COMPILED_ENGINES, bench_one, random_pipeline, random_tiny_vae, random_wan_vae
from selfforcing.inference.pipeline import COMPILE_SCOPES, SamplingConfig, StreamingPipeline
from selfforcing.models.vae import cudnn_benchmark, num_video_frames
from selfforcing.models.wan import ATTENTION_BACKENDS
from selfforcing.utils import atomic_path, synchronize
from vae_decode import stream_seconds  # benchmarks/ is this script's directory, so on its path

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
ENGINES = {"eager": "eager", "fast": "fast", "fast compiled": "fast+compile", "fast + CUDA graphs": "fast+graphs"}
HEADER = ("| engine | frames/chunk | FPS with VAE decode | first frame with VAE (s) | DiT-only FPS | "
          "first frame (s, DiT) | DiT MFU | peak GiB | latents vs eager (rel. L2) | row time (s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


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


# cuDNN picks its conv3d algorithms by a heuristic unless told to time them (the stream's
# shapes are fixed, so timing once pays); channels-last is the layout its fast kernels prefer;
# a chunk per decoder call gives every conv a chunk's frames at once (WanVAE.frames_per_call).
# name -> (cudnn.benchmark, channels-last conv3d weights, a chunk per decoder call)
VAE_VARIANTS = {"as loaded": (False, False, False), "cudnn.benchmark": (True, False, False),
                "cudnn.benchmark + channels_last_3d": (True, True, False),
                "cudnn.benchmark + a chunk per call": (True, False, True),
                "cudnn.benchmark + channels_last_3d + a chunk per call": (True, True, True)}
# How a Wan VAE decodes on CUDA in the product (WanVAE.tune_convs, which vae_from_config applies
# there): the fastest setting measured (third device session).
PRODUCT_VAE_VARIANT = "cudnn.benchmark + channels_last_3d"
# The engines a plain call runs: the reference, for the latents column, and the fastest engine
# measured. "fast" and "fast compiled" were measured in the first two device sessions.
DEFAULT_ENGINES = ("eager", "fast + CUDA graphs")


def wan_vae(device: torch.device, variant: str, frames_per_chunk: int):
    """The random-weight Wan VAE with the weights and calls ``variant`` says (its decode runs
    under ``cudnn_benchmark(VAE_VARIANTS[variant][0])``)."""
    vae = random_wan_vae(device)
    _, channels_last, chunk_per_call = VAE_VARIANTS[variant]
    if channels_last:
        vae.tune_convs()  # channels-last weights (and cudnn.benchmark while decoding, as the variant has anyway)
    vae.frames_per_call = frames_per_chunk if chunk_per_call else 1
    return vae


def decode_fps(vae, device: torch.device, latent_frames: int, frames_per_chunk: int, size: SamplingConfig,
               benchmark: bool = False) -> float:
    """A VAE alone, decoding random latents of a ``size`` video chunk by chunk as a stream does
    (video frames/s, the faster of two streams after a first, untimed one)."""
    latents = torch.randn(1, vae.latent_channels, latent_frames, size.height // vae.spatial_ratio,
                          size.width // vae.spatial_ratio, device=device,
                          dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    with cudnn_benchmark(benchmark):
        stream_seconds(vae, latents, frames_per_chunk)
        seconds = min(stream_seconds(vae, latents, frames_per_chunk) for _ in range(2))
    return num_video_frames(vae, latent_frames) / seconds


def vae_decode_fps(device: torch.device, latent_frames: int, frames_per_chunk: int, variant: str,
                   compiled: bool = False) -> float:
    """The Wan VAE alone at 832x480 in ``variant``; ``compiled``: its decoder compiled by
    inductor (the first, untimed stream compiles)."""
    vae = wan_vae(device, variant, frames_per_chunk)
    if compiled:
        vae.compile_decoder()
    return decode_fps(vae, device, latent_frames, frames_per_chunk, SamplingConfig(), VAE_VARIANTS[variant][0])


TINY_VARIANTS = ("as loaded", "cudnn.benchmark + channels_last")  # the second: TinyVAE.tune_convs()


def tiny_vae(device: torch.device, variant: str):
    vae = random_tiny_vae(device)
    if variant == TINY_VARIANTS[1]:
        vae.tune_convs()
    return vae


def variant_table(title: str, variants: list[str], fps_of, args, start: float) -> dict[int, str]:
    """Print a decode-alone table, a column per variant (``fps_of(variant, frames_per_chunk)``:
    video frames/s) while the time budget lasts; the fastest variant per chunk size."""
    print(f"{title}:\n\n| frames/chunk | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants), flush=True)
    best = {}
    for n in args.frames_per_chunk:
        fps = {variant: fps_of(variant, n) for variant in variants if time.perf_counter() - start < args.budget_s}
        print(f"| {n} | {' | '.join(f'{fps[v]:.1f}' if v in fps else 'skipped' for v in variants)} |", flush=True)
        best[n] = max(fps, key=fps.get) if fps else variants[0]
    print(flush=True)
    return best


def tiny_decode(device: torch.device, args, start: float) -> dict[int, str]:
    """The TAEHV tiny VAE alone (``taew2_1``'s shape, random weights) at the preset's video size,
    in each of ``TINY_VARIANTS``; the fastest per chunk size."""
    size = preset_shape(args).sampling
    return variant_table(f"TAEHV tiny VAE decode alone ({size.width}x{size.height}, video frames/s)",
                         list(TINY_VARIANTS),
                         lambda variant, n: decode_fps(tiny_vae(device, variant), device, args.latent_frames, n, size),
                         args, start)


def wan_decode_variants(device: torch.device, args, start: float) -> dict[int, str]:
    """With ``--vae-variant all``, time the Wan VAE alone in every variant, print the table and
    return the fastest variant per chunk size; otherwise the one named, for every chunk size, untimed."""
    if args.vae_variant != "all":
        return dict.fromkeys(args.frames_per_chunk, args.vae_variant)
    return variant_table("Wan VAE decode alone (video frames/s)", list(VAE_VARIANTS),
                         lambda variant, n: vae_decode_fps(device, args.latent_frames, n, variant), args, start)


def preset_shape(args) -> StreamingPipeline:
    """The preset's pipeline on the meta device: only its shapes, no weights drawn or moved."""
    meta = torch.device("meta")
    with meta:
        return random_pipeline(args.preset, 1, meta, "eager", dit_only=True)


def attention_backends(device: torch.device, args) -> None:
    """Each SDPA backend alone at the stream's largest self-attention, the last chunk's (its
    queries over the whole cache and itself), chunk-wise and frame-wise, on contiguous tensors
    and in the engine's own layout: which exact kernel is fastest here (attention is most of a
    frame-wise forward's work), and whether it needs its inputs laid out otherwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = preset_shape(args)
    c, s = pipe.model.config, pipe.sampling
    ratio = pipe.vae.spatial_ratio * c.patch_size[1]
    tokens = (s.height // ratio) * (s.width // ratio)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as random_pipeline builds the model
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cuDNN": SDPBackend.CUDNN_ATTENTION}
    print(f"SDPA backends alone, the last chunk's self-attention ({c.num_attention_heads} heads of "
          f"{c.attention_head_dim}; ms (TFLOP/s); then the first call's ms, which pays for choosing or building a "
          "kernel at a new shape, once per attended length a stream has), on contiguous (B, heads, tokens, dim) "
          "tensors and as the fast engine lays them out (views of (B, tokens, heads, dim) buffers; K/V the prefix "
          "of the cache's):\n\n| frames/chunk | queries x keys | attended lengths a stream has | layout | "
          + " | ".join(backends) + " |\n|---|---|---|---|" + "---|" * len(backends), flush=True)
    heads, head_dim = c.num_attention_heads, c.attention_head_dim
    for n in args.frames_per_chunk:
        queries, keys = n * tokens, min(s.kv_cache_frames + n, args.latent_frames) * tokens
        # The frames a chunk attends: those held (at most the cache's) and itself, chunk by chunk.
        lengths = len({min(held, s.kv_cache_frames) + n for held in range(0, args.latent_frames, n)})
        slots = (s.kv_cache_frames + n + 1) * tokens  # StaticKVCache: ring, scratch chunk, one spare frame

        def engine_layout(rows: int, buffer_rows: int) -> torch.Tensor:
            return torch.randn(1, buffer_rows, heads, head_dim, device=device, dtype=dtype)[:, :rows].transpose(1, 2)

        layouts = {"contiguous": [torch.randn(1, heads, rows, head_dim, device=device, dtype=dtype)
                                  for rows in (queries, keys, keys)],
                   "engine's": [engine_layout(queries, queries), engine_layout(keys, slots),
                                engine_layout(keys, slots)]}
        flops = 4 * queries * keys * heads * head_dim
        for layout, (q, k, v) in layouts.items():
            cells = []
            for backend in backends.values():
                try:
                    with sdpa_kernel(backend):
                        first, seconds = _seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                                  device)
                    cells.append(f"{seconds * 1e3:.2f} ({flops / seconds / 1e12:.3g}); {first * 1e3:.3g}")
                except RuntimeError:  # a backend this device, dtype or shape does not have
                    cells.append("n/a")
            print(f"| {n} | {queries} x {keys} | {lengths} | {layout} | " + " | ".join(cells) + " |", flush=True)
    print(flush=True)


# Kernel (GPU) or op (CPU) names by what they compute, for the profile table; first match wins.
KERNEL_KINDS = {"attention": re.compile(r"flash|fmha|attention|sdpa|softmax", re.I),
                "matmul": re.compile(r"gemm|cutlass|xmma|nvjet|matmul|addmm|\bmm\b|linear|mkldnn", re.I),
                "conv": re.compile(r"conv", re.I)}


def profile_stream(pipe, latent_frames: int, device: torch.device) -> tuple[dict[str, float], list[str]]:
    """One more (warm) stream under torch.profiler: each kind's share of the device time (CPU:
    self CPU time) and the three costliest kernels, to see where the DiT's time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in pipe.stream(["profile"], pipe.video_frames(latent_frames)):
            synchronize(device)
    timed = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()]
    timed = sorted(((k, t) for k, t in timed if t > 0), key=lambda kt: -kt[1])
    total = sum(t for _, t in timed) or 1.0
    shares = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for key, t in timed:
        shares[next((kind for kind, pattern in KERNEL_KINDS.items() if pattern.search(key)), "other")] += t / total
    return shares, [f"{key[:50]} ({100 * t / total:.0f} %)" for key, t in timed[:3]]


def _seconds(fn, device: torch.device, repeats: int = 10) -> tuple[float, float]:
    """Wall time of the first call of ``fn`` (which pays for any kernel selection or plan
    building at a new shape) and the mean of ``repeats`` calls after it, waiting for the device."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first, start = time.perf_counter() - start, time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return first, (time.perf_counter() - start) / repeats


def compiled_decode(device: torch.device, args, start: float, best: dict[int, str]) -> None:
    """Last, while the budget lasts: the VAE alone in its setting with the decoder
    compiled (one graph per call shape and cache state; minutes of compiling on first use)."""
    print("\nWan VAE decode alone, decoder compiled (video frames/s):\n\n| frames/chunk | variant | "
          "compiled | row time (s) |\n|---|---|---|---|", flush=True)
    for n in args.frames_per_chunk:
        if time.perf_counter() - start > args.budget_s:
            print(f"| {n} | {best[n]} | skipped: over the {args.budget_s:.0f} s budget | |", flush=True)
            continue
        row_start = time.perf_counter()
        try:
            fps = f"{vae_decode_fps(device, args.latent_frames, n, best[n], compiled=True):.1f}"
        except Exception as error:  # a compile failure must not lose the rows measured before it
            fps = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        torch._dynamo.reset()
        print(f"| {n} | {best[n]} | {fps} | {time.perf_counter() - row_start:.0f} |", flush=True)


def load_compile_cache(path: Path) -> None:
    """Compiled code from an earlier run of this check (``torch.compiler.load_cache_artifacts``):
    where the graphs, torch and the device match, inductor and Triton skip generating and
    compiling the kernels, most of the minutes a compiled row spends before it streams."""
    if not path.is_file():
        print(f"no compile cache at {path}: compiling from scratch\n", flush=True)
        return
    try:
        info = torch.compiler.load_cache_artifacts(zlib.decompress(path.read_bytes()))
    except Exception as error:  # a damaged or foreign file must not cost the call its rows
        print(f"compile cache {path} unreadable ({type(error).__name__}: {error}): compiling from scratch\n",
              flush=True)
        return
    count = sum(len(keys) for keys in info.artifacts.values()) if info else 0
    print(f"compile cache: {count} artifacts from {path}\n", flush=True)


def save_compile_cache(path: Path) -> None:
    """What this run compiled or found cached, compressed, for ``--load-compile-cache`` on another
    machine of the same kind (written whole or not at all: a temporary file, then renamed)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        partial.write_bytes(zlib.compress(saved[0]))


def build_parser() -> argparse.ArgumentParser:
    """The check's options. Their defaults make the plain ``bash scripts/gpu_check.sh`` the one
    call a fresh device session runs first: the reference and the fastest engine, both chunk
    sizes, every decode row, about 8 minutes on an H100."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420, help="skip rows once this much time has passed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latent-frames", type=int, default=21, help="21: the paper's 81-frame videos")
    parser.add_argument("--device", default="cuda", help="cpu runs the same check (a dry run of this script)")
    parser.add_argument("--preset", default="wan2.1-1.3b", help="mid: a small shape for a dry run")
    parser.add_argument("--frames-per-chunk", type=int, nargs="+", default=[3, 1], help="3: chunk-wise, 1: frame-wise")
    parser.add_argument("--engines", nargs="*", default=list(DEFAULT_ENGINES), choices=list(ENGINES), metavar="ENGINE",
                        help="engines to run, from: " + ", ".join(ENGINES) + " (default: " + ", ".join(DEFAULT_ENGINES)
                             + "; none: only the VAE decode alone)")
    parser.add_argument("--vae", choices=["none", "last", "all"], default="last",
                        help="the FPS-with-VAE-decode columns for no engine, the last one of each chunk size, or all; "
                             "the Wan VAE decodes in --vae-variant's setting, after the DiT and, in a second row, "
                             "beside it (overlap_decode)")
    parser.add_argument("--decoders", nargs="*", choices=["wan", "taehv"], default=["wan", "taehv"],
                        help="decoders to time (alone, and with the DiT where --vae says): the Wan VAE, "
                             "the TAEHV tiny VAE (taew2_1's shape)")
    parser.add_argument("--vae-variant", choices=[*VAE_VARIANTS, "all"], default=PRODUCT_VAE_VARIANT,
                        help="the Wan VAE's setting (default: the product's on CUDA); all: time the VAE alone in "
                             "each setting first and decode in the fastest")
    parser.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default=None,
                        help="the SDPA kernel the fast engines put first (default: torch's order); the eager "
                             "reference keeps torch's order")
    parser.add_argument("--compile-scope", nargs="+", choices=COMPILE_SCOPES, default=["step"],
                        help="what the compiled engines compile, a row each: the whole chunk step, one block for all")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more stream per engine row: attention / matmul / conv / other shares")
    parser.add_argument("--no-vae-compile", dest="vae_compile", action="store_false",
                        help="skip the last table: the VAE decode alone with its decoder compiled")
    parser.add_argument("--load-compile-cache", type=Path, default=None, metavar="FILE",
                        help="start from the compiled code an earlier run saved (same torch and device kind)")
    parser.add_argument("--save-compile-cache", type=Path, default=None, metavar="FILE",
                        help="save the compiled code after each row, for --load-compile-cache on a fresh machine")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    device, start = torch.device(args.device), time.perf_counter()
    # A row still running well past the budget may be stuck: every thread's stack goes to stderr
    # then (and again each such interval), so a call cut off at its time limit shows where it was.
    faulthandler.dump_traceback_later(args.budget_s + 30, repeat=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989e12)
    decode_rows = args.preset == "wan2.1-1.3b" and device.type == "cuda" and args.vae != "none"
    try:
        import diffusers  # noqa: F401  (the Wan VAE)
        with_vae = decode_rows and "wan" in args.decoders
    except ImportError:
        with_vae = False
    with_tiny = decode_rows and "taehv" in args.decoders
    # (row label, engine, compile scope): each compiled engine once per --compile-scope.
    engines = [(label if scope == "step" else f"{label} ({scope})", ENGINES[label], scope)
               for label in ENGINES if label in args.engines
               for scope in (args.compile_scope if ENGINES[label] in COMPILED_ENGINES else ["step"])]
    # Environment that changes what is measured (cuDNN attention plans) goes into the record.
    settings = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_CUDNN_SDPA_AVOID_RECOMPILE",) if k in os.environ)
    print(f"GPU check: {name}, torch {torch.__version__}; {args.preset} shape, random weights, "
          f"{args.latent_frames} latent frames, 4 steps, {time.strftime('%Y-%m-%d')}; "
          f"`{settings + ' ' if settings else ''}bash scripts/gpu_check.sh {shlex.join(sys.argv[1:])}`\n", flush=True)
    if args.load_compile_cache is not None:
        load_compile_cache(args.load_compile_cache)
    decode_variant = wan_decode_variants(device, args, start) if with_vae else {}
    tiny_variant = tiny_decode(device, args, start) if "taehv" in args.decoders else {}
    attention_backends(device, args)
    if engines:
        print(HEADER, flush=True)
    failures, profiles = [], []
    for n in args.frames_per_chunk:
        reference = None
        for label, engine, scope in engines:
            if time.perf_counter() - start > args.budget_s:
                print(f"| {label} | {n} | skipped: over the {args.budget_s:.0f} s budget |", flush=True)
                continue
            if engine == "fast+graphs" and device.type != "cuda":
                print(f"| {label} | {n} | n/a: CUDA only |", flush=True)
                continue
            row_start = time.perf_counter()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            backend = None if engine == "eager" else args.attention_backend
            pipe = random_pipeline(args.preset, n, device, engine, dit_only=True, attention_backend=backend,
                                   compile_scope=scope)
            fps, first, _, _, latents = bench_one(pipe, args.latent_frames, args.repeats)
            seconds = pipe.video_frames(args.latent_frames) / fps
            mfu = dit_flops(pipe, args.latent_frames) / seconds / peak
            if engine == "eager":
                reference, error = latents, 0.0
            elif reference is None:
                error = float("nan")  # no eager row to compare with
            else:
                error = ((latents - reference).norm() / reference.norm()).item()
                if not error < 2e-2:
                    failures.append(f"{label}, {n} frames/chunk: relative L2 {error:.3g} vs eager")
            gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            with_decode = {"": "| | |"}
            if args.vae == "all" or label == engines[-1][0]:
                # The same (compiled) transformer, with a VAE decoding each chunk after it, then beside it.
                decoders = []  # (row suffix, VAE, cudnn.benchmark while it decodes)
                if with_vae:
                    decoders.append(("", wan_vae(device, decode_variant[n], n), VAE_VARIANTS[decode_variant[n]][0]))
                if with_tiny:  # a tuned TAEHV sets cudnn.benchmark itself (TinyVAE.tune_convs)
                    decoders.append((", TAEHV", tiny_vae(device, tiny_variant[n]), False))
                for name, decoder_vae, benchmark in decoders:
                    for overlap, suffix in ((False, name), (True, f"{name or ','} decode beside")):
                        vae_pipe = StreamingPipeline(pipe.model, pipe.text_encoder, decoder_vae, pipe.sampling,
                                                     engine=pipe.engine, overlap_decode=overlap,
                                                     early_first_frame=True)
                        with cudnn_benchmark(benchmark):
                            timing = bench_one(vae_pipe, args.latent_frames, args.repeats)
                        with_decode[suffix] = f"| {timing.fps:.1f} | {timing.first_frame_s:.3f} |"
                        del vae_pipe
            for suffix, vae in with_decode.items():
                print(f"| {label}{suffix} | {n} {vae} {fps:.2f} | {first:.3f} | {100 * mfu:.1f} % | {gib:.1f} | "
                      f"{'n/a' if error != error else f'{error:.2e}'} | {time.perf_counter() - row_start:.0f} |",
                      flush=True)
            if args.profile:
                profiles.append((label, n, *profile_stream(pipe, args.latent_frames, device)))
            if args.save_compile_cache is not None:  # after each row: a call cut off keeps what it compiled
                save_compile_cache(args.save_compile_cache)
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if profiles:
        print(f"\nWhere the DiT's time goes: one more stream per row, profiled (share of the "
              f"{'GPU kernel' if device.type == 'cuda' else 'self CPU'} time):\n\n| engine | frames/chunk | "
              + " | ".join(KERNEL_KINDS) + " | other | costliest |\n|---|---|" + "---|" * (len(KERNEL_KINDS) + 2))
        for label, n, shares, top in profiles:
            print(f"| {label} | {n} | " + " | ".join(f"{100 * v:.0f} %" for v in shares.values())
                  + f" | {'; '.join(top)} |", flush=True)
    if with_vae and args.vae_compile:
        compiled_decode(device, args, start, decode_variant)
        if args.save_compile_cache is not None:
            save_compile_cache(args.save_compile_cache)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    faulthandler.cancel_dump_traceback_later()
    for failure in failures:
        print(f"MISMATCH: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
