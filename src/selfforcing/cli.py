"""Command line: ``selfforcing generate | bench``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from selfforcing.errors import SelfForcingError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SelfForcingError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SelfForcingError(f"device {name!r} requested but CUDA is not available")
    return device


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from selfforcing.inference.pipeline import StreamingPipeline
    from selfforcing.inference.video import mp4_writer, read_mp4
    from selfforcing.models.text_encoders import validate_prompts

    validate_prompts([args.prompt])
    if args.model is None:
        raise SelfForcingError(
            "no default model is shipped yet; pass --model DIR (a selfforcing or diffusers Wan model directory)"
        )
    pipe = StreamingPipeline.from_pretrained(args.model, device=_device(args.device), checkpoint=args.checkpoint)
    if args.height or args.width:
        pipe.sampling = replace(pipe.sampling, height=args.height or pipe.sampling.height,
                                width=args.width or pipe.sampling.width)
    num_frames = args.frames or pipe.video_frames(21)
    pipe.latent_frames(num_frames)  # validate before creating any output
    initial = None
    if args.extend is not None:
        initial = pipe.encode_video(torch.from_numpy(read_mp4(args.extend))[None])
    with mp4_writer(args.output, pipe.sampling.fps) as writer, tqdm(
        total=num_frames, unit="frame", desc="generating", disable=args.quiet
    ) as bar:
        for chunk in pipe.stream([args.prompt], num_frames, seed=args.seed, initial_latents=initial):
            writer.write(chunk.frames[0])
            bar.update(chunk.frames.shape[1])
    stats = pipe.stats
    print(f"wrote {args.output}: {stats.frames} frames; first frame after {stats.first_frame_s:.3f} s; "
          f"{stats.fps:.1f} FPS")


def cmd_bench(args: argparse.Namespace) -> None:
    from selfforcing.bench import run_bench

    run_bench(preset=args.preset, device=_device(args.device), frames_per_chunk=args.frames_per_chunk,
              latent_frames=args.latent_frames, repeats=args.repeats, output=args.append)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfforcing", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a video from a text prompt into an mp4")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", type=Path, default=Path("out.mp4"))
    g.add_argument("--frames", type=_positive_int, default=None, help="video frames (default: 21 latent frames)")
    g.add_argument("--model", type=Path, default=None, help="model directory")
    g.add_argument("--checkpoint", type=Path, default=None, help="transformer weights to load on top (.safetensors/.pt)")
    g.add_argument("--height", type=_positive_int, default=None, help="video height in pixels (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None, help="video width in pixels (default: the model's)")
    g.add_argument("--extend", type=Path, default=None, help="continue this mp4 (its frames fill the KV cache)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="measure streaming throughput, first-frame latency and peak memory")
    b.add_argument("--preset", default="toy", help="toy | wan2.1-1.3b, built with random weights (speed does not depend on weight values)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--frames-per-chunk", type=_positive_int, nargs="+", default=[3, 1])
    b.add_argument("--latent-frames", type=_positive_int, default=21)
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--append", type=Path, default=None, help="append the result table to this markdown file")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SelfForcingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
