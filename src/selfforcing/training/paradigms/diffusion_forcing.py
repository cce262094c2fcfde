"""Diffusion Forcing: every chunk has its own noise level and is conditioned on the *noisy
ground-truth* earlier chunks (block-causal attention over one noisy sequence)."""

from __future__ import annotations

import torch

from selfforcing.diffusion.samplers import few_step_denoise
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.models.wan import BlockCausal, CausalWanModel
from selfforcing.training.losses.denoising import denoising_loss
from selfforcing.training.paradigms import per_chunk, sample_exit_index


def chunk_timesteps(x0, schedule, attention, generator) -> torch.Tensor:
    chunks = x0.shape[2] // attention.frames_per_chunk
    t = schedule.sample_timesteps((x0.shape[0], chunks), generator, device=x0.device)
    return per_chunk(t, attention.frames_per_chunk)


def loss(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    attention: BlockCausal, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Many-step DF: independent noise level per chunk, block-causal mask, denoising loss."""
    ctx = model.encode_text(text)
    return denoising_loss(lambda xt, tt: model(xt, tt, ctx, attention=attention),
                          x0, chunk_timesteps(x0, schedule, attention, generator), schedule, generator)


def generate(
    model: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    attention: BlockCausal, timesteps: torch.Tensor, exit_generator: torch.Generator,
    generator: torch.Generator | None = None, grad: bool = True,
) -> torch.Tensor:
    """DF + DMD: the few-step student denoises every chunk from noise in parallel, each
    conditioned on ground truth noised to a random level per chunk; gradient at one exit step."""
    ctx = model.encode_text(text)
    context_t = chunk_timesteps(x0, schedule, attention, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noisy_context = schedule.add_noise(x0, noise, context_t)
    start = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return few_step_denoise(
        lambda x, t: model(x, t, ctx, attention=attention, context_frames=noisy_context, context_t=context_t),
        start, timesteps, schedule, exit_index=sample_exit_index(len(timesteps), exit_generator),
        grad=grad, generator=generator,
    )
