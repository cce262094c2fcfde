"""SIGTERM, what ``timeout`` and ``docker stop`` send, stops a command the way Ctrl-C does:
the same cleanup runs, nothing is left beside the output, and a resumed run is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from factories import killed_write, tiny_config
from selfforcing.cli import main

PROMPT = "a red circle bouncing on a dark blue background"
pytestmark = pytest.mark.usefixtures("single_thread")  # as the subprocesses: same results, no thread contention


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfforcing", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before the signal: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the command to get going"
        time.sleep(0.01)


def terminate(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "terminated"
    return err


def hidden(root: Path) -> list[Path]:
    """Temporaries (``.NAME.RANDOM.tmp...``) and their locks anywhere under ``root``."""
    return [p for p in root.rglob(".*")]


def test_sigterm_mid_generate_leaves_only_the_earlier_output(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier video")
    proc = start(["generate", PROMPT, "-o", str(out), "--frames", "1023", "--quiet"], tmp_path)
    wait_for(lambda: any(tmp_path.glob(".out.mp4.*.tmp.mp4")), proc)  # the writer is open: frames are flowing
    time.sleep(0.3)
    terminate(proc)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert out.read_bytes() == b"an earlier video"


def test_sigterm_mid_training_then_resume_is_exact(tmp_path):
    steps = 10
    configs = {}
    for name in ("full", "split"):
        cfg = tiny_config(tmp_path / name, paradigm={"name": "teacher"}, loss={"name": "denoising"}, steps=steps,
                          data={"batch_size": 1, "num_frames": 3, "height": 8, "width": 8},
                          logging={"checkpoint_every": 2, "log_every": 1})
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    # One thread in every run, as the subprocess's OMP_NUM_THREADS: a thread count changes float rounding.
    assert main(["train", str(configs["full"]), "--threads", "1"]) == 0  # the uninterrupted reference

    split = tmp_path / "split"
    proc = start(["train", str(configs["split"])], tmp_path)
    wait_for(lambda: (split / "checkpoints" / "latest").is_file(), proc)
    terminate(proc)
    assert not hidden(split)  # no temporary checkpoint folder, no half-written pointer
    interrupted_at = int((split / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert interrupted_at < steps

    # A checkpoint write killed by SIGKILL (no cleanup at all) leaves its folder: the next run clears it.
    stale = killed_write(split / "checkpoints" / f"step-{interrupted_at + 2:07d}", directory=True)
    assert (stale / "student.safetensors").is_file()
    assert main(["train", str(configs["split"]), "--resume", "--threads", "1"]) == 0
    assert not hidden(split)

    last = f"checkpoints/step-{steps:07d}"
    for name in ("student", "ema"):
        full = load_file(tmp_path / "full" / last / f"{name}.safetensors")
        resumed = load_file(split / last / f"{name}.safetensors")
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full), name

    def metrics(run: Path) -> list[dict]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "it_per_s"} for line in lines]

    assert [m["step"] for m in metrics(split)] == list(range(1, steps + 1))  # each step logged once
    assert metrics(split) == metrics(tmp_path / "full")


@pytest.mark.parametrize("gap_s", [0.0, 0.02, 0.05])
def test_ctrl_c_twice_is_one_interrupt(tmp_path, gap_s):
    """The second Ctrl-C, while the first one's cleanup runs, used to print a traceback from
    torch's exit handlers: it is ignored, and the command ends as for one."""
    out = tmp_path / "out.mp4"
    proc = start(["generate", PROMPT, "-o", str(out), "--frames", "1023", "--quiet"], tmp_path)
    wait_for(lambda: any(tmp_path.glob(".out.mp4.*.tmp.mp4")), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], err[-2000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["generate", PROMPT, "-o", "{tmp}/out.mp4", "--frames", "3"],
                                  ["train", str(Path(__file__).parents[1] / "configs" / "toy" / "teacher.yaml"),
                                   "--dry-run"]], ids=["generate", "train-dry-run"])
def test_output_piped_into_a_reader_that_left_ends_quietly(tmp_path, argv):
    """``selfforcing ... | true``: the reader is gone before the command prints; it ends as SIGPIPE
    ends other tools (141), with no traceback, and the work it did stands."""
    proc = subprocess.Popen([sys.executable, "-m", "selfforcing", *(a.format(tmp=tmp_path) for a in argv)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader leaves at once
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""
    if argv[0] == "generate":
        assert os.listdir(tmp_path) == ["out.mp4"]
