"""Every shipped toy experiment config trains (shrunk to test size), chained as in the paper:
teacher -> ODE pairs -> ODE init -> Self Forcing with DMD / SiD / GAN, plus the baselines."""

import sys
from pathlib import Path

import pytest
import yaml

from factories import TINY, Terminal
from selfforcing.cli import main
from selfforcing.training.config import merge_overrides

CONFIGS = Path(__file__).parents[2] / "configs" / "toy"


def shrink(name: str, tmp: Path, teacher_dir: Path, **extra) -> Path:
    """The shipped config with test-size model, data and run length; everything else as shipped."""
    overrides = {
        "output_dir": str(tmp / name), "steps": 2, "model": {"path": None, "preset": "toy", "overrides": TINY},
        "text_encoder": {"type": "hash", "dim": 16, "max_length": 8}, "vae": {"type": "pixel", "patch": 2},
        "data": {"batch_size": 2, "num_frames": 6, "height": 16, "width": 16},
        "logging": {"progress": False, "tensorboard": False},
        **extra,
    }
    if "teacher" in yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()):
        overrides["teacher"] = {"path": str(teacher_dir)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(merge_overrides(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), overrides)))
    return path


@pytest.mark.parametrize("name", ["teacher", "tf", "df", "sf_dmd", "sf_dmd_framewise", "sf_sid", "sf_gan",
                                  "tf_dmd", "df_dmd"])
def test_shipped_config_trains(tmp_path, teacher_dir, name, capsys):
    assert main(["train", str(shrink(name, tmp_path, teacher_dir))]) == 0, capsys.readouterr().err
    assert (tmp_path / name / "model" / "selfforcing.json").is_file()


def test_ode_pairs_then_ode_init(tmp_path, teacher_dir, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("a red circle bouncing on a black background\na blue square resting\n")
    pairs = tmp_path / "pairs.safetensors"
    config = shrink("ode_init", tmp_path, teacher_dir, data={"path": str(tmp_path / "elsewhere.safetensors"),
                                                             "batch_size": 2, "num_frames": 6, "height": 16, "width": 16})
    redirect = ["--set", f"data.path={pairs}"]  # --set works as for train
    with monkeypatch.context() as terminal:
        terminal.setattr(sys, "stderr", Terminal())
        assert main(["ode-pairs", str(config), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "8",
                     "--batch-size", "1", *redirect]) == 0
        progress = sys.stderr.getvalue()  # each teacher step of each batch of prompts
    assert "ode pairs, 2 prompts" in progress and "16/16" in progress and "2/2 prompts" in progress
    assert pairs.is_file() and not (tmp_path / "elsewhere.safetensors").exists()
    assert main(["train", str(config), *redirect]) == 0, capsys.readouterr().err
