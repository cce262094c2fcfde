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

from selfforcing.training.losses.dmd import DMDLoss, FlowFn, normaliser


@dataclass
class SiDLoss(DMDLoss):
    alpha: float = 1.0

    def generator_loss(
        self, x: torch.Tensor, real_flow: FlowFn, fake_flow: FlowFn, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, real_x0, fake_x0 = self.scores(x, real_flow, fake_flow, generator)
        gap = real_x0 - fake_x0
        per_element = gap * ((real_x0 - x.double()) - self.alpha * gap)
        loss = torch.nan_to_num(per_element / normaliser(x, real_x0)).mean().float()
        return loss, {"sid_gap": gap.detach().abs().mean(), "sid_t": t.mean()}
