"""Tests for captioned video folders, the latent cache they encode into, and reading it back."""

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader

from selfforcing.data.latents import LatentDataset
from selfforcing.data import video_folder
from selfforcing.data.video_folder import encode_video_folder, scan_video_folder
from selfforcing.errors import SelfForcingError
from selfforcing.models.vae import PixelCodec


pytestmark = pytest.mark.usefixtures("single_thread")


def write_npy(path, frames=5, height=8, width=8, seed=0):
    video = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    np.save(path, video)
    return video


def write_jsonl(folder, records, name="captions.jsonl"):
    (folder / name).write_text("".join(json.dumps(record) + "\n" for record in records))


def solid_frames(base, frames=6, size=16):
    """Frame t is one solid colour, ``base`` brightened by 20 t, so frame order is visible."""
    colours = np.array([[min(255, c + 20 * t) for c in base] for t in range(frames)], dtype=np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (frames, size, size, 3)).copy()


def write_mp4(path, frames):
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=8, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=2, ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def pixel_latents(frames, patch=2):
    """What the cache should hold: ``PixelCodec`` latents of uint8 ``(T, H, W, 3)`` frames."""
    video = torch.as_tensor(np.asarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return PixelCodec(patch).encode(video[None])[0]


@pytest.fixture
def npy_folder(tmp_path):
    """Three 5-frame 8x8 .npy videos captioned by a toy-world style captions.jsonl."""
    folder = tmp_path / "videos"
    folder.mkdir()
    videos = [write_npy(folder / f"{i:06d}.npy", seed=i) for i in range(3)]
    write_jsonl(folder, [{"file": f"{i:06d}.npy", "caption": f" video {i} ", "scene": {"objects": []}}
                         for i in range(3)])
    return folder, videos


def encode(folder, out, **kwargs):
    options = dict(vae=PixelCodec(2), num_frames=4, height=8, width=8, progress=False)
    return encode_video_folder(folder, out_dir=out, **(options | kwargs))


# ----------------------------------------------------------------------------- scanning


def test_scan_reads_jsonl_captions_and_ignores_extra_keys(npy_folder):
    folder, _ = npy_folder
    assert scan_video_folder(folder) == [(folder / f"{i:06d}.npy", f"video {i}") for i in range(3)]


def test_scan_reads_txt_captions_beside_videos(tmp_path):
    for name in ("b.mp4", "a.webm"):
        (tmp_path / name).write_bytes(b"not decoded by a scan")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "notes.md").write_text("not a video")
    assert scan_video_folder(tmp_path) == [(tmp_path / "a.webm", "first"), (tmp_path / "b.mp4", "second")]


def test_scan_accepts_any_single_jsonl_and_prefers_txt_captions(tmp_path):
    write_npy(tmp_path / "a.npy")
    write_npy(tmp_path / "b.npy")
    write_jsonl(tmp_path, [{"file": "a.npy", "caption": "from jsonl"}, {"file": "b.npy", "caption": "from jsonl"}],
                name="meta.jsonl")
    (tmp_path / "b.txt").write_text("from txt")
    assert [caption for _, caption in scan_video_folder(tmp_path)] == ["from jsonl", "from txt"]


def test_scan_lists_videos_without_captions(tmp_path):
    for i in range(12):
        (tmp_path / f"clip{i:02d}.mp4").write_bytes(b"")
    (tmp_path / "clip00.txt").write_text("captioned")
    (tmp_path / "clip01.txt").write_text("   \n")  # a blank caption is as good as none
    with pytest.raises(SelfForcingError, match=r"11 video\(s\) .* no caption") as error:
        scan_video_folder(tmp_path)
    message = str(error.value)
    assert "clip01.mp4" in message and "clip10.mp4" in message and "and 1 more" in message
    assert "clip00.mp4" not in message and "clip11.mp4" not in message


def test_scan_missing_or_empty_folder(tmp_path):
    with pytest.raises(SelfForcingError, match="nowhere does not exist"):
        scan_video_folder(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(SelfForcingError, match="no videos in"):
        scan_video_folder(tmp_path)


def test_scan_rejects_ambiguous_or_malformed_jsonl(tmp_path):
    write_npy(tmp_path / "a.npy")
    write_jsonl(tmp_path, [], name="one.jsonl")
    write_jsonl(tmp_path, [], name="two.jsonl")
    with pytest.raises(SelfForcingError, match="several .jsonl files"):
        scan_video_folder(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.npy", "caption": "ok"}\n\n{"file": "a.npy"}\n')
    with pytest.raises(SelfForcingError, match=r"captions.jsonl:3 must be an object"):
        scan_video_folder(tmp_path)
    (tmp_path / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(SelfForcingError, match=r"captions.jsonl:1 is not valid JSON"):
        scan_video_folder(tmp_path)


# ----------------------------------------------------------------------------- encoding


def test_encode_npy_exactly_with_shard_boundaries(npy_folder, tmp_path):
    folder, videos = npy_folder
    out = tmp_path / "cache"
    index = encode(folder, out, shard_size=2, batch_size=3)  # batches straddle shards

    assert sorted(path.name for path in out.iterdir()) == [
        "index.json", "latents-00000.safetensors", "latents-00001.safetensors",
    ]
    assert json.loads((out / "index.json").read_text()) == index
    assert index["num_items"] == 3
    assert index["shards"] == [{"file": "latents-00000.safetensors", "num_items": 2},
                               {"file": "latents-00001.safetensors", "num_items": 1}]
    assert index["latent_shape"] == [12, 4, 4, 4]
    assert index["vae"] == {"type": "pixel", "patch": 2}
    assert (index["height"], index["width"], index["num_frames"], index["dtype"]) == (8, 8, 4, "float32")

    dataset = LatentDataset(out)
    assert len(dataset) == 3 and dataset.latent_shape == (12, 4, 4, 4)
    for i, video in enumerate(videos):
        item = dataset[i]
        assert item["caption"] == f"video {i}" and item["index"] == i
        assert torch.equal(item["latents"], pixel_latents(video[:4]))
    with pytest.raises(IndexError):
        dataset[3]


def test_encode_center_crops_then_resizes(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    wide = write_npy(folder / "wide.npy", frames=2, height=8, width=16)
    tall = write_npy(folder / "tall.npy", frames=2, height=12, width=4, seed=1)
    write_jsonl(folder, [{"file": "wide.npy", "caption": "wide"}, {"file": "tall.npy", "caption": "tall"}])
    encode(folder, tmp_path / "cache", num_frames=2)
    dataset = LatentDataset(tmp_path / "cache")

    tall_crop = torch.from_numpy(tall[:, 4:8]).permute(0, 3, 1, 2).float()  # centred 4x4 of 12x4
    tall_resized = F.interpolate(tall_crop, size=(8, 8), mode="bilinear", antialias=True)
    tall_expected = PixelCodec(2).encode((tall_resized / 127.5 - 1.0).permute(1, 0, 2, 3)[None])[0]
    assert torch.allclose(dataset[0]["latents"], tall_expected, atol=1e-6)
    assert torch.equal(dataset[1]["latents"], pixel_latents(wide[:, :, 4:12]))  # centred 8x8 of 8x16, no resize


def test_encode_mp4_with_txt_captions(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    sources = {"red": solid_frames((200, 30, 40)), "teal": solid_frames((10, 120, 110))}
    for name, frames in sources.items():
        write_mp4(folder / f"{name}.mp4", frames)
        (folder / f"{name}.txt").write_text(f"a {name} screen")
    encode(folder, tmp_path / "cache", num_frames=5, height=8, width=8)

    dataset = LatentDataset(tmp_path / "cache")
    for i, (name, frames) in enumerate(sorted(sources.items())):
        assert dataset[i]["caption"] == f"a {name} screen"
        expected = pixel_latents(frames[:5, :8, :8])  # solid frames: resizing keeps each colour
        assert torch.allclose(dataset[i]["latents"], expected, atol=8 / 127.5)  # H.264 + yuv420p rounding


def test_encode_toy_world_folder(tmp_path):
    from selfforcing.data.toy_world import ToyWorldFolder, write_dataset

    folder = write_dataset(tmp_path / "toy", 3, num_frames=5, height=16, width=16)
    encode(folder, tmp_path / "cache", num_frames=5, height=16, width=16)
    dataset, toy = LatentDataset(tmp_path / "cache"), ToyWorldFolder(folder)
    for i in range(3):
        assert dataset[i]["caption"] == toy[i]["caption"]
        assert torch.allclose(dataset[i]["latents"], PixelCodec(2).encode(toy[i]["video"][None])[0], atol=1e-6)


def test_encode_float16_is_read_back_as_float32(npy_folder, tmp_path):
    folder, videos = npy_folder
    index = encode(folder, tmp_path / "cache", dtype=torch.float16)
    assert index["dtype"] == "float16"
    with safe_open(tmp_path / "cache" / "latents-00000.safetensors", framework="pt") as f:
        assert f.get_tensor("latents").dtype == torch.float16
    latents = LatentDataset(tmp_path / "cache")[0]["latents"]
    assert latents.dtype == torch.float32
    assert torch.allclose(latents, pixel_latents(videos[0][:4]), atol=1e-3)


def test_latent_dataset_works_with_a_dataloader(npy_folder, tmp_path):
    encode(npy_folder[0], tmp_path / "cache", shard_size=2)
    batch = next(iter(DataLoader(LatentDataset(tmp_path / "cache"), batch_size=3)))
    assert batch["latents"].shape == (3, 12, 4, 4, 4)
    assert batch["caption"] == ["video 0", "video 1", "video 2"]
    assert batch["index"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- failures


def test_too_short_video_stops_before_the_index_is_written(npy_folder, tmp_path):
    folder, _ = npy_folder
    write_npy(folder / "000003.npy", frames=2)
    write_jsonl(folder, [{"file": f"{i:06d}.npy", "caption": f"video {i}"} for i in range(4)])
    out = tmp_path / "cache"
    with pytest.raises(SelfForcingError, match=r"000003.npy has only 2 frame\(s\), fewer than num_frames=4"):
        encode(folder, out, shard_size=1, batch_size=1)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left
    with pytest.raises(SelfForcingError, match="no latent cache at"):
        LatentDataset(out)


@pytest.mark.parametrize("failure", ["a corrupt clip", "Ctrl-C"])
def test_a_failed_rebuild_leaves_the_old_cache_whole(npy_folder, tmp_path, monkeypatch, failure):
    folder, _ = npy_folder
    out = tmp_path / "cache"
    encode(folder, out, shard_size=1)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(SelfForcingError, match="already holds a latent cache"):
        encode(folder, out)
    if failure == "a corrupt clip":
        (folder / "000002.npy").write_bytes(b"\x00" * 100)
        expected = pytest.raises(SelfForcingError, match="000002.npy")
    else:
        calls = []

        def interrupted(path, num_frames):
            calls.append(path)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(path, num_frames)

        original = video_folder.read_video
        monkeypatch.setattr(video_folder, "read_video", interrupted)
        expected = pytest.raises(KeyboardInterrupt)
    with expected:
        encode(folder, out, shard_size=1, num_frames=2, overwrite=True)  # two shards written when it stops
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert len(LatentDataset(out)) == 3


def test_overwrite_removes_stale_shards(npy_folder, tmp_path):
    folder, videos = npy_folder
    out = tmp_path / "cache"
    encode(folder, out, shard_size=1)
    for name in ("000001.npy", "000002.npy"):
        (folder / name).unlink()
    encode(folder, out, shard_size=1, overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == ["index.json", "latents-00000.safetensors"]
    assert torch.equal(LatentDataset(out)[0]["latents"], pixel_latents(videos[0][:4]))


def test_settings_the_vae_cannot_encode_are_rejected_before_writing(npy_folder, tmp_path):
    class TemporalCodec(PixelCodec):
        temporal_ratio = 4

    folder, _ = npy_folder
    out = tmp_path / "cache"
    with pytest.raises(SelfForcingError, match=r"num_frames must be 1 \+ 4k .* got 6 \(try 5 or 9\)"):
        encode(folder, out, vae=TemporalCodec(2), num_frames=6)
    with pytest.raises(SelfForcingError, match="multiples of 2 .* got 7x8"):
        encode(folder, out, height=7)
    with pytest.raises(SelfForcingError, match="shard_size must be a positive integer"):
        encode(folder, out, shard_size=0)
    with pytest.raises(SelfForcingError, match="not a floating point type"):
        encode(folder, out, dtype=torch.int8)
    assert not out.exists()


def test_unreadable_videos_are_named(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 1000)
    (tmp_path / "broken.txt").write_text("broken")
    with pytest.raises(SelfForcingError, match="ffmpeg cannot read video .*broken.mp4"):
        encode(tmp_path, tmp_path / "cache")
    (tmp_path / "broken.mp4").unlink()
    np.save(tmp_path / "broken.npy", np.zeros((4, 8, 8), np.uint8))  # grey, no channel axis
    with pytest.raises(SelfForcingError, match=r"broken.npy must hold a uint8 \(T, H, W, 3\) video"):
        encode(tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- reading a damaged cache


def test_missing_cache(tmp_path):
    with pytest.raises(SelfForcingError, match="no latent cache at .*nothing"):
        LatentDataset(tmp_path / "nothing")


def test_damaged_cache_is_reported(npy_folder, tmp_path):
    out = tmp_path / "cache"
    encode(npy_folder[0], out, shard_size=2)
    (out / "latents-00001.safetensors").unlink()
    dataset = LatentDataset(out)
    assert dataset[1]["caption"] == "video 1"
    with pytest.raises(SelfForcingError, match="latents-00001.safetensors is missing or unreadable"):
        dataset[2]

    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps(index | {"num_items": 5}))
    with pytest.raises(SelfForcingError, match="num_items is 5 but the shards hold 3"):
        LatentDataset(out)
    (out / "index.json").write_text(json.dumps(index | {"latent_shape": [12, 4, 4, 2]}))
    with pytest.raises(SelfForcingError, match="does not hold latents of shape"):
        LatentDataset(out)[0]
