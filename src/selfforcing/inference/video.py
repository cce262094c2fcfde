"""Progressive MP4 writing: frames go to ffmpeg as they arrive, the file appears only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.utils import atomic_path, check_writable


class MP4Writer:
    """Feed (T, H, W, 3) uint8 frames through ``write``; H.264 by the ffmpeg of imageio-ffmpeg.

    ffmpeg runs as imageio-ffmpeg's ``write_frames`` runs it (the same command: libx264, CRF 25,
    yuv420p), but here its exit status is read: ``write_frames`` ignores it, so a disk that
    filled up left a truncated video behind a success message. ffmpeg's messages are kept
    for the error instead of going to the terminal."""

    def __init__(self, path: Path, fps: int, shown: Path | None = None):
        self._path, self._fps, self._shown = path, fps, shown or path
        self._ffmpeg: subprocess.Popen | None = None
        self._messages = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads can fill and block ffmpeg
        self.frames = 0

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
        if self._ffmpeg is None:
            height, width = frames.shape[1:3]
            command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
                       "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(self._fps), "-i", "-", "-an",
                       "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "25", "-v", "error", "-f", "mp4",
                       str(self._path)]
            # Its own session: Ctrl-C reaches this process, which then stops ffmpeg (close)
            self._ffmpeg = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=self._messages, start_new_session=True)
        try:
            for frame in frames:
                self._ffmpeg.stdin.write(frame.tobytes())
        except BrokenPipeError:  # ffmpeg stopped: its exit status and messages say why
            self._finish()
            raise self._failure()
        self.frames += len(frames)

    def close(self, complete: bool = True) -> None:
        """Let ffmpeg finish the file (``complete``), or stop it; an ffmpeg that failed raises."""
        if self._ffmpeg is not None and self._ffmpeg.returncode is None:
            if not complete:
                self._ffmpeg.kill()
            self._finish()
            if complete and self._ffmpeg.returncode != 0:
                raise self._failure()
        self._messages.close()

    def _finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._ffmpeg.stdin.close()
        self._ffmpeg.wait()

    def _failure(self) -> Exception:
        """What stopped ffmpeg: a full disk as the ``OSError`` a write of our own would have met
        (the CLI names those), anything else in ffmpeg's last line."""
        self._messages.seek(0)
        said = self._messages.read().decode(errors="replace").strip().splitlines()
        if any("No space left on device" in line for line in said):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._shown))
        last = said[-1] if said else f"exit status {self._ffmpeg.returncode}"
        return SelfForcingError(f"cannot write {self._shown}: ffmpeg failed ({last})")


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
        writer = MP4Writer(tmp, fps, shown=path)
        try:
            yield writer
        except BaseException:
            writer.close(complete=False)
            raise
        writer.close()
        if writer.frames == 0:
            raise SelfForcingError("no frames were generated; nothing written")


def load_image(path: str | Path):
    """An image file as an RGB ``PIL.Image``; a file that is not one is the user's error, in one line."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"image {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        raise SelfForcingError(f"cannot read {path} as an image (PNG, JPEG, WebP, ...)") from None


def fit_image(image, height: int, width: int) -> np.ndarray:
    """An RGB ``PIL.Image`` as a (1, height, width, 3) uint8 clip of one frame: centre-cropped to
    the video's aspect ratio, then resized (Lanczos), so that nothing is stretched."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    return np.array(image, dtype=np.uint8)[None]


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
