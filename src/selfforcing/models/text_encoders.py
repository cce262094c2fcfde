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
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from selfforcing.errors import SelfForcingError


class TextEncoder(Protocol):
    """What the rest of the package needs from a text encoder."""

    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Return float32 embeddings of shape (B, max_length, dim) on the
        encoder's device, exactly zero at padded positions."""
        ...


def validate_prompts(prompts: list[str]) -> None:
    """Reject input that would silently produce a meaningless embedding."""
    if isinstance(prompts, str):
        # A bare string would otherwise be encoded character by character.
        raise SelfForcingError("prompts must be a list of strings, not a single string")
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise SelfForcingError("prompts must be a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise SelfForcingError(f"prompt {i} is not a string (got {type(prompt).__name__})")
        if not prompt.strip():
            raise SelfForcingError(f"prompt {i} is empty")


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
    ``text_encoder/`` and ``tokenizer/`` subdirectories (diffusers layout).
    ``dtype`` only applies to UMT5 weights; outputs are always float32.
    """
    if not isinstance(cfg, dict):
        raise SelfForcingError(f"text encoder config must be a mapping, got {type(cfg).__name__}")
    kind = cfg.get("type")
    if kind == "hash":
        return HashTextEncoder.from_config(cfg, device=device)
    if kind == "umt5":
        _check_keys(cfg, {"type", "dim", "max_length"})
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
    raise SelfForcingError(f"unknown text encoder type {kind!r}; expected 'hash' or 'umt5'")
