"""Experiment configs: validation with clear messages, and the shipped configs."""

import re
from pathlib import Path

import pytest

from factories import tiny_config
from selfforcing.errors import SelfForcingError
from selfforcing.training.config import SHIPPED_MODELS, check_model_paths, config_from_dict, load_config

TOY = Path(__file__).parents[2] / "configs" / "toy"
CONFIGS = sorted(TOY.glob("*.yaml"))  # training configs


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
    ({"paradigm": {"context_from": "last"}}, "paradigm.context_from must be one of exit, final"),
    ({"paradigm": {"name": "diffusion_forcing", "context_from": "final"}}, "context_from final applies to self_forcing"),
    ({"loss": {"name": "dmd", "ode_clean_context": 0.2}}, "loss.ode_clean_context is set but does not apply"),
    # the long-horizon options (tiny_config: 6 frames in chunks of 3)
    ({"paradigm": {"rollout_frames": 10, "hide_first_chunk_from_last": False}},
     "rollout_frames 10 must be a multiple of frames_per_chunk"),
    ({"paradigm": {"rollout_frames": 3}}, "at least data.num_frames"),
    ({"paradigm": {"rollout_frames": 0}}, "paradigm.rollout_frames must be a positive integer, got 0"),
    ({"paradigm": {"kv_cache_frames": 4, "sink_frames": 2}}, r"kv_cache_frames \(4\) minus sink_frames \(2\)"),
    ({"paradigm": {"sink_frames": -1}}, "paradigm.sink_frames must be >= 0"),
    ({"paradigm": {"rollout_frames": 12}}, r"hide_first_chunk_from_last \(§3.4\) applies to a plain rollout"),
    ({"paradigm": {"rolling_window": True, "hide_first_chunk_from_last": False}}, "set context_from: final"),
    ({"paradigm": {"rolling_window": "yes"}}, "paradigm.rolling_window must be"),
    ({"paradigm": {"name": "diffusion_forcing", "rollout_frames": 12}}, "rollout_frames applies to self_forcing only"),
])
def test_bad_configs_name_the_problem(tmp_path, change, message):
    cfg = tiny_config(tmp_path, teacher={"path": "somewhere"})
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    with pytest.raises(SelfForcingError, match=message):
        config_from_dict(cfg)


@pytest.mark.parametrize("change,message", [
    ({"optim": {"lr": "3e-4"}}, "optim.lr must be a number, got '3e-4' (a string; YAML needs a dot and a signed "
                                "exponent to read a number: 3.0e-4)"),
    ({"optim": {"lr": "1e5"}}, "got '1e5' (a string; YAML needs a dot and a signed exponent to read a number: 1.0e+5)"),
    ({"optim": {"lr": "0.1"}}, "got '0.1' (a string: write it without quotes)"),
    ({"optim": {"lr": -1e-4}}, "optim.lr must be > 0, got -0.0001"),
    ({"optim": {"lr": float("nan")}}, "optim.lr must be a finite number, got nan"),
    ({"optim": {"critic_lr": float("inf")}}, "optim.critic_lr must be a finite number, got inf"),
    ({"optim": {"lr": None}}, "optim.lr must be a number, got null"),
    ({"optim": {"betas": [0.9, 1.0]}}, r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ({"optim": {"betas": 0.9}}, "optim.betas must be a list, got 0.9"),
    ({"optim": {"grad_clip": 0}}, "optim.grad_clip must be > 0, got 0"),
    ({"optim": {"ema_decay": 1.0}}, r"optim.ema_decay must be in \(0, 1\), got 1.0"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"steps": True}, "steps must be an integer, got true"),
    ({"steps": "10"}, "steps must be an integer, got '10' (a string: write it without quotes)"),
    ({"name": 5}, "name must be a string, got 5"),
    ({"logging": {"tensorboard": "yes please"}}, "logging.tensorboard must be true or false, got 'yes please'"),
    ({"vae": "pixel"}, "vae must be a mapping, got 'pixel'"),
    ({"data": "toy"}, "data must be a mapping of keys to values, got 'toy'"),
    ({"paradigm": {"denoising_steps": [1000, "x"]}}, r"paradigm.denoising_steps\[1\] must be an integer, got 'x'"),
    ({"paradigm": {"denoising_steps": [1000, 1001]}}, r"must be in \[1, 1000\], got 1001"),
    ({"paradigm": {"denoising_steps": []}}, "must list at least one timestep"),
    ({"loss": {"min_t": 1.5}}, r"loss.min_t must be in \[0, 1\], got 1.5"),
    ({"loss": {"min_t": 0.9, "max_t": 0.5}}, "loss.min_t 0.9 is above loss.max_t 0.5"),
    ({"critic": {"preset": "toy"}}, "missing config keys in critic: path"),
    ({"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_every_value_is_checked_against_its_type_and_range(tmp_path, change, message):
    cfg = tiny_config(tmp_path, teacher={"path": "somewhere"})
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    with pytest.raises(SelfForcingError, match=message if "\\" in message else re.escape(message)):
        config_from_dict(cfg)


def test_integers_are_numbers_and_the_values_are_kept_as_written(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, teacher={"path": "t"}, optim={"lr": 1, "betas": [0, 0.5]}))
    assert cfg.optim.lr == 1 and cfg.optim.betas == [0, 0.5]


def test_missing_or_unparsable_config_file(tmp_path):
    with pytest.raises(SelfForcingError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(SelfForcingError, match="is not a file"):
        load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("a: 1\nb: [1, 2")
    with pytest.raises(SelfForcingError, match="cannot parse .*bad.yaml: line 2, column 9: expected ',' or ']'"):
        load_config(tmp_path / "bad.yaml")


def test_a_missing_starting_model_names_the_run_that_writes_it_and_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative outputs/ paths exist nowhere here
    config = TOY / "tf.yaml"
    with pytest.raises(SelfForcingError) as missing:
        check_model_paths(load_config(config), config)
    assert str(missing.value) == (
        f"model.path outputs/toy/teacher/model in {config} does not exist; `selfforcing train {TOY / 'teacher.yaml'}` "
        f"writes it, or start from the shipped model of that run: --set model.path={SHIPPED_MODELS / 'toy-teacher'}")
    check_model_paths(load_config(config, {"model": {"path": str(SHIPPED_MODELS / "toy-teacher")}}), config)

    with pytest.raises(SelfForcingError, match=r"teacher.path outputs/toy/teacher/model .* does not exist; "
                                               r"`selfforcing train .*teacher.yaml` writes it, or start from"):
        check_model_paths(load_config(TOY / "ode_init.yaml"), TOY / "ode_init.yaml", roles=("teacher",))
    # a run of ours with no shipped model: the command alone
    with pytest.raises(SelfForcingError, match=r"ode_init/model in .* does not exist; `selfforcing train "
                                               r".*ode_init.yaml` writes it$"):
        check_model_paths(load_config(TOY / "sf_dmd.yaml"), TOY / "sf_dmd.yaml")
