"""Flow-matching schedule and samplers."""

import pytest
import torch

from selfforcing.diffusion import FlowMatchSchedule, euler_sample_cfg, few_step_denoise
from selfforcing.errors import SelfForcingError

schedule = FlowMatchSchedule()


def test_few_step_list_is_warped_by_the_shift():
    # Self Forcing's 1000/750/500/250 on the shift-5 schedule (paper code: "warp_denoising_step")
    expected = torch.tensor([1000.0, 937.5, 2500 / 3, 625.0])
    assert torch.allclose(schedule.few_step_timesteps([1000, 750, 500, 250]), expected)
    assert torch.allclose(FlowMatchSchedule(shift=1.0).few_step_timesteps([1000, 500]), torch.tensor([1000.0, 500.0]))
    train = schedule.train_timesteps()
    assert len(train) == 1000 and train[0] == 1000 and (train.diff() < 0).all()


@pytest.mark.parametrize("steps,message", [([], "empty"), ([1000, 1200], "must lie in"), ([500, 750], "decreasing")])
def test_bad_step_lists(steps, message):
    with pytest.raises(SelfForcingError, match=message):
        schedule.few_step_timesteps(steps)


def test_conversions_are_consistent_per_sample_and_per_frame():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    for t in (torch.tensor([250.0, 900.0]), torch.tensor([[0.0, 500.0, 1000.0], [10.0, 20.0, 30.0]])):
        xt = schedule.add_noise(x0, noise, t)
        v = schedule.flow_target(x0, noise)
        assert torch.allclose(schedule.x0_from_flow(xt, v, t), x0, atol=1e-5)
    # per-frame: frame 0 at t=0 is clean, frame 2 at t=1000 is pure noise
    xt = schedule.add_noise(x0, noise, torch.tensor([[0.0, 500.0, 1000.0]] * 2))
    assert torch.equal(xt[:, :, 0], x0[:, :, 0]) and torch.allclose(xt[:, :, 2], noise[:, :, 2])


def point_mass_flow(target):
    """Exact flow of a data distribution concentrated at ``target``: v = (x_t - target) / sigma."""
    return lambda x, t: (x - target) / schedule._expand(t, x)


def test_euler_cfg_reaches_the_guided_point_mass():
    cond, uncond = torch.full((1, 2, 1, 2, 2), 0.5), torch.full((1, 2, 1, 2, 2), -0.25)
    noise = torch.randn(1, 2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    flows = {True: point_mass_flow(cond), False: point_mass_flow(uncond)}
    out = euler_sample_cfg(lambda x, t, c: flows[c](x, t), noise, schedule, num_steps=8, guidance_scale=3.0)
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_euler_calls_on_step_once_per_step_after_it():
    schedule, calls = FlowMatchSchedule(shift=1.0), []
    euler_sample_cfg(lambda x, t, c: torch.zeros_like(x), torch.ones(1, 2), schedule, num_steps=6,
                     on_step=lambda: calls.append(len(calls)))
    assert calls == list(range(6))


def test_few_step_denoise_grad_only_at_the_exit_step():
    target = torch.full((1, 2, 1, 2, 2), 0.7)
    weight = torch.ones((), requires_grad=True)
    grad_calls = []

    def flow(x, t):
        grad_calls.append(torch.is_grad_enabled())
        return point_mass_flow(target)(x, t) * weight

    timesteps = schedule.few_step_timesteps()
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    x0 = few_step_denoise(flow, noise, timesteps, schedule, grad=True)
    assert torch.allclose(x0, target, atol=1e-5) and grad_calls == [False, False, False, True]
    grad_calls.clear()
    x0 = few_step_denoise(flow, noise, timesteps, schedule, exit_index=1, grad=True)
    assert grad_calls == [False, True] and x0.requires_grad
