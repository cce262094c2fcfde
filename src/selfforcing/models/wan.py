"""The Wan2.1 text-to-video diffusion transformer, made causal.

One file, one forward pass, top to bottom (read ``CausalWanModel.forward``):

    video latents (B, C, F, H, W)
      -> 3D patch embed (conv, patch (1, 2, 2))            -> tokens (B, F*h*w, dim)
      -> per-frame sinusoidal timestep embedding -> MLP     -> adaLN modulation (6 x dim)
      -> text embeddings -> GELU-tanh MLP                   -> cross-attention K/V per block
      -> N x [LayerNorm+mod -> self-attn (qk-RMSNorm, 3D RoPE) -> gate
              LayerNorm(affine) -> cross-attn to text
              LayerNorm+mod -> FFN (GELU-tanh) -> gate]
      -> LayerNorm+mod -> linear head -> unpatchify         -> flow v (B, C, F, H, W)

Parameter names are those of diffusers' ``WanTransformer3DModel``, so its
``save_pretrained`` directories load here without conversion.

Self-attention runs in one of three modes (the only thing that differs between
the teacher, parallel causal training and streaming inference):

* full bidirectional attention (``attention=None``, no cache): the teacher;
* a block-causal frame mask over the whole sequence (``attention=BlockCausal``):
  Teacher/Diffusion Forcing training, chunk size 3 (chunk-wise) or 1 (frame-wise);
* incremental (``kv_cache=...``): one chunk attends to the cached K/V of earlier
  frames plus itself; ``update_cache=True`` stores the chunk's K/V afterwards.

Timesteps may be per sample ``(B,)`` or per latent frame ``(B, F)`` in every mode.
The model knows nothing about parallelism or training: those wrap it from outside.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from selfforcing.errors import SelfForcingError
from selfforcing.files import load_json
from selfforcing.memory import check_fits
from selfforcing.models.graphs import CapturedStep
from selfforcing.models.kv_cache import KVCache, StaticKVCache
from selfforcing.schema import check_values

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# diffusers config keys that select image-to-video parts this text-to-video model does not have.
_I2V_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


# --------------------------------------------------------------------------- config
# Bounds past which a config is a mistake (or an attack), not a model: refused before anything is built.
MAX_LAYERS = 1000
MAX_PARAMETERS = 10**12
MAX_ROPE_POSITIONS = 1 << 20


@dataclass(frozen=True)
class WanConfig:
    """Architecture hyper-parameters, named as in diffusers' ``WanTransformer3DModel`` config."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise SelfForcingError(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.qk_norm != "rms_norm_across_heads":
            raise SelfForcingError(f"only qk_norm='rms_norm_across_heads' (Wan2.1) is supported, got {self.qk_norm!r}")
        if not self.cross_attn_norm:
            raise SelfForcingError("only cross_attn_norm=True (Wan2.1) is supported")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise SelfForcingError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {self.attention_head_dim}")
        for name in ("num_attention_heads", "in_channels", "out_channels", "text_dim", "ffn_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise SelfForcingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.freq_dim < 2 or self.freq_dim % 2:
            raise SelfForcingError(f"freq_dim must be even and >= 2, got {self.freq_dim}")
        if not 1 <= self.rope_max_seq_len <= MAX_ROPE_POSITIONS:
            raise SelfForcingError(f"rope_max_seq_len must be in [1, {MAX_ROPE_POSITIONS}], got {self.rope_max_seq_len}")
        if self.num_layers > MAX_LAYERS or self.num_parameters() > MAX_PARAMETERS:
            raise SelfForcingError(
                f"a Wan config with {self.num_layers} layers, width {self.dim} and ffn_dim {self.ffn_dim} has "
                f"{self.num_parameters():.3g} parameters: past any model this code runs (at most {MAX_LAYERS} layers "
                f"and {MAX_PARAMETERS:.0e} parameters; Wan2.1-14B has 40 layers and 1.4e10)"
            )

    def num_parameters(self) -> int:
        """The parameters of ``CausalWanModel(self)``, counted from the sizes alone (a check on a
        config must not build it: a hundred million layers would fill the memory first)."""
        dim, ffn, patch = self.dim, self.ffn_dim, math.prod(self.patch_size)
        linear = lambda d_in, d_out: d_in * d_out + d_out  # noqa: E731
        attention = 4 * linear(dim, dim) + 2 * dim  # q, k, v, out; RMSNorm on q and k
        block = 2 * attention + 2 * dim + linear(dim, ffn) + linear(ffn, dim) + 6 * dim  # norm2 affine; modulation
        embedders = (self.in_channels * patch * dim + dim + linear(self.freq_dim, dim) + linear(dim, dim)
                     + linear(dim, 6 * dim) + linear(self.text_dim, dim) + linear(dim, dim))
        return embedders + self.num_layers * block + linear(dim, self.out_channels * patch) + 2 * dim

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        """Build from a diffusers ``config.json`` dict (``_``-prefixed metadata is ignored)."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        i2v = [k for k in _I2V_KEYS if d.pop(k, None) is not None]
        if i2v:
            raise SelfForcingError(f"image-to-video Wan configs are not supported (config sets {', '.join(i2v)})")
        d.pop("window_size", None)  # legacy key of original Wan configs, always global attention
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SelfForcingError(f"unknown Wan config keys: {', '.join(unknown)}")
        check_values(cls, d, "Wan config")
        return cls(**d)

    @classmethod
    def from_original_dict(cls, d: dict) -> "WanConfig":
        """Build from an original Wan ``config.json`` (``WanModel``: dim, num_heads, in_dim, ...)."""
        if d.get("model_type", "t2v") != "t2v":
            raise SelfForcingError(f"only text-to-video Wan models are supported, config says {d['model_type']!r}")
        try:
            return cls(
                patch_size=tuple(d.get("patch_size", (1, 2, 2))), num_attention_heads=d["num_heads"],
                attention_head_dim=d["dim"] // d["num_heads"], in_channels=d.get("in_dim", 16),
                out_channels=d.get("out_dim", 16), text_dim=d.get("text_dim", 4096), freq_dim=d.get("freq_dim", 256),
                ffn_dim=d["ffn_dim"], num_layers=d["num_layers"], eps=d.get("eps", 1e-6),
            )
        except KeyError as e:
            raise SelfForcingError(f"original Wan config lacks {e.args[0]!r}") from None

    @classmethod
    def read(cls, path: str | Path) -> "WanConfig":
        """The architecture in a model directory's ``config.json`` (diffusers or original Wan
        layout; a pipeline directory's ``transformer/`` is found), without loading weights."""
        config_file = _transformer_dir(Path(path)) / CONFIG_NAME
        if not config_file.is_file():
            raise SelfForcingError(f"no Wan transformer at {path}: {CONFIG_NAME} not found")
        d = load_json(config_file)
        if not isinstance(d, dict):
            raise SelfForcingError(f"{config_file} is not a JSON object")
        return cls.from_original_dict(d) if "num_heads" in d else cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": "WanTransformer3DModel", **d}


PRESETS: dict[str, WanConfig] = {
    # Wan2.1-T2V-1.3B, the model Self Forcing post-trains.
    "wan2.1-1.3b": WanConfig(),
    # Wan2.1-T2V-14B: the real score of the paper's DMD recipe.
    "wan2.1-14b": WanConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # The embedded toy-world model: 12-channel pixel latents (32x32 RGB, space-to-depth 2), 64 tokens
    # per latent frame. Each token then carries 48 pixel values, well below the width of 128: with a
    # flow (v) target the network must pass per-pixel noise through, so a token holding more values
    # than the width (space-to-depth 4 gives 192) leaves visible noise in every sample.
    "toy": WanConfig(
        num_attention_heads=4, attention_head_dim=32, in_channels=12, out_channels=12,
        text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, rope_max_seq_len=1024,
    ),
    # Smallest useful network, for tests.
    "tiny": WanConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ),
}


def preset(name: str) -> WanConfig:
    if name not in PRESETS:
        raise SelfForcingError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _transformer_dir(path: Path) -> Path:
    """A whole diffusers pipeline directory holds its transformer in ``transformer/``."""
    return path / "transformer" if (path / "transformer" / CONFIG_NAME).is_file() else path


# --------------------------------------------------------------------------- attention masks
@dataclass(frozen=True)
class BlockCausal:
    """Frame-level block-causal attention for parallel (teacher / diffusion forcing) training.

    Frames are grouped into chunks of ``frames_per_chunk``; every frame sees all frames of
    its own chunk and earlier chunks. ``window_frames`` limits the past to what a rolling
    KV cache of that capacity would hold (``sink_frames`` first frames always kept), so one
    parallel forward reproduces streaming inference exactly. ``hide_first_chunk_from_last``
    is the paper's §3.4 trick: the last chunk may not attend to the first, so the model
    learns to do without it before the rolling cache evicts it at extrapolation time.
    """

    frames_per_chunk: int = 3
    window_frames: int | None = None
    sink_frames: int = 0
    hide_first_chunk_from_last: bool = False

    def frame_mask(self, num_frames: int, device: torch.device | None = None) -> torch.Tensor:
        """(F, F) bool, True where query frame i may attend key frame j."""
        n = self.frames_per_chunk
        if num_frames % n:
            raise SelfForcingError(f"{num_frames} latent frames is not a multiple of frames_per_chunk={n}")
        idx = torch.arange(num_frames, device=device)
        chunk_start = (idx // n * n)[:, None]  # first frame of the query's chunk
        key = idx[None, :]
        allowed = key < chunk_start + n
        if self.window_frames is not None:
            recent = key >= chunk_start - (self.window_frames - self.sink_frames)
            allowed &= recent | (key >= chunk_start) | (key < self.sink_frames)
        if self.hide_first_chunk_from_last and num_frames > n:
            last = idx[:, None] >= num_frames - n
            allowed &= ~(last & (key < n))
        return allowed

    def teacher_forcing_mask(self, num_frames: int, device: torch.device | None = None) -> torch.Tensor:
        """(2F, 2F) mask for the sequence [clean frames ; noisy frames] of teacher forcing.

        Clean frames attend block-causally among themselves (exactly what their K/V in a
        cache would have seen); each noisy chunk attends to the clean frames of *earlier*
        chunks and to its own noisy frames, never to its own clean version.
        """
        allowed = self.frame_mask(num_frames, device)
        chunk = torch.arange(num_frames, device=device) // self.frames_per_chunk
        same_chunk = chunk[:, None] == chunk[None, :]
        clean_rows = torch.cat([allowed, torch.zeros_like(allowed)], dim=1)
        noisy_rows = torch.cat([allowed & ~same_chunk, same_chunk], dim=1)
        return torch.cat([clean_rows, noisy_rows], dim=0)


@dataclass(frozen=True)
class _TeacherForcingMask:
    """Internal: the [clean ; noisy] mask of ``BlockCausal`` over a doubled sequence."""

    inner: BlockCausal

    def frame_mask(self, num_frames: int, device: torch.device | None = None) -> torch.Tensor:
        return self.inner.teacher_forcing_mask(num_frames // 2, device)


# --------------------------------------------------------------------------- building blocks
class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, d_in: int, d_out: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act_1 = act
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (embedding, 6-way adaLN modulation); text -> model width."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP2(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP2(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of ``t`` (any shape) -> (..., freq_dim), cos first as in Wan."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[..., None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps (B, F) -> temb (B, F, dim), modulation (B, F, 6, dim)."""
        temb = self.time_embedder(self.sinusoid(t).to(self.time_proj.weight.dtype))
        mod = self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))
        return temb, mod


class Rope3D(nn.Module):
    """Wan's 3D rotary embedding: head channels split into time / height / width parts.

    Height and width get ``2 * (head_dim // 6)`` channels each, time the rest. Tables are
    precomputed for ``max_seq_len`` positions per axis; frame positions are passed in
    explicitly so that a KV cache can place frames absolutely or relative to its window.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        hw = 2 * (head_dim // 6)
        self.split = (head_dim - 2 * hw, hw, hw)
        self.max_seq_len = max_seq_len
        pos = torch.arange(max_seq_len, dtype=torch.float64)
        tables = []
        for d in self.split:
            inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            tables.append(torch.outer(pos, inv_freq))
        angles = torch.cat(tables, dim=1)  # (max_seq_len, head_dim/2), axes side by side
        self.register_buffer("cos_table", angles.cos().float(), persistent=False)
        self.register_buffer("sin_table", angles.sin().float(), persistent=False)

    def forward(self, frame_positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (F*h*w, head_dim/2) for tokens ordered frame, row, column.

        ``frame_positions`` is a CPU tensor (checked against the table without a device sync)."""
        if int(frame_positions.max()) >= self.max_seq_len or max(height, width) > self.max_seq_len:
            raise SelfForcingError(
                f"position {int(frame_positions.max())} is past the RoPE table ({self.max_seq_len} positions); "
                "use cache-relative RoPE positions (rope_positions='relative') for unbounded generation"
            )
        n_t, n_h, _ = (s // 2 for s in self.split)
        device = self.cos_table.device
        frame_positions = frame_positions.to(device, non_blocking=True)
        rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)

        def grid(table: torch.Tensor) -> torch.Tensor:
            t_part = table[frame_positions, :n_t][:, None, None, :].expand(-1, height, width, -1)
            h_part = table[rows, n_t:n_t + n_h][None, :, None, :].expand(len(frame_positions), -1, width, -1)
            w_part = table[cols, n_t + n_h:][None, None, :, :].expand(len(frame_positions), height, -1, -1)
            return torch.cat([t_part, h_part, w_part], dim=-1).flatten(0, 2)

        return grid(self.cos_table), grid(self.sin_table)

    def frame_shift(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (head_dim/2,) that move a rotated key by ``frames`` positions along time
        (height and width unchanged): RoPE composes, rot(rot(k, p), d) = rot(k, p + d)."""
        n_t = self.split[0] // 2
        cos, sin = torch.ones_like(self.cos_table[0]), torch.zeros_like(self.sin_table[0])
        cos[:n_t] = self.cos_table[abs(frames), :n_t]
        sin[:n_t] = self.sin_table[abs(frames), :n_t] * (1 if frames >= 0 else -1)
        return cos[None], sin[None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` (B, N, H, D) by the token angles (N, D/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# Exact SDPA kernels a model can put first (``CausalWanModel.set_attention_backend``).
ATTENTION_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                      "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on (B, N, H, D) tensors; ``mask`` (Nq, Nk) bool, True = attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class WanAttention(nn.Module):
    """Projections of one attention layer (q/k/v/out, RMSNorm on q and k across all heads)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(x)).unflatten(-1, (self.heads, -1))
        return k, self.to_v(x).unflatten(-1, (self.heads, -1))


class FeedForward(nn.Module):
    """dim -> ffn_dim -> GELU(tanh) -> dim, named like diffusers' FeedForward (net.0.proj, net.2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


@dataclass
class TextContext:
    """Projected text of one batch of prompts, with each block's cross-attention K/V.

    Every block computes its K/V from ``text`` on first use, inside its own forward (so a
    sharded block only touches its own weights); without autograd they are kept and reused
    by every later denoising step and chunk, since text never changes while a prompt streams.
    The fast engine fills all of them at once before its compiled step (``fill_kv``), which
    then only reads the list.
    """

    text: torch.Tensor  # (B, L, dim) after the text projection
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # by layer

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def layer_kv(self, layer: int, attn: "WanAttention") -> tuple[torch.Tensor, torch.Tensor]:
        # Only K/V computed without autograd are kept: a forward that trains must build its own
        # graph to the K/V projections (and be recomputable under gradient checkpointing).
        if torch.is_grad_enabled():
            return attn.key_value(self.text)
        if layer >= len(self.kv) or self.kv[layer] is None:
            self.kv.extend([None] * (layer + 1 - len(self.kv)))
            self.kv[layer] = attn.key_value(self.text)
        return self.kv[layer]

    @torch.no_grad()
    def fill_kv(self, blocks: nn.ModuleList) -> None:
        for layer, block in enumerate(blocks):
            self.layer_kv(layer, block.attn2)

    def only_layer(self, layer: int) -> "TextContext":
        """This layer's filled K/V alone, as layer 0 (a block compiled once for all reads it)."""
        return TextContext(self.text, [self.kv[layer]])


@dataclass
class SelfAttnInputs:
    """What one forward's self-attention needs besides the block's own activations: RoPE of the
    queries and keys, a mask, and (streaming) the cache window it attends to and where it
    stores its own K/V. ``attend`` is the reference path (keys kept before RoPE, the window
    joined to the chunk and rotated at every forward)."""

    rope_q: tuple[torch.Tensor, torch.Tensor]
    rope_k: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    kv_cache: KVCache | None = None
    cache_slots: torch.Tensor | None = None  # where this forward's K/V go in the cache (None: don't store)
    window_frames: int = 0  # cached frames attended (fixed when the forward runs, for recomputation)
    stamp: int = 0  # the cache's overwrite count when the forward ran

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all, v_all = k, v
        if self.window_frames:
            past_k, past_v = self.kv_cache.window(layer, self.window_frames)
            k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        if self.cache_slots is not None:
            self.kv_cache.append(layer, self.cache_slots, k, v)
        q, k_all = apply_rope(q, *self.rope_q), apply_rope(k_all, *self.rope_k)
        return attention(q, k_all, v_all, self.mask)


@dataclass
class StaticAttnInputs:
    """The fast engine's self-attention (``StaticKVCache``): the chunk rotates its queries and
    keys at its own positions, writes K/V in place into the last slots of the attended buffer
    prefix and attends to that prefix. Only tensors are read here, so a compiled step sees
    one graph at every chunk of every stream (the prefix length is its one dynamic size)."""

    rope: tuple[torch.Tensor, torch.Tensor]
    keys: list[torch.Tensor]  # per layer (B, prefix, H, D) views of the cache buffers
    values: list[torch.Tensor]
    mask: torch.Tensor | None = None  # only for padded pieces and hidden frames (run eagerly)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = apply_rope(q, *self.rope), apply_rope(k, *self.rope)
        keys, values = self.keys[layer], self.values[layer]
        start = keys.shape[1] - k.shape[1]  # the chunk's slots end the (dynamic-length) prefix
        keys.narrow(1, start, k.shape[1]).copy_(k)
        values.narrow(1, start, v.shape[1]).copy_(v)
        return attention(q, keys, values, self.mask)

    def only_layer(self, layer: int) -> "StaticAttnInputs":
        """This layer's cache buffers alone, as layer 0 (a block compiled once for all reads them)."""
        return replace(self, keys=[self.keys[layer]], values=[self.values[layer]])


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNormFP32(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = LayerNormFP32(dim, cfg.eps, elementwise_affine=True)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm3 = LayerNormFP32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, mod, text: TextContext, sa: SelfAttnInputs | StaticAttnInputs, layer: int) -> torch.Tensor:
        """x: (B, F, hw, dim) tokens grouped by frame; mod: (B, F, 6, dim) per-frame modulation."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod.float()).unsqueeze(3).unbind(2)

        h = (self.norm1(x).float() * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attention(h.flatten(1, 2), sa, layer).view_as(x) * gate).type_as(x)

        text_kv = text.layer_kv(layer, self.attn2)
        x = x + self.attn2.to_out[0](attention(self.attn2.query(self.norm2(x).flatten(1, 2)), *text_kv)).view_as(x)

        h = (self.norm3(x).float() * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)

    def self_attention(self, h: torch.Tensor, sa, layer: int) -> torch.Tensor:
        q = self.attn1.query(h)
        k, v = self.attn1.key_value(h)
        return self.attn1.to_out[0](sa.attend(layer, q, k, v))


def _recompute_guarded(block, tokens, mod, text, sa, layer):
    """A checkpointed block reads its cache window in place when the backward recomputes it:
    refuse if a held frame was overwritten in between (a copy per chunk and block instead
    would grow with the square of the chunks)."""
    if sa.kv_cache is not None and sa.kv_cache.overwrites != sa.stamp:
        raise SelfForcingError("the KV cache overwrote frames a checkpointed forward attended before its backward "
                               "ran: train with a cache that holds the whole video (no rolling eviction)")
    return block(tokens, mod, text, sa, layer)


def _one_block(block: WanBlock, tokens, mod, text: TextContext, sa: StaticAttnInputs) -> torch.Tensor:
    """A block on its own layer's inputs (``only_layer``): what a regional compile compiles,
    one graph for every block (its weights are inputs, not constants)."""
    return block(tokens, mod, text, sa, 0)


def _first_chunk_block(block: WanBlock, tokens, mod, text: TextContext, sa: StaticAttnInputs) -> torch.Tensor:
    """The same for a chunk with nothing cached, compiled apart (see ``_first_chunk_step``)."""
    return _one_block(block, tokens, mod, text, sa)


# --------------------------------------------------------------------------- the model
class CausalWanModel(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        parameters = config.num_parameters()
        check_fits(parameters * torch.get_default_dtype().itemsize, f"a Wan transformer of {parameters:.3g} parameters",
                   torch.get_default_device(), "check num_layers, ffn_dim and the head sizes in its config")
        self.config = config
        dim = config.dim
        self.rope = Rope3D(config.attention_head_dim, config.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.norm_out = LayerNormFP32(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False
        self.attention_backend: str | None = None

    def set_attention_backend(self, backend: str | None) -> None:
        """Put one exact SDPA kernel first in torch's priority order for this model's forwards
        (``None``: torch's own order, flash first on an H100). The others stay behind it as
        fallbacks, for masks, shapes or devices the chosen kernel does not take. On an H100 the
        cuDNN kernel ran the stream's largest self-attention, timed alone, 1.7x faster than
        flash (docs/PERFORMANCE.md). Set it before ``compile_step``: a compiled step keeps the
        kernel it was traced with. cuDNN builds an execution plan for each new attention shape,
        so once per attended length of a stream (and per thread); torch's opt-in
        ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``, set before the first cuDNN call, lets a plan
        serve many lengths where q, k and v are laid out (B, tokens, heads, dim), as the fast
        engine lays them out at batch 1 (eager)."""
        if backend is not None and backend not in ATTENTION_BACKENDS:
            raise SelfForcingError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)} or None, "
                                   f"got {backend!r}")
        if getattr(self, "_compiled_steps", None) is not None:
            raise SelfForcingError("set the attention backend before compile_step(): the compiled step keeps "
                                   "the kernel it was traced with")
        self.attention_backend = backend

    def _attention_kernels(self):
        """The context every forward runs its step in: the chosen SDPA kernel first."""
        if self.attention_backend is None:
            return nullcontext()
        first = ATTENTION_BACKENDS[self.attention_backend]
        return sdpa_kernel([first, *(b for b in ATTENTION_BACKENDS.values() if b != first)], set_priority=True)

    # ---- text ------------------------------------------------------------
    def encode_text(self, context: torch.Tensor) -> TextContext:
        """Text-encoder output (B, L, text_dim) -> projected text for every block's cross-attention."""
        if context.ndim != 3 or context.shape[-1] != self.config.text_dim:
            raise SelfForcingError(
                f"text embeddings must have shape (B, L, {self.config.text_dim}), got {tuple(context.shape)}"
            )
        return TextContext(self.condition_embedder.text_embedder(context.to(self.proj_out.weight.dtype)))

    # ---- forward ---------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | TextContext,
        *,
        attention: BlockCausal | None = None,
        kv_cache: KVCache | None = None,
        update_cache: bool = False,
        context_frames: torch.Tensor | None = None,
        context_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow ``v = noise - x0`` for latents ``x`` (B, C, F, H, W) at timesteps ``t``.

        ``t`` is (B,) or per latent frame (B, F). With ``kv_cache`` the F frames are the next
        chunk of a stream; they attend to the cache and themselves, and are appended to the
        cache when ``update_cache`` (the clean "cache-fill" pass of the paper's Algorithm 2).
        With ``context_frames`` (needs ``attention``) every chunk of ``x`` is conditioned on the
        given ground-truth frames of earlier chunks, all chunks in one forward: clean frames
        (teacher forcing) or, with per-frame ``context_t`` > 0, noisy ones (diffusion forcing).
        """
        cfg = self.config
        B, _, num_frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if num_frames % pt or height % ph or width % pw:
            raise SelfForcingError(f"latent shape {tuple(x.shape[2:])} is not divisible by patch size {cfg.patch_size}")
        if attention is not None and kv_cache is not None:
            raise SelfForcingError("pass either a block-causal mask or a KV cache, not both")
        if context_frames is not None:
            return self._with_context_frames(x, t, context, attention, context_frames, context_t)
        f, h, w = num_frames // pt, height // ph, width // pw
        text = context if isinstance(context, TextContext) else self.encode_text(context)
        if text.batch_size != B:
            raise SelfForcingError(f"text batch {text.batch_size} does not match latent batch {B}")
        if kv_cache is not None and kv_cache.static:
            return self._static_forward(x, t, text, kv_cache, update_cache)

        # Positions and the self-attention mode, then the blocks; the cache records the chunk last.
        sa = self._self_attn_inputs(f, h, w, attention, kv_cache, update_cache)
        with self._attention_kernels():
            out = self._step(x, self._per_frame(t, B, f, x.device), text, sa)
        if sa.cache_slots is not None:
            kv_cache.commit(sa.cache_slots)
        return out

    def _step(self, x: torch.Tensor, t: torch.Tensor, text: TextContext, sa, run_block=None) -> torch.Tensor:
        """The part of a forward that only touches tensors (what ``compile_step`` compiles);
        ``t`` is per frame (B, f). ``run_block(block, tokens, mod, text, sa)``, when given,
        runs each block on its own layer's inputs (``compile_step(regional=True)``)."""
        B, _, num_frames, height, width = x.shape
        pt, ph, pw = self.config.patch_size
        f, h, w = num_frames // pt, height // ph, width // pw

        # 1. Patchify: (B, C, F, H, W) -> (B, f, h*w, dim), tokens grouped by frame.
        tokens = self.patch_embedding(x.to(self.proj_out.weight.dtype)).flatten(3).permute(0, 2, 3, 1)

        # 2. Per-frame timestep embedding and adaLN modulation.
        temb, mod = self.condition_embedder.time(t)

        # 3. Transformer blocks (optionally recomputed in backward to save activation memory).
        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(_recompute_guarded, block, tokens, mod, text, sa, layer, use_reentrant=False,
                                    context_fn=lambda: (self._attention_kernels(), self._attention_kernels()))
            elif run_block is not None:
                tokens = run_block(block, tokens, mod, text.only_layer(layer), sa.only_layer(layer))
            else:
                tokens = block(tokens, mod, text, sa, layer)

        # 4. Output norm + modulation, linear head, unpatchify.
        shift, scale = (self.scale_shift_table + temb[:, :, None].float()).unsqueeze(3).unbind(2)
        out = self.proj_out((self.norm_out(tokens).float() * (1 + scale) + shift).type_as(tokens))
        out = out.view(B, f, h, w, pt, ph, pw, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, -1, num_frames, height, width)

    # ---- the fast engine -------------------------------------------------
    def compile_step(self, mode: str | None = None, options: dict | None = None, cuda_graphs: bool = False,
                     regional: bool = False) -> None:
        """Compile the chunk step of ``StaticKVCache`` forwards: one graph for a chunk with an
        empty cache, one for every other (the attended prefix is its one dynamic size), each
        compiled once (fullgraph) and never again as the cache fills, rolls, switches prompt
        or re-caches. ``options`` go to inductor (they exclude ``mode``). ``cuda_graphs``
        replays the compiled steps as CUDA graphs captured by ``CapturedStep`` (inductor's own
        ``reduce-overhead`` skips them: the step writes the cache in place).

        ``regional`` compiles one transformer block instead of the whole step: the blocks are
        alike, so that one graph (two: empty cache, and the rest) serves all of them, each
        block called with its own weights and its own layer's inputs; the patch embedding,
        time embedding and head run eagerly. Compiling costs about one block's tracing
        instead of ``num_layers``, for a little less fusion (none across blocks)."""
        compiled = partial(torch.compile, fullgraph=True, dynamic=False, mode=mode, options=options)
        if regional:
            steps = (partial(self._step, run_block=compiled(_first_chunk_block)),
                     partial(self._step, run_block=compiled(_one_block)))
        else:
            steps = (compiled(self._first_chunk_step), compiled(self._step))
        self._compiled_steps = tuple(CapturedStep(step) for step in steps) if cuda_graphs else steps

    def drop_compiled_step(self) -> None:
        """Back to the eager chunk step (where the compiler failed on this device, say)."""
        self._compiled_steps = None

    def _first_chunk_step(self, x, t, text, sa) -> torch.Tensor:
        """The step of a chunk with nothing cached, compiled apart (static shapes): there the
        attended prefix is the chunk itself, and traced with the rest dynamo would fold that
        length into the general graph."""
        return self._step(x, t, text, sa)

    def _static_forward(self, x, t, text: TextContext, cache: StaticKVCache, update_cache: bool) -> torch.Tensor:
        """Host bookkeeping around one fixed-shape step: pad a partial piece to its step size,
        take positions and the attended buffer prefix from the cache, run the step, then
        record the chunk in the ring (and, with relative positions, shift the keys of an
        evicted window). Padded pieces of a prefix or a re-cache need a mask and run eagerly."""
        cfg = self.config
        B, _, num_frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        f = num_frames // pt
        if f > cache.chunk_frames:
            raise SelfForcingError(f"a forward of {f} frames does not fit this cache's {cache.chunk_frames}-frame chunks")
        n = cache.step_frames(f)
        t = self._per_frame(t, B, f, x.device).contiguous()  # one memory layout: one compiled graph
        x = x.contiguous()
        if f < n:
            x = F.pad(x, (0, 0, 0, 0, 0, (n - f) * pt))
            t = F.pad(t, (0, n - f))
        h, w = height // ph, width // pw
        cache.allocate(B, h * w, cfg.num_attention_heads, cfg.attention_head_dim, self.proj_out.weight.dtype, x.device)
        positions = cache.next_positions(f)
        positions = torch.cat([positions, positions[-1:].expand(n - f)])
        slots = cache.evict(f) if update_cache else None
        views = [cache.attended(layer, n) for layer in range(len(self.blocks))]
        sa = StaticAttnInputs(cache.chunk_rope(self.rope, positions, h, w), [k for k, _ in views],
                              [v for _, v in views], cache.attention_mask(f, n))
        compiled = getattr(self, "_compiled_steps", None)
        if compiled is None or sa.mask is not None:
            step = self._step
        elif cache.num_valid == 0:
            step = compiled[0]
        else:
            step = compiled[1]
            for view in sa.keys + sa.values:
                torch._dynamo.mark_dynamic(view, 1)  # the prefix grows while the cache fills
        text = cache.load_text(text, self.blocks)
        with self._attention_kernels():
            out = step(x, t, text, sa)[:, :, :num_frames]
        if update_cache:
            evicted = cache.commit_chunk(slots, shift=self._shift_keys)
            if evicted and cache.rope_positions == "relative":
                cache.rotate_non_sinks(*self.rope.frame_shift(-evicted), apply_rope)
        return out

    def _shift_keys(self, keys: torch.Tensor, frames: int) -> torch.Tensor:
        """Rotated keys (B, tokens, H, D) moved ``frames`` positions along time."""
        return apply_rope(keys, *self.rope.frame_shift(frames))

    def _with_context_frames(self, x, t, context, attention, frames, frames_t):
        """Run [context frames ; x] as one sequence, both halves at the same RoPE positions."""
        if attention is None or frames.shape != x.shape:
            raise SelfForcingError("context frames need a BlockCausal mask and must be shaped like the input")
        B, F = x.shape[0], x.shape[2]
        frames_t = torch.zeros(B, F, device=x.device) if frames_t is None else self._per_frame(frames_t, B, F, x.device)
        t = torch.cat([frames_t, self._per_frame(t, B, F, x.device)], dim=1)
        out = self(torch.cat([frames, x], dim=2), t, context, attention=_TeacherForcingMask(attention))
        return out[:, :, F:]

    @staticmethod
    def _per_frame(t: torch.Tensor, batch: int, frames: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            t = t[:, None].expand(-1, frames)
        if t.shape != (batch, frames):
            raise SelfForcingError(f"timesteps must have shape ({batch},) or ({batch}, {frames}), got {tuple(t.shape)}")
        return t

    def _self_attn_inputs(self, f, h, w, attention, kv_cache, update_cache) -> SelfAttnInputs:
        tokens_per_frame = h * w
        device = self.rope.cos_table.device
        if kv_cache is None:
            positions = torch.arange(f)
            if isinstance(attention, _TeacherForcingMask):
                positions = positions % (f // 2)  # a clean frame and its noisy twin share a position
            rope = self.rope(positions, h, w)
            mask = None
            if attention is not None:
                frame_mask = attention.frame_mask(f, device)
                mask = frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
            return SelfAttnInputs(rope, rope, mask)
        query_pos = kv_cache.next_positions(f)
        key_pos = torch.cat([kv_cache.positions(), query_pos])
        key_mask = kv_cache.key_mask()
        mask = None if key_mask is None else torch.cat(
            [key_mask, torch.ones(f * tokens_per_frame, dtype=torch.bool)]).to(device, non_blocking=True)[None]
        slots = kv_cache.evict(f) if update_cache else None
        return SelfAttnInputs(self.rope(query_pos, h, w), self.rope(key_pos, h, w), mask, kv_cache, slots,
                              kv_cache.num_valid, kv_cache.overwrites)

    # ---- persistence -----------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Load a transformer directory: diffusers ``WanTransformer3DModel`` (config.json +
        safetensors, sharded or not) or original Wan (``WanModel`` config and key names)."""
        from safetensors.torch import load_file

        from selfforcing.models.convert import detect_format, original_to_diffusers

        path = _transformer_dir(Path(path))
        config = WanConfig.read(path)
        if (path / WEIGHTS_NAME).is_file():
            shards = [path / WEIGHTS_NAME]
        elif (path / WEIGHTS_INDEX_NAME).is_file():
            index = load_json(path / WEIGHTS_INDEX_NAME)
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) \
                    or not all(isinstance(name, str) for name in index["weight_map"].values()):
                raise SelfForcingError(f"{path / WEIGHTS_INDEX_NAME} has no weight_map of tensor names to files")
            shards = [path / name for name in sorted(set(index["weight_map"].values()))]
        else:
            raise SelfForcingError(f"no weights in {path}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
        state = {}
        for shard in shards:
            if not shard.is_file():
                raise SelfForcingError(f"weight shard {shard} is missing")
            state.update(load_file(shard))
        if detect_format(state) == "original":
            state = original_to_diffusers(state)
        model = cls(config)
        model.load_weights(state)
        return model.to(device=device, dtype=dtype)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Strictly load diffusers-named weights, naming any missing or unexpected key."""
        from selfforcing.models.convert import check_keys

        check_keys(set(self.state_dict()), set(state))
        mismatched = [
            f"{k}: {tuple(v.shape)} vs {tuple(self.state_dict()[k].shape)}"
            for k, v in state.items() if v.shape != self.state_dict()[k].shape
        ]
        if mismatched:
            raise SelfForcingError("checkpoint shapes do not match the model config: " + "; ".join(mismatched[:10]))
        self.load_state_dict(state)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json + safetensors in diffusers' layout (each file atomically)."""
        from safetensors.torch import save_file

        from selfforcing.utils import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2))
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
