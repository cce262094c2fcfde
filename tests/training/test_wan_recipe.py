"""The shipped Wan2.1 recipes (configs/wan/) run end to end on the CPU with tiny random models
in the real layouts: diffusers directories written by diffusers' own ``save_pretrained`` (a
real score of another width than the critic), an original-format Self-Forcing ``ode_init.pt``
for the generator, and a UMT5 prompt-embedding cache. Only sizes and paths are overridden.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factories import TEXT_DIM, Z_DIM, randomize_, write_tiny_diffusers_wan_pipeline
from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.models.convert import diffusers_to_original
from selfforcing.models.wan import CausalWanModel
from selfforcing.training.config import load_config
from selfforcing.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "wan"
PROMPTS = ["a red fox in the garden", "a cat plays piano", "a dog in the garden", "the red cat"]


def write_transformer(path: Path, heads: int, seed: int, in_channels: int = Z_DIM) -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    randomize_(model, seed=seed, std=0.05).save_pretrained(path)


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wan")
    write_tiny_diffusers_wan_pipeline(root / "Wan2.1-T2V-1.3B")
    write_transformer(root / "Wan2.1-T2V-14B", heads=3, seed=7)  # the real score: another width
    # The official ode_init.pt: {"generator": original-format keys under the wrapper's "model." prefix}.
    init = CausalWanModel.from_pretrained(root / "Wan2.1-T2V-1.3B").state_dict()
    init = {k: v + 0.01 for k, v in init.items()}
    torch.save({"generator": {f"model.{k}": v for k, v in diffusers_to_original(init).items()}}, root / "ode_init.pt")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["data", "encode-prompts", str(root / "prompts.txt"), "--model", str(root / "Wan2.1-T2V-1.3B"),
                 "-o", str(root / "text.safetensors")]) == 0
    return {"root": root, "init": init}


def settings(wan: dict, output: Path, steps: int, **extra) -> dict:
    root = wan["root"]
    return {
        "output_dir": output, "steps": steps, "device": "cpu",
        "model.path": root / "Wan2.1-T2V-1.3B", "model.init": root / "ode_init.pt",
        "teacher.path": root / "Wan2.1-T2V-14B", "critic.path": root / "Wan2.1-T2V-1.3B",
        "text_encoder.path": root / "text.safetensors", "data.path": root / "prompts.txt",
        "data.num_frames": 6, "data.height": 32, "data.width": 32, "loss.generator_every": 2,
        "optim.total_batch_size": 2, "optim.ema_start": 1, "logging.log_every": 1, "logging.checkpoint_every": 1,
        "logging.sample_every": 0, "logging.tensorboard": False, "logging.progress": False, **extra,
    }


def as_args(values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def overrides(wan: dict, output: Path, steps: int, **extra) -> list[str]:
    return as_args(settings(wan, output, steps, **extra))


def ode_settings(wan: dict, output: Path, pairs: Path) -> dict:
    """The ODE-init config at test size: no critic, no init checkpoint, pairs instead of prompts."""
    drop = ("critic.", "model.init", "loss.generator_every", "data.path", "teacher.")
    kept = {k: v for k, v in settings(wan, output, 1).items() if not k.startswith(drop)}
    return {**kept, "data.path": pairs, "data.num_frames": 3, "optim.total_batch_size": 1,
            "teacher.path": wan["root"] / "Wan2.1-T2V-1.3B"}


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_generator_starts_from_the_official_ode_init_and_the_scores_from_their_own_models(wan, tmp_path):
    cfg = load_config(CONFIGS / "self_forcing_dmd.yaml",
                      {"output_dir": str(tmp_path), "device": "cpu", **_nested(overrides(wan, tmp_path, 1))})
    trainer = Trainer(cfg)
    student = trainer.student.state_dict()
    assert all(torch.equal(student[k], v) for k, v in wan["init"].items())
    assert trainer.teacher.config.num_attention_heads == 3 and trainer.critic.config.num_attention_heads == 2
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.grad_accum == 2  # total_batch_size 2 = batch 1 x 1 process x 2 micro-batches
    neg = trainer.objective.uncond_text
    assert neg.abs().sum() > 0  # Wan's negative prompt, embedded once, from the cache
    frames = trainer.sample_video(trainer._sample_prompt())  # a cached prompt, decoded by the Wan VAE
    assert frames.shape == (21, 32, 32, 3) and frames.dtype == torch.uint8


@pytest.mark.parametrize("config", ["self_forcing_dmd.yaml", "self_forcing_sid.yaml"])
def test_wan_recipe_trains_checkpoints_and_resumes_exactly(wan, tmp_path, config):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", str(CONFIGS / config), *overrides(wan, whole, 4)]) == 0
    assert main(["train", str(CONFIGS / config), *overrides(wan, split, 2)]) == 0
    assert main(["train", str(CONFIGS / config), "--resume", *overrides(wan, split, 4)]) == 0
    a, b = metrics(whole), metrics(split)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "it_per_s"} == {k: v for k, v in y.items() if k != "it_per_s"}
    w1 = CausalWanModel.from_pretrained(whole / "model").state_dict()
    w2 = CausalWanModel.from_pretrained(split / "model").state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)

    # The exported model streams with UMT5 (the cache's source) and the Wan VAE linked from the generator's directory.
    from selfforcing.inference import StreamingPipeline

    assert json.loads((whole / "model" / "selfforcing.json").read_text())["text_encoder"]["type"] == "umt5"
    video = StreamingPipeline.from_pretrained(whole / "model").generate("a cat in the garden", num_frames=9, seed=0)
    assert video.shape == (1, 9, 32, 32, 3)


def test_wan_recipe_runs_under_torchrun_with_two_gloo_processes(wan, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "selfforcing",
           "train", str(CONFIGS / "self_forcing_dmd.yaml"), *overrides(wan, tmp_path / "run", 2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = metrics(tmp_path / "run")
    assert [m["step"] for m in logs] == [1, 2] and all(torch.isfinite(torch.tensor(m["critic_loss"])) for m in logs)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000002"


def test_bad_wan_configs_give_one_clear_line(wan, tmp_path, capsys):
    root = wan["root"]
    write_transformer(root / "teacher-8ch", heads=3, seed=8, in_channels=8)
    bad_teacher = overrides(wan, tmp_path / "a", 1, **{"teacher.path": root / "teacher-8ch"})
    assert main(["train", str(CONFIGS / "self_forcing_dmd.yaml"), *bad_teacher]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "teacher does not fit the generator" in err and "in_channels 8 vs 4" in err

    assert main(["train", str(CONFIGS / "self_forcing_dmd.yaml"), "--set", "loss.guidance=3"]) == 2
    assert "unknown config keys in loss: guidance" in capsys.readouterr().err

    from selfforcing.training.paradigms.ode import save_pairs

    pairs = tmp_path / "pairs.safetensors"  # states labelled on the shift-5 axis, the config says shift 8
    save_pairs(pairs, torch.zeros(2, 5, Z_DIM, 3, 4, 4), PROMPTS[:2], torch.tensor([1000.0, 937.5, 833.3, 625.0]))
    assert main(["train", str(CONFIGS / "ode_init.yaml"), *as_args(ode_settings(wan, tmp_path / "b", pairs))]) == 2
    err = capsys.readouterr().err
    assert "hold states at timesteps 1000.0/937.5/833.3/625.0" in err and "1000.0/960.0/888.9/727.3" in err


def test_ode_pairs_follow_the_released_script_and_train_the_ode_init(wan, tmp_path):
    """shift 8, 48 Euler steps, states 0/12/24/36 + end, labelled 1000/960/888.9/727.3."""
    pairs = tmp_path / "pairs.safetensors"
    args = as_args(ode_settings(wan, tmp_path / "out", pairs))
    config = tmp_path / "ode_init.yaml"  # `ode-pairs` takes no --set: write the overridden config
    import yaml

    from selfforcing.training.config import load_config

    config.write_text(yaml.safe_dump(load_config(CONFIGS / "ode_init.yaml", _nested(args)).to_dict(), allow_unicode=True))
    assert main(["ode-pairs", str(config), "--prompts", str(wan["root"] / "prompts.txt")]) == 0
    from selfforcing.training.paradigms.ode import OdePairs

    stored = OdePairs.load(pairs)
    torch.testing.assert_close(stored.timesteps, torch.tensor([1000.0, 960.0, 888.8889, 727.2727]), atol=1e-3, rtol=0)
    assert stored.trajectories.shape == (4, 5, Z_DIM, 3, 4, 4)
    assert main(["train", str(config)]) == 0


def _nested(args: list[str]) -> dict:
    from selfforcing.cli import _overrides

    return _overrides([a for a in args if a != "--set"])


def test_a_critic_is_only_for_distillation(tmp_path):
    with pytest.raises(SelfForcingError, match="critic is set but loss ode trains no critic"):
        load_config(CONFIGS / "ode_init.yaml", {"critic": {"path": str(tmp_path)}})
