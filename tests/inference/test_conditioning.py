"""Prompt switching mid-stream: re-encoding the cache (LongLive) and blending the conditioning (Krea)."""

import pytest
import torch

from factories import randomize_
from selfforcing.cli import DEFAULT_MODEL
from selfforcing.data.toy_world import BACKGROUND_COLORS
from selfforcing.diffusion import FlowMatchSchedule
from selfforcing.errors import SelfForcingError
from selfforcing.inference import rollout
from selfforcing.inference.conditioning import Conditioning
from selfforcing.inference.pipeline import StreamingPipeline
from selfforcing.models import CausalWanModel, KVCache, preset


def tiny_setup():
    torch.manual_seed(0)
    model = randomize_(CausalWanModel(preset("tiny")), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    return model, [model.encode_text(torch.randn(1, 5, 16, generator=g)) for _ in range(2)], FlowMatchSchedule()


def stream(model, conditioning, schedule, cache, switch_after=None, switch=None, chunks=5):
    out = []
    it = rollout(model, conditioning, cache, schedule, schedule.few_step_timesteps(), (1, 4, 3, 8, 8), chunks,
                 generator=torch.Generator().manual_seed(0))
    for i, x0 in enumerate(it):
        out.append(x0)
        if i == switch_after:
            switch(conditioning)
    return torch.cat(out, dim=2)


@torch.no_grad()
@pytest.mark.parametrize("sinks", [0, 3])
def test_recache_under_the_same_prompt_changes_nothing_before_eviction(sinks):
    model, (a, _), schedule = tiny_setup()
    base = stream(model, Conditioning(a), schedule, KVCache(2, 15, sinks))
    switched = stream(model, Conditioning(a), schedule, KVCache(2, 15, sinks), switch_after=1,
                      switch=lambda c: c.switch(a, "recache"))
    assert (base - switched).abs().max() < 1e-5


class RecordingCache(KVCache):
    """Records what the cache held whenever it is reset, and every skip."""

    def reset(self):
        if hasattr(self, "slot_frame"):
            self.resets = getattr(self, "resets", []) + [(self.held_frames(), self.frames_seen)]
        super().reset()

    def skip_to(self, frame):
        self.skips = getattr(self, "skips", []) + [frame]
        super().skip_to(frame)


@torch.no_grad()
def test_recache_refills_the_held_frames_at_their_positions_across_the_eviction_gap():
    model, (a, b), schedule = tiny_setup()
    cache = RecordingCache(2, 9, sink_frames=3)
    stream(model, Conditioning(a), schedule, cache, switch_after=3, switch=lambda c: c.switch(b, "recache"))
    # The switch comes after chunk 3; its K/V are written first, evicting chunk 1 (frames 3-5).
    assert cache.resets == [([0, 1, 2, 6, 7, 8, 9, 10, 11], 12)]
    assert cache.skips == [0, 6, 12]  # the sink run, the recent run, then the next frame
    # Chunk 4 (frames 12-14), the last, is generated from that cache and not written into it.
    assert cache.held_frames() == [0, 1, 2, 6, 7, 8, 9, 10, 11] and cache.frames_seen == 12


@torch.no_grad()
def test_blend_moves_the_conditioning_linearly_to_the_new_prompt():
    _, (a, b), _ = tiny_setup()
    c = Conditioning(a)
    c.switch(b, "blend", blend_chunks=4)
    texts = [c.next_chunk() for _ in range(5)]
    assert not any(recache for _, recache in texts)
    for i, (t, _) in enumerate(texts[:4], start=1):
        assert torch.allclose(t.text, a.text + (b.text - a.text) * i / 4, atol=1e-6)
    assert texts[3][0] is b and texts[4][0] is b


def test_bad_switch_requests_are_clear_errors():
    model, (a, _), _ = tiny_setup()
    c = Conditioning(a)
    with pytest.raises(SelfForcingError, match="switch mode"):
        c.switch(a, "fade")
    with pytest.raises(SelfForcingError, match="blend_chunks"):
        c.switch(a, "blend", blend_chunks=0)
    with pytest.raises(SelfForcingError, match="does not match"):
        c.switch(model.encode_text(torch.randn(2, 5, 16)), "recache")


def background_distance(frames: torch.Tensor, background: str) -> float:
    """Mean distance of the frames' border pixels (mostly background) to a toy background colour."""
    border = torch.cat([frames[:, :, 0], frames[:, :, -1], frames[:, :, :, 0], frames[:, :, :, -1]], dim=2).float()
    return (border - torch.tensor(BACKGROUND_COLORS[background]).float()).norm(dim=-1).mean().item()


@torch.no_grad()
@pytest.mark.parametrize("mode", ["recache", "blend"])
def test_switching_moves_the_shipped_model_toward_the_new_prompt(mode):
    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL)
    old, new = "a white circle moving up on a gray background", "a white circle moving up on a dark green background"

    def run(switch: bool) -> torch.Tensor:
        conditioning = Conditioning(pipe.encode_prompts(old))
        frames = []
        for chunk in pipe.stream(conditioning, None, seed=0):
            frames.append(chunk.frames)
            if chunk.index == 1 and switch:
                conditioning.switch(pipe.encode_prompts(new), mode, blend_chunks=2)
            if chunk.index == 6:
                return torch.cat(frames, dim=1)

    kept, switched = run(False), run(True)
    assert torch.equal(kept[:, :6], switched[:, :6])  # nothing changes before the switch
    late_kept, late_switched = kept[:, -6:], switched[:, -6:]
    assert background_distance(late_switched, "dark green") < background_distance(late_kept, "dark green") - 50
    assert background_distance(late_switched, "dark green") < background_distance(late_switched, "gray") - 50
