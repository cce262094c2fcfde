"""The autoregressive rollout: the one loop behind streaming inference, Self Forcing
training and the live server.

For each chunk (paper Algorithm 1 for training, Algorithm 2 for inference):

1. start from pure noise and denoise through the few-step list, attending to the KV cache
   of earlier *generated* chunks (never ground truth: that is the point of Self Forcing);
2. hand the clean chunk ``x0`` to the caller (the generator ``yield``\\ s it at once);
3. run one more forward on the detached clean chunk (timestep ``context_t``, 0 by default,
   optionally noised) to write its K/V into the cache, evicting the oldest frames when full;
   not after the last of ``num_chunks`` chunks, whose K/V nothing would read (the released
   code runs that forward too; skipping it changes no output, only saves one forward and,
   with a noisy context, the noise it would have drawn).

Training passes ``exit_index``/``grad`` so that only the exit step builds a graph
(stochastic gradient truncation, §3.3); the cache-fill pass never does.

The live server passes a ``Conditioning`` instead of a fixed text, to switch prompts between
chunks; a ``"recache"`` switch re-encodes the held frames under the new prompt before step 1,
which is why the loop keeps the clean latents of the frames its cache holds. With
``recompute_window`` the same re-encoding runs before every chunk once the cache has evicted a
frame (KV recomputation, as Krea Realtime 14B's blog describes it): a held frame's K/V were
computed attending to frames evicted since, so they carry those frames on; re-encoded, the
window's K/V depend on the window's frames alone.
"""

from __future__ import annotations

from typing import Iterator

import torch

from selfforcing.diffusion.samplers import few_step_denoise
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.inference.conditioning import Conditioning
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.wan import CausalWanModel, TextContext


def rollout(
    model: CausalWanModel,
    text: TextContext | Conditioning,
    cache: KVCache,
    schedule: FlowMatchSchedule,
    timesteps: torch.Tensor,
    chunk_shape: tuple[int, ...],
    num_chunks: int | None,
    *,
    generator: torch.Generator | None = None,
    context_t: float = 0.0,
    prefix: torch.Tensor | None = None,
    exit_index: int | list[int] | None = None,
    grad: bool = False,
    hide_first_chunk_from_last: bool = False,
    context_from: str = "exit",
    recompute_window: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield clean latent chunks of shape ``chunk_shape`` (B, C, n, h, w); ``num_chunks=None`` streams for ever.

    ``prefix`` (B, C, F0, h, w) holds given clean latents to continue from (video
    extension): they only fill the cache, in pieces of ``n`` frames, and are not yielded.
    ``exit_index`` may differ per chunk (a list). ``hide_first_chunk_from_last`` is the §3.4 training trick: the last of ``num_chunks``
    chunks does not attend to the first chunk (as if the rolling cache had evicted it).
    ``context_from`` says which output of a chunk stopped early at ``exit_index`` fills the cache:
    ``"exit"`` (the released code) that early estimate itself, ``"final"`` (an option of ours)
    the chunk denoised on through the remaining steps without gradient, as inference would
    have made it, so the later chunks train on the context they will see at inference.
    """
    device = timesteps.device
    frames_per_chunk = chunk_shape[2]
    conditioning = text if isinstance(text, Conditioning) else Conditioning(text)
    text = conditioning.text
    held: dict[int, torch.Tensor] = {}  # stream frame index -> clean latent of a frame the cache holds

    def flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, text, kv_cache=cache)

    def fill_cache(text: TextContext, x0: torch.Tensor) -> None:
        _fill_cache(model, text, cache, schedule, x0, context_t, generator)

    def remember(x0: torch.Tensor) -> None:
        first = cache.frames_seen - x0.shape[2]
        held.update({first + i: x0[:, :, i:i + 1] for i in range(x0.shape[2])})
        for frame in held.keys() - set(cache.held_frames()):
            del held[frame]

    if prefix is not None:
        for start in range(0, prefix.shape[2], frames_per_chunk):
            fill_cache(text, prefix[:, :, start:start + frames_per_chunk])
            remember(prefix[:, :, start:start + frames_per_chunk])
    chunk = 0
    while num_chunks is None or chunk < num_chunks:
        text, recache = conditioning.next_chunk()
        if recache or recompute_window and cache.frames_seen > len(held):  # (held: the frames not evicted)
            _recache(text, cache, held, frames_per_chunk, fill_cache)
        if hide_first_chunk_from_last and chunk == num_chunks - 1 and chunk > 0:
            cache.hide_frames_before(frames_per_chunk)
        noise = torch.randn(chunk_shape, generator=generator, device=device)
        exit_at = exit_index[chunk] if isinstance(exit_index, list) else exit_index
        x0 = few_step_denoise(flow, noise, timesteps, schedule, exit_index=exit_at, grad=grad, generator=generator)
        yield x0
        chunk += 1
        if chunk == num_chunks:
            break  # no later chunk would read the last one's K/V: its cache fill would be wasted work
        context = x0.detach()
        if context_from == "final" and exit_at is not None:
            context = _finish(flow, context, timesteps[exit_at + 1:], schedule, generator)
        fill_cache(text, context)
        remember(context)


def _recache(text: TextContext, cache: KVCache, held: dict[int, torch.Tensor], frames_per_chunk: int, fill_cache) -> None:
    """Re-encode the held frames under ``text`` at their original stream positions (LongLive's
    KV re-cache), in pieces of one chunk as they were first written."""
    frames, next_frame = cache.held_frames(), cache.frames_seen
    cache.reset()
    runs: list[list[int]] = []  # contiguous stretches: sinks, then the recent frames
    for f in frames:
        if runs and f == runs[-1][-1] + 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    for run in runs:
        cache.skip_to(run[0])
        for i in range(0, len(run), frames_per_chunk):
            fill_cache(text, torch.cat([held[f] for f in run[i:i + frames_per_chunk]], dim=2))
    cache.skip_to(next_frame)


@torch.no_grad()
def _finish(flow, x0: torch.Tensor, remaining: torch.Tensor, schedule: FlowMatchSchedule,
            generator: torch.Generator | None) -> torch.Tensor:
    """Denoise an early ``x0`` on through the ``remaining`` few-step timesteps (re-noised to the
    first of them, as the sampler would have)."""
    if len(remaining) == 0:
        return x0
    fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return few_step_denoise(flow, schedule.add_noise(x0, fresh, remaining[0].expand(x0.shape[0])), remaining, schedule,
                            generator=generator)


@torch.no_grad()
def _fill_cache(model, text, cache, schedule, x0, context_t, generator) -> None:
    """Write a clean chunk's K/V into the cache (optionally noised to ``context_t``)."""
    t = torch.full((x0.shape[0],), float(context_t), device=x0.device)
    if context_t > 0:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x0 = schedule.add_noise(x0, noise, t)
    model(x0, t, text, kv_cache=cache, update_cache=True)
