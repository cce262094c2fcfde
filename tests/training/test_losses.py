"""Losses on problems whose answers are known in closed form."""

import pytest
import torch

from selfforcing.diffusion import FlowMatchSchedule
from selfforcing.training.losses.denoising import denoising_loss
from selfforcing.training.losses.dmd import DMDLoss, ScoreTimesteps
from selfforcing.training.losses.gan import DiscriminatorHead, GANLoss
from selfforcing.training.losses.ode import ode_regression_loss
from selfforcing.training.losses.sid import SiDLoss

schedule = FlowMatchSchedule()


def gaussian_flow(mean, std):
    """Exact flow of data x0 ~ N(mean, std^2) (per element): v = (x_t - E[x0 | x_t]) / sigma."""

    def flow(xt, t):
        sigma = schedule._expand(t, xt)
        a = 1 - sigma
        x0_hat = mean + a * std**2 / (a**2 * std**2 + sigma**2) * (xt - a * mean)
        return (xt - x0_hat) / sigma

    return flow


@pytest.mark.parametrize("loss_cls", [DMDLoss, SiDLoss])
def test_distribution_matching_moves_the_student_toward_the_teacher(loss_cls):
    """Teacher data N(2, 0.5^2); student x = theta + 0.5 eps starts at theta = 0. Following the
    loss's gradient with the exact real and fake scores drives theta to 2."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    theta = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.2)
    loss_fn = loss_cls(schedule)
    real = gaussian_flow(2.0, 0.5)
    for _ in range(200):
        x = theta + 0.5 * torch.randn(64, 1, 1, 2, 2, generator=g)
        loss, _ = loss_fn.generator_loss(x, real, gaussian_flow(theta.detach(), 0.5), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(theta.item() - 2.0) < 0.15, theta.item()


def test_dmd_gradient_vanishes_when_student_equals_teacher():
    x = 2.0 + 0.5 * torch.randn(16, 1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    loss, logs = DMDLoss(schedule).generator_loss(x, gaussian_flow(2.0, 0.5), gaussian_flow(2.0, 0.5))
    loss.backward()
    assert x.grad.abs().max() < 1e-6 and logs["dmd_grad_norm"] < 1e-4


def test_denoising_loss_is_zero_for_the_exact_flow_of_a_point_mass():
    x0 = torch.full((4, 2, 3, 2, 2), 0.3)
    t = schedule.sample_timesteps((4,), torch.Generator().manual_seed(0))
    target_flow = lambda xt, tt: (xt - x0) / schedule._expand(tt, xt)  # noqa: E731
    assert denoising_loss(target_flow, x0, t, schedule) < 1e-8


def _trajectory(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(endpoint, few-step timesteps, trajectory): states on straight paths to a random endpoint."""
    end = torch.randn(batch, 4, 6, 2, 2)
    timesteps = schedule.few_step_timesteps()
    noise = torch.randn(batch, 4, 4, 6, 2, 2)
    states = torch.stack([schedule.add_noise(end, noise[:, i], timesteps[i].expand(batch)) for i in range(4)], dim=1)
    return end, timesteps, torch.cat([states, end[:, None]], dim=1)


def test_ode_regression_is_zero_when_the_student_lands_on_the_endpoint():
    end, timesteps, trajectory = _trajectory(2)
    exact = lambda xt, t: (xt - end) / schedule._expand(t, xt)  # noqa: E731
    assert ode_regression_loss(exact, trajectory, timesteps, schedule, frames_per_chunk=3) < 1e-8
    assert ode_regression_loss(lambda xt, t: torch.zeros_like(xt), trajectory, timesteps, schedule, 3) > 0.1


def test_ode_regression_with_clean_context_shows_some_chunks_clean_at_t0_and_scores_only_the_rest():
    end, timesteps, trajectory = _trajectory(8)
    seen = []

    def exact(xt, t):  # the endpoint's flow; 0/0 at t = 0, where the loss must not look
        seen.append((xt, t))
        return (xt - end) / schedule._expand(t, xt)

    g = torch.Generator().manual_seed(0)
    assert ode_regression_loss(exact, trajectory, timesteps, schedule, 3, g, clean_context=0.5) < 1e-8
    xt, t = seen[-1]
    clean = (t == 0).view(8, 2, 3)
    assert 0 < clean.sum() < clean.numel() and (clean == clean[..., :1]).all()  # whole chunks, some of them
    frames = (t == 0).view(8, 1, 6, 1, 1).expand_as(end)
    assert torch.equal(xt[frames], end[frames])  # a clean chunk is the endpoint itself
    ode_regression_loss(exact, trajectory, timesteps, schedule, 3, torch.Generator().manual_seed(0))
    assert (seen[-1][1] > 0).all()  # the released draw: every chunk noisy


def test_gan_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = DiscriminatorHead(dim=4, hidden=16)
    logit_fn = lambda xt, t: head(xt.permute(0, 2, 3, 4, 1))  # noqa: E731  (channels as features)
    gan = GANLoss(schedule, ScoreTimesteps(schedule, "continuous", 0.0, 0.02), r1_weight=0.1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    pattern = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1, 1)  # real and fake differ per channel
    real = lambda: pattern + 0.1 * torch.randn(32, 4, 1, 2, 2, generator=g)  # noqa: E731
    fake = lambda: -pattern + 0.1 * torch.randn(32, 4, 1, 2, 2, generator=g)  # noqa: E731
    for _ in range(60):
        loss, logs = gan.critic_loss(fake(), real(), logit_fn, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["d_real"] > 1.0 > -1.0 > logs["d_fake"]
    gen_loss, _ = gan.generator_loss(fake(), logit_fn, g)
    assert gen_loss > 1.0  # fakes are recognised, so the generator's loss is high
