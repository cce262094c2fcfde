"""A tiny video autoencoder in the TAEHV format, for fast streaming decode.

TAEHV (Boer Bohan, github.com/madebyollin/taehv) replaces a video model's large VAE with a
few 2D convolutions per frame; its ``taew2_1`` weights decode Wan 2.1 latents, and the
Self-Forcing demo offers them (``--use_taehv``) for faster real-time streaming, at some cost
in quality. :class:`TinyVAE` has that architecture with the checkpoints' own layout, so their
state dicts (``.pth`` or ``.safetensors``) load as they are, and the variant (latent
channels, pixel patch, temporal strides) is read from the weights' shapes.

Every layer works on each frame alone except three kinds:

* :class:`MemBlock`, a residual conv block whose first conv also sees the block's input at the
  previous frame (zeros before the first): the only temporal context, one frame deep;
* :class:`TPool` (encoder), a 1x1 conv over ``stride`` consecutive frames stacked on channels;
* :class:`TGrow` (decoder), a 1x1 conv to ``stride`` frames' channels, unstacked into frames.

``F`` latent frames decode to ``t * F`` frames (``t``: the TGrow strides' product, 4 for Wan)
of which the first ``t - 1`` are dropped: ``1 + t * (F - 1)``, the Wan VAE's count. Latents
are the diffusion model's own (no mean/std to apply); pixels are ``[0, 1]`` inside and
``[-1, 1]`` outside, as for every VAE here. A stream decoder keeps each MemBlock's last input
frame and decodes a whole chunk at once: the same frames as a one-shot decode.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from selfforcing.errors import SelfForcingError
from selfforcing.models.vae import (
    _check_config_keys,
    _check_latents,
    _check_video,
    _chunk_frame_shape,
    cudnn_benchmark,
)

ENCODER_WIDTH = 64
DECODER_WIDTHS = (256, 128, 64, 64)  # per upsampling stage, then the output projection's input
STAGES = 3  # each halves (encoder) or doubles (decoder) height and width
IMAGE_CHANNELS = 3


def _conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """``3 tanh(x / 3)``: outlying latents are pulled into about [-3, 3], smoothly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also reads its own input at the previous frame (``past``)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """``stride`` consecutive frames -> one, by a 1x1 conv over their stacked channels."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (frames, C, H, W), frames a multiple of stride
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


class TGrow(nn.Module):
    """One frame -> ``stride`` frames: a 1x1 conv to ``stride`` groups of channels, group j is frame j."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(-1, *x.shape[1:])


def run_frames(layers: nn.Sequential, x: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
    """``(B, T, C, H, W)`` frames through ``layers``, all frames of a layer at once.

    ``memory[i]`` is MemBlock ``i``'s input at the frame just before ``x`` (None: the video
    starts with ``x``); it is replaced by the input at ``x``'s last frame, so the next call
    goes on from there."""
    batch = x.shape[0]
    x = x.flatten(0, 1)  # frames of one video stay consecutive: TPool and TGrow rely on it
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            frames = x.unflatten(0, (batch, -1))
            before = torch.zeros_like(frames[:, :1]) if memory[i] is None else memory[i]
            past = torch.cat([before, frames[:, :-1]], dim=1)
            memory[i] = frames[:, -1:].clone()  # one frame, not a view holding the layer's whole input
            x = layer(x, past.flatten(0, 1))
        else:
            x = layer(x)
    return x.unflatten(0, (batch, -1))


class TinyVAE(nn.Module):
    """TAEHV-format encoder and decoder; the defaults are ``taew2_1``'s (Wan 2.1: 16 latent
    channels, no pixel patch, 8x smaller in space and 4x in time)."""

    def __init__(self, latent_channels: int = 16, patch_size: int = 1,
                 encoder_time_downscale: tuple[int, ...] = (2, 2, 1),
                 decoder_time_upscale: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        for name, strides in (("encoder_time_downscale", encoder_time_downscale),
                              ("decoder_time_upscale", decoder_time_upscale)):
            if len(strides) != STAGES or any(s not in (1, 2) for s in strides):
                raise SelfForcingError(f"{name} must be {STAGES} strides of 1 or 2, got {strides!r}")
        if math.prod(encoder_time_downscale) != math.prod(decoder_time_upscale):
            raise SelfForcingError(f"the encoder packs {math.prod(encoder_time_downscale)} frames per latent frame "
                                   f"but the decoder makes {math.prod(decoder_time_upscale)}")
        self.latent_channels, self.patch_size = latent_channels, patch_size
        self.tuned_convs = False  # see tune_convs()
        self.spatial_ratio = patch_size * 2**STAGES
        self.temporal_ratio = math.prod(decoder_time_upscale)
        pixels, w = IMAGE_CHANNELS * patch_size**2, ENCODER_WIDTH
        encoder: list[nn.Module] = [_conv(pixels, w), nn.ReLU()]
        for stride in encoder_time_downscale:
            encoder += [TPool(w, stride), _conv(w, w, stride=2, bias=False), MemBlock(w, w), MemBlock(w, w),
                        MemBlock(w, w)]
        self.encoder = nn.Sequential(*encoder, _conv(w, latent_channels))
        widths = DECODER_WIDTHS
        decoder: list[nn.Module] = [SoftClamp(), _conv(latent_channels, widths[0]), nn.ReLU()]
        for stage, stride in enumerate(decoder_time_upscale):
            w, w_next = widths[stage], widths[stage + 1]
            decoder += [MemBlock(w, w), MemBlock(w, w), MemBlock(w, w), nn.Upsample(scale_factor=2),
                        TGrow(w, stride), _conv(w, w_next, bias=False)]
        self.decoder = nn.Sequential(*decoder, nn.ReLU(), _conv(widths[-1], pixels))

    @staticmethod
    def config_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The constructor's arguments for a checkpoint, from its weights' shapes (the released
        files differ in latent channels, pixel patch and temporal strides, not in layout)."""
        try:
            out_channels = state[f"decoder.{3 + 6 * STAGES + 1}.weight"].shape[0]
            return {
                "latent_channels": state["decoder.1.weight"].shape[1],
                "patch_size": math.isqrt(out_channels // IMAGE_CHANNELS),
                "encoder_time_downscale": tuple(state[f"encoder.{2 + 5 * k}.conv.weight"].shape[1] // ENCODER_WIDTH
                                                for k in range(STAGES)),
                "decoder_time_upscale": tuple(state[f"decoder.{7 + 6 * k}.conv.weight"].shape[0] // DECODER_WIDTHS[k]
                                              for k in range(STAGES)),
            }
        except (KeyError, IndexError, AttributeError) as error:
            raise SelfForcingError(f"not a TAEHV-format state dict: no tensor {error}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> TinyVAE:
        """Load a TAEHV checkpoint (e.g. ``taew2_1.pth`` or ``.safetensors``), or the one weight
        file in directory ``path``; never downloads."""
        from selfforcing.models.convert import check_keys, read_checkpoint_file

        path = Path(path)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".safetensors", ".pth", ".pt"))
            if len(files) != 1:
                raise SelfForcingError(f"{path} should hold one TAEHV weight file (.safetensors/.pth), "
                                       f"found {len(files)}")
            path = files[0]
        state = read_checkpoint_file(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SelfForcingError(f"{path} does not hold a state dict of named tensors")
        try:
            vae = cls(**cls.config_from_state_dict(state))
            check_keys(set(vae.state_dict()), set(state))
            vae.load_state_dict(state)
        except (SelfForcingError, RuntimeError) as error:
            raise SelfForcingError(f"{path} is not a TAEHV checkpoint this VAE can load: {error}") from None
        return vae.eval().requires_grad_(False).to(device=device, dtype=dtype)

    def tune_convs(self) -> None:
        """Channels-last conv weights (the layout of cuDNN's NHWC kernels) and cuDNN timing its
        algorithms while this VAE decodes (a stream's conv shapes are fixed); the same frames to
        float rounding. As ``WanVAE.tune_convs``, which paid on an H100; not applied by default
        until measured here (the GPU check times the decoder both ways)."""
        self.tuned_convs = True
        self.to(memory_format=torch.channels_last)

    @property
    def _weight(self) -> torch.Tensor:
        return self.decoder[1].weight

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 1 + t k, H, W)`` video in [-1, 1] -> ``(B, C, k + 1, h, w)`` latents. As TAEHV
        encodes, the video is padded at its end with its last frame to whole groups of ``t``."""
        _check_video(video, self.spatial_ratio, self.temporal_ratio)
        x = rearrange((video.to(self._weight) + 1) / 2, "b c t h w -> b t c h w")
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        pad = -x.shape[1] % self.temporal_ratio
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        latents = run_frames(self.encoder, x, [None] * len(self.encoder))
        return rearrange(latents, "b t c h w -> b c t h w")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` latents -> ``(B, 3, 1 + t (F - 1), H, W)`` video in [-1, 1], in one go."""
        return self.stream_decoder().decode_chunk(latents)

    def stream_decoder(self) -> TinyStreamDecoder:
        return TinyStreamDecoder(self)

    def config(self) -> dict[str, Any]:
        return {"type": "taehv"}  # the variant comes from the weights


class TinyStreamDecoder:
    """Decodes one video's latents chunk by chunk, a chunk's frames at once; each MemBlock's
    input at the last frame decoded is all it carries between chunks."""

    def __init__(self, vae: TinyVAE) -> None:
        self._vae = vae
        self._memory: list[torch.Tensor | None] = [None] * len(vae.decoder)
        self._frame_shape: tuple[int, ...] | None = None  # (B, h, w) of the first chunk

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._vae
        _check_latents(latents, vae.latent_channels)
        first_chunk = self._frame_shape is None
        self._frame_shape = _chunk_frame_shape(self._frame_shape, latents)
        x = rearrange(latents.to(vae._weight), "b c f h w -> b f c h w")
        with cudnn_benchmark(vae.tuned_convs):
            frames = run_frames(vae.decoder, x, self._memory)
        if vae.patch_size > 1:
            frames = F.pixel_shuffle(frames, vae.patch_size)
        if first_chunk:  # the video's first latent frame stands for one frame: the last of its t
            frames = frames[:, vae.temporal_ratio - 1:]
        return rearrange(frames.clamp(0, 1) * 2 - 1, "b t c h w -> b c t h w")


def tiny_vae_from_config(cfg: dict[str, Any], path: Path | None, *, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> TinyVAE:
    """``{"type": "taehv"}``: the TAEHV weights at ``path`` (a file, or a directory holding one)."""
    _check_config_keys(cfg, "taehv", set())
    if path is None:
        raise SelfForcingError("a 'taehv' VAE config needs the path of a TAEHV weight file")
    return TinyVAE.from_pretrained(path, device=device, dtype=dtype)
