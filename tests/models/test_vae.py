"""Tests for the VAE adapters: the toy pixel codec and the Wan VAE streaming decoder."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from factories import LATENTS_MEAN, LATENTS_STD, write_tiny_wan_vae
from selfforcing.errors import SelfForcingError
from selfforcing.models.vae import (
    PixelCodec,
    StreamDecoder,
    VideoVAE,
    WanVAE,
    num_video_frames,
    vae_from_config,
)



pytestmark = pytest.mark.usefixtures("single_thread")


def stream(vae, latents, sizes):
    decoder = vae.stream_decoder()
    return torch.cat([decoder.decode_chunk(chunk) for chunk in latents.split(sizes, dim=2)], dim=2)


# --- PixelCodec --------------------------------------------------------------------------


def random_video(frames=5, size=8, batch=2):
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_pixel_codec_round_trip_is_exact_with_expected_shapes():
    codec = PixelCodec(patch=2)
    video = random_video()
    latents = codec.encode(video)
    assert latents.shape == (2, 12, 5, 4, 4)
    assert codec.latent_channels == 12 and codec.spatial_ratio == 2 and codec.temporal_ratio == 1
    assert torch.equal(codec.decode(latents), video)


def test_pixel_codec_uses_pixel_unshuffle_layout():
    video = random_video(frames=3)
    latents = PixelCodec(patch=2).encode(video)
    for t in range(3):
        assert torch.equal(latents[:, :, t], F.pixel_unshuffle(video[:, :, t], 2))


def test_pixel_codec_patch_one_is_identity():
    video = random_video()
    codec = PixelCodec(patch=1)
    assert torch.equal(codec.encode(video), video)
    assert torch.equal(codec.decode(video), video)


def test_pixel_codec_decode_clamps():
    codec = PixelCodec(patch=1)
    assert codec.decode(torch.full((1, 3, 1, 2, 2), 3.0)).max() == 1.0


def test_pixel_codec_stream_decode_equals_one_shot():
    codec = PixelCodec(patch=2)
    latents = codec.encode(random_video(frames=7))
    assert torch.equal(stream(codec, latents, [1, 3, 3]), codec.decode(latents))


def test_pixel_codec_config_round_trip_and_protocols():
    codec = PixelCodec(patch=4)
    assert codec.config() == {"type": "pixel", "patch": 4}
    assert PixelCodec.from_config(codec.config()).patch == 4
    assert isinstance(codec, VideoVAE) and isinstance(codec.stream_decoder(), StreamDecoder)
    assert num_video_frames(codec, 7) == 7


@pytest.mark.parametrize("patch", [0, -1, 1.5, True])
def test_pixel_codec_rejects_bad_patch(patch):
    with pytest.raises(SelfForcingError, match="patch"):
        PixelCodec(patch=patch)


def test_pixel_codec_rejects_bad_shapes():
    codec = PixelCodec(patch=4)
    with pytest.raises(SelfForcingError, match="multiples of 4"):
        codec.encode(random_video(size=6))
    with pytest.raises(SelfForcingError, match="latents of shape"):
        codec.decode(torch.zeros(1, 3, 1, 2, 2))


# --- WanVAE ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny randomly initialised Wan 2.1-style VAE (8x spatial, 4x temporal) saved to disk."""
    path = tmp_path_factory.mktemp("wan_vae")
    write_tiny_wan_vae(path)
    return path


@pytest.fixture(scope="module")
def wan(wan_dir):
    return WanVAE.from_pretrained(wan_dir)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 7, 2, 2, generator=torch.Generator().manual_seed(1))


def denormalize_by_hand(latents):
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    return latents * std + mean


def test_wan_ratios_and_frame_count(wan, latents):
    assert (wan.latent_channels, wan.spatial_ratio, wan.temporal_ratio) == (4, 8, 4)
    assert isinstance(wan, VideoVAE)
    video = wan.decode(latents)
    assert video.shape == (2, 3, 1 + 4 * (7 - 1), 16, 16)
    assert video.shape[2] == num_video_frames(wan, 7)
    assert video.abs().max() <= 1.0


def test_wan_decode_matches_diffusers_on_denormalised_latents(wan, latents):
    expected = wan.model.decode(denormalize_by_hand(latents)).sample
    torch.testing.assert_close(wan.decode(latents), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames_per_call", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[1, 3, 3], [3, 3, 1], [1] * 7, [7]])
def test_wan_stream_decode_equals_one_shot(wan, latents, sizes, frames_per_call):
    """Frame by frame (diffusers' decode) or several latent frames per decoder call."""
    one_shot = wan.decode(latents)
    streamed = stream(WanVAE(wan.model, frames_per_call=frames_per_call), latents, sizes)
    assert streamed.shape == one_shot.shape
    assert (streamed - one_shot).abs().max() <= 1e-5


def test_tuned_wan_convs_stream_the_same_video_with_channels_last_weights(wan_dir, latents):
    """``tune_convs``: every conv3d weight channels-last, cuDNN's algorithm timing on while
    (and only while) decoding, the same frames."""
    vae = WanVAE.from_pretrained(wan_dir)
    expected = stream(vae, latents, [1, 3, 3])
    vae.tune_convs()
    convs = [m for m in vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    flags, decoder = [], vae.model.decoder
    hook = decoder.register_forward_pre_hook(lambda *_: flags.append(torch.backends.cudnn.benchmark))
    try:
        assert (stream(vae, latents, [1, 3, 3]) - expected).abs().max() <= 1e-5
    finally:
        hook.remove()
    assert flags and all(flags) and torch.backends.cudnn.benchmark is False
    assert vae_from_config({"type": "wan"}, wan_dir, device="cpu").tuned_convs is False  # CUDA only


@pytest.mark.parametrize("frames_per_call", [0, 1.5])
def test_wan_rejects_a_bad_frames_per_call(wan, frames_per_call):
    with pytest.raises(SelfForcingError, match="frames_per_call must be a positive integer"):
        WanVAE(wan.model, frames_per_call=frames_per_call)


def test_wan22_style_stream_decode_equals_one_shot(latents):
    """Wan 2.2's VAE adds residual up-blocks (which use ``first_chunk``) and a 2x2 patchify."""
    torch.manual_seed(0)
    model = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=16,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
    )
    wan22 = WanVAE(model)
    assert wan22.spatial_ratio == 16
    one_shot = wan22.decode(latents)
    assert one_shot.shape == (2, 3, 25, 32, 32)
    torch.testing.assert_close(one_shot, model.decode(denormalize_by_hand(latents)).sample, rtol=0, atol=1e-5)
    for sizes in ([1, 3, 3], [3, 3, 1]):
        assert (stream(wan22, latents, sizes) - one_shot).abs().max() <= 1e-5
        assert (stream(WanVAE(model, frames_per_call=3), latents, sizes) - one_shot).abs().max() <= 1e-5


def test_compiled_wan_decoder_streams_the_same_video_and_stops_compiling(wan_dir):
    """One graph per call shape and cache state (chunks of 3: the first frame, the first chunk's
    other 2, then two more states before the caches settle), none after; the same frames.
    ``aot_eager`` traces and checks what inductor would compile, without its code generation."""
    from torch._dynamo.utils import counters

    vae = WanVAE(WanVAE.from_pretrained(wan_dir).model, frames_per_call=3)
    latents = torch.randn(1, 4, 15, 2, 2, generator=torch.Generator().manual_seed(2))
    expected = vae.decode(latents)
    torch._dynamo.reset()
    counters.clear()
    vae.compile_decoder(backend="aot_eager", fullgraph=True)
    graphs = []
    for _ in range(2):
        decoder, frames = vae.stream_decoder(), []
        for chunk in latents.split(3, dim=2):
            frames.append(decoder.decode_chunk(chunk))
            graphs.append(counters["stats"]["unique_graphs"])
        assert (torch.cat(frames, dim=2) - expected).abs().max() <= 1e-5
    assert graphs == [2, 3, 4, 4, 4] + [4] * 5  # the second stream reuses them all
    assert set(vae.state_dict()) == set(WanVAE.from_pretrained(wan_dir).state_dict())
    torch._dynamo.reset()


def test_wan_stream_decoders_do_not_interfere(wan, latents):
    first, second = wan.stream_decoder(), wan.stream_decoder()
    other = torch.randn_like(latents)
    outputs = []
    for chunk, other_chunk in zip(latents.split([1, 3, 3], dim=2), other.split([1, 3, 3], dim=2)):
        outputs.append(first.decode_chunk(chunk))
        second.decode_chunk(other_chunk)
    assert (torch.cat(outputs, dim=2) - wan.decode(latents)).abs().max() <= 1e-5


def test_naive_chunked_diffusers_decode_does_not_match(wan, latents):
    """Why the stream decoder exists: diffusers resets the causal cache on every call."""
    chunks = denormalize_by_hand(latents).split([1, 3, 3], dim=2)
    naive = torch.cat([wan.model.decode(chunk).sample for chunk in chunks], dim=2)
    one_shot = wan.decode(latents)
    # Each chunk is treated as a video start, so frames go missing ...
    assert naive.shape[2] == 1 + 9 + 9 != one_shot.shape[2]
    # ... and the frames of the last latent frame come out different.
    assert (naive[:, :, -4:] - one_shot[:, :, -4:]).abs().max() > 0.05


def test_wan_stream_rejects_a_chunk_from_another_video(wan, latents):
    decoder = wan.stream_decoder()
    decoder.decode_chunk(latents[:, :, :1])
    with pytest.raises(SelfForcingError, match="new stream decoder"):
        decoder.decode_chunk(latents[:1, :, 1:2])


def test_wan_encode_shape_and_normalisation(wan):
    video = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latents = wan.encode(video)
    assert latents.shape == (1, 4, 3, 2, 2)
    raw = wan.model.encode(video).latent_dist.mode()
    torch.testing.assert_close(denormalize_by_hand(latents), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wan.denormalize(wan.normalize(raw)), raw, rtol=1e-5, atol=1e-5)
    assert not latents.requires_grad


def test_wan_encode_rejects_bad_frame_count(wan):
    with pytest.raises(SelfForcingError, match=r"1 \+ 4 \* k"):
        wan.encode(torch.zeros(1, 3, 4, 16, 16))


# --- loading and the factory -------------------------------------------------------------


def test_wan_from_missing_directory(tmp_path):
    with pytest.raises(SelfForcingError, match="not found"):
        WanVAE.from_pretrained(tmp_path / "nope")


def test_wan_from_directory_without_config(tmp_path):
    with pytest.raises(SelfForcingError, match="config.json"):
        WanVAE.from_pretrained(tmp_path)


def test_wan_from_directory_with_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(SelfForcingError, match="AutoencoderKL,"):
        WanVAE.from_pretrained(tmp_path)


def test_wan_from_directory_without_weights(tmp_path, wan_dir):
    (tmp_path / "config.json").write_text((wan_dir / "config.json").read_text())
    with pytest.raises(SelfForcingError, match="could not load"):
        WanVAE.from_pretrained(tmp_path)


def test_factory_builds_both_kinds(wan_dir):
    assert vae_from_config({"type": "pixel", "patch": 2}, None).config() == {"type": "pixel", "patch": 2}
    assert isinstance(vae_from_config({"type": "wan"}, wan_dir), WanVAE)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"type": "sd"}, "unknown VAE type 'sd'"),
        ({"patch": 2}, "unknown VAE type None"),
        ({"type": "pixel", "patch": 2, "sclae": 1}, "sclae"),
        ({"type": "wan", "dtype": "bf16"}, "dtype"),
        ({"type": "wan"}, "needs the path"),
    ],
)
def test_factory_rejects_bad_configs(cfg, message):
    with pytest.raises(SelfForcingError, match=message):
        vae_from_config(cfg, None)
