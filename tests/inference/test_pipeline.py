"""Streaming pipeline and the `generate` command, end to end on tiny random models."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from factories import randomize_, shrink_rope
from factories import write_tiny_diffusers_wan_pipeline
from selfforcing.cli import DEFAULT_MODEL, main
from selfforcing.errors import SelfForcingError
from selfforcing.inference import SamplingConfig, StreamingPipeline
from selfforcing.inference.pipeline import to_uint8
from selfforcing.inference.video import fit_image, load_image, read_mp4
from selfforcing.models import CausalWanModel, WanConfig, preset
from selfforcing.models.text_encoders import HashTextEncoder
from selfforcing.models.vae import PixelCodec


def toy_pipeline(frames_per_chunk=3, kv_cache_frames=6, rope_max_seq_len=64, **sampling) -> StreamingPipeline:
    torch.manual_seed(0)
    config = WanConfig(**{**preset("tiny").__dict__, "in_channels": 12, "out_channels": 12,
                          "rope_max_seq_len": rope_max_seq_len})
    model = randomize_(CausalWanModel(config), std=0.1)
    sampling = SamplingConfig(frames_per_chunk=frames_per_chunk, kv_cache_frames=kv_cache_frames,
                              height=16, width=16, **sampling)
    return StreamingPipeline(model, HashTextEncoder(dim=16, max_length=8), PixelCodec(patch=2), sampling)


@pytest.fixture(scope="module")
def pipe():
    return toy_pipeline()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory, pipe):
    path = tmp_path_factory.mktemp("toy_model")
    pipe.save_pretrained(path)
    return path


def test_stream_yields_decoded_chunks_progressively(pipe):
    stream = pipe.stream("a red circle", num_frames=12, seed=0)
    first = next(stream)  # available before the rest of the video exists
    assert first.index == 0 and first.frames.shape == (1, 3, 16, 16, 3) and first.frames.dtype == torch.uint8
    assert pipe.stats.first_frame_s is not None and pipe.stats.first_frame_s > 0
    rest = list(stream)
    assert [c.start_frame for c in rest] == [3, 6, 9]
    assert pipe.stats.frames == 12 and pipe.stats.fps > 0


def test_overlapped_decode_hands_over_the_same_chunks_in_order(pipe):
    """``overlap_decode`` only moves when a chunk is handed over (after the next one is queued;
    on CUDA its decode runs on a side stream): same chunks, same order, the last one included."""
    overlapped = StreamingPipeline(pipe.model, pipe.text_encoder, pipe.vae, pipe.sampling, overlap_decode=True)
    plain = list(pipe.stream(["a red circle", "a blue square"], num_frames=12, seed=3))
    chunks = list(overlapped.stream(["a red circle", "a blue square"], num_frames=12, seed=3))
    assert [(c.index, c.start_frame) for c in chunks] == [(c.index, c.start_frame) for c in plain] == [
        (0, 0), (1, 3), (2, 6), (3, 9)]
    for a, b in zip(chunks, plain):
        assert torch.equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)
    assert overlapped.stats.frames == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("early_first_frame", [False, True])
def test_decode_beside_the_dit_on_a_side_cuda_stream_gives_the_same_frames(early_first_frame):
    plain = toy_pipeline()
    plain.model.to("cuda")
    overlapped = StreamingPipeline(plain.model, plain.text_encoder, plain.vae, plain.sampling, overlap_decode=True,
                                   early_first_frame=early_first_frame)
    chunks = list(overlapped.stream("a red circle", num_frames=12, seed=3))
    assert [c.frames.shape[1] for c in chunks] == ([1, 2, 3, 3, 3] if early_first_frame else [3, 3, 3, 3])
    assert all(c.frames.device.type == "cpu" for c in chunks)
    for name in ("frames", "latents"):
        dim = 1 if name == "frames" else 2
        ours = torch.cat([getattr(c, name).cpu() for c in chunks], dim)
        theirs = torch.cat([getattr(c, name).cpu() for c in plain.stream("a red circle", num_frames=12, seed=3)], dim)
        assert torch.equal(ours, theirs), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_vae_tuned_decodes_beside_the_dit_as_after_it():
    """The TAEHV decoder on CUDA, channels-last and cuDNN-timed, on the side stream with the first
    frame handed over alone: the same video as decoding after the DiT."""
    from selfforcing.models.tiny_vae import TinyVAE

    base = toy_pipeline()
    torch.manual_seed(0)
    vae = randomize_(TinyVAE(latent_channels=12), std=0.02).to("cuda")  # not so chaotic that TF32 rounding shows
    vae.tune_convs()
    after = StreamingPipeline(base.model.to("cuda"), base.text_encoder, vae, base.sampling)
    beside = StreamingPipeline(after.model, after.text_encoder, vae, after.sampling, overlap_decode=True,
                               early_first_frame=True)
    chunks = list(beside.stream("a red circle", num_frames=21, seed=3))
    assert [c.frames.shape[1] for c in chunks] == [1, 8, 12]
    ours = torch.cat([c.frames for c in chunks], 1).int()
    theirs = torch.cat([c.frames for c in after.stream("a red circle", num_frames=21, seed=3)], 1).int()
    assert (ours - theirs).abs().max() <= 1  # uint8 levels: the same decode, to rounding


def test_seeds_batches_and_prompts(pipe):
    a = pipe.generate("a red circle", 6, seed=1)
    assert torch.equal(a, pipe.generate("a red circle", 6, seed=1))
    assert not torch.equal(a, pipe.generate("a red circle", 6, seed=2))
    assert not torch.equal(a, pipe.generate("a blue square", 6, seed=1))
    batch = pipe.generate(["a red circle", "a blue square"], 6, seed=1)
    assert batch.shape == (2, 6, 16, 16, 3)


@pytest.mark.parametrize("frames_per_chunk", [3, 1])
def test_extrapolates_past_the_cache_with_constant_memory(frames_per_chunk):
    pipe = toy_pipeline(frames_per_chunk=frames_per_chunk, kv_cache_frames=3)
    video = pipe.generate("a red circle", 15)  # 5x the cache
    assert video.shape[1] == 15 and video.float().std() > 0


def test_relative_rope_generates_past_the_rope_table():
    absolute = toy_pipeline(kv_cache_frames=3, rope_max_seq_len=8)
    with pytest.raises(SelfForcingError, match="12 frames is past this model's limit of 6 .*\"rope_positions\": \"relative\""):
        absolute.generate("a red circle", 12)  # refused before any work
    relative = toy_pipeline(kv_cache_frames=3, rope_max_seq_len=8, sink_frames=0, rope_positions="relative")
    long = relative.generate("a red circle", 30)
    assert long.shape[1] == 30
    # relative positions only renumber: before any eviction both modes produce the same frames
    assert torch.equal(long[:, :6], absolute.generate("a red circle", 6))


def test_sink_frames_are_kept():
    pipe = toy_pipeline(kv_cache_frames=4, sink_frames=1, frames_per_chunk=3)
    assert pipe.generate("a red circle", 12).shape[1] == 12


def test_video_extension_from_initial_latents(pipe):
    prefix = torch.randn(1, 12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    extended = torch.cat([c.frames for c in pipe.stream("a red circle", 6, seed=0, initial_latents=prefix)], 1)
    fresh = pipe.generate("a red circle", 6, seed=0)
    assert extended.shape == fresh.shape and not torch.equal(extended, fresh)


def test_generate_extends_an_existing_video(toy_dir, tmp_path):
    first, extended = tmp_path / "first.mp4", tmp_path / "extended.mp4"
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", first, "--frames", 6, "--quiet") == 0
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", extended, "--frames", 3,
                   "--extend", first, "--quiet") == 0
    assert read_mp4(extended).shape == (3, 16, 16, 3)
    assert run_cli("generate", "a cat", "--model", toy_dir, "-o", tmp_path / "x.mp4", "--extend",
                   tmp_path / "none.mp4", "--quiet") == 2


def test_generate_from_an_image_opens_with_it_and_streams_on(toy_dir, tmp_path, capsys):
    """Image-to-video: the image, centre-cropped and resized to the video, is the first latent
    frame (its K/V fill the cache) and the video's first frame is that latent decoded; the
    stream continues from it (--frames: the frames added)."""
    from PIL import Image

    image = np.zeros((48, 96, 3), np.uint8)  # twice as wide: the centre square survives the crop
    image[..., 2] = 120
    image[16:32, 40:56] = (230, 20, 20)
    Image.fromarray(image).save(tmp_path / "start.png")
    out = tmp_path / "i2v.mp4"
    assert run_cli("generate", "a red square", "--model", toy_dir, "-o", out, "--frames", 6,
                   "--image", tmp_path / "start.png", "--quiet") == 0
    video, fitted = read_mp4(out), fit_image(load_image(tmp_path / "start.png"), 16, 16)[0]
    assert video.shape == (7, 16, 16, 3) and "7 frames" in capsys.readouterr().out
    assert fitted[8, 8, 0] > 200 > fitted[1, 1, 0] and fitted[1, 1, 2] > 100  # the square in the middle, blue around
    loaded = StreamingPipeline.from_pretrained(toy_dir)
    with torch.no_grad():  # the first frame as written: the image through the VAE, here unchanged
        round_trip = to_uint8(loaded.vae.decode(loaded.encode_video(torch.from_numpy(fitted[None, None]))))[0, 0]
    assert (round_trip.int() - torch.from_numpy(fitted).int()).abs().max() <= 1
    assert np.abs(video[0].astype(int) - fitted.astype(int)).mean() < 16  # (the mp4: 4:2:0 colour at 16x16)
    assert run_cli("generate", "a cat", "--model", toy_dir, "-o", tmp_path / "x.mp4", "--image", tmp_path / "i2v.mp4",
                   "--quiet") == 2
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()
    assert run_cli("generate", "a cat", "--model", toy_dir, "-o", tmp_path / "x.mp4", "--image", tmp_path / "start.png",
                   "--extend", out, "--quiet") == 2
    assert "pass one" in capsys.readouterr().err


def test_bidirectional_teacher_sampler_is_euler_cfg_over_the_whole_clip(pipe):
    """generate_bidirectional: every frame at once, full attention, Euler steps mixing the
    conditional and the zero-text (caption-dropout) flow with CFG, from seeded noise."""
    prompts = ["a red circle", "a blue square"]
    video = pipe.generate_bidirectional(prompts, 6, steps=3, guidance_scale=2.5, seed=4)
    assert video.shape == (2, 6, 16, 16, 3) and video.dtype == torch.uint8
    model, schedule = pipe.model, pipe.schedule
    cond = model.encode_text(pipe.text_encoder.encode(prompts))
    uncond = model.encode_text(torch.zeros(2, 8, 16))
    x = torch.randn((2, 12, 6, 8, 8), generator=torch.Generator().manual_seed(4))
    t = torch.cat([schedule.sampling_timesteps(3), torch.zeros(1)])
    with torch.no_grad():
        for i in range(3):
            tb = t[i].expand(2)
            v_c, v_u = model(x, tb, cond), model(x, tb, uncond)
            x = x + (schedule.sigma(t[i + 1]) - schedule.sigma(t[i])) * (v_u + 2.5 * (v_c - v_u))
    assert torch.equal(video, pipe.vae.decode(x).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
                       .permute(0, 2, 3, 4, 1))
    with pytest.raises(SelfForcingError, match="positive integer"):
        pipe.generate_bidirectional(prompts, 6, steps=0, guidance_scale=1.0)


def test_save_and_load_round_trip(pipe, toy_dir):
    loaded = StreamingPipeline.from_pretrained(toy_dir)
    assert loaded.sampling == pipe.sampling
    assert torch.equal(loaded.generate("a red circle", 6), pipe.generate("a red circle", 6))


def test_bad_arguments_are_named(pipe):
    for frames, message in [(0, "positive integer"), (-3, "positive integer"), (7, "not a multiple of the chunk size")]:
        with pytest.raises(SelfForcingError, match=message):
            pipe.generate("a red circle", frames)
    with pytest.raises(SelfForcingError, match="prompt 0 is empty"):
        pipe.generate("  ", 3)
    with pytest.raises(SelfForcingError, match="unknown sampling config keys: bogus"):
        SamplingConfig.from_dict({"bogus": 1})


def run_cli(*args) -> int:
    """Exit status of the CLI (argparse's own usage errors exit via SystemExit)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def test_generate_writes_a_playable_mp4(toy_dir, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", out, "--frames", 9, "--quiet") == 0
    frames = read_mp4(out)
    assert frames.shape == (9, 16, 16, 3) and frames.dtype == np.uint8
    assert "first frame after" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]  # no temp file left behind


def test_generate_draws_a_strip_of_every_frame(toy_dir, tmp_path):
    from PIL import Image

    out, strip = tmp_path / "video.mp4", tmp_path / "strip.png"
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", out, "--frames", 9, "--quiet",
                   "--strip", strip) == 0
    width, height = Image.open(strip).size
    assert width > 2 * height  # one row of 9 frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strip.png", "video.mp4"]
    other = tmp_path / "other.mp4"
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", other, "--strip", strip / "x.png") == 2
    assert not other.exists()  # refused before any video was made: the strip's "directory" is a file


@pytest.mark.parametrize("args,message", [
    (["", "--model", "{model}"], "prompt 0 is empty"),
    (["a cat", "--frames", "0", "--model", "{model}"], "must be a positive integer"),
    (["a cat", "--frames", "4", "--model", "{model}"], "not a multiple of the chunk size"),
    (["a cat", "--model", "{tmp}/missing"], "does not exist"),
    (["a cat", "--model", "{tmp}"], "is not a model directory"),
    (["a cat", "--model", "{model}", "--checkpoint", "{tmp}/missing.pt"], "missing.pt"),
])
def test_generate_bad_input_clear_error_no_output(toy_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out.mp4"
    args = [a.format(model=toy_dir, tmp=tmp_path) for a in args]
    assert run_cli("generate", *args, "-o", out, "--quiet") == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not any(tmp_path.glob("*.mp4*"))


def test_checkpoint_with_wrong_keys_names_them(toy_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    state = {k: v for k, v in StreamingPipeline.from_pretrained(toy_dir).model.state_dict().items()}
    state["blocks.0.surprise.weight"] = state.pop("proj_out.bias")
    save_file(state, tmp_path / "bad.safetensors")
    out = tmp_path / "out.mp4"
    assert run_cli("generate", "a cat", "--model", toy_dir, "--checkpoint", tmp_path / "bad.safetensors",
                   "-o", out, "--quiet") == 2
    err = capsys.readouterr().err
    assert "proj_out.bias" in err and "blocks.0.surprise.weight" in err and not out.exists()


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return write_tiny_diffusers_wan_pipeline(tmp_path_factory.mktemp("wan"))


def test_generate_from_diffusers_wan_directory(wan_dir, tmp_path):
    """The full-size code path (UMT5 + Wan VAE with streaming decode + Wan DiT) on tiny random parts."""
    root = wan_dir
    pipe = StreamingPipeline.from_pretrained(root)
    pipe.sampling = replace(pipe.sampling, height=32, width=32, kv_cache_frames=6)
    video = pipe.generate("a red fox", 1 + 4 * 8)  # 9 latent frames -> 33 video frames
    assert video.shape == (1, 33, 32, 32, 3)
    with pytest.raises(SelfForcingError, match="1 \\+ 4k"):
        pipe.generate("a red fox", 32)
    out = tmp_path / "wan.mp4"
    assert run_cli("generate", "a red fox", "--model", root, "--height", 32, "--width", 32, "--frames", 9,
                   "-o", out, "--quiet", "--text-encoder-device", "cpu") == 0
    assert read_mp4(out).shape == (9, 32, 32, 3)
    assert run_cli("generate", "a red fox", "--model", root, "-o", out, "--text-encoder-device", "tpu9") == 2


def test_tiny_vae_decodes_the_same_latents_instead_of_the_wan_vae(wan_dir, tmp_path, capsys):
    """``tiny_vae`` / ``--tiny-vae``: a TAEHV file decodes the stream; the DiT's latents do not change."""
    from safetensors.torch import save_file

    from factories import Z_DIM
    from selfforcing.models.tiny_vae import TinyVAE

    torch.manual_seed(0)
    save_file(randomize_(TinyVAE(latent_channels=Z_DIM), std=0.05).state_dict(), tmp_path / "taew.safetensors")
    wan = StreamingPipeline.from_pretrained(wan_dir)
    tiny = StreamingPipeline.from_pretrained(wan_dir, tiny_vae=tmp_path / "taew.safetensors")
    assert isinstance(tiny.vae, TinyVAE)
    for pipe in (wan, tiny):
        pipe.sampling = replace(pipe.sampling, height=32, width=32, kv_cache_frames=6)
    chunks = {name: list(pipe.stream("a red fox", 1 + 4 * 5, seed=3)) for name, pipe in (("wan", wan), ("tiny", tiny))}
    latents = torch.cat([c.latents for c in chunks["tiny"]], dim=2)
    assert torch.equal(latents, torch.cat([c.latents for c in chunks["wan"]], dim=2))
    frames = torch.cat([c.frames for c in chunks["tiny"]], dim=1)
    assert frames.shape == (1, 21, 32, 32, 3) and [c.frames.shape[1] for c in chunks["tiny"]] == [9, 12]
    assert torch.equal(frames, to_uint8(tiny.vae.decode(latents)))
    out = tmp_path / "tiny.mp4"
    assert run_cli("generate", "a red fox", "--model", wan_dir, "--height", 32, "--width", 32, "--frames", 9,
                   "--tiny-vae", tmp_path / "taew.safetensors", "-o", out, "--quiet") == 0
    assert read_mp4(out).shape == (9, 32, 32, 3)
    assert run_cli("generate", "a red fox", "--model", wan_dir, "--tiny-vae", tmp_path / "none.pth", "-o", out) == 2
    assert "none.pth does not exist" in capsys.readouterr().err
    save_file(randomize_(TinyVAE(), std=0.05).state_dict(), tmp_path / "taew2_1.safetensors")
    with pytest.raises(SelfForcingError, match="VAE latent channels 16 do not match the model's in_channels 4"):
        StreamingPipeline.from_pretrained(wan_dir, tiny_vae=tmp_path / "taew2_1.safetensors")


def test_auto_dtype_is_bfloat16_on_cuda_as_the_released_inference():
    from selfforcing.cli import _weights_dtype

    assert _weights_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert _weights_dtype("auto", torch.device("cpu")) == torch.float32
    assert _weights_dtype("float32", torch.device("cuda")) == torch.float32


def test_bfloat16_loads_the_dit_and_the_vae_in_bfloat16(wan_dir, tmp_path):
    """``dtype`` (``--dtype``; auto: bf16 on CUDA) is the DiT's and the VAE's; a text encoder on the CPU stays float32."""
    pipe = StreamingPipeline.from_pretrained(wan_dir, dtype=torch.bfloat16)
    assert pipe.model.proj_out.weight.dtype == torch.bfloat16 == pipe.vae.model.dtype
    assert next(pipe.text_encoder.model.parameters()).dtype == torch.float32
    pipe.sampling = replace(pipe.sampling, height=32, width=32, kv_cache_frames=6)
    chunks = list(pipe.stream("a red fox", 9, seed=3))
    assert chunks[0].frames.shape == (1, 9, 32, 32, 3) and torch.isfinite(chunks[0].latents).all()
    out = tmp_path / "bf16.mp4"
    assert run_cli("generate", "a red fox", "--model", wan_dir, "--height", 32, "--width", 32, "--frames", 9,
                   "--dtype", "bfloat16", "-o", out, "--quiet") == 0
    assert read_mp4(out).shape == (9, 32, 32, 3)


@pytest.mark.parametrize("overlap_decode", [False, True])
def test_early_first_frame_hands_over_the_first_video_frame_alone(wan_dir, overlap_decode):
    """Behind the Wan VAE (4x in time) the first chunk of 3 latent frames is 9 video frames; with
    ``early_first_frame`` its first frame comes first, alone, then the other 8: the same video."""
    pipe = StreamingPipeline.from_pretrained(wan_dir)
    pipe.sampling = replace(pipe.sampling, height=32, width=32, kv_cache_frames=6)
    plain = list(pipe.stream("a red fox", 1 + 4 * 5, seed=4))
    early = StreamingPipeline(pipe.model, pipe.text_encoder, pipe.vae, pipe.sampling,
                              overlap_decode=overlap_decode, early_first_frame=True)
    chunks = list(early.stream("a red fox", 1 + 4 * 5, seed=4))
    assert [(c.index, c.start_frame, c.frames.shape[1], c.latents.shape[2]) for c in chunks] == [
        (0, 0, 1, 1), (1, 1, 8, 2), (2, 9, 12, 3)]
    assert [(c.start_frame, c.frames.shape[1]) for c in plain] == [(0, 9), (9, 12)]
    assert torch.equal(torch.cat([c.frames for c in chunks], 1), torch.cat([c.frames for c in plain], 1))
    assert torch.equal(torch.cat([c.latents for c in chunks], 2), torch.cat([c.latents for c in plain], 2))
    assert early.stats.frames == 21


def test_extension_decodes_as_the_rest_of_one_video(wan_dir):
    """Behind the Wan VAE a continuation's latent frames decode with the video they continue
    in the decoder's causal caches: 4 video frames each, the tail of one decode of the whole."""
    pipe = StreamingPipeline.from_pretrained(wan_dir)
    pipe.sampling = replace(pipe.sampling, height=32, width=32, kv_cache_frames=6)
    prefix = torch.cat([c.latents for c in pipe.stream("a red fox", 1 + 4 * 2, seed=5)], dim=2)
    chunks = list(pipe.stream("a red fox", 4 * 3, seed=6, initial_latents=prefix))
    assert [(c.start_frame, c.frames.shape[1]) for c in chunks] == [(0, 12)]
    whole = pipe.vae.decode(torch.cat([prefix, chunks[0].latents], dim=2))
    assert whole.shape[2] == 1 + 4 * 2 + 12
    assert torch.equal(chunks[0].frames, to_uint8(whole[:, :, -12:]))
    assert pipe.video_frames(3, prefix=3) == 12 and pipe.latent_frames(12, prefix=3) == 3
    with pytest.raises(SelfForcingError, match="continues a video 4 frames per latent frame; 13 is not"):
        pipe.latent_frames(13, prefix=3)
    early = StreamingPipeline(pipe.model, pipe.text_encoder, pipe.vae, pipe.sampling, early_first_frame=True)
    again = list(early.stream("a red fox", 4 * 3, seed=6, initial_latents=prefix))
    assert len(again) == 1 and torch.equal(again[0].frames, chunks[0].frames)  # no first frame to hand early


def test_generate_hands_the_first_frame_over_alone(toy_dir, tmp_path, monkeypatch):
    """``generate`` streams as the GPU check measured the earliest first frame: the first latent
    frame decoded alone, and on CUDA (only) the decode beside the DiT."""
    seen, stream = [], StreamingPipeline.stream

    def recording_stream(self, *args, **kwargs):
        seen.append((self.early_first_frame, self.overlap_decode))
        return stream(self, *args, **kwargs)

    monkeypatch.setattr(StreamingPipeline, "stream", recording_stream)
    assert run_cli("generate", "a red circle", "--model", toy_dir, "-o", tmp_path / "a.mp4", "--frames", 6,
                   "--quiet") == 0
    assert seen == [(True, False)] and read_mp4(tmp_path / "a.mp4").shape == (6, 16, 16, 3)


def test_generate_uses_the_shipped_default_model(tmp_path, capsys):
    """No --model: the embedded Self Forcing toy model streams offline on the CPU."""
    from selfforcing.cli import DEFAULT_MODEL

    assert (DEFAULT_MODEL / "selfforcing.json").is_file()
    out = tmp_path / "default.mp4"
    assert run_cli("generate", "a red circle bouncing on a dark blue background", "-o", out, "--frames", 12,
                   "--quiet") == 0
    assert read_mp4(out).shape == (12, 32, 32, 3)
    # a prompt outside the toy grammar is explained, not refused
    assert run_cli("generate", "a cat playing the piano", "-o", tmp_path / "cat.mp4", "--frames", 3, "--quiet") == 0
    assert "does not know 'cat'" in capsys.readouterr().err


def test_the_shipped_teacher_samples_the_whole_clip():
    """The toy teacher in the package (the real score of the toy recipes) loads and samples
    with its bidirectional many-step sampler; scoring it is in docs/RESULTS.md."""
    from selfforcing.cli import DEFAULT_MODEL

    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL.parent / "toy-teacher")
    assert pipe.model.config.num_layers == 4 and pipe.sampling.timestep_shift == 1.0
    video = pipe.generate_bidirectional("a red circle moving right on a black background", 3, steps=2,
                                        guidance_scale=3.0)
    assert video.shape == (1, 3, 32, 32, 3)


# ----------------------------------------------------------------------------- unbounded streams (issue 31)


SHIPPED_PROMPT = "a red circle bouncing on a dark blue background"


def stream_frames(pipe, num_frames, stop_after=None) -> torch.Tensor:
    frames = []
    for chunk in pipe.stream([SHIPPED_PROMPT], num_frames, seed=0):
        frames.append(chunk.frames)
        if stop_after is not None and sum(f.shape[1] for f in frames) >= stop_after:
            break
    return torch.cat(frames, dim=1)


def test_the_shipped_default_streams_without_a_length_limit():
    """As `serve` streams: unbounded, here 2.5x past its RoPE table (cut to 16 frames; the
    shipped table holds 1024, and absolute positions stopped a stream there)."""
    pipe = shrink_rope(StreamingPipeline.from_pretrained(DEFAULT_MODEL), 16)
    assert pipe.sampling.rope_positions == "relative"
    assert stream_frames(pipe, None, stop_after=40).shape[1] >= 40
    pipe.sampling = replace(pipe.sampling, rope_positions="absolute")
    with pytest.raises(SelfForcingError, match="past the RoPE table"):
        stream_frames(pipe, None, stop_after=40)


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_relative_positions_give_the_absolute_stream_without_sink_frames(engine):
    """Attention sees RoPE position differences only: without sinks, renumbering the window from
    its start changes nothing but rounding (the switch of the shipped model to relative positions)."""
    pipe = StreamingPipeline.from_pretrained(DEFAULT_MODEL, engine=engine)
    pipe.sampling = replace(pipe.sampling, sink_frames=0, kv_cache_frames=12)  # the released plain rolling window
    relative = stream_frames(pipe, 48).int()
    pipe.sampling = replace(pipe.sampling, rope_positions="absolute")  # (idle caches are kept per position mode)
    absolute = stream_frames(pipe, 48).int()
    assert (relative - absolute).abs().max() <= 1 and (relative != absolute).float().mean() < 1e-3


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_a_stream_builds_no_autograd_graph_even_for_trainable_weights(engine):
    """Streaming is inference: a model whose weights require grad (a LoRA being trained, say)
    still streams without recording a graph."""
    pipe = toy_pipeline()
    pipe.engine = engine
    pipe.model.requires_grad_(True)
    chunk = next(pipe.stream(["a red circle"], 6, seed=0))
    assert not chunk.latents.requires_grad and not chunk.frames.requires_grad


def test_the_sampling_defaults_are_the_released_inference():
    """Self-Forcing's released inference: chunks of 3 latent frames, the 4-step list 1000/750/500/250
    warped by shift 5, a rolling cache of the last 21 latent frames, no sinks, absolute RoPE, a clean
    context. Every long-video option (sinks, a shorter window, KV recomputation, the EMA-Sink,
    context noise, relative positions) is off unless a model or --sampling turns it on."""
    s = SamplingConfig()
    assert (s.frames_per_chunk, s.denoising_steps, s.timestep_shift) == (3, (1000, 750, 500, 250), 5.0)
    assert (s.kv_cache_frames, s.sink_frames, s.rope_positions) == (21, 0, "absolute")
    assert (s.context_noise, s.kv_recompute, s.sink_ema) == (0.0, False, 0.0)
    assert (s.height, s.width, s.fps) == (480, 832, 16)
