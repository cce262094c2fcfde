"""`selfforcing eval` end to end on a tiny random model."""

import json
import sys

import torch

from factories import Terminal, randomize_
from selfforcing.cli import main
from selfforcing.inference import SamplingConfig, StreamingPipeline
from selfforcing.models import CausalWanModel, WanConfig, preset
from selfforcing.models.text_encoders import HashTextEncoder
from selfforcing.models.vae import PixelCodec


def save_tiny_model(path, size: int) -> None:
    torch.manual_seed(0)
    config = WanConfig(**{**preset("tiny").__dict__, "in_channels": 12, "out_channels": 12})
    sampling = SamplingConfig(frames_per_chunk=3, kv_cache_frames=6, height=size, width=size)
    pipe = StreamingPipeline(randomize_(CausalWanModel(config), std=0.1), HashTextEncoder(16, 8), PixelCodec(2), sampling)
    pipe.save_pretrained(path)


def test_eval_command_writes_results_and_plots(tmp_path, capsys):
    save_tiny_model(tmp_path / "model", 32)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(out), "--n", "4", "--frames", "9",
                 "--window", "3"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_videos"] == 4 and results["num_frames"] == 9
    assert len(results["per_frame"]["semantic_accuracy"]) == 9
    assert results["window"] == 3 and results["per_window"]["start"] == [0, 3, 6]  # FD per 3-frame window
    assert 0 <= results["scalars"]["total"] <= 100
    assert list(out.glob("*.png")) and "total" in capsys.readouterr().out


def test_eval_shows_its_progress_in_frames_on_a_terminal(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "model", 16)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "report"), "--n", "3", "--frames",
                 "6", "--batch-size", "2"]) == 0
    assert "generating 3 videos" in sys.stderr.getvalue() and "18/18" in sys.stderr.getvalue()  # 3 x 6 frames


def test_eval_scores_a_bidirectional_teacher_with_its_many_step_sampler(tmp_path):
    save_tiny_model(tmp_path / "model", 16)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(out), "--n", "2", "--frames", "6",
                 "--teacher-steps", "2", "--guidance", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["sampler"] == {"bidirectional_euler_steps": 2, "guidance_scale": 2.0}
    assert results["num_frames"] == 6
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "again"), "--n", "2", "--frames",
                 "6", "--teacher-steps", "2", "--guidance", "2", "--checkpoint", str(weights)]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["scalars"] == results["scalars"] and again["model"].endswith(f"+ {weights}")


def test_real_context_generates_each_chunk_from_the_real_frames_before_it(tmp_path):
    from selfforcing.eval.run import generate_from_real_context

    save_tiny_model(tmp_path / "model", 16)
    pipe = StreamingPipeline.from_pretrained(tmp_path / "model")
    prompts = ["a red circle bouncing on a dark blue background"] * 2
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (2, 9, 16, 16, 3), generator=g, dtype=torch.uint8)
    changed = real.clone()
    changed[:, 3:] = torch.randint(0, 256, changed[:, 3:].shape, generator=g, dtype=torch.uint8)

    video, _ = generate_from_real_context(pipe, prompts, real, batch_size=2, seed=5)
    other, _ = generate_from_real_context(pipe, prompts, changed, batch_size=2, seed=5)
    assert video.shape == (2, 9, 16, 16, 3)
    assert torch.equal(video[:, :6], other[:, :6])  # chunks 0 and 1 see only real frames 0-2, unchanged
    assert not torch.equal(video[:, 6:], other[:, 6:])  # chunk 2 sees frames 3-5, changed


def test_real_context_of_the_models_own_video_gives_that_video_back(tmp_path):
    """Same noise as the free stream, chunk by chunk: given the stream's own frames as the
    'real' clip, it makes the same video (up to re-encoding the uint8 frames)."""
    from selfforcing.eval.run import generate_from_real_context

    save_tiny_model(tmp_path / "model", 16)
    pipe = StreamingPipeline.from_pretrained(tmp_path / "model")
    prompts = ["a red circle bouncing on a dark blue background", "a green square resting on a black background"]
    free = pipe.generate(prompts, 12, seed=5)
    again, _ = generate_from_real_context(pipe, prompts, free, batch_size=2, seed=5)
    assert torch.equal(again[:, :3], free[:, :3])  # chunk 0 has no context: the very same frames
    assert (again.int() - free.int()).abs().max() <= 2


def test_eval_with_real_context(tmp_path):
    save_tiny_model(tmp_path / "model", 16)
    out = tmp_path / "report"
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(out), "--n", "2", "--frames", "6",
                 "--context", "real"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["context"] == "real" and results["num_frames"] == 6
    assert main(["eval", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "teacher"), "--n", "2",
                 "--frames", "6", "--context", "real", "--teacher-steps", "2"]) != 0
    assert not (tmp_path / "teacher" / "results.json").exists()


def test_an_eval_stopped_after_results_json_leaves_the_earlier_report_whole(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "model", 16)
    out = tmp_path / "report"
    argv = ["eval", "--model", str(tmp_path / "model"), "-o", str(out), "--n", "3", "--frames", "6"]
    assert main(argv) == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}

    def stopped(*args, **kwargs):  # SIGTERM raises in the CLI as Ctrl-C does, after results.json is written
        raise KeyboardInterrupt

    monkeypatch.setattr("selfforcing.eval.run.write_sample_strips", stopped)
    assert main([*argv, "--seed", "1"]) == 130
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier  # not a mix of two runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report"]
