"""Streaming text-to-video: prompt -> text embedding -> rollout -> streaming VAE decode.

``StreamingPipeline.stream`` is a Python iterator: each chunk's frames are decoded and
handed out as soon as its few denoising steps finish, so a caller can show or write them
while later chunks are still being generated. Time to first frame and throughput are
recorded in ``pipeline.stats``.

A model directory is either

* a selfforcing directory: ``selfforcing.json`` (sampling, text encoder and VAE configs)
  plus ``transformer/`` (diffusers layout), written by ``save_pretrained``; or
* a diffusers Wan2.1-T2V pipeline directory (``model_index.json``, ``transformer/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``), streamed with Self Forcing's defaults.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

from selfforcing import threads
from selfforcing.diffusion.samplers import euler_sample_cfg
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.errors import SelfForcingError
from selfforcing.files import load_json
from selfforcing.memory import GIB, check_fits
from selfforcing.inference.conditioning import Conditioning
from selfforcing.inference.rollout import rollout
from selfforcing.models.convert import check_weight_files, load_state_dict_file
from selfforcing.models.kv_cache import ROPE_MODES, KVCache, StaticKVCache, check_sink_ema
from selfforcing.models.text_encoders import TextEncoder, negative_text, text_encoder_from_config, validate_prompts
from selfforcing.models.vae import VideoVAE, vae_from_config
from selfforcing.models.wan import CausalWanModel, TextContext
from selfforcing.schema import check_values
from selfforcing.utils import atomic_path, synchronize

PIPELINE_CONFIG = "selfforcing.json"


@dataclass(frozen=True)
class SamplingConfig:
    """How a causal student streams; stored in ``selfforcing.json`` under ``"sampling"``."""

    frames_per_chunk: int = 3  # latent frames per chunk: 3 chunk-wise (paper default), 1 frame-wise
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)  # paper's list, warped by the shift
    timestep_shift: float = 5.0
    kv_cache_frames: int = 21  # past latent frames the rolling cache holds (L)
    sink_frames: int = 0  # first frames never evicted
    rope_positions: str = "absolute"  # or "relative" for unbounded length
    context_noise: float = 0.0  # timestep of the cache-fill pass (0 = clean context)
    kv_recompute: bool = False  # re-encode the window from its clean frames before each chunk once it rolls
    sink_ema: float = 0.0  # > 0: evicted frames are fused into the sinks by EMA (Reward Forcing's EMA-Sink)
    rolling_window: bool = False  # Rolling Forcing: len(denoising_steps) chunks denoised jointly, staggered
    height: int = 480  # output video size in pixels
    width: int = 832
    fps: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "denoising_steps", tuple(self.denoising_steps))
        if self.frames_per_chunk < 1:
            raise SelfForcingError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.kv_cache_frames - self.sink_frames < self.frames_per_chunk:
            raise SelfForcingError(
                f"kv_cache_frames ({self.kv_cache_frames}) minus sink_frames ({self.sink_frames}) "
                f"must hold at least one chunk ({self.frames_per_chunk} frames)"
            )
        if self.rope_positions not in ROPE_MODES:
            raise SelfForcingError(f"rope_positions must be one of {ROPE_MODES}, got {self.rope_positions!r}")
        check_sink_ema(self.sink_ema, self.sink_frames)
        if self.sink_ema and self.kv_recompute:
            raise SelfForcingError("sink_ema and kv_recompute do not go together: the recompute re-encodes the sinks "
                                   "from their own frames, undoing the EMA")
        if not 0 <= self.context_noise < 1000:
            raise SelfForcingError(f"context_noise must be in [0, 1000), got {self.context_noise}")
        if min(self.height, self.width, self.fps) < 1:
            raise SelfForcingError("height, width and fps must be positive")
        FlowMatchSchedule(shift=self.timestep_shift).few_step_timesteps(self.denoising_steps)  # validates

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SelfForcingError(f"unknown sampling config keys: {', '.join(unknown)}")
        check_values(cls, d, "sampling")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["denoising_steps"] = list(self.denoising_steps)
        return d

    @property
    def forward_frames(self) -> int:
        """Latent frames in the largest forward: a chunk, or a rolling window of chunks."""
        return self.frames_per_chunk * (len(self.denoising_steps) if self.rolling_window else 1)

    def updated(self, changes: dict) -> "SamplingConfig":
        """This config with ``changes`` (``--sampling KEY=VALUE``), checked as a stored one is."""
        return self.from_dict({**self.to_dict(), **changes})


@dataclass
class StreamStats:
    """Wall-clock figures of the last stream."""

    first_frame_s: float | None = None  # from the call to the first decoded frame
    frames: int = 0  # video frames produced (per batch element)
    elapsed_s: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class VideoChunk:
    index: int  # piece number in the stream: a chunk, or with early_first_frame the first chunk in two
    start_frame: int  # index of its first video frame
    frames: torch.Tensor  # (B, T, H, W, 3) uint8
    latents: torch.Tensor  # (B, C, n, h, w)


ENGINES = ("fast", "eager")
COMPILE_SCOPES = ("step", "blocks")  # what compile() compiles: the whole chunk step, or one block for all


class StreamingPipeline:
    """Streams video from a causal student. ``engine="fast"`` (default) runs every forward as
    one fixed-shape chunk step over a ``StaticKVCache`` (compilable with ``compile()``);
    ``"eager"`` is the reference loop over the ``KVCache`` (same outputs, to float rounding).

    ``overlap_decode`` (CUDA) decodes each chunk on a side stream while the main stream goes
    on with the next chunk's cache fill and denoising, so the VAE and the DiT share the GPU
    instead of taking turns; each chunk is then handed over once the next one is queued.

    ``early_first_frame`` hands over the video's first latent frame as a chunk of its own, as
    soon as it is decoded, and the rest of the first chunk after it: the time to the first
    frame then counts one latent frame's decode, not a chunk's. It costs nothing extra (the
    Wan VAE decodes that frame apart anyway: its temporal upsamplers treat it alone) and the
    video is the same; only the first chunk comes in two pieces."""

    def __init__(self, model: CausalWanModel, text_encoder: TextEncoder, vae: VideoVAE, sampling: SamplingConfig,
                 engine: str = "fast", overlap_decode: bool = False, early_first_frame: bool = False):
        if engine not in ENGINES:
            raise SelfForcingError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.engine, self.overlap_decode, self.early_first_frame = engine, overlap_decode, early_first_frame
        if text_encoder.dim != model.config.text_dim:
            raise SelfForcingError(
                f"text encoder width {text_encoder.dim} does not match the model's text_dim {model.config.text_dim}"
            )
        if vae.latent_channels != model.config.in_channels:
            raise SelfForcingError(
                f"VAE latent channels {vae.latent_channels} do not match the model's in_channels {model.config.in_channels}"
            )
        self.model = model.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.vae = vae
        self.sampling = sampling
        self.schedule = FlowMatchSchedule(shift=sampling.timestep_shift)
        self.stats = StreamStats()
        self.compile_scope: str | None = None  # what compile() compiled: "step", "blocks" (None: not compiled)
        # Caches of finished streams, by stream shape: a later stream reuses their buffers, and
        # so the CUDA graphs captured on them (``compile(cuda_graphs=True)``).
        self._idle_caches: dict[tuple, list[KVCache]] = {}

    @property
    def device(self) -> torch.device:
        return self.model.proj_out.weight.device

    # ---- loading and saving ----------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: str | Path | None = None,
        text_encoder_device: str | torch.device | None = None,
        engine: str = "fast",
        tiny_vae: str | Path | None = None,
    ) -> "StreamingPipeline":
        """Load a model directory; ``checkpoint`` overrides the transformer weights
        (e.g. a Self-Forcing ``.pt`` holding ``generator_ema``). ``text_encoder_device="cpu"``
        keeps the text encoder (UMT5-XXL: about 11 GB in bf16) off the GPU: it runs once per
        prompt, and only its (1, 512, 4096) output moves to the model's device.

        ``dtype`` is the transformer's and the VAE's, and the text encoder's weights' on CUDA
        (bf16 there is the released code's inference; on the CPU the encoder stays float32).
        ``tiny_vae``, a TAEHV weight file (e.g. ``taew2_1.pth``), decodes instead of the
        model's VAE: the Self-Forcing demo's ``--use_taehv``, faster and coarser."""
        path = Path(path)
        if not path.is_dir():
            raise SelfForcingError(f"model directory {path} does not exist" if not path.exists() else
                                   f"{path} is a file; a model is a directory (with {PIPELINE_CONFIG} or model_index.json)")
        if (path / PIPELINE_CONFIG).is_file():
            cfg = _read_json(path / PIPELINE_CONFIG)
            unknown = sorted(set(cfg) - {"sampling", "text_encoder", "vae"})
            if unknown:
                raise SelfForcingError(f"unknown keys in {path / PIPELINE_CONFIG}: {', '.join(unknown)}")
            sampling = SamplingConfig.from_dict(cfg.get("sampling", {}))
            text_cfg, vae_cfg = cfg.get("text_encoder", {"type": "umt5"}), cfg.get("vae", {"type": "wan"})
        elif (path / "model_index.json").is_file():
            sampling, text_cfg, vae_cfg = SamplingConfig(), {"type": "umt5"}, {"type": "wan"}
        else:
            raise SelfForcingError(
                f"{path} is not a model directory: expected {PIPELINE_CONFIG} (selfforcing) "
                "or model_index.json (diffusers Wan pipeline)"
            )
        check_weight_files(path)
        model = CausalWanModel.from_pretrained(path / "transformer")
        if checkpoint is not None:
            model.load_weights(load_state_dict_file(checkpoint))
        model.to(device=device, dtype=dtype)
        text_device = torch.device(text_encoder_device or device)
        text_encoder = text_encoder_from_config(text_cfg, path, device=text_device,
                                                dtype=dtype if text_device.type == "cuda" else torch.float32)
        if tiny_vae is not None:
            vae_cfg, vae_path = {"type": "taehv"}, Path(tiny_vae)
        else:
            vae_path = path / "vae"
        vae = vae_from_config(vae_cfg, vae_path, device=device, dtype=dtype)
        return cls(model, text_encoder, vae, sampling, engine)

    def load_loras(self, loras: list[tuple[str | Path, float]], fuse: bool = True) -> None:
        """Apply LoRA files (diffusers, original-Wan / ComfyUI or musubi layout), each times its
        scale. Fused (default), they are added into the weights, so streams run at base-model
        speed and ``compile()`` freezes the result; unfused, they stay separate adapters
        (``selfforcing.models.lora.fuse`` / ``unfuse`` switch later)."""
        if not loras:
            return
        from selfforcing.models import lora

        for path, scale in loras:
            lora.load(self.model, path, scale, name=f"lora{len(getattr(self.model, 'peft_config', {}))}")
        if fuse:
            lora.fuse(self.model)

    def save_pretrained(self, path: str | Path, text_encoder_config: dict | None = None) -> None:
        """Write a selfforcing model directory (config last, so a partial write is never loadable).
        ``text_encoder_config`` replaces the encoder's own (a prompt cache names its source)."""
        path = Path(path)
        self.model.save_pretrained(path / "transformer")
        cfg = {"sampling": self.sampling.to_dict(), "text_encoder": text_encoder_config or self.text_encoder.config(),
               "vae": self.vae.config()}
        with atomic_path(path / PIPELINE_CONFIG) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2))

    # ---- streaming --------------------------------------------------------
    def latent_frames(self, num_frames: int, prefix: int = 0) -> int:
        """Latent frames needed for ``num_frames`` video frames (after ``prefix`` latent frames of a
        video to extend), or a clear error, before any work: absolute RoPE positions end with the table."""
        if not isinstance(num_frames, int) or num_frames <= 0:
            raise SelfForcingError(f"number of frames must be a positive integer, got {num_frames!r}")
        r, n = self.vae.temporal_ratio, self.sampling.frames_per_chunk
        if r == 1:
            latent = num_frames
        elif prefix:  # a continuation: r video frames from each latent frame (see video_frames)
            if num_frames % r:
                raise SelfForcingError(f"this VAE continues a video {r} frames per latent frame; {num_frames} is "
                                       f"not a multiple of {r}")
            latent = num_frames // r
        else:
            if (num_frames - 1) % r:
                raise SelfForcingError(f"this VAE makes 1 + {r}k video frames; {num_frames} is not of that form")
            latent = (num_frames - 1) // r + 1
        if latent % n:
            valid = [self.video_frames(k * n, prefix) for k in (max(1, latent // n), latent // n + 1)]
            raise SelfForcingError(
                f"{num_frames} frames is {latent} latent frames, not a multiple of the chunk size "
                f"({n} latent frames); try {' or '.join(map(str, sorted(set(valid))))}"
            )
        limit = self.model.config.rope_max_seq_len
        if self.sampling.rope_positions == "absolute" and prefix + latent > limit:
            raise SelfForcingError(
                f"{num_frames} frames{' after the video to extend' if prefix else ''} is past this model's limit of "
                f"{self.video_frames(max(limit - prefix, 0) // n * n, prefix)} (its RoPE table holds {limit} latent frames); to "
                "go further set \"rope_positions\": \"relative\" in the sampling section of its selfforcing.json: "
                "the rolling KV cache then renumbers positions, so a stream can run for ever"
            )
        return latent

    def video_frames(self, latent_frames: int, prefix: int = 0) -> int:
        """Video frames of ``latent_frames`` latent frames: a causal VAE decodes a video's first
        latent frame to one frame and every later one (a continuation's first too, after its
        ``prefix`` latent frames) to ``temporal_ratio``."""
        r = self.vae.temporal_ratio
        return r * latent_frames if prefix else 1 + r * (latent_frames - 1)

    @contextmanager
    def _stream_cache(self, chunk_shape: tuple[int, ...]) -> Iterator[KVCache]:
        """A cache for one stream: an idle one of the same shape, else a new one; idle again
        (reset) when the stream ends or is dropped."""
        s = self.sampling
        weight = self.model.proj_out.weight
        key = (chunk_shape[0], *chunk_shape[3:], weight.dtype, weight.device, s.kv_cache_frames, s.sink_frames,
               s.rope_positions, s.frames_per_chunk, s.sink_ema, s.rolling_window)
        idle = self._idle_caches.setdefault(key, [])
        cache = idle.pop() if idle else self.new_cache()
        try:
            yield cache
        finally:
            cache.reset()
            idle.append(cache)

    def new_cache(self) -> KVCache:
        s = self.sampling
        if self.engine == "fast":
            return StaticKVCache(len(self.model.blocks), s.kv_cache_frames, s.sink_frames, s.rope_positions,
                                 chunk_frames=s.forward_frames, sink_ema=s.sink_ema, fill_frames=s.frames_per_chunk)
        return KVCache(len(self.model.blocks), s.kv_cache_frames, s.sink_frames, s.rope_positions, s.sink_ema)

    def compile(self, mode: str | None = "default-for-device", cuda_graphs: bool = False,
                scope: str = "default-for-device") -> None:
        """Compile the fast engine's chunk step (once per chunk size, batch and resolution; the
        first two chunks pay for it). The default for the device: on CUDA, inductor's default
        mode; on the CPU, inductor's ``freezing`` (the weights a compiled graph holds become
        constants: prepacked matmul weights, q/k/v projections joined into one matmul), so load
        or fuse weights first. ``cuda_graphs`` (CUDA only) replays the compiled step as
        captured CUDA graphs, one per attended-prefix length. ``scope="blocks"`` compiles one
        transformer block for all of them instead of the whole step
        (``CausalWanModel.compile_step``, ``regional``): the same two graphs, no fusion across
        blocks, far less compile time, and the block weights stay inputs of the graph (so
        nothing is frozen). It is the default on the CPU, where it streamed as fast with 5-10x
        less compiling (docs/PERFORMANCE.md); on CUDA the default stays the whole step until
        it is measured there."""
        if self.engine != "fast":
            raise SelfForcingError("compile() needs the fast engine (engine='fast')")
        if cuda_graphs and self.device.type != "cuda":
            raise SelfForcingError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        if scope == "default-for-device":
            scope = "step" if self.device.type == "cuda" else "blocks"
        if scope not in COMPILE_SCOPES:
            raise SelfForcingError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
        self.compile_scope, regional = scope, scope == "blocks"
        if mode != "default-for-device":
            self.model.compile_step(mode, cuda_graphs=cuda_graphs, regional=regional)
        elif self.device.type == "cuda":
            self.model.compile_step(cuda_graphs=cuda_graphs, regional=regional)
        else:
            self.model.compile_step(options={"freezing": True, "cpp.enable_concat_linear": True}, regional=regional)

    def uncompile(self) -> None:
        """Back to the uncompiled fast engine (after ``compile``)."""
        self.model.drop_compiled_step()
        self.compile_scope = None

    @torch.no_grad()
    def warm_up(self, latent_frames: int | None = None, batch: int = 1) -> float:
        """Stream once, unseen, through every state the chunk step of a stream from a prompt
        meets: a chunk with an empty cache, one at each fill level, one attending the full
        cache. A compiled step compiles there, CUDA graphs are captured (one per attended
        length, ``CapturedStep``: later streams reuse the cache buffers, so they replay them)
        and cuDNN builds its plans (for this thread only), so that the next stream of ``batch``
        runs at full speed from its first chunk. A re-cache switch with sink frames or a video
        prefix may meet other lengths, each compiled or captured when first met.
        ``latent_frames`` stops at the states a stream that long meets (a benchmark's own
        length). The text is the empty prompt's (zeros of a prompt's shape), so no prompt need be
        known to the text encoder. Returns the seconds it took."""
        s, n = self.sampling, self.sampling.frames_per_chunk
        frames = (-(-s.kv_cache_frames // n) + 1) * n
        if latent_frames is not None:
            frames = min(frames, latent_frames)
        if s.rope_positions == "absolute":  # a position past the RoPE table is an error
            frames = min(frames, self.model.config.rope_max_seq_len)
        frames = max(frames // n, 1) * n
        empty = negative_text(self.text_encoder, "", self.device).expand(batch, -1, -1)
        start = time.perf_counter()
        for _ in self.stream(Conditioning(self.model.encode_text(empty)), self.video_frames(frames)):
            pass
        synchronize(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> TextContext:
        """Prompts -> the projected text every block's cross-attention reads."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        validate_prompts(prompts)
        return self.model.encode_text(self.text_encoder.encode(prompts).to(self.device))

    def _check_memory(self, chunk_shape: tuple[int, ...]) -> None:
        """Refuse a stream whose KV cache and one chunk's activations cannot fit, before it
        allocates (a 4000x4000 toy stream wanted 24 GB of the CPU's memory, then was killed)."""
        s, config = self.sampling, self.model.config
        batch, _, frames, h, w = chunk_shape
        tokens = (h // config.patch_size[1]) * (w // config.patch_size[2])  # per latent frame
        size = self.model.proj_out.weight.dtype.itemsize
        kv_cache = 2 * config.num_layers * batch * s.kv_cache_frames * tokens * config.dim * size
        chunk = batch * s.forward_frames * tokens * (config.ffn_dim + 4 * config.dim) * size  # the FFN's and q/k/v/out's
        video = batch * 3 * self.video_frames(frames) * s.height * s.width * 4  # one decoded chunk, float
        check_fits(kv_cache + chunk + video, f"a {s.width}x{s.height} stream of batch {batch} (its KV cache of "
                   f"{s.kv_cache_frames} latent frames: {kv_cache / GIB:,.1f} GiB)", self.device,
                   "lower --height and --width, or the batch")

    @torch.no_grad()
    def stream(
        self,
        prompts: list[str] | str | Conditioning,
        num_frames: int | None,
        seed: int | torch.Generator = 0,
        initial_latents: torch.Tensor | None = None,
    ) -> Iterator[VideoChunk]:
        """Generate and yield video chunk by chunk; ``num_frames=None`` streams until the caller stops.

        ``initial_latents`` (B, C, F0, h, w) continues a given video (extension): those frames
        fill the KV cache and the decoder's causal caches, and are not yielded; the new frames
        decode as the rest of one video (``temporal_ratio`` video frames per latent frame; see
        ``encode_video`` to get the latents from pixels). Pass a
        ``Conditioning`` (from ``encode_prompts``) instead of prompts to switch prompts while
        the stream runs. ``seed`` may be a generator to go on drawing from (one stream's noise
        spread over several calls).
        """
        start = time.perf_counter()
        conditioning = prompts if isinstance(prompts, Conditioning) else Conditioning(self.encode_prompts(prompts))
        prefix_frames = 0 if initial_latents is None else initial_latents.shape[2]  # positions taken already
        latent = None if num_frames is None else self.latent_frames(num_frames, prefix_frames)
        num_chunks = None if latent is None else latent // self.sampling.frames_per_chunk
        s, device = self.sampling, self.device
        ratio = self.vae.spatial_ratio * self.model.config.patch_size[1]
        if s.height % ratio or s.width % ratio:
            raise SelfForcingError(f"height and width must be multiples of {ratio}, got {s.height}x{s.width}")
        if max(s.height, s.width) > ratio * self.model.config.rope_max_seq_len:
            raise SelfForcingError(f"{s.width}x{s.height} is past this model's largest side, "
                                   f"{ratio * self.model.config.rope_max_seq_len} pixels (its RoPE table)")
        chunk_shape = (conditioning.text.batch_size, self.model.config.in_channels, s.frames_per_chunk,
                       s.height // self.vae.spatial_ratio, s.width // self.vae.spatial_ratio)
        if initial_latents is not None and (initial_latents.shape[:2] != chunk_shape[:2] or initial_latents.shape[3:] != chunk_shape[3:]):
            raise SelfForcingError(f"initial latents of shape {tuple(initial_latents.shape)} do not match {chunk_shape}")
        self._check_memory(chunk_shape)

        self.stats = stats = StreamStats()
        generator = seed if isinstance(seed, torch.Generator) else torch.Generator(device).manual_seed(seed)
        timesteps = self.schedule.few_step_timesteps(s.denoising_steps).to(device)
        decoder = self.vae.stream_decoder()
        if initial_latents is not None:
            # The continuation decodes as the rest of one video: the decoder's causal caches
            # must hold the video to extend (its frames are not yielded again).
            decoder.decode_chunk(initial_latents.to(device))
        with self._stream_cache(chunk_shape) as cache, threads.stream():
            threads.adapt(device)  # and after each chunk: the cores other work leaves free
            chunks = rollout(
                self.model, conditioning, cache, self.schedule, timesteps, chunk_shape, num_chunks,
                generator=generator, context_t=s.context_noise, recompute_window=s.kv_recompute,
                rolling_window=s.rolling_window,
                prefix=None if initial_latents is None else initial_latents.to(device, self.model.proj_out.weight.dtype),
            )
            for index, (x0, frames) in enumerate(self._decoded(chunks, decoder, video_start=not prefix_frames)):
                now = time.perf_counter()
                if stats.first_frame_s is None:
                    stats.first_frame_s = now - start
                yield VideoChunk(index, stats.frames, frames, x0)
                stats.frames += frames.shape[1]
                stats.elapsed_s = time.perf_counter() - start
                threads.adapt(device)

    def _decoded(self, chunks: Iterator[torch.Tensor], decoder,
                 video_start: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x0, uint8 frames) of every chunk, decoded in order (``video_start``: the chunks begin
        the video, no continuation). With ``overlap_decode`` a chunk is handed over after the
        next chunk's DiT work is queued (asking ``chunks`` for the next chunk queues it: the
        fast engine has no host syncs), its decode running beside it."""
        if self.early_first_frame and video_start:
            chunks = _first_frame_apart(chunks)
        if not self.overlap_decode:
            for x0 in chunks:
                yield x0, to_uint8(decoder.decode_chunk(x0))
            return
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pending = None
        for x0 in chunks:
            if pending is not None:
                yield pending()
            pending = _decode_beside(decoder, x0, side)
        if pending is not None:
            yield pending()

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 video -> latents to continue from, at this pipeline's size."""
        s = self.sampling
        if frames.ndim != 5 or frames.shape[2:] != (s.height, s.width, 3):
            raise SelfForcingError(
                f"video to extend must be {s.width}x{s.height} RGB frames, got shape {tuple(frames.shape)}"
            )
        r = self.vae.temporal_ratio
        if r > 1 and (frames.shape[1] - 1) % r:
            raise SelfForcingError(f"video to extend must have 1 + {r}k frames, got {frames.shape[1]}")
        video = frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1).to(self.device)
        return self.vae.encode(video)

    def generate(self, prompts: list[str] | str, num_frames: int, seed: int = 0) -> torch.Tensor:
        """Whole video (B, T, H, W, 3) uint8."""
        return torch.cat([c.frames for c in self.stream(prompts, num_frames, seed)], dim=1)

    @torch.no_grad()
    def generate_bidirectional(self, prompts: list[str] | str, num_frames: int, steps: int,
                               guidance_scale: float, seed: int = 0, negative_prompt: str = "") -> torch.Tensor:
        """Whole video (B, T, H, W, 3) uint8 the way a bidirectional teacher samples: every frame
        at once, full attention, ``steps`` Euler steps of the flow ODE with classifier-free
        guidance (the sampler of the ODE pairs). Not streaming; for scoring teachers."""
        if not isinstance(steps, int) or steps < 1:
            raise SelfForcingError(f"teacher sampling steps must be a positive integer, got {steps!r}")
        text = self.encode_prompts(prompts)
        negative = self.model.encode_text(
            negative_text(self.text_encoder, negative_prompt, self.device).expand(text.batch_size, -1, -1))
        s = self.sampling
        shape = (text.batch_size, self.model.config.in_channels, self.latent_frames(num_frames),
                 s.height // self.vae.spatial_ratio, s.width // self.vae.spatial_ratio)
        noise = torch.randn(shape, generator=torch.Generator(self.device).manual_seed(seed), device=self.device,
                            dtype=self.model.proj_out.weight.dtype)
        x0 = euler_sample_cfg(lambda x, t, cond: self.model(x, t, text if cond else negative), noise,
                              self.schedule, steps, guidance_scale)
        return to_uint8(self.vae.decode(x0))


def _first_frame_apart(chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The chunks, the first split into its first latent frame and the rest (``early_first_frame``)."""
    for index, x0 in enumerate(chunks):
        if index == 0 and x0.shape[2] > 1:
            yield x0[:, :, :1]
            yield x0[:, :, 1:]
        else:
            yield x0


def _decode_beside(decoder, x0: torch.Tensor, side: torch.cuda.Stream | None):
    """Queue the decode of ``x0`` on the ``side`` CUDA stream (None: decode now); returns the
    call that waits for it and gives (x0, uint8 frames on the host)."""
    if side is None:
        frames = to_uint8(decoder.decode_chunk(x0))
        return lambda: (x0, frames)
    side.wait_stream(torch.cuda.current_stream(x0.device))  # x0 is written by the main stream
    with torch.cuda.stream(side):
        on_device = _uint8_frames(decoder.decode_chunk(x0)).contiguous()
        # The copy to the host is queued on the side stream too: a blocking .cpu() here would
        # wait for the decode, and one on the main stream for the next chunk's DiT work.
        frames = torch.empty(on_device.shape, dtype=torch.uint8, pin_memory=True)
        frames.copy_(on_device, non_blocking=True)
        done = side.record_event()
    x0.record_stream(side)  # the allocator must not hand x0's memory to main while side reads it

    def finish() -> tuple[torch.Tensor, torch.Tensor]:
        done.synchronize()
        return x0, frames

    return finish


def _uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8, on the video's device."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8 on the host."""
    return _uint8_frames(video).cpu()


def _read_json(path: Path) -> dict:
    data = load_json(path)
    if not isinstance(data, dict):
        raise SelfForcingError(f"{path} must hold a JSON object")
    return data
