"""FSDP2 data parallelism on CPU (gloo): `selfforcing train` under torchrun with 2 processes
matches one process on the same global batch, and writes a checkpoint and a loadable model.

The run is made independent of the world size: ODE initialisation with a single few-step
timestep (so the per-chunk step index, its only random choice, is always 0) on a fixed
pairs file, and every rank takes its slice of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from factories import TINY

TIMEOUT_S = 300
CONFIG = {
    "name": "fsdp-check",
    "steps": 3,
    "seed": 0,
    "device": "cpu",
    "model": {"preset": "toy", "overrides": TINY},
    "text_encoder": {"type": "hash", "dim": 16, "max_length": 8},
    "vae": {"type": "pixel", "patch": 2},
    "data": {"source": "ode_pairs", "batch_size": 2, "num_frames": 3, "height": 16, "width": 16},
    "paradigm": {"name": "ode", "frames_per_chunk": 3, "denoising_steps": [1000]},
    "loss": {"name": "ode"},
    "optim": {"lr": 1e-3, "ema_decay": 0.9, "grad_clip": 100.0},
    "logging": {"progress": False, "tensorboard": False, "log_every": 1, "checkpoint_every": 2},
}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # stacks on abort
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after {TIMEOUT_S} s\nstderr:\n{e.stderr}")


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Train the same config once with one process (batch 2) and once with two (batch 1 each)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    from selfforcing.training.paradigms.ode import save_pairs

    root = tmp_path_factory.mktemp("fsdp")
    g = torch.Generator().manual_seed(0)
    trajectories = torch.randn(4, 2, 12, 3, 8, 8, generator=g)  # (N, S+1, C, F, h, w): 16x16 px, pixel VAE
    save_pairs(root / "pairs.safetensors", trajectories, ["a red fox", "a cat", "a dog plays piano", "the garden"],
               timesteps=torch.tensor([1000.0]))
    (root / "cfg.yaml").write_text(yaml.safe_dump(
        {**CONFIG, "output_dir": str(root / "unused"), "data": {**CONFIG["data"], "path": str(root / "pairs.safetensors")}}
    ))

    single = root / "single"
    proc = _run([sys.executable, "-m", "selfforcing", "train", "cfg.yaml", "--set", f"output_dir={single}"], root)
    assert proc.returncode == 0, f"single-process training failed:\n{proc.stderr}"

    multi = root / "multi"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = _run([*launcher, "-m", "selfforcing", "train", "cfg.yaml", "--set", f"output_dir={multi}",
                 "--set", "data.batch_size=1"], root)
    if proc.returncode != 0 and not (multi / "checkpoints").exists():
        # Tell "torchrun cannot start here" (no sockets, sandbox) apart from a training failure.
        probe = _run([*launcher, "-c", "import torch.distributed as d; d.init_process_group('gloo'); "
                      "d.barrier(); d.destroy_process_group()"], root)
        if probe.returncode != 0:
            pytest.skip(f"torchrun with gloo cannot start here:\n{probe.stderr[-2000:]}")
    assert proc.returncode == 0, f"2-process training failed:\n{proc.stderr}"
    return {"single": single, "multi": multi, "root": root}


def test_two_processes_match_one(runs):
    single, multi = _metrics(runs["single"]), _metrics(runs["multi"])
    assert [m["step"] for m in single] == [m["step"] for m in multi] == [1, 2, 3]
    for a, b in zip(single, multi):
        assert b["generator_loss"] == pytest.approx(a["generator_loss"], rel=1e-4), (a, b)
        # clip_grad_norm_ over sharded (DTensor) gradients gives the global norm
        assert b["generator_grad_norm"] == pytest.approx(a["generator_grad_norm"], rel=1e-4), (a, b)

    from selfforcing.models import CausalWanModel

    w1 = CausalWanModel.from_pretrained(runs["single"] / "model" / "transformer").state_dict()
    w2 = CausalWanModel.from_pretrained(runs["multi"] / "model" / "transformer").state_dict()
    assert w1.keys() == w2.keys()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-4, f"exported weights differ by {diff}"


def test_two_processes_write_checkpoint_and_model(runs):
    from safetensors.torch import load_file

    from selfforcing.inference import StreamingPipeline
    from selfforcing.models import CausalWanModel

    ckpts = runs["multi"] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000003"
    assert (ckpts / "step-0000002" / "state.pt").is_file()
    final = ckpts / "step-0000003"
    for name in ("student", "ema"):
        weights = load_file(str(final / f"{name}.safetensors"))  # full (unsharded) tensors
        reference = load_file(str(runs["single"] / "checkpoints" / "step-0000003" / f"{name}.safetensors"))
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.items()}
    state = torch.load(final / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["data_position"] == 6 and len(state["noise_rng"]) == 2
    # the exported model is the EMA
    ema = load_file(str(final / "ema.safetensors"))
    exported = CausalWanModel.from_pretrained(runs["multi"] / "model" / "transformer").state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)

    model_dir = runs["multi"] / "model"
    assert (model_dir / "selfforcing.json").is_file()
    pipe = StreamingPipeline.from_pretrained(model_dir)
    video = pipe.generate("a red fox", num_frames=3, seed=0)
    assert video.shape == (1, 3, 16, 16, 3) and video.dtype == torch.uint8
