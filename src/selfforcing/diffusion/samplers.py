"""Samplers: the few-step denoiser of a Self Forcing student and the many-step Euler
sampler with classifier-free guidance used by teachers.

A sampler only sees ``model_fn(x_t, t) -> v`` (the flow), so it is independent of
attention mode, KV caches and text conditioning.
"""

from __future__ import annotations

from typing import Callable

import torch

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.errors import SelfForcingError

FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_flow(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in the standard convention, ``v_u + w (v_c - v_u)``."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def few_step_denoise(
    model_fn: FlowFn,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: FlowMatchSchedule,
    *,
    exit_index: int | None = None,
    grad: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` through the few-step list and return the clean estimate ``x0``.

    Each step predicts ``x0`` and, unless it is the exit step, re-noises it with *fresh*
    Gaussian noise to the next timestep (the DMD few-step sampler, paper Alg. 1 lines 5-12).
    ``exit_index`` stops early (Self Forcing's stochastic gradient truncation draws it at
    random during training); with ``grad`` only the exit step builds an autograd graph.
    """
    last = len(timesteps) - 1 if exit_index is None else exit_index
    x = noise
    for i in range(last + 1):
        t = timesteps[i].expand(x.shape[0])
        with torch.set_grad_enabled(grad and i == last):
            x0 = schedule.x0_from_flow(x, model_fn(x, t), t)
        if i == last:
            return x0
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = schedule.add_noise(x0, fresh, timesteps[i + 1].expand(x.shape[0]))
    raise ValueError("empty timestep list")


@torch.no_grad()
def euler_sample_cfg(
    model_fn: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    noise: torch.Tensor,
    schedule: FlowMatchSchedule,
    num_steps: int = 50,
    guidance_scale: float = 3.0,
    record_at: torch.Tensor | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrate the probability-flow ODE from ``noise`` (sigma = 1) to sigma = 0 with Euler steps.

    ``model_fn(x, t, cond)`` returns the conditional (``cond=True``) or unconditional flow;
    classifier-free guidance mixes them as ``v_u + w (v_c - v_u)``. ``guidance_scale == 1``
    skips the unconditional pass. With ``record_at`` (timesteps that must lie on the Euler
    grid), also returns the states there, stacked on dim 1: the ODE pairs of the paper's
    initialisation. ``on_step()`` is called after each Euler step (a progress bar's update).
    """
    timesteps = torch.cat([schedule.sampling_timesteps(num_steps), torch.zeros(1)]).to(noise.device)
    record = [] if record_at is None else [_grid_index(timesteps, t) for t in record_at.tolist()]
    states = []
    x = noise
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if i in record:
            states.append(x)
        tb = t.expand(x.shape[0])
        v = model_fn(x, tb, True)
        if guidance_scale != 1.0:
            v = cfg_flow(v, model_fn(x, tb, False), guidance_scale)
        x = x + (schedule.sigma(t_next) - schedule.sigma(t)) * v
        if on_step is not None:
            on_step()
    return x if record_at is None else (x, torch.stack(states, dim=1))


def _grid_index(timesteps: torch.Tensor, t: float) -> int:
    index = int((timesteps - t).abs().argmin())
    if abs(float(timesteps[index]) - t) > 1e-3:
        raise SelfForcingError(
            f"timestep {t:.2f} is not on the {len(timesteps) - 1}-step Euler grid; use a step count that is a "
            "multiple of the few-step list length (e.g. 48 for 4 steps)"
        )
    return index
