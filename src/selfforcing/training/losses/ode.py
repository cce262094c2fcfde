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
    clean_context: float = 0.0,
) -> torch.Tensor:
    """``trajectory`` (B, S+1, C, F, h, w) holds the teacher's states at the S few-step
    ``timesteps`` followed by the clean endpoint. Each chunk gets its own random step (as in
    Diffusion Forcing), the student predicts x0 from that state, and the loss is the MSE to
    the endpoint.

    With ``clean_context`` > 0 (an option of ours; the released code: 0) each chunk is instead
    the clean endpoint at t = 0 with that probability, and is left out of the loss: the later
    chunks then also learn from clean context, which is what the KV cache holds at inference
    (it is filled from each finished chunk at t = 0), where with the released draw every
    context chunk is at least as noisy as the last few-step timestep."""
    B, S, F_ = trajectory.shape[0], len(timesteps), trajectory.shape[3]
    chunks = F_ // frames_per_chunk
    step = torch.randint(0, S, (B, chunks), generator=generator, device=trajectory.device)
    if clean_context:
        clean = torch.rand((B, chunks), generator=generator, device=trajectory.device) < clean_context
        step = torch.where(clean, S, step)  # index S: the endpoint
    step = step.repeat_interleave(frames_per_chunk, dim=1)  # (B, F)
    frames = torch.arange(F_, device=trajectory.device)
    xt = trajectory[torch.arange(B)[:, None], step, :, frames[None, :]]  # (B, F, C, h, w)
    xt = xt.permute(0, 2, 1, 3, 4)
    t = F.pad(timesteps.to(trajectory.device), (0, 1))[step]  # the endpoint's timestep is 0
    x0_pred = schedule.x0_from_flow(xt, flow_fn(xt, t), t)
    error = (x0_pred.float() - trajectory[:, -1].float()) ** 2  # (B, C, F, h, w)
    noisy = (step < S)[:, None, :, None, None].expand_as(error)  # a mask, not an index: no host sync
    return torch.where(noisy, error, 0.0).sum() / noisy.sum().clamp(min=1)
