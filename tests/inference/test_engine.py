"""The fast streaming engine (``StaticKVCache`` + one fixed-shape chunk step) against the
eager reference loop, and its compiled step: one graph, never recompiled."""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch

from factories import randomize_
from selfforcing.bench import FixedTextEncoder
from selfforcing.errors import SelfForcingError
from selfforcing.inference.conditioning import Conditioning
from selfforcing.inference.pipeline import SamplingConfig, StreamingPipeline
from selfforcing.models import CausalWanModel, WanConfig, preset
from selfforcing.models.graphs import CapturedStep
from selfforcing.models.kv_cache import StaticKVCache
from selfforcing.models.wan import _first_chunk_block, _one_block
from selfforcing.models.vae import PixelCodec


def tiny_model(rope_max_seq_len: int = 64) -> CausalWanModel:
    torch.manual_seed(0)
    cfg = WanConfig.from_dict({**preset("tiny").to_dict(), "in_channels": 12, "out_channels": 12,
                               "rope_max_seq_len": rope_max_seq_len})
    return randomize_(CausalWanModel(cfg), std=0.1).eval()


def pipelines(model: CausalWanModel, **sampling) -> dict[str, StreamingPipeline]:
    s = SamplingConfig(height=16, width=16, **{"kv_cache_frames": 6, **sampling})
    return {engine: StreamingPipeline(model, FixedTextEncoder(16, 8), PixelCodec(2), s, engine=engine)
            for engine in ("eager", "fast")}


def texts(pipe: StreamingPipeline, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    return [pipe.model.encode_text(torch.randn(batch, 8, 16, generator=g)) for _ in range(2)]


def latents(pipe: StreamingPipeline, num_frames: int, switch=None, prefix=None, batch: int = 2) -> torch.Tensor:
    """Stream and return every chunk's latents; ``switch(conditioning)`` after the second chunk."""
    first, second = texts(pipe, batch)
    conditioning = Conditioning(first)
    out = []
    with torch.no_grad():
        for chunk in pipe.stream(conditioning, num_frames, seed=0, initial_latents=prefix):
            out.append(chunk.latents)
            if switch is not None and chunk.index == 1:
                switch(conditioning, second)
    return torch.cat(out, dim=2)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-5, (a - b).abs().max()


@pytest.mark.parametrize("frames_per_chunk", [3, 1])
@pytest.mark.parametrize("sinks, rope", [(0, "absolute"), (1, "relative"), (2, "relative")])
def test_fast_engine_equals_the_eager_loop_while_the_cache_rolls(frames_per_chunk, sinks, rope):
    """Batch 2; a cache of 6 frames over a 24-frame stream: it fills, then evicts every chunk."""
    if rope == "absolute":  # absolute positions stop at the RoPE table (64): 24 frames fit
        sinks = 0
    pipes = pipelines(tiny_model(), frames_per_chunk=frames_per_chunk, sink_frames=sinks, rope_positions=rope)
    assert_same(latents(pipes["eager"], 24), latents(pipes["fast"], 24))


@pytest.mark.parametrize("sinks, rope", [(0, "absolute"), (1, "relative")])
def test_fast_engine_equals_the_eager_loop_with_window_recompute(sinks, rope):
    """KV recomputation re-encodes the window before every chunk once it rolls (24 frames, a
    cache of 6: from the third chunk on)."""
    pipes = pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope, kv_recompute=True)
    recomputed = latents(pipes["eager"], 24)
    assert_same(recomputed, latents(pipes["fast"], 24))
    assert (recomputed - latents(pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope)["eager"], 24)
            ).abs().max() > 1e-4  # (an option that changes the stream: far past the engines' 1e-5)


@pytest.mark.parametrize("sinks, rope", [(1, "absolute"), (2, "relative"), (3, "relative")])
def test_fast_engine_equals_the_eager_loop_with_an_ema_sink(sinks, rope):
    """The fast engine stores keys rotated: an evicted key is moved to its sink's position
    before it is fused (the eager cache fuses pre-RoPE keys)."""
    pipes = pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope, kv_cache_frames=3 + sinks, sink_ema=0.7)
    fused = latents(pipes["eager"], 24)
    assert_same(fused, latents(pipes["fast"], 24))
    plain = pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope, kv_cache_frames=3 + sinks)["eager"]
    assert (fused - latents(plain, 24)).abs().max() > 1e-4


@pytest.mark.parametrize("sinks, rope", [(0, "absolute"), (2, "relative")])
def test_fast_engine_equals_the_eager_loop_with_a_rolling_window(sinks, rope):
    """Rolling Forcing's window: four chunks denoised in one forward (the engine's chunk is the
    window; a cache fill is a padded piece of it), the cache of 6 frames rolling under it."""
    pipes = pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope, rolling_window=True)
    rolled = latents(pipes["eager"], 24)
    assert_same(rolled, latents(pipes["fast"], 24))
    assert (rolled - latents(pipelines(tiny_model(), sink_frames=sinks, rope_positions=rope)["eager"], 24)
            ).abs().max() > 1e-4


def test_fast_engine_goes_past_the_rope_table_with_relative_positions():
    pipes = pipelines(tiny_model(rope_max_seq_len=10), sink_frames=1, rope_positions="relative")
    assert_same(latents(pipes["eager"], 30), latents(pipes["fast"], 30))  # frame 29 is past the 10-position table


@pytest.mark.parametrize("mode", ["recache", "blend"])
def test_fast_engine_equals_the_eager_loop_across_a_prompt_switch(mode):
    pipes = pipelines(tiny_model(), sink_frames=1, rope_positions="relative")
    switch = lambda c, text: c.switch(text, mode, blend_chunks=3)  # noqa: E731
    assert_same(latents(pipes["eager"], 24, switch), latents(pipes["fast"], 24, switch))


def test_fast_engine_equals_the_eager_loop_when_extending_a_video():
    """A 7-frame prefix fills the cache in pieces of 3, 3 and 1 (the last one padded to a chunk)."""
    pipes = pipelines(tiny_model(), sink_frames=1, rope_positions="relative")
    prefix = torch.randn(1, 12, 7, 8, 8, generator=torch.Generator().manual_seed(5))
    assert_same(latents(pipes["eager"], 12, prefix=prefix, batch=1), latents(pipes["fast"], 12, prefix=prefix, batch=1))


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_a_preferred_attention_kernel_is_first_whenever_attention_runs(engine, monkeypatch):
    """``set_attention_backend`` puts its kernel first in torch's SDPA priority order (torch's
    own order puts flash first and cuDNN after math) for every attention of a stream, and
    only there; the stream is the one torch's order gives (here on the CPU, which has one
    fused kernel)."""
    import selfforcing.models.wan as wan
    from torch.nn.attention import SDPBackend

    pipe = pipelines(tiny_model(), sink_frames=1, rope_positions="relative")[engine]
    default_order = torch._C._get_sdp_priority_order()
    expected = latents(pipe, 12)
    first_kernels, sdpa = [], wan.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        first_kernels.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(wan.F, "scaled_dot_product_attention", spy)
    pipe.model.set_attention_backend("cudnn")
    assert_same(expected, latents(pipe, 12))
    assert first_kernels and set(first_kernels) == {int(SDPBackend.CUDNN_ATTENTION)}
    assert torch._C._get_sdp_priority_order() == default_order


def test_the_attention_backend_and_compile_scope_are_named_and_checked():
    from selfforcing.cli import ATTENTION_BACKEND_NAMES, COMPILE_SCOPE_NAMES
    from selfforcing.inference.pipeline import COMPILE_SCOPES
    from selfforcing.models.wan import ATTENTION_BACKENDS

    assert ATTENTION_BACKEND_NAMES == tuple(ATTENTION_BACKENDS) and COMPILE_SCOPE_NAMES == COMPILE_SCOPES
    pipe = pipelines(tiny_model())["fast"]
    with pytest.raises(SelfForcingError, match="attention backend must be one of flash, efficient, cudnn, math"):
        pipe.model.set_attention_backend("sage")
    with pytest.raises(SelfForcingError, match="compile scope must be one of step, blocks, got 'layer'"):
        pipe.compile(scope="layer")
    pipe.compile()
    assert pipe.compile_scope == "blocks"  # the CPU's default: as fast as the whole step, far less compiling
    with pytest.raises(SelfForcingError, match="before compile_step"):
        pipe.model.set_attention_backend("cudnn")


def test_generate_and_serve_stream_with_the_fast_engine():
    from selfforcing.cli import DEFAULT_MODEL

    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL)
    assert pipe.engine == "fast" and isinstance(pipe.new_cache(), StaticKVCache)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_the_compiled_step_compiles_once_and_never_recompiles(scope):
    """A stream four times the cache length, with sinks and relative positions (every chunk
    after the third evicts and shifts the window), a re-cache switch, a blend switch and a
    partial prefix piece, then a second stream: two graphs (a chunk with an empty cache, every
    other chunk), each compiled at its first forward and never again; compiling one block for
    all (``scope="blocks"``), the same two graphs serve both blocks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipes = pipelines(tiny_model(), sink_frames=1, rope_positions="relative")
    fast = pipes["fast"]
    fast.compile(scope=scope)
    prefix = torch.randn(2, 12, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = latents(fast, 24, switch=lambda c, text: c.switch(text, "recache"), prefix=prefix)
    graphs = counters["stats"]["unique_graphs"]
    out2 = latents(fast, 24, switch=lambda c, text: c.switch(text, "blend", blend_chunks=3))
    fast.sampling = replace(fast.sampling, kv_recompute=True)  # the window re-encoded before every chunk
    out3 = latents(fast, 24)
    fast.sampling = replace(fast.sampling, kv_recompute=False, sink_ema=0.5)  # evicted frames fused into the sink
    out4 = latents(fast, 24)
    assert graphs == 2 and counters["stats"]["unique_graphs"] == 2
    assert not counters["recompiles"] and not counters["graph_break"]
    fast.sampling = replace(fast.sampling, sink_ema=0.0, rolling_window=True)  # window steps, and one-chunk fills
    out5 = latents(fast, 24)  # the window's own graphs (nothing cached yet; the rest) and the first fill's
    graphs = counters["stats"]["unique_graphs"]
    out6 = latents(fast, 24)
    assert graphs == 5 and counters["stats"]["unique_graphs"] == 5
    assert not counters["recompiles"] and not counters["graph_break"] and torch.equal(out5, out6)
    eager = pipes["eager"]
    assert_same(latents(eager, 24, switch=lambda c, text: c.switch(text, "recache"), prefix=prefix), out)
    assert_same(latents(eager, 24, switch=lambda c, text: c.switch(text, "blend", blend_chunks=3)), out2)
    eager.sampling = replace(eager.sampling, kv_recompute=True)
    assert_same(latents(eager, 24), out3)
    eager.sampling = replace(eager.sampling, kv_recompute=False, sink_ema=0.5)
    assert_same(latents(eager, 24), out4)
    eager.sampling = replace(eager.sampling, sink_ema=0.0, rolling_window=True)
    assert_same(latents(eager, 24), out5)


class ReplayedStep(CapturedStep):
    """``CapturedStep`` with the capture swapped for a plain call on the static buffers: a
    replay then sees exactly what a CUDA graph would read, so any input not routed through
    them shows as a mismatch, on the CPU."""

    def _capture(self, run):
        out = run()
        return lambda: out.copy_(run()), out


def test_a_captured_step_replays_only_on_the_buffers_it_was_captured_on():
    """A graph reads and writes its cache buffers by address: a call on a cache that shares
    only its first layer's buffers with a captured one (as a new cache may, taking freed
    addresses) gets a graph of its own, whose replay writes into the caller's buffers."""
    from types import SimpleNamespace

    from selfforcing.models.wan import StaticAttnInputs

    def step(x, t, text, sa):  # writes every cache buffer in place, as a chunk's K/V
        for buffer in (*sa.keys, *sa.values):
            buffer.fill_(x.sum())
        return x + t

    captured = ReplayedStep(step)
    text = SimpleNamespace(kv=[(torch.zeros(2), torch.zeros(2))])
    shared, first, second = torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1)
    rope = (torch.ones(1), torch.zeros(1))
    captured(torch.ones(3), torch.zeros(1), text, StaticAttnInputs(rope, [shared, first], [shared, first]))
    captured(torch.full((3,), 2.0), torch.zeros(1), text, StaticAttnInputs(rope, [shared, second], [shared, second]))
    assert len(captured._graphs) == 2
    assert (first == 3).all() and (second == 6).all() and (shared == 6).all()


@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_captured_steps_read_every_input_through_their_static_buffers(scope):
    """Rolling with sinks and relative positions, a prefix piece, a re-cache and a blend
    switch. A later stream of the same shape reuses the cache buffers, so it replays the
    captures of the earlier ones (one per attended-prefix length) and captures nothing new.
    ``blocks``: the step as a regional compile runs it, each block on its own layer's inputs."""
    pipes = pipelines(tiny_model(), sink_frames=1, rope_positions="relative")
    model = pipes["fast"].model
    steps = (model._first_chunk_step, model._step) if scope == "step" else (
        partial(model._step, run_block=_first_chunk_block), partial(model._step, run_block=_one_block))
    model._compiled_steps = steps = tuple(ReplayedStep(step) for step in steps)
    prefix = torch.randn(2, 12, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    recache, blend = (lambda c, text: c.switch(text, "recache"),  # noqa: E731
                      lambda c, text: c.switch(text, "blend", blend_chunks=3))
    try:
        assert_same(latents(pipes["eager"], 24, recache, prefix), latents(pipes["fast"], 24, recache, prefix))
        assert_same(latents(pipes["eager"], 24, blend), latents(pipes["fast"], 24, blend))
        captured = [len(step._graphs) for step in steps]
        assert_same(latents(pipes["eager"], 24, recache), latents(pipes["fast"], 24, recache))
    finally:
        del model._compiled_steps
    # The first chunk; then a 3-frame chunk after 1 held frame (the sink, re-cached first),
    # 3, 4 (the video prefix) and 6 (a full ring).
    assert [sorted(key[1] // 16 for key in step._graphs) for step in steps] == [[3], [4, 6, 7, 9]]
    assert captured == [1, 4] and [len(step._graphs) for step in steps] == captured


@pytest.mark.parametrize("cache_frames, lengths", [(6, [6, 9]), (7, [6, 9, 10])])
def test_a_warm_up_stream_captures_every_graph_a_stream_replays(cache_frames, lengths):
    """``warm_up`` meets every state of a stream from a prompt (empty cache, each fill level,
    the full ring; also where 3-frame chunks do not divide the cache), so the next streams of
    its batch, however long, capture nothing new and are unchanged."""
    pipes = pipelines(tiny_model(), kv_cache_frames=cache_frames, sink_frames=1, rope_positions="relative")
    model = pipes["fast"].model
    model._compiled_steps = steps = tuple(ReplayedStep(step) for step in (model._first_chunk_step, model._step))
    try:
        assert pipes["fast"].warm_up(batch=2) > 0
        # Attended frames: the first chunk's 3; then 3 held and the chunk, 6 and the chunk, ...
        assert [sorted(key[1] // 16 for key in step._graphs) for step in steps] == [[3], lengths]
        assert_same(latents(pipes["eager"], 24), latents(pipes["fast"], 24))
        assert [len(step._graphs) for step in steps] == [1, len(lengths)]
    finally:
        model.drop_compiled_step()


def test_a_warm_up_stops_at_the_rope_table_with_absolute_positions():
    """With absolute positions a stream may not run past the RoPE table: the warm-up stops
    at the last whole chunk it holds instead of refusing (8 positions: 6 frames, not 9)."""
    fast = pipelines(tiny_model(rope_max_seq_len=8))["fast"]
    fast.warm_up()
    assert fast.stats.frames == 6


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(SelfForcingError, match="CUDA graphs need a CUDA device"):
        pipelines(tiny_model())["fast"].compile(cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention_backend", [None, "cudnn"])
@pytest.mark.parametrize("scope", ["step", "blocks"])
def test_cuda_graphs_match_the_eager_loop_in_bf16(attention_backend, scope):
    """Batch 1, as the server and the benchmarks stream: there the cache prefix is laid out as
    cuDNN's ragged path takes it (``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``), when set."""
    model = tiny_model().to("cuda", torch.bfloat16)
    eager = pipelines(model, sink_frames=1, rope_positions="relative")["eager"]  # torch's kernel order
    fast = pipelines(copy.deepcopy(model), sink_frames=1, rope_positions="relative")["fast"]
    fast.model.set_attention_backend(attention_backend)
    fast.compile(cuda_graphs=True, scope=scope)
    reference, out = latents(eager, 24, batch=1).float(), latents(fast, 24, batch=1).float()
    assert (out - reference).norm() / reference.norm() < 2e-2


def test_a_finished_or_dropped_stream_leaves_its_cache_to_the_next_one():
    """Later streams of the same shape reuse the cache buffers (and so the CUDA graphs captured
    on them); a stream abandoned after one chunk returns its cache too, reset."""
    fast = pipelines(tiny_model())["fast"]
    text = texts(fast)[0]
    stream = fast.stream(Conditioning(text), 12)
    next(stream)
    stream.close()
    (cache,) = [c for idle in fast._idle_caches.values() for c in idle]
    assert cache.num_valid == 0
    with torch.no_grad():
        list(fast.stream(Conditioning(text), 12))
    assert [c for idle in fast._idle_caches.values() for c in idle] == [cache]
    list(fast.stream(Conditioning(texts(fast, batch=1)[0]), 12))  # another batch: another cache
    assert sum(len(idle) for idle in fast._idle_caches.values()) == 2
