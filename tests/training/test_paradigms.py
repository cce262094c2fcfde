"""Self Forcing rollout training and the TF / DF generators."""

import pytest
import torch

from factories import TINY
from selfforcing.diffusion import FlowMatchSchedule
from selfforcing.errors import SelfForcingError
from selfforcing.models import BlockCausal, CausalWanModel, WanConfig, preset
from selfforcing.training.paradigms import diffusion_forcing, self_forcing, teacher_forcing

schedule = FlowMatchSchedule()
TIMESTEPS = schedule.few_step_timesteps()


def tiny_student(layers=2, seed=0):
    torch.manual_seed(seed)
    return CausalWanModel(WanConfig.from_dict({**preset("toy").to_dict(), **TINY, "num_layers": layers}))


def count_forwards(model):
    """Record, for every forward, whether autograd was on and whether it filled the cache."""
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs.get("update_cache", False))),
        with_kwargs=True)
    return calls


def rollout(model, shared_seed=0, **kw):
    text = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5))
    return self_forcing.generate(model, (2, 12, 9, 8, 8), text, schedule, 3, TIMESTEPS,
                                 torch.Generator().manual_seed(shared_seed), torch.Generator().manual_seed(1), **kw)


def test_gradient_flows_only_through_the_exit_step_of_each_chunk():
    model = tiny_student()
    calls = count_forwards(model)
    video = rollout(model)
    exit_index = int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(0)))
    per_chunk = [(False, False)] * exit_index + [(True, False)] + [(False, True)]  # denoise..., exit, cache fill
    assert calls == per_chunk * 2 + per_chunk[:-1]  # no cache fill after the last chunk
    assert video.shape == (2, 12, 9, 8, 8) and video.requires_grad
    video.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_exit_step_per_chunk_differs_between_chunks():
    model = tiny_student()
    calls = count_forwards(model)
    with torch.no_grad():
        rollout(model, shared_seed=3, exit_per_chunk=True, grad=False)
    counts, n = [], 0
    for _, fill in calls:
        n += 1
        if fill:
            counts.append(n - 1)
            n = 0
    counts.append(n)  # the last chunk: no cache fill after it
    assert len(counts) == 3 and len(set(counts)) > 1  # different exit steps -> different step counts


def test_restricted_attention_hides_the_first_chunk_from_the_last():
    """One layer: the last chunk's output can only depend on the first chunk through attention,
    so with the §3.4 restriction, changing the first chunk's cache leaves it unchanged."""
    model = tiny_student(layers=1).eval()
    text = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(5))
    ctx = model.encode_text(text)

    def last_chunk(first, restrict):
        x = torch.cat([first, torch.randn(1, 12, 6, 8, 8, generator=torch.Generator().manual_seed(9))], dim=2)
        t = torch.zeros(1, 9)
        return model(x, t, ctx, attention=BlockCausal(3, hide_first_chunk_from_last=restrict))[:, :, 6:]

    a, b = torch.randn(1, 12, 3, 8, 8), torch.randn(1, 12, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(last_chunk(a, True), last_chunk(b, True), atol=1e-6)
        assert not torch.allclose(last_chunk(a, False), last_chunk(b, False), atol=1e-4)
        # and the rollout applies it: restricted and unrestricted rollouts differ only in the last chunk
        restricted = rollout(model, grad=False, hide_first_chunk_from_last=True)
        plain = rollout(model, grad=False, hide_first_chunk_from_last=False)
    assert torch.equal(restricted[:, :, :6], plain[:, :, :6])
    assert not torch.allclose(restricted[:, :, 6:], plain[:, :, 6:], atol=1e-4)


def test_tf_and_df_generators_use_ground_truth_context():
    model = tiny_student()
    text = torch.randn(2, 8, 16)
    gt = torch.randn(2, 12, 6, 8, 8)
    for paradigm in (teacher_forcing, diffusion_forcing):
        out = paradigm.generate(model, gt, text, schedule, BlockCausal(3), TIMESTEPS, torch.Generator().manual_seed(0),
                                torch.Generator().manual_seed(1))
        other = paradigm.generate(model, gt + 1, text, schedule, BlockCausal(3), TIMESTEPS,
                                  torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        assert out.requires_grad and out.shape == gt.shape
        # the first chunk has no context; later chunks see the (changed) ground truth
        assert torch.allclose(out[:, :, :3], other[:, :, :3], atol=1e-5)
        assert not torch.allclose(out[:, :, 3:], other[:, :, 3:], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_student()
        model.gradient_checkpointing = checkpointing
        rollout(model).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_checkpointed_forwards_refuse_a_window_overwritten_before_the_backward():
    """Checkpointing keeps the attended K/V window as a view of the cache (no copy per chunk);
    a rolling cache that evicts those frames before the backward is an error, not wrong gradients."""
    from selfforcing.inference.rollout import rollout as stream
    from selfforcing.models.kv_cache import KVCache

    model = tiny_student()
    model.gradient_checkpointing = True
    text = model.encode_text(torch.randn(1, 4, model.config.text_dim))
    timesteps = FlowMatchSchedule().few_step_timesteps([1000, 500])
    chunks = stream(model, text, KVCache(len(model.blocks), capacity=3), FlowMatchSchedule(), timesteps,
                    (1, model.config.in_channels, 3, 4, 4), 3, exit_index=1, grad=True)
    video = torch.cat(list(chunks), dim=2)
    with pytest.raises(SelfForcingError, match="overwrote frames a checkpointed forward attended"):
        video.square().mean().backward()


def test_cross_attention_projections_get_gradients_whatever_the_exit_step():
    """Text K/V cached by the no-grad steps must not cut the exit step's graph to attn2.to_k/to_v."""
    for seed in range(6):  # several exit steps, including late ones
        model = tiny_student()
        rollout(model, shared_seed=seed).square().mean().backward()
        assert all(b.attn2.to_k.weight.grad is not None and b.attn2.to_k.weight.grad.abs().sum() > 0
                   for b in model.blocks)


def test_long_rollout_trains_only_its_window_at_the_exit_step():
    """18 frames streamed through a 6-frame rolling cache, a 9-frame window trained: the chunks
    before the window run every step without gradient (and fill the cache), each window chunk
    carries gradient at its exit step alone."""
    model = tiny_student()
    calls = count_forwards(model)
    video = rollout(model, shared_seed=4, rollout_frames=18, kv_cache_frames=6, hide_first_chunk_from_last=False)
    g = torch.Generator().manual_seed(4)
    start = int(torch.randint(0, 4, (1,), generator=g))  # the window's first chunk, then the exit step
    exit_index = int(torch.randint(0, 4, (1,), generator=g))
    before = [(False, False)] * 4 + [(False, True)]
    window = [(False, False)] * exit_index + [(True, False)] + [(False, True)]
    assert calls == before * start + window * 2 + window[:-1]
    assert video.shape == (2, 12, 9, 8, 8) and video.requires_grad
    video.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_long_rollout_through_a_rolling_cache_checkpoints_to_the_same_gradients():
    """The cache rolls inside the trained window; its exit steps' checkpointed forwards re-read
    their windows in the backward, which nothing has overwritten (the rollout keeps the video's
    length more frames, hidden)."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_student()
        model.gradient_checkpointing = checkpointing
        rollout(model, shared_seed=4, rollout_frames=18, kv_cache_frames=6, sink_frames=3,
                hide_first_chunk_from_last=False).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-6 * grads[0].abs().max()


def test_long_rollout_windows_start_anywhere_in_the_rollout():
    model = tiny_student()
    starts = set()
    for seed in range(12):
        calls = count_forwards(model)
        with torch.no_grad():
            rollout(model, shared_seed=seed, grad=False, rollout_frames=18, kv_cache_frames=6,
                    hide_first_chunk_from_last=False)
        starts.add((len(calls) - 9) // 5)  # each chunk before the window: 4 steps and a fill
        model._forward_pre_hooks.clear()
    assert starts == {0, 1, 2, 3}


def test_long_rollout_of_the_training_length_is_the_released_rollout():
    """rollout_frames and kv_cache_frames at their defaults' values change nothing: same draws, same video."""
    a = rollout(tiny_student(), shared_seed=2)
    b = rollout(tiny_student(), shared_seed=2, rollout_frames=9, kv_cache_frames=9)
    assert torch.equal(a, b)


def test_rolling_window_rollout_has_gradient_in_the_windows_at_the_exit_step():
    model = tiny_student()
    calls = count_forwards(model)
    video = rollout(model, shared_seed=0, rolling_window=True, context_from="final", hide_first_chunk_from_last=False)
    first = int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(0)))
    windows = [grad for grad, fill in calls if not fill]
    assert len(windows) == 3 + 4 - 1 and [i for i, g in enumerate(windows) if g] == list(range(first, 6, 4))
    assert video.shape == (2, 12, 9, 8, 8) and video.requires_grad
