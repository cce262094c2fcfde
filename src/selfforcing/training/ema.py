"""The student's exponential moving average, over its trainable parameters only.

For a full fine-tune that is every weight; for a LoRA run only the adapters, so the frozen
base is never held twice. The averages live beside the parameters (sharded like them under
FSDP2) and are swapped into the model, one tensor at a time, whenever the averaged model is
needed: to sample, to checkpoint and to export.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TrainableEMA:
    def __init__(self, model: nn.Module):
        self.model = model
        self.average = {name: p.detach().clone() for name, p in self._trainable()}

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for name, p in self._trainable():
            self.average[name].lerp_(p.detach(), 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """The model with the averaged weights in place of its own until the block ends."""
        self._swap()
        try:
            yield self.model
        finally:
            self._swap()

    @torch.no_grad()
    def capture(self) -> None:
        """Take the model's current trainable weights as the averages (resume loads them there first)."""
        for name, p in self._trainable():
            self.average[name].copy_(p.detach())

    @torch.no_grad()
    def _swap(self) -> None:
        for name, p in self._trainable():
            held = p.detach().clone()
            p.copy_(self.average[name])
            self.average[name].copy_(held)
