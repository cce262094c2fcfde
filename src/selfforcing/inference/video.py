"""Progressive MP4 writing: frames go to ffmpeg as they arrive, the file appears only when complete."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.utils import atomic_path, check_writable


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


def check_mp4_output(path: str | Path) -> None:
    """Refuse an output path that could never be written, before any work is spent on it."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise SelfForcingError(f"output must be an .mp4 file, got {path}")
    if path.is_dir():
        raise SelfForcingError(f"output path {path} is a directory; give a file, e.g. {path / 'out.mp4'}")
    check_writable(path)


@contextlib.contextmanager
def mp4_writer(path: str | Path, fps: int) -> Iterator[MP4Writer]:
    """Write an mp4 progressively; on any error no file (and no partial file) is left at ``path``."""
    path = Path(path)
    check_mp4_output(path)
    with atomic_path(path) as tmp:
        writer = MP4Writer(tmp, fps)
        try:
            yield writer
        finally:
            writer.close()
        if writer.frames == 0:
            raise SelfForcingError("no frames were generated; nothing written")


def read_mp4(path: str | Path) -> np.ndarray:
    """Decode a video to (T, H, W, 3) uint8; a file ffmpeg cannot decode is the user's error,
    reported in one line (ffmpeg's own report opens with its whole build banner)."""
    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"video {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    except (OSError, RuntimeError, StopIteration, ValueError):
        raise SelfForcingError(f"cannot read {path} as a video: ffmpeg cannot decode it") from None
    if not frames:
        raise SelfForcingError(f"video {path} holds no frames")
    return np.stack(frames)
