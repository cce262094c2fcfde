"""Distribution Matching Distillation (DMD / DMD2), the paper's main holistic loss (§3.2, eq. 3).

The generator's samples ``x`` are noised to a random timestep; the frozen teacher with
classifier-free guidance gives the "real" score, a critic trained on the generator's own
samples gives the "fake" score. Their difference, in x0 space and normalised by the mean
distance to the real prediction (DMD's per-sample weighting, DMD eq. 8), is the gradient
pushed into ``x``: the student's distribution moves toward the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.training.losses.denoising import denoising_loss

FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ScoreTimesteps:
    """Where the scores and the critic look at a sample: one timestep per video.

    ``official`` (default) reproduces the released code (see ``FlowMatchSchedule.score_timesteps``
    and ``nearest_train_timestep``); ``continuous`` draws the base level uniformly in
    [min_t, max_t] and shifts it, with the noise level exactly ``t / N``. ``score_shift``
    reproduces one more detail of the released code: its real and fake score wrappers read the
    sigma that turns their flow into x0 off a table of *their own* shift (8, the wrapper's
    default), while the sample was noised with the generator's (5); None reads both off one table.
    """

    schedule: FlowMatchSchedule
    sampling: str = "official"
    min_t: float = 0.02
    max_t: float = 0.98
    score_shift: float | None = None

    def sample(self, batch: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise_t): the networks' timestep and the timestep whose sigma noises the sample."""
        s = self.schedule
        if self.sampling == "official":
            t = s.score_timesteps(batch, generator, self.min_t, self.max_t, device)
        else:
            t = s.sample_timesteps((batch,), generator, self.min_t, self.max_t, device)
        return t, self.noise_t(t)

    def noise_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep whose sigma noises a sample seen at ``t`` (official: the nearest table entry)."""
        return self.schedule.nearest_train_timestep(t) if self.sampling == "official" else t

    def score_t(self, t: torch.Tensor, noise_t: torch.Tensor) -> torch.Tensor:
        """The timestep whose sigma converts a score network's flow to x0."""
        if self.score_shift is None:
            return noise_t
        return FlowMatchSchedule(self.schedule.num_train_timesteps, self.score_shift).nearest_train_timestep(t)


@dataclass
class DMDLoss:
    schedule: FlowMatchSchedule
    timesteps: ScoreTimesteps | None = None  # default: the official draw on ``schedule``

    def __post_init__(self) -> None:
        if self.timesteps is None:
            self.timesteps = ScoreTimesteps(self.schedule)

    def noised(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, x_t, score_t): ``x`` noised to a drawn score timestep ``t``, and the timestep whose
        sigma turns a score network's flow at ``x_t`` into x0."""
        t, noise_t = self.timesteps.sample(x.shape[0], generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return t, self.schedule.add_noise(x, noise, noise_t), self.timesteps.score_t(t, noise_t)

    def scores(
        self, x: torch.Tensor, real_flow: FlowFn, fake_flow: FlowFn, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, real x0, fake x0) of ``x`` noised to a score timestep, in float64; gradient flows
        back to ``x`` through both networks unless the caller runs this without autograd."""
        t, xt, score_t = self.noised(x, generator)
        real_x0 = self.schedule.x0_from_flow(xt, real_flow(xt, t), score_t).double()
        fake_x0 = self.schedule.x0_from_flow(xt, fake_flow(xt, t), score_t).double()
        return t, real_x0, fake_x0

    def generator_loss(
        self, x: torch.Tensor, real_flow: FlowFn, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss whose gradient w.r.t. ``x`` is the normalised score difference (fake - real)."""
        with torch.no_grad():
            t, real_x0, fake_x0 = self.scores(x.detach(), real_flow, fake_flow, generator)
            grad = torch.nan_to_num((fake_x0 - real_x0) / normaliser(x, real_x0))
        # 0.5 * ||x - sg(x - grad)||^2 has gradient ``grad`` (per element, up to the mean).
        loss = 0.5 * F.mse_loss(x.double(), x.detach().double() - grad)
        return loss.float(), {"dmd_grad_norm": grad.norm(), "dmd_t": t.mean()}

    def critic_loss(
        self, x: torch.Tensor, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fake score learns the generator's current distribution by plain denoising."""
        x = x.detach()
        t, noise_t = self.timesteps.sample(x.shape[0], generator, x.device)
        flow = fake_flow
        if self.timesteps.score_shift is not None:  # released: (xt - x0_fake) / sigma_noise, x0_fake via sigma_score
            ratio = (self.timesteps.score_t(t, noise_t) / noise_t).view(-1, *[1] * (x.ndim - 1))  # sigma = t / N
            flow = lambda xt, tt: fake_flow(xt, tt) * ratio  # noqa: E731
        loss = denoising_loss(flow, x, t, self.schedule, generator, noise_t=noise_t)
        return loss, {"critic_denoising": loss.detach()}


def normaliser(x: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample weighting (DMD eq. 8): the mean distance from ``x`` to the real score's
    x0, held constant (no gradient)."""
    return (x.detach().double() - real_x0.detach()).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
