"""KVCache bookkeeping: ring slots, sinks, positions, constant memory."""

import pytest
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.models import KVCache


def fill(cache, frames, tokens_per_frame=2, layers=1):
    slots = cache.evict(frames)
    for layer in range(layers):
        k = torch.full((1, frames * tokens_per_frame, 1, 2), float(cache.frames_seen))
        cache.append(layer, slots, k, k)
    cache.commit(slots)


def test_rolling_eviction_keeps_sinks_and_newest_frames():
    cache = KVCache(num_layers=1, capacity=5, sink_frames=2)
    for _ in range(4):
        fill(cache, 3)
    assert len(cache) == 5 and cache.frames_seen == 12
    assert sorted(cache.slot_frame.tolist()) == [0, 1, 9, 10, 11]
    k, v = cache.window(0)
    assert k.shape == (1, 5 * 2, 1, 2)


def test_positions_absolute_and_relative():
    absolute = KVCache(1, capacity=4, sink_frames=1)
    relative = KVCache(1, capacity=4, sink_frames=1, rope_positions="relative")
    for cache in (absolute, relative):
        for _ in range(3):
            fill(cache, 2)
    assert sorted(absolute.positions().tolist()) == [0, 3, 4, 5]
    assert absolute.next_positions(2).tolist() == [6, 7]
    # relative: sink at 0, the rest renumbered by age right after it; never grows past capacity + chunk
    assert sorted(relative.positions().tolist()) == [0, 1, 2, 3]
    assert relative.next_positions(2).tolist() == [4, 5]


def test_memory_is_constant_as_the_stream_grows():
    cache = KVCache(num_layers=3, capacity=6)
    fill(cache, 3, layers=3)
    size = cache.nbytes()
    for _ in range(20):
        fill(cache, 3, layers=3)
    assert cache.nbytes() == size == 2 * 3 * 6 * 2 * 2 * 4  # k+v, layers, frames, tokens, head_dim, fp32


def test_cache_holds_no_autograd_graph():
    cache = KVCache(1, capacity=3)
    k = torch.randn(1, 2, 1, 2, requires_grad=True) * 2
    slots = cache.evict(1)
    cache.append(0, slots, k, k)
    cache.commit(slots)
    assert not cache.window(0)[0].requires_grad


def test_reset_and_validation():
    cache = KVCache(1, capacity=3)
    fill(cache, 3)
    cache.reset()
    assert len(cache) == 0 and cache.window(0) is None and cache.next_positions(1).tolist() == [0]
    with pytest.raises(SelfForcingError, match="does not fit"):
        KVCache(1, capacity=2).evict(3)
    with pytest.raises(SelfForcingError, match="sink_frames"):
        KVCache(1, capacity=2, sink_frames=3)
    with pytest.raises(SelfForcingError, match="rope_positions"):
        KVCache(1, capacity=2, rope_positions="nope")


def frame_fill(cache, frame_values):
    """Append one chunk whose frames' K and V are the constants ``frame_values`` (2 tokens each)."""
    slots = cache.evict(len(frame_values))
    k = torch.cat([torch.full((1, 2, 1, 2), float(x)) for x in frame_values], dim=1)
    cache.append(0, slots, k, -k)
    cache.commit(slots)


def test_ema_sink_fuses_each_evicted_frame_into_its_sink():
    """Reward Forcing's EMA-Sink, restated: sink j starts as frame j and, as each later frame f
    with f % sinks == j leaves the window (oldest first), becomes a * sink + (1 - a) * frame f."""
    a, sinks, values = 0.6, 2, [3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0, 29.0, 31.0]
    cache = KVCache(1, capacity=4, sink_frames=sinks, sink_ema=a)
    for start in range(0, len(values), 2):  # chunks of 2 frames
        frame_fill(cache, values[start:start + 2])
    # held: the 2 sinks and frames 8, 9; frames 2..7 were evicted, in that order
    expected = [values[0], values[1]]
    for f in range(2, 8):
        expected[f % sinks] = a * expected[f % sinks] + (1 - a) * values[f]
    k, v = cache.window(0)
    by_slot = {int(frame): slot for slot, frame in enumerate(cache.slot_frame.tolist())}
    for j in range(sinks):
        sink_k = k[0, by_slot[j] * 2:(by_slot[j] + 1) * 2]
        assert torch.allclose(sink_k, torch.tensor(expected[j])) and torch.allclose(v[0, by_slot[j] * 2], torch.tensor(-expected[j]))
    assert torch.equal(k[0, by_slot[9] * 2], torch.full((1, 2), values[9]))  # the recent frames are untouched
    with pytest.raises(SelfForcingError, match="sink_ema must be in"):
        KVCache(1, capacity=4, sink_frames=0, sink_ema=0.5)
