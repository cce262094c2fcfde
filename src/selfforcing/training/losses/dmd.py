"""Distribution Matching Distillation (DMD / DMD2), the paper's main holistic loss (§3.2, eq. 3).

The generator's samples ``x`` are noised to a random timestep; the frozen teacher with
classifier-free guidance gives the "real" score, a critic trained on the generator's own
samples gives the "fake" score. Their difference, in x0 space and normalised by the mean
distance to the real prediction (DMD's per-sample weighting), is the gradient pushed into
``x``: the student's distribution moves toward the teacher's.
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
class DMDLoss:
    schedule: FlowMatchSchedule
    min_t: float = 0.02  # score timesteps, as fractions of the (shifted) schedule
    max_t: float = 0.98

    def sample_t(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.schedule.sample_timesteps((x.shape[0],), generator, self.min_t, self.max_t, x.device)

    def generator_loss(
        self, x: torch.Tensor, real_flow: FlowFn, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss whose gradient w.r.t. ``x`` is the normalised score difference (fake - real)."""
        t = self.sample_t(x, generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            xt = self.schedule.add_noise(x.detach(), noise, t)
            real_x0 = self.schedule.x0_from_flow(xt, real_flow(xt, t), t).float()
            fake_x0 = self.schedule.x0_from_flow(xt, fake_flow(xt, t), t).float()
            weight = (x.detach().float() - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
        # 0.5 * ||x - sg(x - grad)||^2 has gradient ``grad`` (per element, up to the mean).
        loss = 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))
        return loss, {"dmd_grad_norm": grad.norm().item(), "dmd_t": t.mean().item()}

    def critic_loss(
        self, x: torch.Tensor, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The fake score learns the generator's current distribution by plain denoising."""
        x = x.detach()
        loss = denoising_loss(fake_flow, x, self.sample_t(x, generator), self.schedule, generator)
        return loss, {"critic_denoising": loss.item()}
