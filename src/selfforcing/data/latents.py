"""Read a latent cache written by :func:`~selfforcing.data.video_folder.encode_video_folder`.

Shards are opened lazily and only the requested item is read from disk (safetensors
slices are memory-mapped), so a cache far larger than memory is fine and a dataset
object stays cheap to copy into loader workers.
"""

from __future__ import annotations

import bisect
import itertools
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from selfforcing.data.video_folder import CAPTIONS_KEY, INDEX_FILE
from selfforcing.errors import SelfForcingError
from selfforcing.files import load_json

_REBUILD = "rebuild it with selfforcing.data.video_folder.encode_video_folder"


class LatentDataset(Dataset):
    """Map-style dataset over a latent cache directory.

    Item ``i`` is ``dict(latents=(C, F, h, w) float32 tensor, caption=str, index=i)``;
    latents stored in a lower precision are returned as float32. ``index_data`` is the
    cache's ``index.json`` (VAE config, frame count, resolution), so training can check
    that the cache matches its model.
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.index_data = _read_index(self.cache_dir)
        self._shards = self.index_data["shards"]
        self._starts = list(itertools.accumulate((s["num_items"] for s in self._shards), initial=0))
        self._captions: dict[int, list[str]] = {}  # per shard, read on first use

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, F, h, w)`` of every item."""
        return tuple(self.index_data["latent_shape"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"latent cache {self.cache_dir} has {len(self)} items, no item {i}")
        shard = bisect.bisect_right(self._starts, i) - 1
        row = i - self._starts[shard]
        path = self.cache_dir / self._shards[shard]["file"]
        try:
            with safe_open(path, framework="pt") as f:
                if shard not in self._captions:
                    self._captions[shard] = self._check_shard(f, shard, path)
                latents = f.get_slice("latents")[row]
        except (FileNotFoundError, SafetensorError) as error:
            message = f"latent cache shard {path} is missing or unreadable ({error}); {_REBUILD}"
            raise SelfForcingError(message) from None
        return {"latents": latents.float(), "caption": self._captions[shard][row], "index": i}

    def _check_shard(self, f: Any, shard: int, path: Path) -> list[str]:
        """Check a shard against the index on first use; returns its captions."""
        count = self._shards[shard]["num_items"]
        expected = [count, *self.index_data["latent_shape"]]
        if "latents" not in f.keys() or f.get_slice("latents").get_shape() != expected:
            raise SelfForcingError(f"latent cache shard {path} does not hold latents of shape {expected}; {_REBUILD}")
        try:
            captions = json.loads((f.metadata() or {})[CAPTIONS_KEY])
        except (KeyError, json.JSONDecodeError, RecursionError):
            captions = None
        if not isinstance(captions, list) or len(captions) != count:
            raise SelfForcingError(f"latent cache shard {path} does not hold {count} captions; {_REBUILD}")
        return captions


def _read_index(cache_dir: Path) -> dict[str, Any]:
    """Load and validate ``index.json``, so a bad cache fails here rather than mid-training."""
    path = cache_dir / INDEX_FILE
    if not path.is_file():
        raise SelfForcingError(
            f"no latent cache at {cache_dir} (no {INDEX_FILE}; an unfinished encoding run leaves none). "
            f"Run encode_video_folder to build it."
        )
    try:
        index = load_json(path)
    except SelfForcingError as error:
        raise SelfForcingError(f"{error}; {_REBUILD}") from None
    problem = _index_problem(index)
    if problem:
        raise SelfForcingError(f"{path} is not a valid latent cache index: {problem}; {_REBUILD}")
    return index


def _index_problem(index: Any) -> str | None:
    """What is wrong with a parsed index, or ``None`` if it is well formed."""
    if not isinstance(index, dict):
        return "expected a JSON object"
    missing = [key for key in ("num_items", "shards", "latent_shape") if key not in index]
    if missing:
        return f"missing {', '.join(missing)}"
    shape = index["latent_shape"]
    if not isinstance(shape, list) or len(shape) != 4 or not all(_positive_int(n) for n in shape):
        return f"latent_shape must be 4 positive integers (C, F, h, w), got {shape!r}"
    shards = index["shards"]
    if not isinstance(shards, list) or not shards:
        return "shards must be a non-empty list"
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) \
                or Path(shard["file"]).name != shard["file"] or not _positive_int(shard.get("num_items")):
            return f"each shard must be {{'file': name in the cache directory, 'num_items': n > 0}}, got {shard!r}"
    total = sum(shard["num_items"] for shard in shards)
    if index["num_items"] != total:
        return f"num_items is {index['num_items']!r} but the shards hold {total}"
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
