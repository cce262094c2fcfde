"""GAN loss on the critic's features (DMD2-style), the paper's third holistic objective.

A small head classifies the critic's intermediate tokens of a noised video as real (from
the dataset) or fake (a student rollout). The critic backbone and the head are trained with
the non-saturating logistic loss plus an R1 penalty on real inputs; the generator is trained
to make its rollouts look real.

R1 (the squared input-gradient norm of the discriminator on real data) is estimated by a
finite difference, E[(D(x + s e) - D(x))^2] / s^2 with Gaussian e, which matches the
expected squared gradient norm to first order without a double backward (fused attention
kernels have none, and it halves the cost).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.training.losses.dmd import ScoreTimesteps

LogitFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiscriminatorHead(nn.Module):
    """Tokens (B, frames, tokens, dim) -> one logit per video: per-token MLP, averaged."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=tuple(range(1, features.ndim)))


@contextlib.contextmanager
def block_features(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Capture the output of ``model.blocks[layer]`` during the forwards run inside the block.

    A forward hook keeps the model code free of training concerns.
    """
    captured: list[torch.Tensor] = []
    handle = model.blocks[layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


@dataclass
class GANLoss:
    """Defaults are ours (see docs/TRAINING.md for the released code's choices, each an option
    here: ``generator_weight = critic_weight = 0.01``, ``r1_weight = 0``, ``shared_noise``)."""

    schedule: FlowMatchSchedule
    timesteps: ScoreTimesteps | None = None  # default: the official draw on ``schedule``
    r1_weight: float = 1.0
    generator_weight: float = 1.0
    critic_weight: float = 1.0
    shared_noise: bool = False  # critic: real and fake noised with the same t and noise
    r1_sigma: float = 0.01  # finite-difference step of the R1 estimate

    def __post_init__(self) -> None:
        if self.timesteps is None:
            self.timesteps = ScoreTimesteps(self.schedule)

    def _noised(self, x, generator, t=None, noise=None):
        if t is None:
            t, noise_t = self.timesteps.sample(x.shape[0], generator, x.device)
        else:
            noise_t = self.timesteps.noise_t(t)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.schedule.add_noise(x, noise, noise_t), t, noise

    def generator_loss(
        self, x: torch.Tensor, logit_fn: LogitFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, _ = self._noised(x, generator)
        loss = F.softplus(-logit_fn(xt, t)).mean()
        return self.generator_weight * loss, {"gan_generator": loss.detach()}

    def critic_loss(
        self, fake: torch.Tensor, real: torch.Tensor, logit_fn: LogitFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fake_xt, fake_t, noise = self._noised(fake.detach(), generator)
        if self.shared_noise:
            real_xt, real_t, _ = self._noised(real.detach(), generator, fake_t, noise)
        else:
            real_xt, real_t, _ = self._noised(real.detach(), generator)
        logit_fake, logit_real = logit_fn(fake_xt, fake_t), logit_fn(real_xt, real_t)
        adversarial = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
        loss = self.critic_weight * adversarial
        logs = {"gan_critic": adversarial.detach(), "d_real": logit_real.detach().mean(),
                "d_fake": logit_fake.detach().mean()}
        if self.r1_weight > 0:
            step = self.r1_sigma * torch.randn(real_xt.shape, generator=generator, device=real_xt.device)
            r1 = ((logit_fn(real_xt + step, real_t) - logit_real).float().square() / self.r1_sigma**2).mean()
            loss = loss + 0.5 * self.r1_weight * r1
            logs["r1"] = r1.detach()
        return loss, logs
