"""Tests for the TAEHV-format tiny VAE: the released checkpoints' layout, frame-by-frame
semantics, streaming equal to one-shot decoding, loading and its errors."""

import pytest
import torch
from safetensors.torch import save_file

from factories import randomize_
from selfforcing.errors import SelfForcingError
from selfforcing.models.tiny_vae import MemBlock, TGrow, TinyVAE, TPool
from selfforcing.models.vae import StreamDecoder, VideoVAE, num_video_frames, vae_from_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return randomize_(TinyVAE(), std=0.05).eval()


def latents(batch=2, frames=5, h=2, w=3, channels=16, seed=0):
    return torch.randn(batch, channels, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2


def frame_by_frame(layers, frames):
    """The released code's sequential semantics, one frame at a time: a MemBlock sees its input
    at the frame before (zeros first), TGrow's channel group j is frame j, TPool stacks frames."""
    for layer in layers:
        if isinstance(layer, MemBlock):
            past, out = torch.zeros_like(frames[0]), []
            for frame in frames:
                out.append(layer(frame, past))
                past = frame
            frames = out
        elif isinstance(layer, TGrow):
            frames = [group for frame in frames for group in layer.conv(frame).chunk(layer.stride, dim=1)]
        elif isinstance(layer, TPool):
            frames = [layer.conv(torch.cat(frames[i:i + layer.stride], dim=1))
                      for i in range(0, len(frames), layer.stride)]
        else:
            frames = [layer(frame) for frame in frames]
    return frames


def test_state_dict_has_the_released_taew2_1_layout(vae):
    """Names and shapes as the released code builds ``taew2_1`` (TAEHV's nn.Sequential indices), so its file loads as is."""
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = {
        "encoder.0.weight": (64, 3, 3, 3), "encoder.2.conv.weight": (64, 128, 1, 1),
        "encoder.3.weight": (64, 64, 3, 3), "encoder.4.conv.0.weight": (64, 128, 3, 3),
        "encoder.7.conv.weight": (64, 128, 1, 1), "encoder.12.conv.weight": (64, 64, 1, 1), "encoder.17.weight": (16, 64, 3, 3),
        "decoder.1.weight": (256, 16, 3, 3), "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.3.conv.4.weight": (256, 256, 3, 3), "decoder.7.conv.weight": (256, 256, 1, 1),
        "decoder.8.weight": (128, 256, 3, 3), "decoder.13.conv.weight": (256, 128, 1, 1),
        "decoder.19.conv.weight": (128, 64, 1, 1), "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3), "decoder.22.bias": (3,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "decoder.8.bias" not in shapes and "decoder.3.skip.weight" not in shapes  # bias-free, same-width skips
    assert len(vae.encoder) == 18 and len(vae.decoder) == 23
    assert sum(k.startswith("decoder.") for k in shapes) == 64  # as many tensors as the released decoders hold
    assert (vae.latent_channels, vae.spatial_ratio, vae.temporal_ratio) == (16, 8, 4)


def test_decode_equals_the_frame_by_frame_reference_and_drops_the_first_three_frames(vae):
    z = latents(frames=3)
    video = vae.decode(z)
    assert video.shape == (2, 3, num_video_frames(vae, 3), 16, 24) == (2, 3, 9, 16, 24)
    reference = torch.stack(frame_by_frame(vae.decoder, list(z.permute(2, 0, 1, 3, 4))), dim=2)
    assert reference.shape[2] == 12
    torch.testing.assert_close(video, reference[:, :, 3:].clamp(0, 1) * 2 - 1, rtol=1e-5, atol=1e-5)
    assert video.min() >= -1 and video.max() <= 1


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [3, 2], [1, 4], [2, 3]])
def test_stream_decode_equals_one_shot(vae, sizes):
    z = latents(frames=5)
    decoder = vae.stream_decoder()
    pieces = [decoder.decode_chunk(chunk) for chunk in z.split(sizes, dim=2)]
    assert [p.shape[2] for p in pieces] == [4 * sizes[0] - 3, *(4 * n for n in sizes[1:])]
    torch.testing.assert_close(torch.cat(pieces, dim=2), vae.decode(z), rtol=1e-5, atol=1e-5)


def test_tuned_convs_decode_the_same_frames_with_channels_last_weights(vae):
    """The same frames to rounding (float64: this random net's activations grow large, so float32
    rounding of other conv algorithms shows at 1e-3 in its output)."""
    plain, tuned = TinyVAE().double(), TinyVAE().double()
    plain.load_state_dict(vae.state_dict())
    tuned.load_state_dict(vae.state_dict())
    tuned.tune_convs()
    assert tuned.tuned_convs and tuned.decoder[3].conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    z = latents(frames=4).double()
    torch.testing.assert_close(tuned.decode(z), plain.decode(z), rtol=1e-9, atol=1e-9)
    assert not torch.backends.cudnn.benchmark  # only while decoding


def test_stream_rejects_a_chunk_from_another_video(vae):
    decoder = vae.stream_decoder()
    decoder.decode_chunk(latents(frames=1))
    with pytest.raises(SelfForcingError, match="new stream decoder"):
        decoder.decode_chunk(latents(frames=1, h=3))
    with pytest.raises(SelfForcingError, match=r"\(B, 16, F, h, w\)"):
        vae.decode(latents(channels=4))


def test_encode_pads_at_the_end_and_follows_the_frame_by_frame_reference(vae):
    video = torch.rand(2, 3, 5, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 16, 2, 2, 3)
    frames = [(f + 1) / 2 for f in video.unbind(2)]
    reference = frame_by_frame(vae.encoder, frames + [frames[-1]] * 3)  # 5 frames padded to 8
    torch.testing.assert_close(z, torch.stack(reference, dim=2), rtol=1e-5, atol=1e-5)
    with pytest.raises(SelfForcingError, match="1 \\+ 4 \\* k"):
        vae.encode(video[:, :, :4])


def test_patched_variant_with_more_latent_channels(tmp_path):
    """A ``taew2_2``-style file (48 latent channels, 2x2 pixel patch) is recognised by its shapes."""
    torch.manual_seed(0)
    wide = randomize_(TinyVAE(latent_channels=48, patch_size=2), std=0.05).eval()
    save_file(wide.state_dict(), tmp_path / "taew2_2.safetensors")
    loaded = TinyVAE.from_pretrained(tmp_path / "taew2_2.safetensors")
    assert (loaded.latent_channels, loaded.patch_size, loaded.spatial_ratio) == (48, 2, 16)
    z = latents(batch=1, frames=2, channels=48)
    assert loaded.decode(z).shape == (1, 3, 5, 32, 48)
    torch.testing.assert_close(loaded.decode(z), wide.decode(z))
    video = torch.zeros(1, 3, 5, 32, 48)
    assert loaded.encode(video).shape == (1, 48, 2, 2, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_from_pretrained_reads_both_file_kinds_and_directories(vae, tmp_path, suffix):
    file = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(vae.state_dict(), file)
    else:
        save_file(vae.state_dict(), file)
    for path in (file, tmp_path):
        loaded = TinyVAE.from_pretrained(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.decode(latents(frames=2)), vae.decode(latents(frames=2)))
    built = vae_from_config({"type": "taehv"}, file, dtype=torch.float64)
    assert isinstance(built, VideoVAE) and isinstance(built.stream_decoder(), StreamDecoder)
    assert built.decoder[1].weight.dtype == torch.float64 and built.config() == {"type": "taehv"}
    assert built.decode(latents(frames=1)).dtype == torch.float64


def test_loading_errors_name_the_problem(vae, tmp_path):
    with pytest.raises(SelfForcingError, match="not found"):
        TinyVAE.from_pretrained(tmp_path / "missing.pth")
    with pytest.raises(SelfForcingError, match="one TAEHV weight file"):
        TinyVAE.from_pretrained(tmp_path)
    state = vae.state_dict()
    save_file({"proj_out.weight": torch.zeros(2)}, tmp_path / "dit.safetensors")
    with pytest.raises(SelfForcingError, match="not a TAEHV-format state dict"):
        TinyVAE.from_pretrained(tmp_path / "dit.safetensors")
    partial = {k: v for k, v in state.items() if k != "decoder.3.conv.2.weight"}
    save_file({**partial, "decoder.99.weight": torch.zeros(1)}, tmp_path / "odd.safetensors")
    with pytest.raises(SelfForcingError, match="decoder.3.conv.2.weight.*decoder.99.weight"):
        TinyVAE.from_pretrained(tmp_path / "odd.safetensors")
    with pytest.raises(SelfForcingError, match="needs the path"):
        vae_from_config({"type": "taehv"})
    with pytest.raises(SelfForcingError, match="unknown key"):
        vae_from_config({"type": "taehv", "patch": 2}, tmp_path)
    with pytest.raises(SelfForcingError, match="strides of 1 or 2"):
        TinyVAE(decoder_time_upscale=(1, 2))
    with pytest.raises(SelfForcingError, match="packs 2 frames"):
        TinyVAE(encoder_time_downscale=(2, 1, 1))
