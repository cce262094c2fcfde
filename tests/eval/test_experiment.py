"""The experiment runner end to end on its micro preset: every stage and method of the
shipped Table-2 plan trains, is evaluated and lands in the table."""

from pathlib import Path

import pytest
import yaml

from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.eval.experiment import Plan

PLAN = Path(__file__).parents[2] / "configs" / "experiments" / "toy_table2.yaml"


def test_micro_table_runs_end_to_end(tmp_path, capsys):
    assert main(["experiment", str(PLAN), "--preset", "micro", "-o", str(tmp_path)]) == 0, capsys.readouterr().err
    root = tmp_path / "micro"
    table = (root / "table.md").read_text()
    for method in ("teacher_forcing", "diffusion_forcing", "tf_dmd", "df_dmd", "sf_dmd", "sf_dmd_framewise",
                   "sf_sid", "sf_gan", "sf_dmd_no_restriction"):
        assert f"| {method} |" in table
    assert "| ode_init (reference) |" in table  # the DMD family's starting point, scored per seed
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
