"""Tiny random models written to disk with their libraries' own ``save_pretrained`` (no downloads)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch


TEXT_DIM = 32  # tiny UMT5 width
Z_DIM = 4  # tiny Wan VAE latent channels
LATENTS_MEAN = [0.5, -0.25, 1.0, -1.5]  # non-trivial normalisation statistics
LATENTS_STD = [2.0, 0.5, 1.5, 3.0]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars draw."""

    def isatty(self) -> bool:
        return True


def tiny_t5_tokenizer():
    """A T5-style unigram tokenizer built in memory: no download, no sentencepiece run."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["a", "cat", "dog", "plays", "piano", "in", "the", "garden", "red", "fox"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in words]
    vocab += [(c, -5.0) for c in letters] + [(f"▁{c}", -4.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def write_tiny_umt5(root: Path) -> None:
    """``root/tokenizer`` and ``root/text_encoder`` as in a diffusers Wan pipeline."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")


def write_tiny_wan_vae(path: Path) -> None:
    """A tiny Wan2.1-style VAE (8x spatial, 4x temporal compression)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
    ).save_pretrained(path)


def write_tiny_diffusers_wan_pipeline(root: Path) -> Path:
    """A complete diffusers-layout Wan T2V directory with tiny random parts."""
    from diffusers import WanTransformer3DModel

    write_tiny_umt5(root)
    write_tiny_wan_vae(root / "vae")
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=Z_DIM, out_channels=Z_DIM,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    randomize_(transformer, std=0.05).save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Re-draw every parameter so no LayerNorm/RMSNorm weight is trivially 1 (tests see all of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# A toy-preset student at test size (12-channel pixel latents, hash text of width 16).
TINY = {"in_channels": 12, "out_channels": 12, "num_attention_heads": 2, "attention_head_dim": 16,
        "text_dim": 16, "freq_dim": 16, "ffn_dim": 64, "num_layers": 2}


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
        "optim": {"lr": 1e-3, "critic_lr": 1e-3, "ema_decay": 0.9, "ema_start": 0, "weight_decay": 0.0},
        "logging": {"progress": False, "tensorboard": False, "log_every": 1, "checkpoint_every": 100},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return copy.deepcopy(cfg)


def killed_write(final: Path, directory: bool = False) -> Path:
    """What a write of ``final`` killed by SIGKILL leaves (no cleanup runs): its temporary (holding
    ``b"half"``) and the temporary's lock file, which no live process holds. Returns the temporary."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from selfforcing.utils import temporary_beside\n"
        "with temporary_beside(Path(sys.argv[1]), directory=sys.argv[2] == '1') as tmp:\n"
        "    (tmp / 'student.safetensors' if tmp.is_dir() else tmp).write_bytes(b'half')\n"
        "    print(tmp, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(final), "1" if directory else "0"],
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    return Path(run.stdout.strip())


def shrink_rope(pipe, positions: int):
    """``pipe`` with its model's RoPE table cut to ``positions`` frames (the weights do not depend
    on it): a stream past the table's end in seconds instead of 1024 frames."""
    from dataclasses import replace

    from selfforcing.models.wan import Rope3D

    config = replace(pipe.model.config, rope_max_seq_len=positions)
    pipe.model.rope = Rope3D(config.attention_head_dim, positions).to(pipe.device)
    pipe.model.config = config
    return pipe
