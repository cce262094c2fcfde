"""ODE regression (the paper's initialisation, from CausVid): the causal few-step student
learns to jump from a teacher ODE state at a few-step timestep straight to its endpoint."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from selfforcing.diffusion.schedule import FlowMatchSchedule


def ode_regression_loss(
    flow_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: FlowMatchSchedule,
    frames_per_chunk: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``trajectory`` (B, S+1, C, F, h, w) holds the teacher's states at the S few-step
    ``timesteps`` followed by the clean endpoint. Each chunk gets its own random step (as in
    Diffusion Forcing), the student predicts x0 from that state, and the loss is the MSE to
    the endpoint."""
    B, S, F_ = trajectory.shape[0], len(timesteps), trajectory.shape[3]
    step = torch.randint(0, S, (B, F_ // frames_per_chunk), generator=generator, device=trajectory.device)
    step = step.repeat_interleave(frames_per_chunk, dim=1)  # (B, F)
    frames = torch.arange(F_, device=trajectory.device)
    xt = trajectory[torch.arange(B)[:, None], step, :, frames[None, :]]  # (B, F, C, h, w)
    xt = xt.permute(0, 2, 1, 3, 4)
    t = timesteps.to(trajectory.device)[step]
    x0_pred = schedule.x0_from_flow(xt, flow_fn(xt, t), t)
    return F.mse_loss(x0_pred.float(), trajectory[:, -1].float())
