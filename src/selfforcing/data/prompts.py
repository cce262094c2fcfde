"""Prompt-only training data: Self Forcing's generator trains from text alone.

A prompt file holds one prompt per line. Blank lines and ``#`` comments are
skipped, so prompt lists can be grouped and annotated by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from selfforcing.errors import SelfForcingError


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in ``path``: stripped lines, without blank lines and ``#`` comments."""
    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SelfForcingError(f"prompt file {path} is not UTF-8 text: {error}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise SelfForcingError(f"no prompts in {path} (one prompt per line; '#' lines are comments)")
    return prompts


class PromptDataset(Dataset):
    """Map-style dataset of prompts; item ``i`` is ``dict(prompt=str, index=int)``.

    With ``seed=None`` items keep the order of ``prompts`` and ``index == i``. With an
    integer seed the items are a fixed permutation of ``prompts`` drawn from that seed,
    so loaders that walk the dataset in order (or shard it across ranks in order) still
    see well-mixed prompts, identically on every run. ``index`` is then the prompt's
    position in ``prompts``, so generated samples can be traced back to their line.
    """

    def __init__(self, prompts: Sequence[str], seed: int | None = None):
        if isinstance(prompts, str):
            raise SelfForcingError("PromptDataset needs a list of prompts, got a single string")
        if not prompts:
            raise SelfForcingError("PromptDataset needs at least one prompt")
        bad = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str) or not prompt.strip()]
        if bad:
            raise SelfForcingError(f"prompts must be non-empty strings; bad entries at positions {bad[:10]}")
        self.prompts = list(prompts)
        self.seed = seed
        if seed is None:
            self._order = list(range(len(self.prompts)))
        else:
            generator = torch.Generator().manual_seed(seed)
            self._order = torch.randperm(len(self.prompts), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, str | int]:
        index = self._order[i]
        return {"prompt": self.prompts[index], "index": index}
