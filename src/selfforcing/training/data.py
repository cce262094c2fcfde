"""Turning a config's data section into a stream of per-rank batches, with an exact position.

Every rank walks the same global sequence of items (a seeded permutation per epoch for
finite datasets, item ``k`` for the endless toy world) and takes its own slice of each
global batch, so the stream is resumable from one integer and independent of timing.
"""

from __future__ import annotations

import torch

from selfforcing.data.latents import LatentDataset
from selfforcing.data.prompts import PromptDataset, read_prompts
from selfforcing.data.toy_world import ToyWorldDataset
from selfforcing.models.vae import VideoVAE, num_video_frames
from selfforcing.training.config import TrainConfig
from selfforcing.training.distributed import DistEnv
from selfforcing.training.paradigms.ode import OdePairs


def build_dataset(cfg: TrainConfig, vae: VideoVAE):
    d = cfg.data
    if d.source == "toy":
        frames = num_video_frames(vae, d.num_frames)
        return ToyWorldDataset(None, num_frames=frames, height=d.height, width=d.width, seed=cfg.seed)
    if d.source == "latents":
        return LatentDataset(d.path)
    if d.source == "prompts":
        return PromptDataset(read_prompts(d.path))
    return OdePairs.load(d.path)


class DataStream:
    def __init__(self, dataset, batch_size: int, seed: int, env: DistEnv):
        self.dataset, self.batch_size, self.seed, self.env = dataset, batch_size, seed, env
        self.endless = getattr(dataset, "num_videos", 0) is None
        self.position = 0  # items consumed so far, over all ranks
        self._perm: tuple[int, torch.Tensor] | None = None

    def next_items(self) -> list[dict]:
        start = self.position + self.env.rank * self.batch_size
        items = [self.dataset[self._index(start + i)] for i in range(self.batch_size)]
        self.position += self.batch_size * self.env.world_size
        return items

    def _index(self, k: int) -> int:
        if self.endless:
            return k
        epoch, offset = divmod(k, len(self.dataset))
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return int(self._perm[1][offset])
