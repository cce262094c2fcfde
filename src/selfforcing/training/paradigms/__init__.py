"""Training paradigms: how the causal student sees its context during training.

Each file offers up to two things: ``loss`` (many-step training on ground-truth video with
the denoising loss) and ``generate`` (few-step student samples, with gradient at one random
exit step, to be scored by a holistic loss such as DMD).
"""

from __future__ import annotations

import torch


def sample_exit_index(num_steps: int, generator: torch.Generator) -> int:
    """The step whose output carries gradient (stochastic gradient truncation, §3.3).

    Drawn from a generator seeded identically on every rank, so all ranks (and all chunks)
    exit at the same step.
    """
    return int(torch.randint(0, num_steps, (1,), generator=generator))


def per_chunk(t: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Expand one timestep per chunk (B, K) to one per frame (B, K * n)."""
    return t.repeat_interleave(frames_per_chunk, dim=1)
