"""Text encoders that turn prompts into the conditioning sequence of the DiT.

The Wan2.1 transformer cross-attends to a fixed-length sequence of text
embeddings of shape ``(B, max_length, dim)`` and has no text mask, so every
encoder here pads to ``max_length`` with *exact zeros*; anything else would
leak padding content into the video.

Two encoders exist:

* :class:`HashTextEncoder` -- no weights, no files. It gives the small default
  model a conditioning signal that is deterministic across machines, so the
  whole pipeline can be trained and tested offline.
* :class:`UMT5TextEncoder` -- the UMT5-XXL encoder that real Wan checkpoints
  were trained with, loaded from a local directory.
* :class:`CachedTextEncoder` -- UMT5 outputs precomputed by
  :func:`write_text_cache` (``selfforcing data encode-prompts``), so training at
  Wan scale never holds the 5.7B-parameter encoder beside three transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from selfforcing.errors import SelfForcingError
from selfforcing.utils import atomic_path, progress_bar

# Wan2.1's standard negative prompt, used by its own samplers and the official Self-Forcing configs.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class TextEncoder(Protocol):
    """What the rest of the package needs from a text encoder."""

    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Return float32 embeddings of shape (B, max_length, dim) on the
        encoder's device, exactly zero at padded positions."""
        ...


def validate_prompts(prompts: list[str], allow_empty: bool = False) -> None:
    """Reject input that would silently produce a meaningless embedding (``allow_empty``: an
    empty prompt is the zero embedding, as for a prompt cache's negative prompt)."""
    if isinstance(prompts, str):
        # A bare string would otherwise be encoded character by character.
        raise SelfForcingError("prompts must be a list of strings, not a single string")
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise SelfForcingError("prompts must be a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise SelfForcingError(f"prompt {i} is not a string (got {type(prompt).__name__})")
        if not allow_empty and not prompt.strip():
            raise SelfForcingError(f"prompt {i} is empty")


def negative_text(text_encoder: TextEncoder, prompt: str, device: torch.device | str) -> torch.Tensor:
    """(1, L, dim) embedding of the negative prompt (CFG and caption dropout), computed once;
    empty means all padding (zeros), the embedding caption dropout trains."""
    if not prompt.strip():
        return torch.zeros(1, text_encoder.max_length, text_encoder.dim, device=device)
    return text_encoder.encode([prompt]).to(device)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SelfForcingError(f"text encoder {name} must be a positive integer, got {value!r}")
    return value


class HashTextEncoder:
    """Deterministic bag-of-positioned-words encoder with no learned weights.

    Each word maps to a unit-variance Gaussian vector drawn from a stream of
    SHAKE-256 bytes of the word. The Gaussians are derived with Box-Muller in
    numpy float64 rather than with a torch/numpy RNG, so the values depend only
    on the word: not on an RNG implementation, the process or ``PYTHONHASHSEED``.
    A sinusoidal position code is added so that word order changes the output.
    """

    _WORD = re.compile(r"[a-z0-9]+")

    def __init__(self, dim: int = 64, max_length: int = 32, device: str | torch.device = "cpu"):
        self.dim = _check_positive_int("dim", dim)
        self.max_length = _check_positive_int("max_length", max_length)
        self.device = torch.device(device)
        self._word_vectors: dict[str, torch.Tensor] = {}
        self._positions = self._position_code(self.max_length, self.dim)

    def config(self) -> dict[str, Any]:
        return {"type": "hash", "dim": self.dim, "max_length": self.max_length}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: str | torch.device = "cpu") -> HashTextEncoder:
        _check_keys(cfg, {"type", "dim", "max_length"})
        return cls(dim=cfg.get("dim", 64), max_length=cfg.get("max_length", 32), device=device)

    def words(self, prompt: str) -> list[str]:
        """The tokens this encoder sees: lower-cased ASCII letter/digit runs."""
        return self._WORD.findall(prompt.lower())

    def encode(self, prompts: list[str]) -> torch.Tensor:
        validate_prompts(prompts)
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        for row, prompt in enumerate(prompts):
            words = self.words(prompt)[: self.max_length]
            for pos, word in enumerate(words):
                out[row, pos] = self._word_vector(word)
            out[row, : len(words)] += self._positions[: len(words)]
        return out.to(self.device)

    def _word_vector(self, word: str) -> torch.Tensor:
        vec = self._word_vectors.get(word)
        if vec is None:
            vec = self._gaussian(word, self.dim)
            self._word_vectors[word] = vec
        return vec

    @staticmethod
    def _gaussian(word: str, dim: int) -> torch.Tensor:
        pairs = (dim + 1) // 2
        raw = hashlib.shake_256(word.encode("utf-8")).digest(16 * pairs)
        bits = np.frombuffer(raw, dtype="<u8") >> np.uint64(11)  # keep 53 bits: exact in float64
        u = (bits.astype(np.float64) + 0.5) * 2.0**-53  # uniform in (0, 1), never 0
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = 2.0 * math.pi * u[pairs:]
        normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:dim]
        return torch.from_numpy(normals).to(torch.float32)

    @staticmethod
    def _position_code(length: int, dim: int) -> torch.Tensor:
        # Transformer-style code: sin on even channels, cos on odd ones.
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        code = torch.zeros(length, dim, dtype=torch.float64)
        code[:, 0::2] = torch.sin(pos * freq)
        code[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        return code.to(torch.float32)


class UMT5TextEncoder:
    """The UMT5 encoder used by Wan2.1, loaded from local files only."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int = 512):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = int(model.config.d_model)
        self.max_length = _check_positive_int("max_length", max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def config(self) -> dict[str, Any]:
        return {"type": "umt5", "dim": self.dim, "max_length": self.max_length}

    @classmethod
    def from_pretrained(
        cls,
        encoder_path: str | Path,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 512,
    ) -> UMT5TextEncoder:
        """Load from ``encoder_path``; in a diffusers pipeline layout the
        tokenizer lives in the sibling ``tokenizer/`` directory."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        _check_positive_int("max_length", max_length)  # before loading gigabytes of weights
        encoder_path = Path(encoder_path)
        if tokenizer_path is None:
            sibling = encoder_path.parent / "tokenizer"
            tokenizer_path = sibling if sibling.is_dir() else encoder_path
        tokenizer_path = Path(tokenizer_path)
        for what, path in (("text encoder", encoder_path), ("tokenizer", tokenizer_path)):
            if not path.is_dir():
                raise SelfForcingError(f"{what} directory not found: {path}")
        try:
            model = UMT5EncoderModel.from_pretrained(encoder_path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SelfForcingError(f"cannot load UMT5 text encoder from {encoder_path}: {exc}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SelfForcingError(f"cannot load tokenizer from {tokenizer_path}: {exc}") from exc
        return cls(model.to(device), tokenizer, max_length=max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        validate_prompts(prompts)
        # Wan's pipelines collapse runs of whitespace before tokenizing.
        prompts = [" ".join(p.split()) for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            padding_side="right",  # Wan puts the prompt first, padding after it
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # The encoder still writes values at padded positions; the DiT has no
        # mask, so zero them as Wan does.
        return hidden.float() * mask[..., None].float()


# --------------------------------------------------------------------------- prompt-embedding cache
#
# One safetensors file: ``lengths`` (N,) int64, then ``tokens`` (sum(lengths), dim), the
# non-padding rows of every prompt back to back. Padding rows are exact zeros (Wan zeroes
# them), so dropping them loses nothing and a Wan-scale cache is ~5x smaller than padded.
# Metadata: ``format``, ``prompts`` (JSON list, the order of ``lengths``), ``dim``,
# ``max_length`` and ``source`` (the encoder's config, so an exported model can name it).

TEXT_CACHE_FORMAT = "selfforcing-text-cache/1"
_REBUILD = "rebuild it with `selfforcing data encode-prompts`"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_MAX_HEADER = 100_000_000  # safetensors refuses to open files with a larger header


def _prompt_key(prompt: str) -> str:
    """Cache lookups ignore whitespace runs, as UMT5TextEncoder does before tokenizing, so a
    YAML negative prompt with a trailing newline still finds its embedding."""
    return " ".join(prompt.split())


def _short(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


def _unique_prompts(prompts: list[str]) -> list[str]:
    """Non-empty prompts, first occurrence of each kept, in order."""
    unique: dict[str, str] = {}
    for prompt in prompts:
        key = _prompt_key(prompt)
        if key and key not in unique:
            unique[key] = prompt
    return list(unique.values())


def _valid_lengths(embeddings: torch.Tensor) -> torch.Tensor:
    """(B,) rows up to and including each prompt's last non-zero row (0 if all zero)."""
    nonzero = embeddings.ne(0).any(dim=-1)  # (B, L); NaN counts as non-zero
    positions = torch.arange(1, embeddings.shape[1] + 1)
    return (nonzero * positions).amax(dim=1)


def _cache_header(num_prompts: int, num_rows: int, dim: int, dtype: torch.dtype, metadata: dict) -> bytes:
    """The safetensors JSON header: ``lengths`` first (its size is known up front), then ``tokens``."""
    lengths_end = 8 * num_prompts
    tokens_end = lengths_end + num_rows * dim * dtype.itemsize
    header = {
        "lengths": {"dtype": "I64", "shape": [num_prompts], "data_offsets": [0, lengths_end]},
        "tokens": {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [num_rows, dim],
                   "data_offsets": [lengths_end, tokens_end]},
        "__metadata__": metadata,
    }
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_text_cache(
    path: str | Path,
    prompts: list[str],
    encoder: TextEncoder,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Encode ``prompts`` once and store their embeddings for :class:`CachedTextEncoder`.

    Duplicates (up to whitespace) are encoded once and empty prompts are skipped: an empty
    prompt is the all-zero embedding, which needs no storage. Rows are streamed to disk a
    batch at a time, so a cache far larger than memory can be written; the file appears at
    ``path`` only when complete.
    """
    validate_prompts(prompts, allow_empty=True)
    _check_positive_int("batch_size", batch_size)
    if dtype not in _SAFETENSORS_DTYPES:
        raise SelfForcingError(f"text cache dtype must be float32, bfloat16 or float16, got {dtype}")
    unique = _unique_prompts(list(prompts))
    if not unique:
        raise SelfForcingError("no non-empty prompts to cache; empty prompts need no cache (they encode to zeros)")
    if sys.byteorder != "little":  # safetensors is little-endian; rows are written as raw bytes
        raise SelfForcingError("writing a text cache needs a little-endian machine")
    dim, max_length = int(encoder.dim), int(encoder.max_length)
    metadata = {"format": TEXT_CACHE_FORMAT, "prompts": json.dumps(unique, ensure_ascii=False),
                "dim": str(dim), "max_length": str(max_length)}
    if callable(getattr(encoder, "config", None)):
        metadata["source"] = json.dumps(encoder.config())
    # Reserve room for the header with the largest possible row count; the real header is
    # never longer and is padded with spaces (valid JSON whitespace, as safetensors does).
    reserved = len(_cache_header(len(unique), len(unique) * max_length, dim, dtype, metadata))
    reserved += -reserved % 8
    if reserved > _MAX_HEADER:
        raise SelfForcingError(
            f"{len(unique)} prompts make a text cache header of {reserved / 1e6:.0f} MB, over safetensors' "
            f"100 MB limit; split the prompt file and build one cache per part"
        )
    lengths: list[int] = []
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as out, progress_bar(
            total=len(unique), unit="prompt", desc="encoding prompts", quiet=not progress
        ) as bar:
            out.seek(8 + reserved + 8 * len(unique))
            for start in range(0, len(unique), batch_size):
                batch = unique[start : start + batch_size]
                lengths += _write_batch(out, encoder.encode(batch), len(batch), max_length, dim, dtype)
                bar.update(len(batch))
            header = _cache_header(len(unique), sum(lengths), dim, dtype, metadata)
            out.seek(0)
            out.write(reserved.to_bytes(8, "little") + header + b" " * (reserved - len(header)))
            out.write(np.asarray(lengths, dtype="<i8").tobytes())
    except OSError as error:
        raise SelfForcingError(f"cannot write text cache {path}: {error}") from None
    return Path(path)


def _write_batch(out: Any, embeddings: torch.Tensor, count: int, max_length: int, dim: int,
                 dtype: torch.dtype) -> list[int]:
    """Append the non-padding rows of one encoded batch; returns their lengths."""
    if tuple(embeddings.shape) != (count, max_length, dim):
        raise SelfForcingError(
            f"text encoder returned shape {tuple(embeddings.shape)} for {count} prompts, "
            f"expected {(count, max_length, dim)}"
        )
    embeddings = embeddings.detach().to("cpu", torch.float32)
    lengths = _valid_lengths(embeddings).tolist()
    for row, length in enumerate(lengths):
        rows = embeddings[row, :length].to(dtype).contiguous()
        out.write(rows.view(torch.uint8).numpy().tobytes())
    return lengths


class CachedTextEncoder:
    """Prompt embeddings looked up in a file written by :func:`write_text_cache`.

    Rows are read on demand from the memory-mapped file, so a cache of millions of prompts
    costs only its prompt index in memory. Outputs are float32, zero-padded to
    ``max_length``, and bit-identical to the source encoder's when the cache is float32.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        self._file: Any = None
        meta, lengths = self._read_index()
        self.dim = meta["dim"]
        self.max_length = meta["max_length"]
        self.prompts: list[str] = meta["prompts"]
        self.source_config: dict[str, Any] | None = meta["source"]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        self._index = {_prompt_key(p): (s, n) for p, s, n in zip(self.prompts, starts, lengths)}

    def config(self) -> dict[str, Any]:
        return {"type": "cache", "path": str(self.path.resolve())}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: str | torch.device = "cpu") -> CachedTextEncoder:
        _check_keys(cfg, {"type", "path"})
        path = cfg.get("path")
        if not isinstance(path, (str, Path)) or not str(path):
            raise SelfForcingError(
                f"a cache text encoder needs 'path', the file from `selfforcing data encode-prompts`; got {path!r}"
            )
        return cls(path, device=device)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        validate_prompts(prompts, allow_empty=True)
        spans = [self._span(prompt) for prompt in prompts]  # every lookup fails before any read
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        tokens = self._open().get_slice("tokens")
        for row, (start, length) in enumerate(spans):
            if length:
                out[row, :length] = tokens[start : start + length].float()
        return out.to(self.device)

    def _span(self, prompt: str) -> tuple[int, int]:
        key = _prompt_key(prompt)
        if not key:
            return 0, 0  # the empty prompt: all padding
        try:
            return self._index[key]
        except KeyError:
            raise SelfForcingError(
                f"prompt {_short(prompt)!r} is not in the text cache {self.path}; "
                f"{_REBUILD} from a prompt file that includes it"
            ) from None

    def _open(self) -> Any:
        """The open file, kept between calls: re-parsing a header of many prompts is slow."""
        from safetensors import SafetensorError, safe_open

        if self._file is None:
            if not self.path.is_file():
                raise SelfForcingError(
                    f"text cache {self.path} does not exist; build it with "
                    f"`selfforcing data encode-prompts PROMPTS.txt --model WAN_DIR -o {self.path}`"
                )
            try:
                self._file = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as error:
                message = f"text cache {self.path} is truncated or corrupt ({error}); {_REBUILD}"
                raise SelfForcingError(message) from None
        return self._file

    def _read_index(self) -> tuple[dict[str, Any], list[int]]:
        """Metadata and per-prompt lengths, checked against the token rows."""
        f = self._open()
        meta = f.metadata() or {}
        if meta.get("format") != TEXT_CACHE_FORMAT or not {"tokens", "lengths"} <= set(f.keys()):
            raise SelfForcingError(f"{self.path} is not a text cache (written by `selfforcing data encode-prompts`)")
        try:
            parsed = {"prompts": json.loads(meta["prompts"]), "dim": int(meta["dim"]),
                      "max_length": int(meta["max_length"]),
                      "source": json.loads(meta["source"]) if "source" in meta else None}
            lengths = f.get_tensor("lengths").tolist()
            shape = f.get_slice("tokens").get_shape()
        except (KeyError, ValueError) as error:
            raise SelfForcingError(f"text cache {self.path} has unreadable metadata ({error}); {_REBUILD}") from None
        consistent = (
            isinstance(parsed["prompts"], list) and all(isinstance(p, str) for p in parsed["prompts"])
            and len(parsed["prompts"]) == len(lengths) and parsed["dim"] > 0 and parsed["max_length"] > 0
            and all(0 <= n <= parsed["max_length"] for n in lengths)
            and shape == [sum(lengths), parsed["dim"]]
            and f.get_slice("lengths").get_dtype() == "I64"
            and f.get_slice("tokens").get_dtype() in _SAFETENSORS_DTYPES.values()
        )
        if not consistent:
            raise SelfForcingError(
                f"text cache {self.path} is inconsistent (prompts, lengths and rows disagree); {_REBUILD}"
            )
        return parsed, lengths

    def __getstate__(self) -> dict[str, Any]:
        # The open safetensors handle cannot be pickled (DataLoader workers, spawn); reopen lazily.
        return {**self.__dict__, "_file": None}


def _check_keys(cfg: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise SelfForcingError(
            f"unknown text encoder config key(s) {unknown} for type {cfg.get('type')!r}; "
            f"allowed: {sorted(allowed)}"
        )


def text_encoder_from_config(
    cfg: dict[str, Any],
    path: Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Build the encoder a model config asks for.

    ``path`` is the model directory; a ``"umt5"`` encoder is read from its
    ``text_encoder/`` and ``tokenizer/`` subdirectories (diffusers layout). A
    ``"cache"`` encoder reads its own ``path`` key (relative to the working directory).
    ``dtype`` only applies to UMT5 weights; outputs are always float32.
    """
    check_config(cfg)
    kind = cfg["type"]
    if kind == "hash":
        return HashTextEncoder.from_config(cfg, device=device)
    if kind == "umt5":
        if path is None:
            raise SelfForcingError("a umt5 text encoder needs a model directory, but none was given")
        path = Path(path)
        encoder = UMT5TextEncoder.from_pretrained(
            path / "text_encoder",
            path / "tokenizer",
            device=device,
            dtype=dtype,
            max_length=cfg.get("max_length", 512),
        )
        if "dim" in cfg and cfg["dim"] != encoder.dim:
            raise SelfForcingError(
                f"text encoder in {path / 'text_encoder'} has dim {encoder.dim}, config says {cfg['dim']}"
            )
        return encoder
    return CachedTextEncoder.from_config(cfg, device=device)


_CONFIG_KEYS = {"hash": {"type", "dim", "max_length"}, "umt5": {"type", "dim", "max_length"}, "cache": {"type", "path"}}


def check_config(cfg: Any) -> None:
    """Refuse a text encoder config that :func:`text_encoder_from_config` would refuse, without
    loading anything (``train --dry-run`` checks it too)."""
    if not isinstance(cfg, dict):
        raise SelfForcingError(f"text encoder config must be a mapping, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind not in _CONFIG_KEYS:
        raise SelfForcingError(f"unknown text encoder type {kind!r}; expected 'hash', 'umt5' or 'cache'")
    _check_keys(cfg, _CONFIG_KEYS[kind])
    for key in ("dim", "max_length"):
        value = cfg.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SelfForcingError(f"text encoder {key} must be a positive integer, got {value!r}")
