"""Score identity Distillation (SiD, Zhou et al. 2024), the paper's alternative holistic loss.

Same two networks as DMD (frozen teacher = real score with CFG, critic = fake score trained
by denoising on the generator's samples), but the generator loss is SiD's

    L = (x0_real - x0_fake) . ((x0_real - x) - alpha (x0_real - x0_fake)),

evaluated at ``x_t`` built from ``x`` *with* gradient, so the gradient also flows through
both (frozen) score networks, weighted per sample by 1 / mean|x - x0_real| as in DMD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfforcing.training.losses.dmd import DMDLoss, FlowFn


@dataclass
class SiDLoss(DMDLoss):
    alpha: float = 1.0

    def generator_loss(
        self, x: torch.Tensor, real_flow: FlowFn, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.schedule
        t, noise_t = self.timesteps.sample(x.shape[0], generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        score_t = self.timesteps.score_t(t, noise_t)
        xt = s.add_noise(x, noise, noise_t)
        fake_x0 = s.x0_from_flow(xt, fake_flow(xt, t), score_t).double()
        real_x0 = s.x0_from_flow(xt, real_flow(xt, t), score_t).double()
        gap = real_x0 - fake_x0
        per_element = gap * ((real_x0 - x.double()) - self.alpha * gap)
        weight = (x.detach().double() - real_x0.detach()).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        loss = torch.nan_to_num(per_element / weight).mean().float()
        return loss, {"sid_gap": gap.abs().mean().item(), "sid_t": t.mean().item()}
