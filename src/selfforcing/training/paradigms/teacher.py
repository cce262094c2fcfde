"""Teacher pretraining: bidirectional flow matching, with caption dropout so that the
teacher can later be sampled with classifier-free guidance."""

from __future__ import annotations

import torch

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.models.wan import CausalWanModel
from selfforcing.training.losses.denoising import denoising_loss


def drop_captions(
    text: torch.Tensor, uncond: torch.Tensor, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Replace each sample's text embedding by the unconditional one with probability ``p``."""
    drop = torch.rand(text.shape[0], generator=generator, device=text.device) < p
    return torch.where(drop[:, None, None], uncond.expand_as(text), text)


def loss(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    t = schedule.sample_timesteps((x0.shape[0],), generator, device=x0.device)
    ctx = model.encode_text(text)
    return denoising_loss(lambda xt, tt: model(xt, tt, ctx), x0, t, schedule, generator)
