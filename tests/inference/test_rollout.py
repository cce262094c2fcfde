"""The shared autoregressive rollout loop."""

import pytest
import torch

from factories import randomize_
from selfforcing.diffusion import FlowMatchSchedule
from selfforcing.inference import rollout
from selfforcing.models import BlockCausal, CausalWanModel, KVCache, preset


class Recorder(torch.nn.Module):
    """Wraps the model and records every call of the rollout."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, text, **kw):
        out = self.model(x, t, text, **kw)
        self.calls.append(dict(x=x.detach(), t=t, out=out.detach(), fill=kw.get("update_cache", False),
                               grad=torch.is_grad_enabled()))
        return out


def setup(seed=0):
    torch.manual_seed(seed)
    model = randomize_(CausalWanModel(preset("tiny")), std=0.1).eval()
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    return Recorder(model), model.encode_text(ctx), FlowMatchSchedule()


@torch.no_grad()
def test_every_chunk_attends_to_its_own_earlier_outputs():
    recorder, text, schedule = setup()
    timesteps = schedule.few_step_timesteps()
    chunks = list(rollout(recorder, text, KVCache(2, capacity=9), schedule, timesteps, (1, 4, 3, 8, 8), 3,
                          generator=torch.Generator().manual_seed(0)))
    denoise = [c for c in recorder.calls if not c["fill"]]
    fills = [c for c in recorder.calls if c["fill"]]
    assert len(denoise) == 3 * 4 and len(fills) == 2  # nothing reads the last chunk's K/V: no fill after it
    for c, fill in enumerate(fills):  # the cache is filled with the generated chunk itself, clean (t = 0)
        assert torch.equal(fill["x"], chunks[c]) and (fill["t"] == 0).all()
    for c in range(3):
        # The last denoising step of chunk c, recomputed in parallel with the *generated* chunks
        # 0..c-1 as clean context, gives the same flow: the rollout conditioned on its own outputs.
        last = denoise[4 * c + 3]
        x = torch.cat(chunks[:c] + [last["x"]], dim=2)
        t = torch.cat([torch.zeros(1, 3 * c), last["t"][:, None].expand(1, 3)], dim=1)
        parallel = recorder.model(x, t, text, attention=BlockCausal(3))[:, :, 3 * c:]
        assert (parallel - last["out"]).abs().max() <= 1e-4


def test_gradient_flows_only_through_the_exit_step():
    recorder, text, schedule = setup()
    cache = KVCache(2, capacity=9)
    chunks = list(rollout(recorder, text, cache, schedule, schedule.few_step_timesteps(), (1, 4, 3, 8, 8), 3,
                          generator=torch.Generator().manual_seed(0), exit_index=2, grad=True))
    # 3 steps + a cache fill per chunk; none after the last
    assert [c["grad"] for c in recorder.calls] == ([False, False, True] + [False]) * 2 + [False, False, True]
    assert all(c.requires_grad for c in chunks)
    assert not cache.window(0)[0].requires_grad and cache.window(0)[0].grad_fn is None
    torch.stack(chunks).square().mean().backward()
    assert recorder.model.proj_out.weight.grad is not None


@torch.no_grad()
def test_context_from_final_fills_the_cache_with_the_chunk_inference_would_have_made():
    """A chunk stopped at step 0 fills the cache with itself ("exit", released) or with its
    denoising carried on to the end ("final"): then the next chunk, run to its last step,
    equals the plain rollout's (the noise draws come in the same order)."""
    _, text, schedule = setup()
    timesteps = schedule.few_step_timesteps()

    def chunks(**kw):
        return list(rollout(setup()[0], text, KVCache(2, capacity=9), schedule, timesteps, (1, 4, 3, 8, 8), 2,
                            generator=torch.Generator().manual_seed(0), **kw))

    plain = chunks()
    final = chunks(exit_index=[0, 3], context_from="final")
    early = chunks(exit_index=[0, 3])
    assert not torch.allclose(final[0], plain[0])  # chunk 0 itself is the early estimate either way
    assert torch.equal(final[0], early[0])
    assert torch.allclose(final[1], plain[1], atol=1e-6)
    assert (early[1] - plain[1]).abs().max() > 1e-3


@torch.no_grad()
def test_window_recompute_makes_each_chunk_see_its_window_alone():
    """KV recomputation (Krea Realtime): once the cache has evicted frames, each chunk is denoised
    against K/V re-encoded from the held clean frames only. Stated independently: its last step
    equals a parallel block-causal forward over [the window's chunks, the chunk]. Without it the
    held frames' K/V still carry what they attended to before the eviction."""
    window = 2  # chunks the cache holds
    for recompute in (True, False):
        recorder, text, schedule = setup()
        chunks = list(rollout(recorder, text, KVCache(2, capacity=3 * window), schedule, schedule.few_step_timesteps(),
                              (1, 4, 3, 8, 8), 5, generator=torch.Generator().manual_seed(0),
                              recompute_window=recompute))
        denoise = [c for c in recorder.calls if not c["fill"]]
        fills = [c for c in recorder.calls if c["fill"]]
        # chunks 3 and 4 come after an eviction: 2 re-encoding fills each, besides the 4 fills after chunks 0-3
        assert len(fills) == 4 + (2 * 2 if recompute else 0)
        for c in range(window + 1, 5):
            last = denoise[4 * c + 3]
            x = torch.cat(chunks[c - window:c] + [last["x"]], dim=2)
            t = torch.cat([torch.zeros(1, 3 * window), last["t"][:, None].expand(1, 3)], dim=1)
            parallel = recorder.model(x, t, text, attention=BlockCausal(3))[:, :, 3 * window:]
            gap = (parallel - last["out"]).abs().max()
            assert gap <= 1e-5 if recompute else gap > 1e-4, (recompute, c, gap)


class _FinishedThenWindow:
    """Attention of the reference below: a finished chunk sees the finished chunks up to itself
    (its K/V were cached when it finished), the window sees everything."""

    def __init__(self, finished_frames: int, frames_per_chunk: int):
        self.finished, self.n = finished_frames, frames_per_chunk

    def frame_mask(self, num_frames, device=None):
        idx = torch.arange(num_frames, device=device)
        query_end = torch.where(idx < self.finished, idx // self.n * self.n + self.n, num_frames)
        return idx[None, :] < query_end[:, None]


def rolling_reference(model, text, schedule, timesteps, shape, num_chunks, generator):
    """Rolling Forcing as its released training pipeline lays it out: window w spans the chunks
    max(0, w - S + 1) .. min(w, last), chunk c at step w - c (it entered at window c as noise);
    restated with one full-sequence forward over [finished chunks ; window] instead of a cache."""
    B, C, n, h, w = shape
    S = len(timesteps)
    finished, noisy = [], {}
    for window in range(num_chunks + S - 1):
        if window < num_chunks:
            noisy[window] = torch.randn(shape, generator=generator)
        members = range(max(0, window - S + 1), min(window, num_chunks - 1) + 1)
        x = torch.cat(finished + [noisy[c] for c in members], dim=2)
        t = torch.cat([torch.zeros(B, n * len(finished))] + [timesteps[window - c].expand(B, n) for c in members], 1)
        v = model(x, t, text, attention=_FinishedThenWindow(n * len(finished), n))
        x0 = schedule.x0_from_flow(x, v, t)[:, :, n * len(finished):].split(n, dim=2)
        for c, x0_c in zip(members, x0):
            step = window - c
            if step == S - 1:
                finished.append(x0_c)
            else:
                fresh = torch.randn(shape, generator=generator)
                noisy[c] = schedule.add_noise(x0_c, fresh, timesteps[step + 1].expand(B))
    return torch.cat(finished, dim=2)


@torch.no_grad()
def test_rolling_window_equals_a_step_by_step_reference():
    recorder, text, schedule = setup()
    timesteps = schedule.few_step_timesteps()
    shape, chunks = (1, 4, 3, 8, 8), 6
    video = torch.cat(list(rollout(recorder, text, KVCache(2, capacity=18), schedule, timesteps, shape, chunks,
                                   generator=torch.Generator().manual_seed(0), rolling_window=True)), dim=2)
    reference = rolling_reference(recorder.model, text, schedule, timesteps, shape, chunks,
                                  torch.Generator().manual_seed(0))
    assert video.shape == (1, 4, 18, 8, 8) and video.abs().max() > 0.1
    assert (video - reference).abs().max() <= 1e-4
    windows = [c for c in recorder.calls if not c["fill"]]
    # chunks + S - 1 window forwards, up to S chunks each at staggered levels, oldest the cleanest
    assert [c["x"].shape[2] // 3 for c in windows] == [1, 2, 3, 4, 4, 4, 3, 2, 1]
    assert torch.equal(windows[4]["t"][0, ::3], timesteps.flip(0))


def test_rolling_window_carries_gradient_in_every_fourth_window_only():
    """One exit step x per video: chunk c yields its estimate from window c + ((x - c) mod S),
    so the windows with gradient are those at index x modulo S, and they tile the video."""
    recorder, text, schedule = setup()
    timesteps = schedule.few_step_timesteps()
    first = 2
    chunks = list(rollout(recorder, text, KVCache(2, capacity=18), schedule, timesteps, (1, 4, 3, 8, 8), 6,
                          generator=torch.Generator().manual_seed(0), rolling_window=True, grad=True,
                          exit_index=[(first - c) % 4 for c in range(6)], context_from="final"))
    windows = [c for c in recorder.calls if not c["fill"]]
    assert [i for i, c in enumerate(windows) if c["grad"]] == [2, 6]
    assert not any(c["grad"] for c in recorder.calls if c["fill"])
    assert all(c.requires_grad for c in chunks)
    with torch.no_grad():  # the exit estimates differ from the clean chunks where the exit is not the last step
        clean = list(rollout(recorder, text, KVCache(2, capacity=18), schedule, timesteps, (1, 4, 3, 8, 8), 6,
                             generator=torch.Generator().manual_seed(0), rolling_window=True))
    for c, (estimate, final) in enumerate(zip(chunks, clean)):
        assert torch.allclose(estimate, final, atol=1e-5) == ((first - c) % 4 == 3)


@pytest.mark.parametrize("sinks", [0, 3])
@torch.no_grad()
def test_hidden_frames_stream_as_the_smaller_rolling_cache(sinks):
    """A cache of 6 + 9 frames that lets attention see 6 (training keeps the rest hidden, so
    that a checkpointed forward's window survives until its backward) streams exactly as a
    rolling cache of 6 frames, relative positions and all."""
    recorder, text, schedule = setup()
    timesteps = schedule.few_step_timesteps()

    def stream(cache):
        return torch.cat(list(rollout(recorder, text, cache, schedule, timesteps, (1, 4, 3, 8, 8), 8,
                                      generator=torch.Generator().manual_seed(0))), dim=2)

    plain = stream(KVCache(2, capacity=6, sink_frames=sinks, rope_positions="relative"))
    hidden = KVCache(2, capacity=15, sink_frames=sinks, rope_positions="relative", attended_frames=6)
    assert (stream(hidden) - plain).abs().max() <= 1e-5 and plain.abs().max() > 0.1
    assert len(hidden) == 15 and hidden.overwrites == 1  # (the reset) frames overwritten only once hidden
