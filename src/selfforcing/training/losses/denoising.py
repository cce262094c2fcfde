"""Flow-matching denoising loss (Wan's pretraining objective; also trains DMD/SiD critics)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from selfforcing.diffusion.schedule import FlowMatchSchedule

FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoising_loss(
    flow_fn: FlowFn, x0: torch.Tensor, t: torch.Tensor, schedule: FlowMatchSchedule,
    generator: torch.Generator | None = None, noise_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the predicted flow at ``x_t`` and the target ``noise - x0``.

    ``t`` is (B,) or per frame (B, F); ``flow_fn(x_t, t)`` hides the attention mode.
    ``noise_t`` (default ``t``) sets the noise level of ``x_t`` when it is read off a table
    apart from the network's timestep (the official critic, see ``nearest_train_timestep``).
    """
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = schedule.add_noise(x0, noise, t if noise_t is None else noise_t)
    return F.mse_loss(flow_fn(xt, t).float(), schedule.flow_target(x0, noise).float())
