"""The dry-run memory planner: counts match the real networks, sharding divides what it should,
and the shipped Wan config plans without its weights on this machine."""

from pathlib import Path

import pytest

from factories import tiny_config
from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.training import loading
from selfforcing.training.config import config_from_dict
from selfforcing.training.memory import GIB, format_plan, plan_memory

WAN_DMD = Path(__file__).parents[2] / "configs" / "wan" / "self_forcing_dmd.yaml"


def _cfg(tmp_path, teacher_dir, **sections):
    return config_from_dict(tiny_config(tmp_path, **{"teacher": {"path": str(teacher_dir)}, **sections}))


def _rows(plan):
    return {r.role: r for r in plan.rows}


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_real_networks(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir)
    rows = _rows(plan_memory(cfg, 1))
    generator = _numel(loading.load_generator(cfg.model))
    teacher = _numel(loading.load_score_model(cfg.teacher, "teacher"))
    assert rows["generator"].parameters == rows["EMA"].parameters == generator
    assert rows["teacher"].parameters == rows["critic"].parameters == teacher  # critic: a copy of the teacher
    assert rows["generator"].params_gib == pytest.approx(generator * 4 / GIB)


def test_sharded_state_scales_as_one_over_n_and_the_rest_does_not(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir)
    one, four = plan_memory(cfg, 1), plan_memory(cfg, 4)
    for a, b in zip(one.rows, four.rows):
        assert (b.params_gib, b.grads_gib, b.optim_gib) == pytest.approx(
            (a.params_gib / 4, a.grads_gib / 4, a.optim_gib / 4))
    assert (four.gathered_gib, four.activations_gib, four.kv_cache_gib) == (
        one.gathered_gib, one.activations_gib, one.kv_cache_gib)
    assert one.kv_cache_gib > 0 and one.activations_gib > 0


def test_trained_networks_hold_gradients_and_adamw_state_frozen_ones_do_not(tmp_path, teacher_dir):
    rows = _rows(plan_memory(_cfg(tmp_path, teacher_dir), 2))
    for role in ("generator", "critic"):
        r = rows[role]
        assert (r.grads_gib, r.optim_gib) == pytest.approx((r.params_gib, 2 * r.params_gib))
    for role in ("teacher", "EMA"):
        assert rows[role].params_gib > 0 and rows[role].grads_gib == rows[role].optim_gib == 0


def test_gan_head_is_trained_and_not_sharded(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, loss={"name": "gan", "generator_every": 2})
    head = _rows(plan_memory(cfg, 8))["GAN head"]
    assert head.params_gib == pytest.approx(head.parameters * 4 / GIB)
    assert head.optim_gib == pytest.approx(2 * head.params_gib)


def test_supervised_activations_follow_the_documented_estimate(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, paradigm={"name": "teacher", "gradient_checkpointing": True},
                                       loss={"name": "denoising"}))
    plan = plan_memory(cfg, 1)
    # toy preset + TINY: 2 layers, dim 32, ffn 64; 2 videos x 6 frames x (16/2/2)^2 tokens
    tokens, layers, dim, ffn = 2 * 6 * 4 * 4, 2, 32, 64
    assert plan.tokens == tokens
    saved, internals = layers * tokens * dim * 2, tokens * (5 * dim + 2 * ffn) * 2
    assert plan.activations_gib * GIB == pytest.approx(saved + internals)
    assert plan.kv_cache_gib == 0 and [r.role for r in plan.rows] == ["generator", "EMA"]


def test_long_horizon_options_plan_their_cache_and_windows(tmp_path, teacher_dir):
    """A long rollout's cache holds kv_cache_frames whatever the rollout's length; a rolling
    window keeps whole windows for its backward, more than one chunk at a time."""
    released = plan_memory(_cfg(tmp_path, teacher_dir), 1)
    long = plan_memory(_cfg(tmp_path, teacher_dir, paradigm={
        "name": "self_forcing", "rollout_frames": 60, "kv_cache_frames": 3, "hide_first_chunk_from_last": False}), 1)
    # 3 frames seen, and the video's 6 more kept hidden (nothing an exit step saw is overwritten before its backward)
    assert long.kv_cache_gib == pytest.approx(released.kv_cache_gib * 9 / 6)
    rolling = plan_memory(_cfg(tmp_path, teacher_dir, paradigm={
        "name": "self_forcing", "rolling_window": True, "context_from": "final", "hide_first_chunk_from_last": False}), 1)
    assert rolling.activations_gib > released.activations_gib and rolling.kv_cache_gib == released.kv_cache_gib


def test_effective_batch_uses_the_accumulation_at_this_world_size(tmp_path, teacher_dir):
    plan = plan_memory(_cfg(tmp_path, teacher_dir, optim={"total_batch_size": 16, "grad_accum": 1}), 4)
    assert (plan.grad_accum, plan.effective_batch) == (2, 16)
    assert "= 16" in format_plan(plan)


def test_missing_model_path_without_a_size_in_its_name_is_an_error(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir, teacher={"path": str(tmp_path / "nowhere")})
    with pytest.raises(SelfForcingError, match="teacher.path .*nowhere does not exist"):
        plan_memory(cfg, 8)


def test_wan_dmd_config_dry_runs_without_its_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's relative wan_models/ paths exist nowhere here
    assert main(["train", str(WAN_DMD), "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "| teacher | 14.29 B |" in out and "| generator | 1.42 B |" in out and "| critic | 1.42 B |" in out
    assert "preset wan2.1-14b" in out and "**total per GPU**" in out
    assert "effective batch: 1 per GPU x 8 GPUs x 8 accumulation = 64" in out


def test_world_size_needs_dry_run(capsys):
    assert main(["train", str(WAN_DMD), "--world-size", "8"]) == 2
    assert "--dry-run" in capsys.readouterr().err
