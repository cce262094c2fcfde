"""Every network a training run needs, built from its config in one place.

The trainer, the ODE-pair command and the memory planner all come here, so a model is read
the same way everywhere. The paper's recipe has three transformers of different sizes: the
generator (1.3B, started from the ODE-init checkpoint), the real score (the frozen teacher,
Wan2.1-T2V-14B in the official DMD config) and the fake score (the critic, started from the
1.3B model). Each may be a diffusers or original-format Wan directory or a checkpoint file
with a preset; the text encoder may be a prompt-embedding cache so that UMT5-XXL never sits
beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfforcing.errors import SelfForcingError
from selfforcing.models.convert import check_weight_files, load_state_dict_file
from selfforcing.models.text_encoders import TextEncoder, text_encoder_from_config
from selfforcing.models.vae import VideoVAE, vae_from_config
from selfforcing.models.wan import CausalWanModel, WanConfig, preset
from selfforcing.schema import check_values
from selfforcing.training.config import ModelConfig, ScoreModelConfig, TrainConfig


# ---- architectures (no weights read: also what the memory planner builds on the meta device)
def generator_config(m: ModelConfig) -> WanConfig:
    if m.path:
        return WanConfig.read(m.path)
    check_values(WanConfig, m.overrides, "model.overrides")
    return WanConfig.from_dict({**preset(m.preset).to_dict(), **m.overrides})


def score_model_config(src: ScoreModelConfig, role: str) -> WanConfig:
    if Path(src.path).is_dir():
        return WanConfig.read(src.path)
    if src.preset is None:
        raise SelfForcingError(f"{role}.path {src.path} is not a model directory; a checkpoint file needs {role}.preset")
    return preset(src.preset)


# ---- networks with their weights
def load_generator(m: ModelConfig, device: torch.device | str = "cpu") -> CausalWanModel:
    """The trainable causal student: a saved model or a fresh preset, then ``init`` on top
    (ours, or an original Self-Forcing ``.pt`` such as the official ``ode_init.pt``)."""
    if m.path:
        check_weight_files(m.path)
    model = CausalWanModel.from_pretrained(m.path) if m.path else CausalWanModel(generator_config(m))
    if m.init:
        model.load_weights(load_state_dict_file(m.init, prefer="generator"))
    return model.to(device).train()


def load_score_model(src: ScoreModelConfig, role: str, device: torch.device | str = "cpu") -> CausalWanModel:
    """A bidirectional score network (teacher or critic init), frozen; the trainer unfreezes the critic."""
    path = Path(src.path)
    if path.is_dir():
        check_weight_files(path)
        model = CausalWanModel.from_pretrained(path)
    else:
        model = CausalWanModel(score_model_config(src, role))
        model.load_weights(load_state_dict_file(path, prefer="generator"))
    return model.to(device).eval().requires_grad_(False)


def check_compatible(generator: WanConfig, other: WanConfig, role: str) -> None:
    """A score network of another width or depth is fine; it must read and write the
    generator's latents and text embeddings, patch for patch."""
    keys = ("in_channels", "out_channels", "text_dim", "patch_size")
    mismatch = [f"{k} {getattr(other, k)} vs {getattr(generator, k)}" for k in keys
                if getattr(other, k) != getattr(generator, k)]
    if mismatch:
        raise SelfForcingError(f"the {role} does not fit the generator's latents/text ({role} vs generator): "
                               + ", ".join(mismatch))


def check_io(model: WanConfig, text_encoder: TextEncoder, vae: VideoVAE, role: str) -> None:
    if model.text_dim != text_encoder.dim:
        raise SelfForcingError(f"{role} text_dim {model.text_dim} does not match the text encoder ({text_encoder.dim})")
    if model.in_channels != vae.latent_channels:
        raise SelfForcingError(f"{role} in_channels {model.in_channels} does not match the VAE ({vae.latent_channels})")


# ---- conditioning and latents
def model_dir(cfg: TrainConfig) -> Path | None:
    """Where a ``umt5`` text encoder and a ``wan`` VAE are read from: the generator's directory."""
    return None if cfg.model.path is None else Path(cfg.model.path)


def load_text_encoder(cfg: TrainConfig, device: torch.device | str = "cpu") -> TextEncoder:
    return text_encoder_from_config(cfg.text_encoder, model_dir(cfg), device=device)


def load_vae(cfg: TrainConfig, device: torch.device | str = "cpu") -> VideoVAE:
    root = model_dir(cfg)
    return vae_from_config(cfg.vae, None if root is None else root / "vae", device=device)
