"""Training checkpoints: ``checkpoints/step-NNNNNNN/`` with one safetensors file per model
(student, ema, critic, head) and ``state.pt`` (optimisers, step, random states, data
position, config fingerprint), plus a ``latest`` pointer.

A checkpoint directory is assembled under a temporary name and renamed into place, and
``latest`` is replaced atomically afterwards, so a write killed at any moment leaves the
previous checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from selfforcing.errors import SelfForcingError
from selfforcing.training.distributed import DistEnv
from selfforcing.utils import atomic_path


class CheckpointStore:
    def __init__(self, root: Path, fingerprint: str, env: DistEnv):
        self.root, self.fingerprint, self.env = Path(root), fingerprint, env

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Collective under torchrun (random states of every rank are gathered); rank 0 writes."""
        state = {**state, "fingerprint": self.fingerprint, "noise_rng": self._gather(state["noise_rng"])}
        final = self.root / f"step-{step:07d}"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
            try:
                for name, tensors in weights.items():
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
                torch.save(state, tmp / "state.pt")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            with atomic_path(self.root / "latest") as f:
                f.write_text(final.name)
        if self.env.distributed:
            dist.barrier()
        return final

    def latest(self) -> Path:
        pointer = self.root / "latest"
        if not pointer.is_file():
            raise SelfForcingError(f"nothing to resume: no checkpoint in {self.root}")
        return self.root / pointer.read_text().strip()

    def load(self, path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        if not (path / "state.pt").is_file():
            raise SelfForcingError(f"{path} is not a complete checkpoint (state.pt missing)")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            raise SelfForcingError(
                f"checkpoint {path} was written by a different config (fingerprint {state.get('fingerprint')} "
                f"vs {self.fingerprint}): model, data, paradigm, loss and optimiser settings must match to resume"
            )
        ranks = state["noise_rng"]
        if len(ranks) != self.env.world_size:
            raise SelfForcingError(f"checkpoint {path} was written by {len(ranks)} processes, "
                                   f"resuming with {self.env.world_size}")
        state["noise_rng"] = ranks[self.env.rank]
        weights = {f.stem: load_file(f) for f in path.glob("*.safetensors")}
        return weights, state

    def _gather(self, rng_state: torch.Tensor) -> list[torch.Tensor]:
        if not self.env.distributed:
            return [rng_state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, rng_state)
        return states
