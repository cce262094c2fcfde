"""Training checkpoints: ``checkpoints/step-NNNNNNN/`` with one safetensors file per model
(student, ema, critic, head) and ``state.pt`` (optimisers, step, random states, data
position, config fingerprint), plus a ``latest`` pointer.

A checkpoint directory is assembled under a temporary name and renamed into place, and
``latest`` is replaced atomically afterwards, so a write killed at any moment leaves the
previous checkpoint intact and ``latest`` pointing at a complete one; the temporary of a
killed write is removed by the next run. A checkpoint damaged afterwards (a file lost or
truncated by a full disk or a partial copy) is skipped on resume for the one before it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from selfforcing.errors import NOT_TENSORS, DamagedFileError, SelfForcingError, reading
from selfforcing.training.distributed import DistEnv
from selfforcing.utils import atomic_path, remove_stale_temporaries, temporary_beside

log = logging.getLogger("selfforcing.train")


class CheckpointStore:
    def __init__(self, root: Path, fingerprint: str, env: DistEnv, also_accepted: tuple[str, ...] = ()):
        """Writes ``fingerprint``; resumes checkpoints holding it or one of ``also_accepted``
        (how earlier versions fingerprinted the same config)."""
        self.root, self.fingerprint, self.env = Path(root), fingerprint, env
        self.accepted = (fingerprint, *also_accepted)
        if env.is_main:
            remove_stale_temporaries(self.root, ".step-")

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Collective under torchrun (random states of every rank are gathered); rank 0 writes."""
        state = {**state, "fingerprint": self.fingerprint, "noise_rng": self._gather(state["noise_rng"])}
        final = self.root / f"step-{step:07d}"
        if self.env.is_main:
            tmp = temporary_beside(final, directory=True)
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

    def load_latest(self, names: Iterable[str]) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict]:
        """The newest complete checkpoint holding the models ``names``: its path, weights and state.
        A damaged one is passed over, with a warning naming the file, for the one before it."""
        candidates = self._candidates()
        if not candidates:
            raise SelfForcingError(f"nothing to resume: no checkpoint in {self.root}")
        damaged: list[DamagedFileError] = []
        for path in candidates:
            try:
                weights, state = self.load(path, names)
            except DamagedFileError as e:
                damaged.append(e)
                continue
            if self.env.is_main:
                for e in damaged:
                    log.warning("checkpoint %s is damaged (%s); resuming from %s instead", e.path.parent.name, e,
                                path.name)
            return path, weights, state
        raise SelfForcingError(f"{damaged[0]}; no earlier complete checkpoint in {self.root}: restore the file, "
                               "or train from scratch without --resume")

    def _candidates(self) -> list[Path]:
        """Checkpoints to try, newest first: the one ``latest`` names, then the earlier ones (a later
        directory may be another run's, left behind by a fresh start in the same output_dir)."""
        found = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)  # zero-padded names
        pointer = self.root / "latest"
        if not pointer.is_file():
            return found
        named = self.root / pointer.read_text().strip()
        return [named, *(p for p in found if p.name < named.name)]

    def load(self, path: Path, names: Iterable[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Read one checkpoint; a missing or unreadable file raises :class:`DamagedFileError`."""
        files = {name: path / f"{name}.safetensors" for name in names}
        for file in [path / "state.pt", *files.values()]:
            if not file.is_file():
                raise DamagedFileError(file, "the file is missing")
        with reading(path / "state.pt", NOT_TENSORS):
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "noise_rng" not in state:
            raise DamagedFileError(path / "state.pt", "not a training state")
        if state.get("fingerprint") not in self.accepted:
            raise SelfForcingError(
                f"checkpoint {path} was written by a different config (fingerprint {state.get('fingerprint')} "
                f"vs {self.fingerprint}): model, data, paradigm, loss and optimiser settings must match to resume"
            )
        ranks = state["noise_rng"]
        if len(ranks) != self.env.world_size:
            raise SelfForcingError(f"checkpoint {path} was written by {len(ranks)} processes, "
                                   f"resuming with {self.env.world_size}")
        state["noise_rng"] = ranks[self.env.rank]
        weights = {}
        for name, file in files.items():
            with reading(file):
                weights[name] = load_file(file)
        return weights, state

    def _gather(self, rng_state: torch.Tensor) -> list[torch.Tensor]:
        if not self.env.distributed:
            return [rng_state]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, rng_state)
        return states
