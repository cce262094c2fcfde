"""VAE adapters: turn video pixels into diffusion latents and back.

Latents have shape ``(B, C, F, h, w)`` and videos ``(B, 3, T, H, W)`` with values
in ``[-1, 1]``. The generator produces latents a few frames at a time, and the
viewer wants pixels as soon as each chunk is ready, so every VAE offers a
*stream decoder*: feeding it consecutive latent chunks must give exactly the
frames that a one-shot decode of the whole latent video would give.

Three implementations:

* :class:`PixelCodec` - the toy world's lossless space-to-depth codec. Frames
  are independent, so streaming is trivial.
* :class:`WanVAE` - the Wan 2.x causal video VAE (diffusers ``AutoencoderKLWan``).
  Its decoder is a stack of causal 3D convolutions whose temporal context lives
  in a feature cache; diffusers clears that cache on every ``decode`` call, so
  :class:`WanStreamDecoder` keeps its own cache across chunks.
* :class:`~selfforcing.models.tiny_vae.TinyVAE` - a TAEHV-format tiny autoencoder
  (``taew2_1`` for Wan 2.1 latents): per-frame 2D convs with one frame of memory, much
  cheaper to decode than the Wan VAE, at some cost in quality.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import nn

from selfforcing.errors import SelfForcingError
from selfforcing.files import load_json

if TYPE_CHECKING:  # diffusers takes seconds to import: only the Wan VAE needs it, so it is imported there
    from diffusers import AutoencoderKLWan


@runtime_checkable
class StreamDecoder(Protocol):
    """Decodes one video's latents chunk by chunk, in order.

    ``torch.cat([decode_chunk(c) for c in chunks], dim=2)`` equals
    ``vae.decode(torch.cat(chunks, dim=2))``. One instance per video.
    """

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next ``(B, C, f, h, w)`` latent chunk into ``(B, 3, t, H, W)`` pixels."""
        ...


@runtime_checkable
class VideoVAE(Protocol):
    """What the rest of the package needs from a video autoencoder."""

    latent_channels: int
    spatial_ratio: int  # pixels per latent cell along H and W
    temporal_ratio: int  # pixel frames per latent frame (after the first)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` video in ``[-1, 1]`` -> ``(B, C, F, h, w)`` model-space latents."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` latents -> ``(B, 3, T, H, W)`` video in ``[-1, 1]``, in one shot."""
        ...

    def stream_decoder(self) -> StreamDecoder:
        """A fresh decoder for streaming one video's latents chunk by chunk."""
        ...


def num_video_frames(vae: VideoVAE, latent_frames: int) -> int:
    """Pixel frames that ``latent_frames`` latent frames decode to.

    Causal video VAEs keep the first frame on its own and pack each further
    ``temporal_ratio`` frames into one latent frame: ``T = 1 + r * (F - 1)``.
    With ``r == 1`` this is simply ``F``.
    """
    if latent_frames < 1:
        raise SelfForcingError(f"a video needs at least one latent frame, got {latent_frames}")
    return 1 + vae.temporal_ratio * (latent_frames - 1)


def _check_video(video: torch.Tensor, spatial_ratio: int, temporal_ratio: int) -> None:
    """Reject videos the codec cannot encode, before they fail deep inside torch."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise SelfForcingError(f"expected a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
    frames, height, width = video.shape[2:]
    if height % spatial_ratio or width % spatial_ratio:
        raise SelfForcingError(
            f"video height and width must be multiples of {spatial_ratio}, got {height}x{width}"
        )
    if frames < 1 or (frames - 1) % temporal_ratio:
        raise SelfForcingError(
            f"video frame count must be 1 + {temporal_ratio} * k, got {frames}"
        )


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    """Catch a latent/VAE mismatch (e.g. a checkpoint paired with the wrong VAE) early."""
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise SelfForcingError(
            f"expected latents of shape (B, {channels}, F, h, w), got {tuple(latents.shape)}"
        )
    if latents.shape[2] == 0:
        raise SelfForcingError("cannot decode a latent chunk with no frames")


def _chunk_frame_shape(started: tuple[int, ...] | None, latents: torch.Tensor) -> tuple[int, ...]:
    """A stream chunk's (batch, h, w), refused unless it is the stream's first chunk's (``started``)."""
    shape = (latents.shape[0], *latents.shape[3:])
    if started is not None and shape != started:
        raise SelfForcingError(
            f"latent chunk has (batch, h, w) = {shape} but this stream started with {started}; "
            "use a new stream decoder for a new video"
        )
    return shape


def _check_config_keys(cfg: dict[str, Any], kind: str, allowed: set[str]) -> None:
    """Typos in a VAE config should fail loudly rather than fall back to defaults."""
    unknown = sorted(set(cfg) - allowed - {"type"})
    if unknown:
        allowed_text = ", ".join(sorted(allowed | {"type"}))
        raise SelfForcingError(
            f"unknown key(s) in {kind} VAE config: {', '.join(unknown)} (allowed: {allowed_text})"
        )


class _FrameIndependentStreamDecoder:
    """Stream decoder for codecs whose frames decode independently: no state to carry."""

    def __init__(self, vae: PixelCodec) -> None:
        self._vae = vae

    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        return self._vae.decode(latents)


class PixelCodec(nn.Module):
    """Toy-world codec: each ``patch x patch`` pixel block becomes one latent cell.

    Space-to-depth per frame (the layout of ``torch.nn.functional.pixel_unshuffle``),
    so it is exactly invertible and latents stay in ``[-1, 1]``. ``patch=1`` is the
    identity. It has no weights; it is a module only so it moves with ``.to()``.
    """

    temporal_ratio = 1

    def __init__(self, patch: int = 2) -> None:
        super().__init__()
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise SelfForcingError(f"pixel codec patch must be an integer >= 1, got {patch!r}")
        self.patch = patch
        self.spatial_ratio = patch
        self.latent_channels = 3 * patch * patch

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video, self.spatial_ratio, self.temporal_ratio)
        return rearrange(video, "b c t (h q) (w s) -> b (c q s) t h w", q=self.patch, s=self.patch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.latent_channels)
        video = rearrange(latents, "b (c q s) t h w -> b c t (h q) (w s)", q=self.patch, s=self.patch)
        return video.clamp(-1.0, 1.0)

    def stream_decoder(self) -> StreamDecoder:
        return _FrameIndependentStreamDecoder(self)

    def config(self) -> dict[str, Any]:
        return {"type": "pixel", "patch": self.patch}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PixelCodec:
        if cfg.get("type", "pixel") != "pixel":
            raise SelfForcingError(f"not a pixel codec config: type is {cfg['type']!r}")
        _check_config_keys(cfg, "pixel", {"patch"})
        return cls(**{key: value for key, value in cfg.items() if key != "type"})


class WanVAE(nn.Module):
    """Adapter around a diffusers ``AutoencoderKLWan`` (Wan 2.1 / 2.2 VAE).

    The diffusion model works on normalised latents ``(z - latents_mean) / latents_std``
    (per channel, from the VAE config), as in the diffusers Wan pipelines;
    :meth:`encode` returns them and :meth:`decode` expects them. The statistics are
    float32 buffers, so with a low-precision VAE the (de)normalisation still runs in
    float32: encode returns float32 latents, decode returns the VAE's dtype. The VAE
    is frozen: encoding and decoding run without gradients.
    """

    def __init__(self, model: AutoencoderKLWan, frames_per_call: int = 1) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        if not isinstance(frames_per_call, int) or frames_per_call < 1:
            raise SelfForcingError(f"frames_per_call must be a positive integer, got {frames_per_call!r}")
        # Latent frames per decoder call when streaming. 1 is diffusers' and the released
        # code's frame-by-frame decode; more gives each conv several frames at once (fewer,
        # larger kernels), the same video to float rounding (WanStreamDecoder).
        self.frames_per_call = frames_per_call
        self.tuned_convs = False  # see tune_convs()
        cfg = model.config
        self.latent_channels = cfg.z_dim
        # Derived from the architecture rather than the `scale_factor_*` config
        # fields, which are declared separately and default to Wan 2.1's values.
        self.spatial_ratio = (cfg.patch_size or 1) * 2 ** (len(cfg.dim_mult) - 1)
        self.temporal_ratio = 2 ** sum(bool(flag) for flag in cfg.temperal_downsample)
        for name in ("latents_mean", "latents_std"):
            stats = torch.tensor(getattr(cfg, name), dtype=torch.float32)
            if stats.shape != (cfg.z_dim,):
                raise SelfForcingError(f"Wan VAE config {name} must have z_dim={cfg.z_dim} values, got {stats.numel()}")
            # Non-persistent: the values belong to the VAE config, not to checkpoints.
            self.register_buffer(name, stats.view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> WanVAE:
        """Load from a local diffusers directory (``config.json`` + weights); never downloads."""
        path = Path(path)
        config_file = path / "config.json"
        if not path.is_dir():
            raise SelfForcingError(f"Wan VAE directory not found: {path}")
        if not config_file.is_file():
            raise SelfForcingError(
                f"{path} has no config.json; expected a diffusers AutoencoderKLWan folder (a Wan checkpoint's 'vae')"
            )
        config = load_json(config_file)
        if not isinstance(config, dict):
            raise SelfForcingError(f"{config_file} is not a JSON object")
        class_name = config.get("_class_name", "AutoencoderKLWan")
        if class_name != "AutoencoderKLWan":
            raise SelfForcingError(f"{config_file} describes a {class_name}, not an AutoencoderKLWan")
        try:
            from diffusers import AutoencoderKLWan

            model = AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as error:
            raise SelfForcingError(f"could not load the Wan VAE from {path}: {error}") from error
        return cls(model).to(device=device)

    def compile_decoder(self, **options: Any) -> None:
        """Compile the decoder in place (``torch.compile``: fuses the norms, activations and
        cache joins around its convolutions; ``options`` go to it). A stream compiles one graph
        per call shape and feature-cache state, four for chunks of three latent frames, and no
        more as it goes on; the state dict keeps its keys."""
        self.model.decoder.compile(dynamic=False, **options)

    def tune_convs(self) -> None:
        """Channels-last conv3d weights (the layout cuDNN's fast 3D kernels take), and cuDNN
        timing its algorithms (``cudnn.benchmark``) while this VAE decodes: the stream's conv
        shapes are fixed, so timing them once pays. On an H100 the decode ran at 47.2 video
        frames/s against 39.2 as loaded (benchmark alone: 39.2; docs/PERFORMANCE.md). The
        same video to float rounding. ``vae_from_config`` does this on CUDA devices."""
        self.tuned_convs = True
        for conv in self.model.modules():
            if isinstance(conv, nn.Conv3d):
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model-space latents."""
        return (z - self.latents_mean) / self.latents_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents."""
        return latents * self.latents_std + self.latents_mean

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode to normalised latents, using the posterior mean so encoding is deterministic."""
        _check_video(video, self.spatial_ratio, self.temporal_ratio)
        video = video.to(device=self.model.device, dtype=self.model.dtype)
        posterior = self.model.encode(video).latent_dist
        return self.normalize(posterior.mode())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole latent video in one go.

        This is streaming with a single chunk: sharing the code path guarantees the
        two agree exactly, and avoids the model's shared (non-reentrant) cache.
        It never tiles, even if tiling was enabled on the diffusers model.
        """
        return self.stream_decoder().decode_chunk(latents)

    def stream_decoder(self) -> WanStreamDecoder:
        return WanStreamDecoder(self)

    def config(self) -> dict[str, Any]:
        return {"type": "wan"}


class WanStreamDecoder:
    """Decodes one video's Wan latents chunk by chunk, matching a one-shot decode.

    diffusers decodes one latent frame at a time, threading a feature cache (the
    last frames seen by every causal conv) from frame to frame, but resets that
    cache at the start of each ``decode`` call. Here the cache lives on this
    object, so it survives between chunks, and two stream decoders over the same
    VAE do not interfere. Chunks must share batch size and spatial size.

    With ``vae.frames_per_call`` > 1 a decoder call takes up to that many latent
    frames: every causal conv sees the same frames either way (its cache holds the
    frames before the call), so only the video's first latent frame, which the
    temporal upsamplers treat apart (no upsampling, ``first_chunk``), goes alone.
    """

    def __init__(self, vae: WanVAE) -> None:
        self._vae = vae
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        num_convs = sum(isinstance(module, WanCausalConv3d) for module in vae.model.decoder.modules())
        self._feat_cache: list[Any] = [None] * num_convs
        self._frame_shape: tuple[int, ...] | None = None  # (B, h, w) of the first chunk

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self._vae.latent_channels)
        first_chunk = self._frame_shape is None
        self._frame_shape = _chunk_frame_shape(self._frame_shape, latents)

        model = self._vae.model
        z = self._vae.denormalize(latents.to(model.device)).to(model.dtype)
        x = model.post_quant_conv(z)  # 1x1x1 conv: no temporal context, safe per chunk
        first, rest = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
        calls = [part for part in (first, *rest.split(self._vae.frames_per_call, dim=2)) if part.shape[2]]
        with cudnn_benchmark(self._vae.tuned_convs):
            frames = [
                model.decoder(
                    part,
                    feat_cache=self._feat_cache,
                    feat_idx=[0],  # the decoder walks its convs in order, indexing the cache
                    first_chunk=first_chunk and i == 0,
                )
                for i, part in enumerate(calls)
            ]
        video = torch.cat(frames, dim=2)
        if model.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=model.config.patch_size)
        return video.clamp(-1.0, 1.0)


@contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's algorithm timing for the block only, when ``on`` (the flag is process-wide)."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = was or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def vae_from_config(
    cfg: dict[str, Any],
    path: Path | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> VideoVAE:
    """Build the VAE a config describes: ``{"type": "pixel", "patch": 2}``, ``{"type": "wan"}``
    or ``{"type": "taehv"}``.

    Wan weights come from ``path``, a local ``AutoencoderKLWan`` directory; TAEHV weights from
    ``path``, a weight file or a directory holding one (``models.tiny_vae``).
    """
    if not isinstance(cfg, dict):
        raise SelfForcingError(f"VAE config must be a mapping, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind == "pixel":
        return PixelCodec.from_config(cfg).to(device=device)
    if kind == "wan":
        _check_config_keys(cfg, "wan", set())
        if path is None:
            raise SelfForcingError("a 'wan' VAE config needs the path of a local AutoencoderKLWan directory")
        vae = WanVAE.from_pretrained(path, device=device, dtype=dtype)
        if torch.device(device or "cpu").type == "cuda":
            vae.tune_convs()  # measured faster there (tune_convs)
        return vae
    if kind == "taehv":
        from selfforcing.models.tiny_vae import tiny_vae_from_config

        return tiny_vae_from_config(cfg, path, device=device, dtype=dtype)
    raise SelfForcingError(f"unknown VAE type {kind!r}; expected 'pixel', 'wan' or 'taehv'")
