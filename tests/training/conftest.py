"""Tiny training setups shared by the training tests."""

import copy

import pytest
import torch

from selfforcing.models import CausalWanModel, WanConfig, preset

TINY = {"in_channels": 12, "out_channels": 12, "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 16, "freq_dim": 16, "ffn_dim": 64,
        "num_layers": 2}


def tiny_config(output_dir, **sections) -> dict:
    """A training config dict at test size; ``sections`` replace or extend the defaults."""
    cfg = {
        "name": "test", "output_dir": str(output_dir), "steps": 2, "seed": 0,
        "model": {"preset": "toy", "overrides": dict(TINY)},
        "text_encoder": {"type": "hash", "dim": 16, "max_length": 8},
        "vae": {"type": "pixel", "patch": 2},
        "data": {"source": "toy", "batch_size": 2, "num_frames": 6, "height": 16, "width": 16},
        "paradigm": {"name": "self_forcing", "frames_per_chunk": 3},
        "loss": {"name": "dmd", "generator_every": 2},
        "optim": {"lr": 1e-3, "critic_lr": 1e-3, "ema_decay": 0.9},
        "logging": {"progress": False, "tensorboard": False, "log_every": 1, "checkpoint_every": 100},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return copy.deepcopy(cfg)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A random tiny bidirectional 'teacher' saved in diffusers layout."""
    torch.manual_seed(123)
    model = CausalWanModel(WanConfig.from_dict({**preset("toy").to_dict(), **TINY}))
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    return path
