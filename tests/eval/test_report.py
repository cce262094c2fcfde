"""write_report: strict JSON plus one PNG per per-frame metric, for one method or several."""

import json
import math

import numpy as np
import pytest

from selfforcing.data.toy_world import ToyWorldDataset, caption, render
from selfforcing.errors import SelfForcingError
from selfforcing.eval import evaluate_videos, write_report
from selfforcing.eval.report import RESULTS_FILE, write_sample_strips

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    dataset = ToyWorldDataset(4, 8, 32, 32, seed=5)
    scenes = [dataset.scene(i) for i in range(4)]
    videos = np.stack([render(scene, 8, 32, 32).numpy() for scene in scenes])
    reference = np.stack([render(ToyWorldDataset(8, 8, seed=6).scene(i), 8, 32, 32).numpy() for i in range(8)])
    return evaluate_videos(videos, [caption(s) for s in scenes], reference, window=4)


def test_single_result_writes_json_and_one_png_per_metric(result, tmp_path):
    paths = write_report(result, tmp_path / "report")
    assert paths["json"] == tmp_path / "report" / RESULTS_FILE
    assert json.loads(paths["json"].read_text()) == result
    assert set(paths) == {"json", "fd", *result["per_frame"]}
    for name, path in paths.items():
        if name != "json":
            assert path.read_bytes().startswith(PNG_MAGIC), name
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in paths.values())


def test_several_methods_share_the_plots(result, tmp_path):
    methods = {"self_forcing": result, "teacher_forcing": result}
    paths = write_report(methods, tmp_path)
    assert set(json.loads(paths["json"].read_text())) == {"self_forcing", "teacher_forcing"}
    assert paths["semantic_accuracy"].read_bytes().startswith(PNG_MAGIC)


def test_nan_and_numpy_values_become_strict_json(result, tmp_path):
    odd = {**result, "scalars": {**result["scalars"], "fd": float("nan"), "total": np.float32(1.5)}}
    odd["per_frame"] = {**result["per_frame"], "jerk": np.array([math.nan, 0.5])}
    stored = json.loads(write_report(odd, tmp_path)["json"].read_text())
    assert stored["scalars"]["fd"] is None and stored["scalars"]["total"] == 1.5
    assert stored["per_frame"]["jerk"] == [None, 0.5]


def test_rewriting_replaces_files(result, tmp_path):
    write_report({"a": result}, tmp_path)
    paths = write_report({"b": result}, tmp_path)
    assert set(json.loads(paths["json"].read_text())) == {"b"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("bad", [{}, {"method": {"scalars": {}}}, [1, 2]])
def test_results_that_are_not_evaluations_are_refused(bad, tmp_path):
    with pytest.raises(SelfForcingError):
        write_report(bad, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_prompt_is_drawn_as_text_never_as_tex(tmp_path):
    """Matplotlib reads "$...$" as TeX: a prompt holding "$\\frac{$" failed the strip after the video was written."""
    videos = {"generated": np.zeros((1, 2, 8, 8, 3), dtype=np.uint8)}
    path = write_sample_strips(videos, [r"a red circle $\frac{$ bouncing"], tmp_path / "strip.png")
    assert path.stat().st_size > 1000
