"""Self Forcing (paper Algorithm 1): the student generates the whole video autoregressively,
chunk by chunk, conditioned on a KV cache of its *own* earlier outputs, exactly as at
inference. Gradient is kept only at one randomly drawn exit step of each chunk's few-step
denoising (stochastic gradient truncation, §3.3); the cache is filled from detached outputs.
The video that comes out is then scored as a whole by a holistic loss (DMD, SiD or GAN).
"""

from __future__ import annotations

import torch

from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.inference.rollout import rollout
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.wan import CausalWanModel
from selfforcing.training.paradigms import sample_exit_index


def generate(
    model: CausalWanModel, shape: tuple[int, ...], text: torch.Tensor, schedule: FlowMatchSchedule,
    frames_per_chunk: int, timesteps: torch.Tensor, exit_generator: torch.Generator,
    generator: torch.Generator | None = None, *, context_t: float = 0.0, exit_per_chunk: bool = False,
    hide_first_chunk_from_last: bool = True, grad: bool = True, context_from: str = "exit",
) -> torch.Tensor:
    """Roll out a (B, C, F, h, w) video with gradient through the exit steps only.

    ``exit_per_chunk`` draws a separate exit step for every chunk instead of one shared step.
    ``hide_first_chunk_from_last`` applies the §3.4 restriction to the last chunk.
    ``context_from`` ("exit" or "final"): see :func:`~selfforcing.inference.rollout.rollout`.
    """
    B, C, F, h, w = shape
    num_chunks = F // frames_per_chunk
    exits = [sample_exit_index(len(timesteps), exit_generator)
             for _ in range(num_chunks if exit_per_chunk else 1)]
    cache = KVCache(len(model.blocks), capacity=F)
    chunks = rollout(
        model, model.encode_text(text), cache, schedule, timesteps, (B, C, frames_per_chunk, h, w), num_chunks,
        generator=generator, context_t=context_t, exit_index=exits if exit_per_chunk else exits[0], grad=grad,
        hide_first_chunk_from_last=hide_first_chunk_from_last, context_from=context_from,
    )
    return torch.cat(list(chunks), dim=2)
