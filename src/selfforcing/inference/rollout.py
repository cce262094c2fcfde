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

With ``rolling_window`` step 1 becomes Rolling Forcing's joint denoising window (Liu et al.
2025, §3.1): as many chunks as there are denoising steps are in flight at once, at staggered
noise levels (the oldest at the last step, the newest pure noise), denoised together by one
forward (bidirectional attention among them, the cache of finished chunks before them); after
each forward the oldest comes out clean and a new noise chunk enters, so every forward still
hands over one chunk. Training then takes each chunk's estimate at one step of the window, the
windows that carry gradient being every ``len(timesteps)``-th (the released training pipeline).
"""

from __future__ import annotations

from typing import Iterator

import torch

from selfforcing.diffusion.samplers import few_step_denoise
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.errors import SelfForcingError
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
    rolling_window: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield clean latent chunks of shape ``chunk_shape`` (B, C, n, h, w); ``num_chunks=None`` streams for ever.

    ``prefix`` (B, C, F0, h, w) holds given clean latents to continue from (video
    extension): they only fill the cache, in pieces of ``n`` frames, and are not yielded.
    ``exit_index`` may differ per chunk (a list, where None runs every step), and so may ``grad``
    (a list of bools: a long rollout's chunks before its training window carry none). ``hide_first_chunk_from_last`` is the §3.4 training trick: the last of ``num_chunks``
    chunks does not attend to the first chunk (as if the rolling cache had evicted it).
    ``context_from`` says which output of a chunk stopped early at ``exit_index`` fills the cache:
    ``"exit"`` (the released code) that early estimate itself, ``"final"`` (an option of ours)
    the chunk denoised on through the remaining steps without gradient, as inference would
    have made it, so the later chunks train on the context they will see at inference.
    ``rolling_window`` denoises in Rolling Forcing's joint window (see the module docstring);
    a chunk's ``exit_index`` is then the step of the window forward whose estimate it yields,
    and the cache is always filled from its final output (with an ``exit_index``,
    ``context_from`` must say so: "final").
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

    if rolling_window and (exit_index is not None and context_from != "final" or hide_first_chunk_from_last):
        raise SelfForcingError("a rolling window fills the cache from each chunk's final output and hides no chunk "
                               "(context_from 'final', hide_first_chunk_from_last off)")
    window = _JointWindow(flow, timesteps, schedule, chunk_shape, num_chunks, generator) if rolling_window else None

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
        exit_at = _at(exit_index, chunk, None)
        if window is not None:
            x0, context = window.next_chunk(exit_index, grad)
        else:
            noise = torch.randn(chunk_shape, generator=generator, device=device)
            x0 = few_step_denoise(flow, noise, timesteps, schedule, exit_index=exit_at,
                                  grad=_at(grad, chunk, False), generator=generator)
            context = x0.detach()
        yield x0
        chunk += 1
        if chunk == num_chunks:
            break  # no later chunk would read the last one's K/V: its cache fill would be wasted work
        if window is None and context_from == "final" and exit_at is not None:
            context = _finish(flow, context, timesteps[exit_at + 1:], schedule, generator)
        fill_cache(text, context)
        remember(context)


class _JointWindow:
    """Rolling Forcing's window: the chunks in flight, oldest first, each as [chunk index, step,
    x_t] with ``x_t`` at ``timesteps[step]``; the estimates chunks yield at their exit step."""

    def __init__(self, flow, timesteps: torch.Tensor, schedule: FlowMatchSchedule, chunk_shape: tuple[int, ...],
                 num_chunks: int | None, generator: torch.Generator | None):
        self.flow, self.timesteps, self.schedule = flow, timesteps, schedule
        self.chunk_shape, self.num_chunks, self.generator = chunk_shape, num_chunks, generator
        self.chunks: list[list] = []
        self.entered = 0  # chunks that have entered the window so far
        self.estimates: dict[int, torch.Tensor] = {}  # chunk -> its estimate at its exit step

    def next_chunk(self, exit_index, grad) -> tuple[torch.Tensor, torch.Tensor]:
        """Run window forwards until the oldest chunk is clean; return (what it yields: its exit
        step's estimate, its clean output to fill the cache with, detached)."""
        last = len(self.timesteps) - 1
        while True:
            if len(self.chunks) <= last and (self.num_chunks is None or self.entered < self.num_chunks):
                noise = torch.randn(self.chunk_shape, generator=self.generator, device=self.timesteps.device)
                self.chunks.append([self.entered, 0, noise])
                self.entered += 1
            exiting = [(c, _at(grad, c, False)) for c, step, _ in self.chunks if step == _at(exit_index, c, last)]
            with torch.set_grad_enabled(any(chunk_grad for _, chunk_grad in exiting)):
                x0s = self._denoise()
            oldest = self.chunks[0][0]  # (chunk indices in the window are consecutive)
            for c, chunk_grad in exiting:
                self.estimates[c] = x0s[c - oldest] if chunk_grad else x0s[c - oldest].detach()
            done = self.chunks[0][1] == last
            for entry, x0 in zip(self.chunks[done:], x0s[done:]):  # the others move one step on, noised afresh
                entry[1] += 1
                fresh = torch.randn(x0.shape, generator=self.generator, device=x0.device, dtype=x0.dtype)
                entry[2] = self.schedule.add_noise(x0.detach(), fresh, self.timesteps[entry[1]].expand(x0.shape[0]))
            if done:
                chunk = self.chunks.pop(0)[0]
                return self.estimates.pop(chunk), x0s[0].detach()

    def _denoise(self) -> list[torch.Tensor]:
        """One forward over the whole window: every chunk's x0 estimate, oldest first."""
        x = torch.cat([x_t for _, _, x_t in self.chunks], dim=2)
        n, B = self.chunk_shape[2], x.shape[0]
        t = torch.cat([self.timesteps[step].expand(B, n) for _, step, _ in self.chunks], dim=1)
        return list(self.schedule.x0_from_flow(x, self.flow(x, t), t).split(n, dim=2))


def _at(values, chunk: int, default):
    """A per-chunk value given as one for all or as a list (None in a list: ``default``)."""
    value = values[chunk] if isinstance(values, list) else values
    return default if value is None else value


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
