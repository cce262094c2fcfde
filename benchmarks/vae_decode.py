"""The VAE decoders alone, streaming random latents chunk by chunk: the Wan 2.1 VAE and the
TAEHV tiny VAE (``taew2_1``'s shape), random weights (speed does not depend on their values).

    python benchmarks/vae_decode.py --height 240 --width 416 --latent-frames 6 --frames-per-chunk 3

Prints a markdown table of video frames per second (the fastest of ``--repeats`` streams) for
docs/PERFORMANCE.md. On CUDA the weights are bf16 and the Wan VAE runs as ``vae_from_config``
loads it there (``tune_convs``); ``scripts/gpu_check.sh`` times both at 832x480 as well.
"""

from __future__ import annotations

import argparse
import time

import torch

from selfforcing.bench import random_tiny_vae, random_wan_vae
from selfforcing.models.vae import cudnn_benchmark, num_video_frames
from selfforcing.utils import synchronize


def stream_seconds(vae, latents: torch.Tensor, frames_per_chunk: int) -> float:
    """Wall time of one stream decoder over ``latents``, chunk by chunk, waiting for the device."""
    decoder, start = vae.stream_decoder(), time.perf_counter()
    for chunk in latents.split(frames_per_chunk, dim=2):
        decoder.decode_chunk(chunk)
    synchronize(latents.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--latent-frames", type=int, default=21)
    parser.add_argument("--frames-per-chunk", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    vaes = {"TAEHV": random_tiny_vae(device), "Wan 2.1 VAE": random_wan_vae(device)}
    if device.type == "cuda":
        vaes["Wan 2.1 VAE"].tune_convs()
    print(f"{args.width}x{args.height}, {args.latent_frames} latent frames, {args.frames_per_chunk} per chunk, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
          "| decoder | video frames | seconds per stream | video frames/s |\n|---|---|---|---|", flush=True)
    for name, vae in vaes.items():
        latents = torch.randn(1, vae.latent_channels, args.latent_frames, args.height // vae.spatial_ratio,
                              args.width // vae.spatial_ratio, device=device)
        with cudnn_benchmark(getattr(vae, "tuned_convs", False)):
            seconds = min(stream_seconds(vae, latents, args.frames_per_chunk) for _ in range(args.repeats))
        frames = num_video_frames(vae, args.latent_frames)
        print(f"| {name} | {frames} | {seconds:.2f} | {frames / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
