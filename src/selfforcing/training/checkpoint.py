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
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from selfforcing.errors import NOT_TENSORS, DamagedFileError, SelfForcingError, describe, reading
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
            remove_stale_temporaries(self.root, r"step-\d+")
            self._clear_pointer_place()

    def _clear_pointer_place(self) -> None:
        """``latest`` is the store's pointer file: an empty directory there (nothing a write can go
        through) is removed, one holding files is the user's to move, named before any work."""
        pointer = self.root / "latest"
        if pointer.is_dir() and not pointer.is_symlink():
            try:
                pointer.rmdir()
            except OSError:
                raise SelfForcingError(f"{pointer} is a directory with files in it, where the checkpoint pointer "
                                       "goes: move it away") from None
            log.warning("%s was an empty directory, where the checkpoint pointer goes: removed", pointer)

    def save(self, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Collective under torchrun (random states of every rank are gathered); rank 0 writes."""
        state = {**state, "fingerprint": self.fingerprint, "noise_rng": self._gather(state["noise_rng"])}
        final = self.root / f"step-{step:07d}"
        if self.env.is_main:
            with temporary_beside(final, directory=True) as tmp:
                for name, tensors in weights.items():
                    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
                torch.save(state, tmp / "state.pt")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            with atomic_path(self.root / "latest", owned=True) as f:  # a link there is replaced, not written through
                f.write_text(final.name)
        if self.env.distributed:
            dist.barrier()
        return final

    def resume(self, names: Iterable[str], apply: Callable[[Path, dict[str, dict[str, torch.Tensor]], dict], None]) -> Path:
        """Hand the newest complete checkpoint holding the models ``names`` to ``apply`` (its path,
        weights and state) and return its path. A checkpoint that is damaged, or that ``apply``
        finds wrong inside (raising :class:`DamagedFileError`), is passed over for the one before
        it, with a warning naming what was wrong."""
        candidates, skipped = self._candidates()
        if not candidates:
            raise SelfForcingError(f"nothing to resume: no checkpoint in {self.root}")
        damaged: list[DamagedFileError] = []
        for path in candidates:
            try:
                weights, state = self.load(path, names)
                apply(path, weights, state)
            except DamagedFileError as e:
                damaged.append(e)
                continue
            if self.env.is_main:
                for note in skipped:
                    log.warning("%s; resuming from %s", note, path.name)
                for e in damaged:
                    log.warning("checkpoint %s is damaged (%s); resuming from %s instead", _checkpoint_of(e.path), e,
                                path.name)
            return path
        raise SelfForcingError(f"{damaged[0]}; no earlier complete checkpoint in {self.root}: restore the file, "
                               "or train from scratch without --resume")

    def _candidates(self) -> tuple[list[Path], list[str]]:
        """Checkpoints to try, newest first: the one ``latest`` names, then the earlier ones (a later
        directory may be another run's, left behind by a fresh start in the same output_dir). A
        ``latest`` that names no checkpoint here is passed over (with the note returned) for all of them."""
        found = sorted((p for p in self.root.glob("step-*") if p.is_dir() and _STEP_DIR.fullmatch(p.name)),
                       reverse=True)  # zero-padded names
        pointer = self.root / "latest"
        if not pointer.exists() and not pointer.is_symlink():
            return found, []
        named, reason = None, "is not a regular file"  # a fifo would block the read, a device never end it
        if pointer.is_file():
            try:
                with open(pointer, "rb") as f:
                    named = f.read(64).decode().strip()  # a step name is 12 characters
                reason = f"names {named[:40]!r}, not a checkpoint here"
            except (OSError, UnicodeDecodeError) as e:
                reason = f"cannot be read ({describe(e) if isinstance(e, OSError) else 'not text'})"
        if named is None or not _STEP_DIR.fullmatch(named) or not (self.root / named).is_dir():
            return found, [f"{pointer} {reason}: ignored"]
        return [self.root / named, *(p for p in found if p.name < named)], []

    def load(self, path: Path, names: Iterable[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Read one checkpoint; a missing or unreadable file raises :class:`DamagedFileError`."""
        files = {name: path / f"{name}.safetensors" for name in names}
        for file in [path / "state.pt", *files.values()]:
            if not file.is_file():
                raise DamagedFileError(file, "the file is missing")
        with reading(path / "state.pt", NOT_TENSORS):
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        _check_state(path / "state.pt", state)
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


_STEP_DIR = re.compile(r"step-\d{7,}")


def _checkpoint_of(file: Path) -> str:
    return file.parent.name if _STEP_DIR.fullmatch(file.parent.name) else file.name


def _check_state(file: Path, state) -> None:
    """A ``state.pt`` that loads but does not hold what :meth:`CheckpointStore.save` wrote is damaged."""
    if not isinstance(state, dict):
        raise DamagedFileError(file, "not a training state")
    counts = {key: state.get(key) for key in ("step", "skipped", "data_position")}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DamagedFileError(file, f"its {key} is {value!r}, not a count")
    rngs = state.get("noise_rng")
    if not isinstance(rngs, list) or not rngs or not all(_is_rng_state(r) for r in rngs):
        raise DamagedFileError(file, "its noise_rng is not a list of random-generator states")
    if not _is_rng_state(state.get("torch_rng")):
        raise DamagedFileError(file, "its torch_rng is not a random-generator state")
    if not isinstance(state.get("optimizers"), dict):
        raise DamagedFileError(file, "it holds no optimizers")
    threads = state.get("threads")  # absent from checkpoints written before 2026-12-07
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DamagedFileError(file, f"its threads is {threads!r}, not a thread count")


def _is_rng_state(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
