"""Progressive MP4 writing: frames go to ffmpeg as they arrive, the file appears only when complete."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.utils import atomic_path


class MP4Writer:
    """Feed (T, H, W, 3) uint8 frames through ``write``; H.264 via imageio-ffmpeg."""

    def __init__(self, path: Path, fps: int):
        self._path, self._fps, self._ffmpeg = path, fps, None
        self.frames = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
        if self._ffmpeg is None:
            height, width = frames.shape[1:3]
            self._ffmpeg = imageio_ffmpeg.write_frames(
                str(self._path), (width, height), fps=self._fps, codec="libx264", pix_fmt_out="yuv420p",
                macro_block_size=2, ffmpeg_log_level="error", output_params=["-f", "mp4"],
            )
            self._ffmpeg.send(None)  # start the encoder process
        for frame in frames:
            self._ffmpeg.send(frame)
        self.frames += len(frames)

    def close(self) -> None:
        if self._ffmpeg is not None:
            self._ffmpeg.close()


@contextlib.contextmanager
def mp4_writer(path: str | Path, fps: int) -> Iterator[MP4Writer]:
    """Write an mp4 progressively; on any error no file (and no partial file) is left at ``path``."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise SelfForcingError(f"output must be an .mp4 file, got {path}")
    if path.is_dir():
        raise SelfForcingError(f"output path {path} is a directory")
    with atomic_path(path) as tmp:
        writer = MP4Writer(tmp, fps)
        try:
            yield writer
        finally:
            writer.close()
        if writer.frames == 0:
            raise SelfForcingError("no frames were generated; nothing written")


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode an mp4 to (T, H, W, 3) uint8."""
    if not Path(path).is_file():
        raise SelfForcingError(f"video {path} does not exist")
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader])
