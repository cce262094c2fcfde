"""Experiment configs: validation with clear messages, and the shipped configs."""

from pathlib import Path

import pytest

from factories import tiny_config
from selfforcing.errors import SelfForcingError
from selfforcing.training.config import config_from_dict, load_config

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs", "toy").glob("*.yaml"))  # training configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.steps > 0


def test_each_holistic_loss_has_a_shipped_config_that_selects_it():
    losses = {load_config(p).loss.name for p in CONFIGS if load_config(p).paradigm.name == "self_forcing"}
    assert losses == {"dmd", "sid", "gan"}


@pytest.mark.parametrize("change,message", [
    ({"bogus": 1}, "unknown config keys in top level: bogus"),
    ({"loss": {"name": "dmd", "sid_alpha": 2.0}}, "loss.sid_alpha is set but does not apply"),
    ({"loss": {"name": "dmd", "typo_key": 2.0}}, "unknown config keys in loss: typo_key"),
    ({"loss": {"name": "sidd"}}, "loss.name must be one of"),
    ({"paradigm": {"name": "teacher"}}, "loss dmd needs a generator paradigm"),
    ({"paradigm": {"name": "teacher"}, "loss": {"name": "ode"}}, "paradigm teacher trains with loss denoising"),
    ({"teacher": None}, "needs a teacher"),
    ({"data": {"source": "prompts"}}, "data.source prompts needs data.path"),
    ({"data": {"num_frames": 7}}, "not a multiple of paradigm.frames_per_chunk"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"data": {"caption_dropout": 0.1}}, "caption_dropout only applies to paradigm teacher"),
])
def test_bad_configs_name_the_problem(tmp_path, change, message):
    cfg = tiny_config(tmp_path, teacher={"path": "somewhere"})
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    with pytest.raises(SelfForcingError, match=message):
        config_from_dict(cfg)


def test_missing_or_unparsable_config_file(tmp_path):
    with pytest.raises(SelfForcingError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(SelfForcingError, match="cannot parse"):
        load_config(tmp_path / "bad.yaml")
