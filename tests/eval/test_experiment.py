"""The experiment runner end to end on its micro preset: every stage and method of the
shipped Table-2 plan trains, is evaluated and lands in the table."""

from pathlib import Path

import json

import pytest
import torch
import yaml

from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.eval.experiment import Plan, Runner

PLAN = Path(__file__).parents[2] / "configs" / "experiments" / "toy_table2.yaml"
SHIPPED_TEACHER = Path(__file__).parents[2] / "src" / "selfforcing" / "assets" / "toy-teacher"


def test_micro_table_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the plan's paths start from its root, not from here
    assert main(["experiment", str(PLAN), "--preset", "micro", "-o", str(tmp_path)]) == 0, capsys.readouterr().err
    root = tmp_path / "micro"
    table = (root / "table.md").read_text()
    for method in ("teacher_forcing", "diffusion_forcing", "tf_dmd", "df_dmd", "sf_dmd", "sf_dmd_framewise",
                   "sf_sid", "sf_gan", "sf_dmd_no_restriction"):
        assert f"| {method} |" in table
    assert "| ode_init (reference) |" in table  # the DMD family's starting point, scored per seed
    runner = Runner(Plan.load(PLAN), "micro", root=tmp_path)
    framewise = runner.stage_config(runner.plan.methods["sf_dmd_framewise"], tmp_path / "x", seed=0)
    assert framewise["model"]["path"] == str(root / "ode_init" / "model")  # the chunk-wise init, on 1-frame chunks
    assert framewise["paradigm"]["frames_per_chunk"] == 1
    assert "| teacher (reference) |" in table  # scored with its own many-step bidirectional sampler
    teacher_eval = json.loads((root / "eval" / "train" / "teacher-seed0" / "results.json").read_text())
    assert teacher_eval["sampler"]["bidirectional_euler_steps"] == 2
    assert not (root / "eval" / "long" / "teacher-seed0").exists()  # no rollout: training length only
    assert "train length" in table and "long length" in table
    assert (root / "summary.json").is_file() and list((root / "plots" / "long").glob("*.png"))
    assert (root / "plots" / "long" / "samples.png").stat().st_size > 1000
    # re-running skips every trained stage
    assert main(["experiment", str(PLAN), "--preset", "micro", "-o", str(tmp_path)]) == 0
    assert "All stages were already trained." in (root / "table.md").read_text()


def test_plan_refuses_a_reference_that_is_not_a_shared_stage(tmp_path):
    plan = yaml.safe_load(PLAN.read_text())
    plan["references"] = ["sf_dmd"]
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="references sf_dmd are not shared stages"):
        Plan.load(path)
    plan["references"] = ["ode_pairs"]  # a shared stage, but it writes pairs, not a model
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="references ode_pairs are not shared stages"):
        Plan.load(path)


def _shipped_teacher(path: Path) -> Path:
    """A tiny bidirectional model saved as a shipped teacher would be."""
    from factories import randomize_
    from selfforcing.inference import SamplingConfig, StreamingPipeline
    from selfforcing.models import CausalWanModel, WanConfig, preset
    from selfforcing.models.text_encoders import HashTextEncoder
    from selfforcing.models.vae import PixelCodec

    micro = yaml.safe_load(PLAN.read_text())["presets"]["micro"]["set"]
    config = WanConfig(**{**preset("toy").__dict__, **micro["model"]["overrides"]})
    sampling = SamplingConfig(frames_per_chunk=3, kv_cache_frames=6, height=16, width=16, timestep_shift=1.0)
    torch.manual_seed(0)
    StreamingPipeline(randomize_(CausalWanModel(config), std=0.05), HashTextEncoder(16, 8), PixelCodec(2),
                      sampling).save_pretrained(path)
    return path


def test_a_shipped_teacher_is_used_as_given_and_scored_with_its_own_sampler(tmp_path):
    """A shared stage with ``path`` is not trained: later stages start from it, and as a
    reference row it is scored with its ``sampler`` (bidirectional Euler + CFG)."""
    teacher = _shipped_teacher(tmp_path / "shipped")
    plan = yaml.safe_load(PLAN.read_text())
    plan["shared"]["teacher"] = {"path": str(teacher), "sampler": {"steps": 2, "guidance": 2.0}}
    del plan["presets"]["micro"]["shared"]  # micro retrains the teacher at test size; here it is given
    plan["methods"] = {"sf_dmd": plan["methods"]["sf_dmd"]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))  # stages run in the plan's order
    Runner(Plan.load(path), "micro", root=tmp_path / "out").run()
    root = tmp_path / "out" / "micro"
    assert not (root / "teacher").exists()  # not retrained
    ode_cfg = yaml.safe_load((root / "ode_pairs.yaml").read_text())
    assert ode_cfg["teacher"]["path"] == str(teacher)
    scored = json.loads((root / "eval" / "train" / "teacher-seed0" / "results.json").read_text())
    assert scored["sampler"] == {"bidirectional_euler_steps": 2, "guidance_scale": 2.0}
    assert "sampler" not in json.loads((root / "eval" / "train" / "ode_init-seed0" / "results.json").read_text())
    assert "| teacher (reference) |" in (root / "table.md").read_text()


def test_a_preset_replaces_a_shared_stage_and_bad_stages_fail_before_training(tmp_path):
    plan = yaml.safe_load(PLAN.read_text())
    plan["shared"]["teacher"] = {"path": str(tmp_path / "missing")}
    del plan["presets"]["micro"]["shared"]
    plan["presets"]["retrain"] = {"steps": 1, "shared": {"teacher": {"config": "configs/toy/teacher.yaml"}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="shared stage teacher: no model at"):
        Runner(Plan.load(path), "micro", root=tmp_path)
    runner = Runner(Plan.load(path), "retrain", root=tmp_path)  # the preset trains it instead
    assert runner.model_dir("teacher") == tmp_path / "retrain" / "teacher" / "model"
    plan["shared"]["teacher"] = {"config": "configs/toy/teacher.yaml", "sampler": {"stepz": 3}}
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="sampler takes steps"):
        Runner(Plan.load(path), "micro", root=tmp_path)


def test_the_cpu_presets_start_from_the_shipped_teacher(tmp_path):
    """The table's cpu preset and the DMD sweep use the shipped teacher as given (it must be
    in the package); cpu-retrain trains it in the run instead."""
    for plan_file in (PLAN, PLAN.parent / "toy_dmd_sweep.yaml"):
        runner = Runner(Plan.load(plan_file), "cpu", root=tmp_path)
        assert runner.model_dir("teacher").resolve() == SHIPPED_TEACHER.resolve()
    retrain = Runner(Plan.load(PLAN), "cpu-retrain", root=tmp_path)
    assert retrain.model_dir("teacher") == tmp_path / "cpu-retrain" / "teacher" / "model"
    assert retrain.shared["teacher"]["sampler"] == {"steps": 32, "guidance": 3.0}


def test_a_preset_can_run_some_rows_and_trains_only_the_stages_they_need(tmp_path):
    """A preset's ``methods`` / ``references`` choose the rows; the shared stages none of them
    starts from (here the ODE pairs and init) are not trained, and an unknown row is refused."""
    plan = yaml.safe_load(PLAN.read_text())
    plan["presets"]["micro"].update(methods=["diffusion_forcing"], references=["teacher"])
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    runner = Runner(Plan.load(path), "micro", root=tmp_path)
    assert runner.needed_shared_stages(runner.methods) == ["teacher"]
    assert runner.needed_shared_stages(["sf_dmd"]) == ["teacher", "ode_pairs", "ode_init"]
    runner.run()
    root = tmp_path / "micro"
    table = (root / "table.md").read_text()
    assert "| diffusion_forcing |" in table and "| teacher (reference) |" in table
    assert "| tf_dmd |" not in table and "ode_init (reference)" not in table
    assert not (root / "ode_init").exists() and not (root / "ode_pairs.safetensors").exists()
    plan["presets"]["micro"]["methods"] = ["sf_dmd", "sf_dmx"]
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="preset methods sf_dmx are not in the plan's methods"):
        Runner(Plan.load(path), "micro", root=tmp_path)


def test_stages_run_side_by_side_give_the_table_of_one_job(tmp_path):
    """``jobs: 2`` runs independent stages in two worker processes, each after the stages it
    starts from (teacher -> ODE pairs -> ODE init -> students -> evaluations); every score is the
    one a single job gives (to float rounding: one thread sums in another order than two)."""
    plan = yaml.safe_load(PLAN.read_text())
    plan["presets"]["micro"].update(methods=["diffusion_forcing", "sf_dmd"], references=["ode_init"], seeds=[0, 1])
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    one = Runner(Plan.load(path), "micro", root=tmp_path / "one")
    tasks = one.tasks(one.methods, {"train": 6}, {"n": 2})
    assert list(tasks)[:3] == [("train", "teacher", None), ("train", "ode_pairs", None), ("train", "ode_init", None)]
    assert tasks[("train", "ode_init", None)].after == (("train", "teacher", None), ("train", "ode_pairs", None))
    assert tasks[("train", "sf_dmd", 1)].after == (("train", "ode_init", None), ("train", "teacher", None))
    assert tasks[("eval", "train", "sf_dmd", 1)].after == (("train", "sf_dmd", 1),)
    assert tasks[("eval", "train", "ode_init", 0)].after == (("train", "ode_init", None),)
    one.run()
    Runner(Plan.load(path), "micro", root=tmp_path / "two", jobs=2).run()
    for result in (tmp_path / "one" / "micro" / "eval").rglob("results.json"):
        twin = tmp_path / "two" / "micro" / result.relative_to(tmp_path / "one" / "micro")
        ours, theirs = (json.loads(file.read_text())["scalars"] for file in (twin, result))
        assert {k for k, v in ours.items() if v is None} == {k for k, v in theirs.items() if v is None}, result
        numbers = [k for k, v in theirs.items() if v is not None]
        assert [ours[k] for k in numbers] == pytest.approx([theirs[k] for k in numbers], rel=1e-4), result
    assert len(list((tmp_path / "two" / "micro" / "eval").rglob("results.json"))) == 2 * 3 * 2  # rows x seeds x lengths
    assert "(2 jobs: stage times overlap)" in (tmp_path / "two" / "micro" / "table.md").read_text()
    with pytest.raises(SelfForcingError, match="--jobs must be at least 1"):
        Runner(Plan.load(path), "micro", root=tmp_path, jobs=0)
    plan["presets"]["micro"]["jobs"] = "two"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(SelfForcingError, match="preset micro: jobs must be a positive integer, got 'two'"):
        Runner(Plan.load(path), "micro", root=tmp_path)


LONG_PLAN = Path(__file__).parents[2] / "configs" / "experiments" / "toy_long.yaml"


def test_the_long_video_plan_trains_each_method_and_scores_each_sampling_option(tmp_path, capsys):
    """toy_long: the long-horizon methods trained from one ODE init, rows with `of` streaming a
    trained row's models with other sampling (nothing trained again), and the shipped student
    under each training-free option; every evaluation records its sampling, and the table ends
    with each row's drift."""
    assert main(["experiment", str(LONG_PLAN), "--preset", "micro", "-o", str(tmp_path)]) == 0, capsys.readouterr().err
    root = tmp_path / "micro"
    result = json.loads((root / "eval" / "4x" / "sink3_window3-seed0" / "results.json").read_text())
    assert result["sampling"] == {"sink_frames": 3, "kv_cache_frames": 6} and result["num_frames"] == 12
    variant = json.loads((root / "eval" / "4x" / "sf_rolling_sink3_window3-seed0" / "results.json").read_text())
    assert variant["sampling"] == {"sink_frames": 3, "kv_cache_frames": 6}
    assert not (root / "sf_rolling_sink3_window3-seed0").exists()  # streams sf_rolling's model
    rolling = json.loads((root / "sf_rolling-seed0" / "model" / "selfforcing.json").read_text())["sampling"]
    assert rolling["rolling_window"] is True  # trained and streamed the same way
    long = json.loads((root / "sf_long-seed0" / "model" / "selfforcing.json").read_text())["sampling"]
    assert (long["sink_frames"], long["kv_cache_frames"]) == (3, 6)  # the cache it was trained with
    table = (root / "table.md").read_text()
    assert "### drift: total at each length minus at 1x" in table and "| ema_sink (reference) | " in table
    for row in ("sf_dmd", "sf_long", "sf_rolling", "sf_rolling_sink3_window3", "tf_dmd", "df_dmd"):
        assert f"| {row} | " in table
    assert (root / "plots" / "4x" / "samples.png").is_file()


def test_a_variant_row_takes_only_a_trained_method_and_sampling(tmp_path):
    plan = yaml.safe_load(LONG_PLAN.read_text())
    for variant in ({"of": "nowhere"}, {"of": "sf_rolling_sink3_window3"},
                    {"of": "sf_dmd", "config": "configs/toy/sf_dmd.yaml"}):
        plan["methods"]["bad"] = variant
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
        with pytest.raises(SelfForcingError, match="method bad is another method's models streamed otherwise"):
            Plan.load(tmp_path / "plan.yaml")


def test_eval_lengths_are_checked(tmp_path):
    plan = yaml.safe_load(LONG_PLAN.read_text())
    for lengths, message in [({}, "eval.lengths must map names to video frames"),
                             ({"1x": "twelve"}, "eval.lengths must map")]:
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump({**plan, "eval": {"n": 2, "lengths": lengths}}))
        with pytest.raises(SelfForcingError, match=message):
            Runner(Plan.load(tmp_path / "plan.yaml"), "cpu", root=tmp_path).run()  # (micro brings its own lengths)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({**plan, "eval": {"n": 2, "lengths": {"1x": 6}, "frames": 6}}))
    with pytest.raises(SelfForcingError, match="unknown eval keys: frames"):
        Runner(Plan.load(tmp_path / "plan.yaml"), "cpu", root=tmp_path).run()
