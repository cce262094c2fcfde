import math

import pytest
import torch

from factories import tiny_config
from selfforcing.cli import main
from selfforcing.eval.dmd_probe import probe_dmd
from selfforcing.training.config import config_from_dict
from selfforcing.training.trainer import Trainer


def trainer(tmp_path, teacher_dir, **sections):
    cfg = tiny_config(tmp_path / "run", teacher={"path": str(teacher_dir)}, **sections)
    return Trainer(config_from_dict(cfg))


def test_at_initialisation_the_dmd_gradient_is_all_guidance(tmp_path, teacher_dir):
    figures = probe_dmd(trainer(tmp_path, teacher_dir), videos=4, draws=3)
    # the critic starts as a copy of the teacher: it knows nothing more, and adds nothing to the gradient
    assert figures["critic_gain"] == pytest.approx(0.0, abs=1e-12)
    assert figures["learned_share"] == pytest.approx(0.0, abs=1e-12)
    assert figures["coherence_if_noise"] == pytest.approx(1 / math.sqrt(3))
    assert 0.0 < figures["coherence"] <= 1.0
    for key in [k for k in figures if k.startswith("object_push/learned/")]:
        assert figures[key] == pytest.approx(0.0, abs=1e-9)
        assert figures[key.replace("learned", "update")] == pytest.approx(figures[key.replace("learned", "guidance")])


def test_object_push_is_positive_towards_the_background_and_negative_away():
    from selfforcing.data.toy_world import OBJECT_COLORS
    from selfforcing.eval.dmd_probe import _object_push
    from selfforcing.models.vae import PixelCodec

    codec = PixelCodec(2)
    video = torch.full((1, 3, 2, 16, 16), -1.0)
    video[:, 2] = -0.2  # a dark blue background
    red = torch.tensor(OBJECT_COLORS["red"], dtype=torch.float64) / 127.5 - 1
    video[..., 4:10, 4:10] = red.view(3, 1, 1, 1).float()
    x = codec.encode(video).double()
    fade = torch.zeros_like(video, dtype=torch.float64)
    fade[..., 4:10, 4:10] = (video[..., :1, :1] - video[..., 4:5, 4:5]).double()  # object -> background colour
    updates = torch.stack([codec.encode(fade), -codec.encode(fade)])
    pushes = _object_push(codec, x, updates, torch.tensor([[0.1], [0.9]]))
    assert [band for band, _ in pushes] == [0, 4]
    assert pushes[0][1] > 0 and pushes[1][1] < 0


def test_a_changed_critic_shows_in_the_split_and_one_draw_is_fully_coherent(tmp_path, teacher_dir):
    t = trainer(tmp_path, teacher_dir)
    with torch.no_grad():
        for p in t.critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    figures = probe_dmd(t, videos=2, draws=1)
    assert figures["critic_gain"] != 0.0 and 0.0 < figures["learned_share"] < 1.0
    assert figures["coherence"] == pytest.approx(1.0)  # one draw: the mean is the draw itself


def test_the_command_probes_a_run_and_refuses_other_losses(tmp_path, teacher_dir, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", teacher={"path": str(teacher_dir)})))
    assert main(["train", str(config)]) == 0
    assert main(["dmd-probe", str(config), "--resume", "--videos", "2", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    assert f"test at step 2 of {tmp_path / 'run'}: critic_gain" in out
    assert "object_push (> 0: towards the background) by score timestep: t " in out
    assert main(["dmd-probe", str(config), "--set", "loss.name=gan"]) == 2
    assert "dmd-probe needs a DMD config; its loss is 'gan'" in capsys.readouterr().err
