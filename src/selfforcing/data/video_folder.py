"""Captioned video folders, encoded once into an on-disk latent cache.

Training touches every video many times, but the VAE is frozen, so each video is
encoded once and the latents are cached (:class:`~selfforcing.data.latents.LatentDataset`
reads them back).

**Folder layout.** Videos (``.mp4 .mov .webm .mkv .avi``, or ``.npy`` uint8
``(T, H, W, 3)`` arrays as the toy world writes them) sit directly in the folder.
A video's caption is a ``.txt`` file with the same stem beside it, or else its entry
in the folder's ``captions.jsonl`` (any single ``.jsonl`` file will do): one
``{"file": "name.mp4", "caption": "..."}`` object per line, extra keys ignored.

**Cache layout.** ``out_dir`` holds shards ``latents-00000.safetensors``, ... Each
shard stores a tensor ``"latents"`` of shape ``(N, C, F, h, w)`` and its N captions,
as a JSON list, in the safetensors metadata key ``"captions"``, so a shard's
latents and captions are one file and can never get out of step. ``index.json``
lists the shards and records how the cache was made. The shards and the index are
written in a temporary folder beside ``out_dir`` and moved in together when all are
complete (``utils.replaced_together``): a run that fails or is stopped leaves the
directory as it was, an earlier cache included, never a mix of two runs.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from selfforcing.errors import SelfForcingError, describe
from selfforcing.models.vae import VideoVAE
from selfforcing.utils import atomic_path, progress_bar, replaced_together

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".npy")
CAPTIONS_FILE = "captions.jsonl"
INDEX_FILE = "index.json"
SHARD_PATTERN = "latents-{:05d}.safetensors"
CAPTIONS_KEY = "captions"  # safetensors metadata key of a shard's captions
MAX_LISTED = 10  # names shown in an error before "... and N more"


# ----------------------------------------------------------------------------- scanning


def scan_video_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """``(video_path, caption)`` for every video directly in ``folder``, sorted by name.

    A ``.txt`` caption beside a video takes precedence over its ``.jsonl`` entry.
    Raises if the folder has no videos or any video has no (non-blank) caption.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SelfForcingError(f"video folder {folder} does not exist")
    videos = sorted(
        path for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")
    )
    if not videos:
        raise SelfForcingError(f"no videos in {folder} (looked for {', '.join(VIDEO_SUFFIXES)} files)")
    jsonl_captions = _read_jsonl_captions(folder)
    items, missing = [], []
    for video in videos:
        caption = _sidecar_caption(video) or jsonl_captions.get(video.name, "")
        if caption:
            items.append((video, caption))
        else:
            missing.append(video.name)
    if missing:
        raise SelfForcingError(
            f"{len(missing)} video(s) in {folder} have no caption (add a .txt with the same name "
            f"or an entry in {CAPTIONS_FILE}): {_name_list(missing)}"
        )
    return items


def _sidecar_caption(video: Path) -> str:
    """The stripped text of ``video``'s same-stem ``.txt`` file, or ``""`` if there is none."""
    text_file = video.with_suffix(".txt")
    return text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else ""


def _find_jsonl(folder: Path) -> Path | None:
    """The folder's captions file: ``captions.jsonl``, else its only ``.jsonl``, else none."""
    if (folder / CAPTIONS_FILE).is_file():
        return folder / CAPTIONS_FILE
    candidates = sorted(path for path in folder.glob("*.jsonl") if not path.name.startswith("."))
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise SelfForcingError(
            f"{folder} has several .jsonl files ({names}); name the captions file {CAPTIONS_FILE}"
        )
    return candidates[0] if candidates else None


def _read_jsonl_captions(folder: Path) -> dict[str, str]:
    """``{file name: stripped caption}`` from the folder's ``.jsonl`` captions file, if any."""
    path = _find_jsonl(folder)
    if path is None:
        return {}
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise SelfForcingError(f"{where} is not valid JSON: {describe(error)}") from None
        if not isinstance(record, dict) or not isinstance(record.get("file"), str) \
                or not isinstance(record.get("caption"), str):
            raise SelfForcingError(f'{where} must be an object with string "file" and "caption" keys')
        if record["file"] in captions:
            raise SelfForcingError(f"{where} repeats the caption of {record['file']}")
        captions[record["file"]] = record["caption"].strip()
    return captions


def _name_list(names: Sequence[str]) -> str:
    """At most :data:`MAX_LISTED` names, so an error about thousands of files stays readable."""
    text = ", ".join(names[:MAX_LISTED])
    return text + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


# ----------------------------------------------------------------------------- reading videos


def read_video(path: str | Path, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames of a video file as ``(num_frames, H, W, 3)`` uint8.

    Only those frames are decoded: a long source video never has to fit in memory.
    """
    path = Path(path)
    frames = _read_npy(path, num_frames) if path.suffix.lower() == ".npy" else _read_container(path, num_frames)
    if len(frames) < num_frames:
        raise SelfForcingError(f"video {path} has only {len(frames)} frame(s), fewer than num_frames={num_frames}")
    return frames


def _read_npy(path: Path, num_frames: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise SelfForcingError(f"cannot read {path} as a numpy array: {error}") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise SelfForcingError(
            f"{path} must hold a uint8 (T, H, W, 3) video, got {array.dtype} {tuple(array.shape)}"
        )
    return np.array(array[:num_frames])


def _read_container(path: Path, num_frames: int) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        try:
            width, height = next(reader)["size"]
        except (OSError, RuntimeError, StopIteration) as error:
            lines = str(error).strip().splitlines() or [type(error).__name__]
            # ffmpeg's output starts with a long banner; its verdict is the last line
            raise SelfForcingError(f"ffmpeg cannot read video {path}: {lines[-1]}") from None
        frames = [
            np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3)
            for frame in itertools.islice(reader, num_frames)
        ]
    finally:
        reader.close()  # stops ffmpeg instead of letting it decode the rest of the file
    return np.stack(frames) if frames else np.empty((0, height, width, 3), np.uint8)


def to_model_video(frames: np.ndarray, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 frames -> ``(3, T, height, width)`` float32 in ``[-1, 1]``.

    The largest centred crop with the target aspect ratio is kept (no stretching),
    then resized with antialiased bilinear filtering (no aliasing when shrinking).
    """
    video = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    video = _center_crop(video, height / width)
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (video / 127.5 - 1.0).permute(1, 0, 2, 3)


def _center_crop(video: torch.Tensor, aspect: float) -> torch.Tensor:
    """The largest centred crop of ``(..., H, W)`` frames whose ``H / W`` is ``aspect``."""
    full_h, full_w = video.shape[-2:]
    crop_h = max(1, min(full_h, round(full_w * aspect)))
    crop_w = max(1, min(full_w, round(full_h / aspect)))
    top, left = (full_h - crop_h) // 2, (full_w - crop_w) // 2
    return video[..., top : top + crop_h, left : left + crop_w]


# ----------------------------------------------------------------------------- encoding


def encode_video_folder(
    folder: str | Path,
    vae: VideoVAE,
    out_dir: str | Path,
    num_frames: int,
    height: int,
    width: int,
    shard_size: int = 256,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every captioned video in ``folder`` into a latent cache in ``out_dir``.

    Each video's first ``num_frames`` frames, centre-cropped and resized to
    ``height x width``, go through ``vae.encode`` (which should already be on
    ``device``) in batches of ``batch_size``; latents are stored as ``dtype``,
    ``shard_size`` videos per shard. An existing cache in ``out_dir`` is only
    replaced with ``overwrite=True``. Returns the index written to ``index.json``.
    """
    _check_encode_args(vae, num_frames, height, width, shard_size, batch_size, dtype)
    items = scan_video_folder(folder)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    writer = _ShardWriter(out_dir, shard_size, dtype)
    # The shards and their index replace an old cache together, once all are written: a corrupt
    # clip or Ctrl-C halfway leaves the old cache whole.
    with replaced_together(out_dir), torch.no_grad(), \
            progress_bar(total=len(items), unit="video", desc="encoding", quiet=not progress) as bar:
        for batch in _batches(items, batch_size):
            videos = torch.stack([to_model_video(read_video(path, num_frames), height, width, device)
                                  for path, _ in batch])
            writer.add(vae.encode(videos), [caption for _, caption in batch])
            bar.update(len(batch))
        shards = writer.finish()
        index = {
            "num_items": len(items),
            "shards": shards,
            "latent_shape": writer.latent_shape,
            "dtype": str(dtype).removeprefix("torch."),
            "vae": vae.config(),
            "height": height,
            "width": width,
            "num_frames": num_frames,
            "source": str(Path(folder).resolve()),
        }
        with atomic_path(out_dir / INDEX_FILE) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
    named = {shard["file"] for shard in shards}
    for stale in out_dir.glob("latents-*.safetensors"):  # the old cache's shards beyond the new count
        if stale.name not in named:
            stale.unlink()
    return index


def _check_encode_args(
    vae: VideoVAE, num_frames: int, height: int, width: int, shard_size: int, batch_size: int, dtype: torch.dtype
) -> None:
    """Reject settings the VAE cannot encode before any video is read or file written."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width),
                        ("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SelfForcingError(f"{name} must be a positive integer, got {value!r}")
    if not dtype.is_floating_point:
        raise SelfForcingError(f"latents are stored as floats; dtype {dtype} is not a floating point type")
    ratio = vae.temporal_ratio
    if (num_frames - 1) % ratio:
        below = num_frames - (num_frames - 1) % ratio
        raise SelfForcingError(
            f"num_frames must be 1 + {ratio}k for this VAE, got {num_frames} (try {below} or {below + ratio})"
        )
    if height % vae.spatial_ratio or width % vae.spatial_ratio:
        raise SelfForcingError(
            f"height and width must be multiples of {vae.spatial_ratio} for this VAE, got {height}x{width}"
        )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, a cache path that is a file, or an existing cache without ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SelfForcingError(f"latent cache path {out_dir} exists and is not a directory")
    if (out_dir / INDEX_FILE).exists() and not overwrite:
        raise SelfForcingError(f"{out_dir} already holds a latent cache; pass overwrite=True to rebuild it")


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _ShardWriter:
    """Collects encoded videos and writes each full shard atomically, independent of batch size."""

    def __init__(self, out_dir: Path, shard_size: int, dtype: torch.dtype):
        self.out_dir, self.shard_size, self.dtype = out_dir, shard_size, dtype
        self.shards: list[dict[str, Any]] = []
        self.latent_shape: list[int] | None = None
        self._latents: list[torch.Tensor] = []
        self._captions: list[str] = []

    def add(self, latents: torch.Tensor, captions: list[str]) -> None:
        """Queue a batch of ``(B, C, F, h, w)`` latents and their captions."""
        self.latent_shape = list(latents.shape[1:])
        for item, caption in zip(latents.to("cpu", self.dtype), captions):
            self._latents.append(item)
            self._captions.append(caption)
            if len(self._latents) == self.shard_size:
                self._flush()

    def finish(self) -> list[dict[str, Any]]:
        """Write the last, possibly partial, shard; returns the shard list for the index."""
        if self._latents:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        with atomic_path(self.out_dir / name) as tmp:
            save_file({"latents": torch.stack(self._latents)}, str(tmp),
                      metadata={CAPTIONS_KEY: json.dumps(self._captions)})
        self.shards.append({"file": name, "num_items": len(self._latents)})
        self._latents, self._captions = [], []
