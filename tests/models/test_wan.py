"""CausalWanModel: parity with diffusers, the three attention modes and the KV cache."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from factories import randomize_
from selfforcing.errors import SelfForcingError
from selfforcing.models import BlockCausal, CausalWanModel, KVCache, WanConfig, preset

TINY_DIFFUSERS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
)


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = randomize_(WanTransformer3DModel(**TINY_DIFFUSERS)).eval()
    path = tmp_path_factory.mktemp("wan")
    ref.save_pretrained(path)
    return ref, CausalWanModel.from_pretrained(path).eval(), path


def inputs(batch=2, frames=6, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, size, size, generator=g)
    ctx = torch.randn(batch, 7, 16, generator=g)
    return x, ctx, g


@torch.no_grad()
def test_bidirectional_matches_diffusers(diffusers_pair):
    ref, ours, _ = diffusers_pair
    x, ctx, _ = inputs()
    t = torch.tensor([500.0, 937.5])
    expected = ref(x, t, ctx).sample
    assert (ours(x, t, ctx) - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors


@torch.no_grad()
def test_per_frame_timesteps_match_diffusers_per_token(diffusers_pair):
    ref, ours, _ = diffusers_pair
    x, ctx, g = inputs()
    t = torch.rand(2, 6, generator=g) * 1000
    tokens_per_frame = (8 // 2) * (8 // 2)
    expected = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), ctx).sample
    got = ours(x, t, ctx)
    assert (got - expected).abs().max() <= 1e-4
    # per-frame timesteps really change the output compared to one shared timestep
    assert (got - ours(x, t.mean(1), ctx)).abs().max() > 1e-2


def test_sharded_checkpoint_loads(diffusers_pair, tmp_path):
    ref, ours, _ = diffusers_pair
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = CausalWanModel.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(ours.state_dict().items())):
        assert k == k2 and torch.equal(a, b)


def test_save_pretrained_round_trips_through_diffusers(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    ref = WanTransformer3DModel.from_pretrained(tmp_path).eval()
    x, ctx, _ = inputs()
    with torch.no_grad():
        assert (ref(x, torch.tensor([300.0, 700.0]), ctx).sample - tiny_model(x, torch.tensor([300.0, 700.0]), ctx)).abs().max() <= 1e-4


def test_presets_and_config_validation():
    assert preset("wan2.1-1.3b").dim == 1536 and preset("wan2.1-1.3b").num_layers == 30
    assert preset("wan2.1-1.3b").ffn_dim == 8960 and preset("wan2.1-1.3b").text_dim == 4096
    with pytest.raises(SelfForcingError, match="unknown model preset"):
        preset("nope")
    with pytest.raises(SelfForcingError, match="unknown Wan config keys: bogus"):
        WanConfig.from_dict({"bogus": 1})
    with pytest.raises(SelfForcingError, match="image-to-video"):
        WanConfig.from_dict({"image_dim": 1280})


def test_wan_1_3b_parameter_count():
    with torch.device("meta"):
        model = CausalWanModel(preset("wan2.1-1.3b"))
    assert 1.40e9 < sum(p.numel() for p in model.parameters()) < 1.45e9  # Wan2.1-T2V-1.3B: 1.42B


@pytest.mark.parametrize("name", ["tiny", "toy", "wan2.1-1.3b", "wan2.1-14b"])
def test_a_configs_parameters_are_counted_without_building_it(name):
    with torch.device("meta"):
        model = CausalWanModel(preset(name))
    assert preset(name).num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("change,message", [
    ({"num_layers": 10**8}, "100000000 layers, width 128 and ffn_dim 512 has 2.65e[+]13 parameters: past any"),
    ({"ffn_dim": 10**12}, "past any model"),
    ({"rope_max_seq_len": 10**9}, "rope_max_seq_len must be in"),
])
def test_a_config_past_any_model_is_refused_before_anything_is_built(change, message):
    with pytest.raises(SelfForcingError, match=message):
        WanConfig(**{**preset("toy").__dict__, **change})


def test_a_model_the_memory_cannot_hold_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr("selfforcing.memory.available_bytes", lambda device: 10**6)  # 1 MB free
    with pytest.raises(SelfForcingError, match="Wan transformer of 1.22e[+]06 parameters needs at least 0.0 GiB"):
        CausalWanModel(preset("toy"))  # 4.9 MB of float32 weights
    CausalWanModel(preset("tiny"))  # 147 kB


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(SelfForcingError, match="config.json not found"):
        CausalWanModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_dict()))
    with pytest.raises(SelfForcingError, match="no weights"):
        CausalWanModel.from_pretrained(tmp_path)


def test_load_weights_names_missing_and_unexpected_keys(tiny_model):
    state = dict(tiny_model.state_dict())
    state["blocks.0.extra.weight"] = state.pop("blocks.0.attn1.to_q.weight")
    with pytest.raises(SelfForcingError) as err:
        CausalWanModel(preset("tiny")).load_weights(state)
    assert "blocks.0.attn1.to_q.weight" in str(err.value) and "blocks.0.extra.weight" in str(err.value)


def stream_incrementally(model, x, t, ctx, frames_per_chunk, cache):
    """Chunk by chunk against the cache: query pass, then the cache-fill pass on the same input."""
    text = model.encode_text(ctx)
    outs = []
    for c in range(0, x.shape[2], frames_per_chunk):
        xs, ts = x[:, :, c:c + frames_per_chunk], t[:, c:c + frames_per_chunk]
        outs.append(model(xs, ts, text, kv_cache=cache))
        model(xs, ts, text, kv_cache=cache, update_cache=True)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("frames_per_chunk", [3, 1])
@torch.no_grad()
def test_kv_cache_equals_block_causal_forward(tiny_model, frames_per_chunk):
    x, ctx, g = inputs(frames=9)
    t = torch.rand(2, 9, generator=g) * 1000  # per-frame timesteps (diffusion forcing)
    parallel = tiny_model(x, t, ctx, attention=BlockCausal(frames_per_chunk))
    incremental = stream_incrementally(tiny_model, x, t, ctx, frames_per_chunk, KVCache(2, capacity=9))
    assert (parallel - incremental).abs().max() <= 1e-4
    # and block-causal differs from bidirectional (the mask is doing something)
    assert (parallel - tiny_model(x, t, ctx)).abs().max() > 1e-2


@pytest.mark.parametrize("frames_per_chunk,capacity,sinks", [(3, 3, 0), (3, 4, 1), (1, 3, 0), (1, 4, 2)])
@torch.no_grad()
def test_rolling_cache_equals_sliding_window_forward(tiny_model, frames_per_chunk, capacity, sinks):
    """Once frames are evicted, streaming equals a parallel forward that sees exactly the
    window the cache kept (sinks + the most recent frames), at every chunk."""
    x, ctx, g = inputs(frames=12)
    t = torch.rand(2, 12, generator=g) * 1000
    cache = KVCache(2, capacity=capacity, sink_frames=sinks)
    incremental = stream_incrementally(tiny_model, x, t, ctx, frames_per_chunk, cache)
    window = BlockCausal(frames_per_chunk, window_frames=capacity, sink_frames=sinks)
    assert (tiny_model(x, t, ctx, attention=window) - incremental).abs().max() <= 1e-4
    assert cache.frames_seen == 12 and len(cache) == capacity
    kept = sorted(cache.slot_frame.tolist())
    assert kept == list(range(sinks)) + list(range(12 - capacity + sinks, 12))
    # eviction really happened: the unrestricted block-causal forward differs
    assert (tiny_model(x, t, ctx, attention=BlockCausal(frames_per_chunk)) - incremental).abs().max() > 1e-3


def test_restricted_mask_hides_first_chunk_from_last_chunk():
    mask = BlockCausal(3, hide_first_chunk_from_last=True).frame_mask(9)
    assert not mask[6:, :3].any()  # last chunk cannot see the first
    assert mask[6:, 3:9].all() and mask[3:6, :6].all()  # everything else is block-causal
    assert not mask[:3, 3:].any()


@torch.no_grad()
def test_restricted_mask_makes_last_chunk_independent_of_first():
    """With one layer, keys depend on their own frame only, so a mask that hides the first
    chunk makes the last chunk's output exactly independent of it."""
    torch.manual_seed(0)
    tiny_model = randomize_(CausalWanModel(WanConfig(**{**preset("tiny").__dict__, "num_layers": 1}))).eval()
    x, ctx, g = inputs(frames=9)
    t = torch.full((2,), 500.0)
    x2 = x.clone()
    x2[:, :, :3] = torch.randn(2, 4, 3, 8, 8, generator=g)  # change only the first chunk
    restricted = BlockCausal(3, hide_first_chunk_from_last=True)
    assert torch.allclose(tiny_model(x, t, ctx, attention=restricted)[:, :, 6:],
                          tiny_model(x2, t, ctx, attention=restricted)[:, :, 6:], atol=1e-6)
    plain = BlockCausal(3)
    assert not torch.allclose(tiny_model(x, t, ctx, attention=plain)[:, :, 6:],
                              tiny_model(x2, t, ctx, attention=plain)[:, :, 6:], atol=1e-3)


def test_block_causal_needs_whole_chunks(tiny_model):
    x, ctx, _ = inputs(frames=4)
    with pytest.raises(SelfForcingError, match="not a multiple of frames_per_chunk=3"):
        tiny_model(x, torch.zeros(2), ctx, attention=BlockCausal(3))


def test_bad_shapes_get_clear_errors(tiny_model):
    x, ctx, _ = inputs()
    with pytest.raises(SelfForcingError, match="timesteps must have shape"):
        tiny_model(x, torch.zeros(2, 5), ctx)
    with pytest.raises(SelfForcingError, match="text embeddings must have shape"):
        tiny_model(x, torch.zeros(2), torch.zeros(2, 7, 3))
    with pytest.raises(SelfForcingError, match="not divisible by patch size"):
        tiny_model(torch.zeros(2, 4, 6, 7, 8), torch.zeros(2), ctx)


@torch.no_grad()
def test_original_format_checkpoint_loads_into_the_same_network(diffusers_pair, tmp_path):
    """diffusers -> original (Self-Forcing .pt) -> ours reproduces diffusers' output exactly."""
    from selfforcing.models.convert import diffusers_to_original, load_state_dict_file

    ref, _, _ = diffusers_pair
    original = {f"model.{k}": v for k, v in diffusers_to_original(ref.state_dict()).items()}
    torch.save({"generator": original, "generator_ema": original}, tmp_path / "self_forcing.pt")
    model = CausalWanModel(preset("tiny"))
    model.load_weights(load_state_dict_file(tmp_path / "self_forcing.pt"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x, ctx, _ = inputs()
    t = torch.tensor([100.0, 600.0])
    assert (model.eval()(x, t, ctx) - ref(x, t, ctx).sample).abs().max() <= 1e-4


@pytest.mark.parametrize("frames_per_chunk", [3, 1])
@torch.no_grad()
def test_teacher_forcing_equals_streaming_on_clean_ground_truth(tiny_model, frames_per_chunk):
    """One teacher-forcing forward = streaming each noisy chunk against a cache of the clean frames."""
    x_noisy, ctx, g = inputs(frames=6)
    clean = torch.randn(x_noisy.shape, generator=g)
    t = torch.rand(2, 6, generator=g) * 1000
    parallel = tiny_model(x_noisy, t, ctx, attention=BlockCausal(frames_per_chunk), context_frames=clean)
    cache, text, outs = KVCache(2, capacity=6), tiny_model.encode_text(ctx), []
    for c in range(0, 6, frames_per_chunk):
        sl = slice(c, c + frames_per_chunk)
        outs.append(tiny_model(x_noisy[:, :, sl], t[:, sl], text, kv_cache=cache))
        tiny_model(clean[:, :, sl], torch.zeros(2), text, kv_cache=cache, update_cache=True)
    assert (parallel - torch.cat(outs, 2)).abs().max() <= 1e-4
    # the first chunk sees no context at all; later chunks do depend on the clean frames
    other = tiny_model(x_noisy, t, ctx, attention=BlockCausal(frames_per_chunk), context_frames=clean + 1)
    n = frames_per_chunk
    assert torch.allclose(other[:, :, :n], parallel[:, :, :n], atol=1e-6)
    assert not torch.allclose(other[:, :, n:], parallel[:, :, n:], atol=1e-3)


@torch.no_grad()
def test_noisy_context_frames_equal_streaming_on_a_noisy_cache(tiny_model):
    """Diffusion-forcing context: the cache holds ground truth noised to per-frame context timesteps."""
    x, ctx, g = inputs(frames=6)
    frames = torch.randn(x.shape, generator=g)
    t, frames_t = torch.rand(2, 6, generator=g) * 1000, torch.rand(2, 6, generator=g) * 1000
    parallel = tiny_model(x, t, ctx, attention=BlockCausal(3), context_frames=frames, context_t=frames_t)
    cache, text, outs = KVCache(2, capacity=6), tiny_model.encode_text(ctx), []
    for c in (0, 3):
        outs.append(tiny_model(x[:, :, c:c + 3], t[:, c:c + 3], text, kv_cache=cache))
        tiny_model(frames[:, :, c:c + 3], frames_t[:, c:c + 3], text, kv_cache=cache, update_cache=True)
    assert (parallel - torch.cat(outs, 2)).abs().max() <= 1e-4


@torch.no_grad()
def test_hidden_cache_frames_equal_the_restricted_mask(tiny_model):
    """Streaming with the first chunk hidden from the last equals the §3.4 block-causal mask."""
    x, ctx, g = inputs(frames=9)
    t = torch.rand(2, 9, generator=g) * 1000
    cache, text, outs = KVCache(2, capacity=9), tiny_model.encode_text(ctx), []
    for c in range(0, 9, 3):
        if c == 6:
            cache.hide_frames_before(3)
        outs.append(tiny_model(x[:, :, c:c + 3], t[:, c:c + 3], text, kv_cache=cache))
        tiny_model(x[:, :, c:c + 3], t[:, c:c + 3], text, kv_cache=cache, update_cache=True)
    restricted = tiny_model(x, t, ctx, attention=BlockCausal(3, hide_first_chunk_from_last=True))
    assert (restricted - torch.cat(outs, 2)).abs().max() <= 1e-4


def test_the_chosen_attention_kernel_is_first_in_checkpointed_recomputation_too(monkeypatch):
    """Gradient checkpointing recomputes each block in the backward, outside the forward's
    context: the recomputation must put the same SDPA kernel first (same numerics)."""
    import selfforcing.models.wan as wan
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    model = randomize_(CausalWanModel(preset("tiny")), std=0.1)
    model.gradient_checkpointing = True
    model.set_attention_backend("cudnn")
    x, context, _ = inputs(batch=1)
    first_kernels, sdpa = [], wan.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        first_kernels.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(wan.F, "scaled_dot_product_attention", spy)
    model(x, torch.tensor([500.0]), context).square().mean().backward()
    # Self- and cross-attention per block, in the forward and again in the backward.
    assert first_kernels == [int(SDPBackend.CUDNN_ATTENTION)] * 4 * len(model.blocks)
