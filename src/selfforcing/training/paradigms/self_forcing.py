"""Self Forcing (paper Algorithm 1): the student generates the whole video autoregressively,
chunk by chunk, conditioned on a KV cache of its *own* earlier outputs, exactly as at
inference. Gradient is kept only at one randomly drawn exit step of each chunk's few-step
denoising (stochastic gradient truncation, §3.3); the cache is filled from detached outputs.
The video that comes out is then scored as a whole by a holistic loss (DMD, SiD or GAN).

Two options train for videos longer than the training length:

* a long rollout (``rollout_frames``; Self-Forcing++'s extended DMD, LongLive's streaming long
  tuning): the student streams through a rolling cache of ``kv_cache_frames`` (``sink_frames``
  never evicted) without gradient, then a window of the training length, drawn uniformly from
  the rollout, gets the exit-step gradient; only that window is scored, by the short-horizon
  teacher and critic. Chunks after the window are never generated: nothing they hold reaches
  the loss.
* a rolling window (``rolling_window``): chunks are denoised in Rolling Forcing's joint window
  (see :mod:`selfforcing.inference.rollout`); one exit step is drawn per video, and each chunk
  yields its estimate from the window forward whose index is that step modulo the window, so
  that the windows carrying gradient tile the video (the released training pipeline).
"""

from __future__ import annotations

import torch

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.inference.rollout import rollout
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.wan import CausalWanModel
from selfforcing.training.paradigms import sample_exit_index


def rollout_cache(num_frames: int, rollout_frames: int | None, kv_cache_frames: int | None) -> tuple[int, int | None]:
    """(capacity, attended frames) of a training rollout's cache: ``kv_cache_frames`` (default the
    video's ``num_frames``); when the rollout is longer than that, so that the cache rolls, it keeps
    ``num_frames`` more, hidden, so that nothing an exit step saw is overwritten before its
    backward (a checkpointed forward re-reads its window then)."""
    cached = kv_cache_frames or num_frames
    if (rollout_frames or num_frames) <= cached:
        return cached, None
    return cached + num_frames, cached


def generate(
    model: CausalWanModel, shape: tuple[int, ...], text: torch.Tensor, schedule: FlowMatchSchedule,
    frames_per_chunk: int, timesteps: torch.Tensor, exit_generator: torch.Generator,
    generator: torch.Generator | None = None, *, context_t: float = 0.0, exit_per_chunk: bool = False,
    hide_first_chunk_from_last: bool = True, grad: bool = True, context_from: str = "exit",
    rollout_frames: int | None = None, kv_cache_frames: int | None = None, sink_frames: int = 0,
    rolling_window: bool = False,
) -> torch.Tensor:
    """Roll out and return a (B, C, F, h, w) video with gradient through the exit steps only.

    ``exit_per_chunk`` draws a separate exit step for every chunk instead of one shared step.
    ``hide_first_chunk_from_last`` applies the §3.4 restriction to the last chunk.
    ``context_from`` ("exit" or "final"): see :func:`~selfforcing.inference.rollout.rollout`.
    ``rollout_frames`` (default F) streams that many frames and returns the F-frame window that
    trains; the cache holds ``kv_cache_frames`` (default F). Both are drawn from ``exit_generator``
    (seeded alike on every rank): the window's start first, when the rollout is longer than F.
    """
    B, C, F, h, w = shape
    window = F // frames_per_chunk
    num_chunks = (rollout_frames or F) // frames_per_chunk
    start = int(torch.randint(0, num_chunks - window + 1, (1,), generator=exit_generator)) if num_chunks > window else 0
    steps = len(timesteps)
    if rolling_window:  # one draw: the window forwards with gradient are those at that index modulo the window
        first = sample_exit_index(steps, exit_generator)
        exits = [(first - chunk) % steps for chunk in range(start, start + window)]
    else:
        exits = [sample_exit_index(steps, exit_generator) for _ in range(window if exit_per_chunk else 1)] * (
            1 if exit_per_chunk else window)
    # Relative positions: with no frame ever evicted (the released setting) they equal the absolute ones.
    capacity, attended = rollout_cache(F, rollout_frames, kv_cache_frames)
    cache = KVCache(len(model.blocks), capacity=capacity, sink_frames=sink_frames, rope_positions="relative",
                    attended_frames=attended)
    chunks = list(rollout(
        model, model.encode_text(text), cache, schedule, timesteps, (B, C, frames_per_chunk, h, w), start + window,
        generator=generator, context_t=context_t, exit_index=[None] * start + exits,
        grad=[False] * start + [grad] * window, hide_first_chunk_from_last=hide_first_chunk_from_last,
        context_from=context_from, rolling_window=rolling_window,
    ))
    return torch.cat(chunks[start:], dim=2)
