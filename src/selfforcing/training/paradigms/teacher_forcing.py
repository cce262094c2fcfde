"""Teacher Forcing: every chunk is conditioned on the *clean ground-truth* earlier chunks.

All chunks train in parallel in one forward over [clean frames ; noisy frames] (see
``CausalWanModel`` context frames). This is the baseline whose train/test mismatch (the
model never sees its own errors) Self Forcing removes.
"""

from __future__ import annotations

import torch

from selfforcing.diffusion.samplers import few_step_denoise
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.models.wan import BlockCausal, CausalWanModel
from selfforcing.training.losses.denoising import denoising_loss
from selfforcing.training.paradigms import per_chunk, sample_exit_index


def loss(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    attention: BlockCausal, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Many-step TF: one noise level per chunk, clean context, denoising loss."""
    chunks = x0.shape[2] // attention.frames_per_chunk
    t = per_chunk(schedule.sample_timesteps((x0.shape[0], chunks), generator, device=x0.device),
                  attention.frames_per_chunk)
    ctx = model.encode_text(text)
    return denoising_loss(lambda xt, tt: model(xt, tt, ctx, attention=attention, context_frames=x0),
                          x0, t, schedule, generator)


def generate(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    attention: BlockCausal, timesteps: torch.Tensor, exit_generator: torch.Generator,
    generator: torch.Generator | None = None, grad: bool = True,
) -> torch.Tensor:
    """TF + DMD (CausVid-style): the few-step student denoises every chunk from noise in
    parallel, each conditioned on clean ground-truth context; gradient at one exit step."""
    ctx = model.encode_text(text)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return few_step_denoise(
        lambda x, t: model(x, t, ctx, attention=attention, context_frames=x0),
        noise, timesteps, schedule, exit_index=sample_exit_index(len(timesteps), exit_generator),
        grad=grad, generator=generator,
    )
