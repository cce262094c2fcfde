"""The training loop: which parameters each update changes, EMA, guards, checkpoints and resume."""

import json
import os

import pytest
import torch

from factories import TINY, tiny_config
from selfforcing import threads
from selfforcing.cli import main
from selfforcing.errors import SelfForcingError
from selfforcing.training.config import config_from_dict
from selfforcing.training.trainer import Trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def make(tmp_path, teacher_dir=None, **sections):
    cfg = tiny_config(tmp_path / "run", **sections)
    if teacher_dir is not None:
        cfg["teacher"] = {"path": str(teacher_dir)}
    return Trainer(config_from_dict(cfg))


@pytest.mark.parametrize("paradigm", ["teacher", "teacher_forcing", "diffusion_forcing"])
def test_supervised_paradigms_train_the_student(tmp_path, paradigm):
    trainer = make(tmp_path, paradigm={"name": paradigm}, loss={"name": "denoising"}, steps=2)
    before = snapshot(trainer.student)
    history = trainer.train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["generator_loss"])) for h in history)
    assert changed(before, trainer.student)
    assert trainer.critic is None


@pytest.mark.parametrize("paradigm", ["self_forcing", "teacher_forcing", "diffusion_forcing"])
@pytest.mark.parametrize("loss", ["dmd", "sid", "gan"])
def test_distillation_updates_each_network_on_its_own_steps(tmp_path, teacher_dir, paradigm, loss):
    trainer = make(tmp_path, teacher_dir, paradigm={"name": paradigm}, loss={"name": loss, "generator_every": 2})
    teacher = snapshot(trainer.teacher)
    critic = snapshot(trainer.critic)
    heads = snapshot(trainer.head) if trainer.head is not None else None
    student = snapshot(trainer.student)

    logs = trainer.generator_step()  # generator update: the student moves, the critic (and its head) do not
    assert "generator_loss" in logs and changed(student, trainer.student)
    assert not changed(critic, trainer.critic) and (heads is None or not changed(heads, trainer.head))

    student = snapshot(trainer.student)
    logs = trainer.critic_step()  # critic update: the critic moves, the student does not
    assert "critic_loss" in logs and changed(critic, trainer.critic) and not changed(student, trainer.student)
    assert heads is None or changed(heads, trainer.head)
    assert not changed(teacher, trainer.teacher)  # the teacher is frozen throughout

    trainer.step = 1  # with generator_every=2 step 1 is critic-only
    student = snapshot(trainer.student)
    assert "generator_loss" not in trainer.train_step() and not changed(student, trainer.student)


def test_critic_warmup_delays_the_first_generator_update(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, loss={"name": "dmd", "generator_every": 2, "critic_warmup": 3}, steps=6)
    history = trainer.train()
    # steps 0..5: without the warm-up the generator would update at 0, 2 and 4
    assert ["generator_loss" in h for h in history] == [False, False, False, False, True, False]
    assert all("critic_loss" in h for h in history)


def test_logged_figures_are_window_means_and_include_the_generator(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, loss={"name": "dmd", "generator_every": 2}, steps=4,
                   logging={"log_every": 2, "progress": False, "tensorboard": False})
    history = trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [2, 4]
    # the logged step (odd index) is critic-only; the generator's figure comes from the step before it
    assert logged[1]["generator_loss"] == pytest.approx(history[2]["generator_loss"])
    assert logged[1]["critic_loss"] == pytest.approx((history[2]["critic_loss"] + history[3]["critic_loss"]) / 2)


def test_a_run_shorter_than_log_every_logs_its_last_step(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, loss={"name": "dmd", "generator_every": 1}, steps=3,
                   logging={"log_every": 10, "progress": False, "tensorboard": False})
    history = trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [3]
    assert logged[0]["critic_loss"] == pytest.approx(sum(h["critic_loss"] for h in history) / 3)


def test_ema_follows_the_student(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, loss={"name": "dmd", "generator_every": 1}, optim={"ema_decay": 0.5})
    initial = {k: v.clone() for k, v in trainer.ema.average.items()}
    assert initial.keys() == trainer.student.state_dict().keys()  # a full fine-tune averages every weight
    trainer.generator_step()
    ema, student = trainer.ema.average, trainer.student.state_dict()
    for k in initial:
        assert torch.allclose(ema[k], 0.5 * initial[k] + 0.5 * student[k], atol=1e-6)


def test_non_finite_loss_skips_the_update_and_says_so(tmp_path, caplog):
    trainer = make(tmp_path, paradigm={"name": "teacher"}, loss={"name": "denoising"})
    handle = trainer.student.register_forward_hook(lambda m, i, out: out * float("nan"))
    before = snapshot(trainer.student)
    logs = trainer.generator_step()
    handle.remove()
    assert logs["generator_skipped"] == 1.0 and trainer.skipped == 1
    assert not changed(before, trainer.student)
    assert "not finite; update skipped" in caplog.text


def ode_setup(tmp_path, batch_size, grad_accum):
    """A deterministic objective (one ODE step, one chunk): gradients are exact functions of the batch."""
    from selfforcing.training.paradigms.ode import save_pairs

    pairs = tmp_path / "pairs.safetensors"
    if not pairs.exists():
        g = torch.Generator().manual_seed(0)
        save_pairs(pairs, torch.randn(4, 2, 12, 3, 8, 8, generator=g), ["a red circle", "a blue square",
                   "a green triangle", "a white circle"], torch.tensor([1000.0]))
    return make(tmp_path / f"b{batch_size}a{grad_accum}",
                paradigm={"name": "ode", "frames_per_chunk": 3, "denoising_steps": [1000]},
                loss={"name": "ode"}, data={"source": "ode_pairs", "path": str(pairs), "num_frames": 3,
                                            "batch_size": batch_size},
                optim={"grad_accum": grad_accum})


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    full, accumulated = ode_setup(tmp_path, 2, 1), ode_setup(tmp_path, 1, 2)
    full.train(), accumulated.train()
    for (k, a), b in zip(full.student.state_dict().items(), accumulated.student.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


LONG_ROLLOUT = {"rollout_frames": 12, "kv_cache_frames": 6, "sink_frames": 3, "hide_first_chunk_from_last": False}
ROLLING_WINDOW = {"rolling_window": True, "context_from": "final", "hide_first_chunk_from_last": False}


@pytest.mark.parametrize("paradigm", [{}, LONG_ROLLOUT, ROLLING_WINDOW], ids=["released", "long", "rolling"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, teacher_dir, paradigm):
    """The long rollout's window and the rolling window's exit are drawn from the checkpointed generators."""
    sections = dict(loss={"name": "dmd", "generator_every": 2}, logging={"checkpoint_every": 2},
                    paradigm={"name": "self_forcing", "frames_per_chunk": 3, **paradigm})
    full = make(tmp_path / "full", teacher_dir, steps=4, **sections).train()
    make(tmp_path / "split", teacher_dir, steps=2, **sections).train()
    resumed = make(tmp_path / "split", teacher_dir, steps=4, **sections)
    rest = resumed.train(resume=True)
    assert resumed.step == 4 and len(rest) == 2
    for a, b in zip(full[2:], rest):
        assert a["critic_loss"] == b["critic_loss"]
        assert a.get("generator_loss") == b.get("generator_loss")


def test_a_run_records_its_thread_count_and_a_resume_takes_it(tmp_path, teacher_dir, monkeypatch):
    """A thread count changes float rounding: a resume repeats the run's, whatever the load now."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sections = dict(loss={"name": "dmd", "generator_every": 2}, logging={"checkpoint_every": 2})
    with threads.policy(requested=1):
        first = make(tmp_path, teacher_dir, steps=2, **sections)
        first.train()
    assert first.threads == 1
    with threads.policy():  # free to choose by the load, it takes the recorded count
        torch.set_num_threads(2)
        resumed = make(tmp_path, teacher_dir, steps=4, **sections)
        resumed.train(resume=True)
        assert resumed.threads == 1 and torch.get_num_threads() == 1


def test_a_critic_warmed_up_alone_resumes_into_distillation(tmp_path, teacher_dir):
    """Warm-up first, decide later: the same run as one with ``critic_warmup`` 2 from the start."""
    def run(name, steps, warmup, resume=False):
        loss = {"name": "dmd", "generator_every": 1, "critic_warmup": warmup}
        return make(tmp_path / name, teacher_dir, steps=steps, loss=loss,
                    logging={"checkpoint_every": 2}).train(resume=resume)

    one = run("one", 4, warmup=2)
    run("two", 2, warmup=10**6)  # the critic alone
    rest = run("two", 4, warmup=2, resume=True)
    assert ["generator_loss" in h for h in rest] == [True, True]
    assert [h["generator_loss"] for h in one[2:]] == [h["generator_loss"] for h in rest]


def test_the_long_horizon_options_leave_earlier_fingerprints_alone(tmp_path):
    """Checkpoints written before the long-horizon keys existed still resume; setting one is a new run."""
    released = config_from_dict(tiny_config(tmp_path, teacher={"path": "teacher"}))
    assert released.fingerprint() == "259463c2f1566e00"  # computed before the keys were added
    for option in (LONG_ROLLOUT, {"sink_frames": 3, "hide_first_chunk_from_last": False}, ROLLING_WINDOW):
        changed = config_from_dict(tiny_config(tmp_path, teacher={"path": "teacher"},
                                               paradigm={"name": "self_forcing", **option}))
        assert changed.fingerprint() != released.fingerprint()


def test_checkpoints_fingerprinted_with_the_schedule_still_resume_under_that_schedule(tmp_path, teacher_dir):
    """Before the schedule left the fingerprint, it was hashed in: those checkpoints resume
    unless the schedule changed."""
    sections = dict(loss={"name": "dmd", "generator_every": 2}, logging={"checkpoint_every": 2})
    trainer = make(tmp_path, teacher_dir, steps=2, **sections)
    trainer.train()
    state_file = tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "fingerprint": trainer.cfg.fingerprint(with_schedule=True)}, state_file)
    changed = dict(sections, loss={"name": "dmd", "generator_every": 5})
    with pytest.raises(SelfForcingError, match="written by a different config"):
        make(tmp_path, teacher_dir, steps=4, **changed).train(resume=True)
    assert len(make(tmp_path, teacher_dir, steps=3, **sections).train(resume=True)) == 1


def test_resume_takes_the_learning_rates_of_the_config(tmp_path, teacher_dir):
    """The optimiser state holds the rate it was saved with; a resume with other rates in the
    config (annealing by hand) uses the config's."""
    sections = dict(loss={"name": "dmd", "generator_every": 2}, logging={"checkpoint_every": 2})
    make(tmp_path, teacher_dir, steps=2, optim={"lr": 1e-3, "critic_lr": 1e-3}, **sections).train()
    resumed = make(tmp_path, teacher_dir, steps=3, optim={"lr": 3e-4, "critic_lr": 2e-4}, **sections)
    resumed.train(resume=True)
    assert [g["lr"] for g in resumed.gen_opt.param_groups] == [3e-4]
    assert [g["lr"] for g in resumed.critic_opt.param_groups] == [2e-4]


def test_lr_drops_scale_both_rates_at_fractions_of_the_run(tmp_path, teacher_dir):
    trainer = make(tmp_path, teacher_dir, steps=10, loss={"name": "dmd", "generator_every": 1},
                   optim={"lr": 1e-3, "critic_lr": 2e-3, "lr_drops": [[0.5, 0.3], [0.8, 0.1]]})
    rates = []
    for step in range(10):
        trainer.step = step
        trainer._set_learning_rates()
        rates.append((trainer.gen_opt.param_groups[0]["lr"], trainer.critic_opt.param_groups[0]["lr"]))
    assert rates == [(1e-3, 2e-3)] * 5 + [(3e-4, 6e-4)] * 3 + [(1e-4, 2e-4)] * 2


@pytest.mark.parametrize("drops, message", [
    ([[0.5]], "pairs"), ([[1.2, 0.1]], "must lie in"), ([[0.5, 0.0]], "must lie in"),
    ([[0.8, 0.3], [0.5, 0.1]], "must increase"),
])
def test_bad_lr_drops_are_named(tmp_path, drops, message):
    with pytest.raises(SelfForcingError, match=message):
        make(tmp_path, optim={"lr_drops": drops}, paradigm={"name": "teacher"}, loss={"name": "denoising"})


def test_a_killed_checkpoint_write_keeps_the_previous_one(tmp_path, teacher_dir, monkeypatch):
    trainer = make(tmp_path, teacher_dir, steps=2, logging={"checkpoint_every": 1})
    trainer.train()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-0000002"
    trainer.step = 3

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("selfforcing.training.checkpoint.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert (root / "latest").read_text() == "step-0000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    make(tmp_path, teacher_dir, steps=3).train(resume=True)  # the previous checkpoint still loads


def test_resume_passes_over_damaged_checkpoints_and_logs_each_step_once(tmp_path, caplog):
    sections = dict(paradigm={"name": "teacher"}, loss={"name": "denoising"},
                    logging={"checkpoint_every": 2, "log_every": 1, "progress": False, "tensorboard": False})
    make(tmp_path, steps=5, **sections).train()  # checkpoints at steps 2, 4 and 5
    root = tmp_path / "run" / "checkpoints"
    student = root / "step-0000005" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:100])  # truncated by a full disk
    (root / "step-0000004" / "ema.safetensors").unlink()  # lost by a partial copy
    resumed = make(tmp_path, steps=6, **sections)
    with caplog.at_level("WARNING", logger="selfforcing.train"):
        assert len(resumed.train(resume=True)) == 4  # steps 3 to 6, from the checkpoint of step 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "step-0000005 is damaged" in warnings[0] and "student.safetensors: Error while deserializing" in warnings[0]
    assert "ema.safetensors: the file is missing" in warnings[1] and "resuming from step-0000002" in warnings[1]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


SUPERVISED = dict(paradigm={"name": "teacher"}, loss={"name": "denoising"},
                  logging={"checkpoint_every": 2, "log_every": 1, "progress": False, "tensorboard": False})


@pytest.fixture
def two_checkpoints(tmp_path):
    """A run of 4 steps with checkpoints at steps 2 and 4; returns its checkpoints folder."""
    make(tmp_path, steps=4, **SUPERVISED).train()
    return tmp_path / "run" / "checkpoints"


def resume_warnings(tmp_path, caplog) -> tuple[int, list[str]]:
    """Resume the run of ``two_checkpoints`` to step 5: the step it resumed at, and its warnings."""
    resumed = make(tmp_path, steps=5, **SUPERVISED)
    with caplog.at_level("WARNING", logger="selfforcing.train"):
        ran = len(resumed.train(resume=True))
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # each step once, whatever was passed over
    return 5 - ran, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("pointer", [b"", b"../../etc", b"\xff\xfe", b"step-0000099", b"state.pt", "a fifo",
                                     "a link out", "an empty directory"])
def test_resume_passes_over_a_latest_that_names_no_checkpoint(tmp_path, two_checkpoints, caplog, pointer):
    latest, outside = two_checkpoints / "latest", tmp_path / "outside.txt"
    latest.unlink()
    if pointer == "a fifo":
        os.mkfifo(latest)
    elif pointer == "a link out":
        outside.write_text("not the run's")
        latest.symlink_to(outside)
    elif pointer == "an empty directory":
        latest.mkdir()
    else:
        latest.write_bytes(pointer)
    resumed_at, warnings = resume_warnings(tmp_path, caplog)
    assert resumed_at == 4 and len(warnings) == 1 and "latest" in warnings[0]
    if pointer == "an empty directory":
        assert "was an empty directory" in warnings[0]
    else:
        assert "ignored; resuming from step-0000004" in warnings[0]
    assert latest.is_file() and not latest.is_symlink() and latest.read_text() == "step-0000005"
    assert not outside.exists() or outside.read_text() == "not the run's"  # a link is replaced, not written through


def test_a_latest_directory_holding_files_is_refused_before_any_work(tmp_path, two_checkpoints):
    (two_checkpoints / "latest").unlink()
    (two_checkpoints / "latest").mkdir()
    (two_checkpoints / "latest" / "notes.txt").write_text("mine")
    with pytest.raises(SelfForcingError, match="latest is a directory with files in it.*move it away"):
        make(tmp_path, steps=5, **SUPERVISED)


def _rewrite_state(checkpoint, change):
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    change(state)
    torch.save(state, checkpoint / "state.pt")


def _wrong_shape(checkpoint):
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "student.safetensors")
    name = next(iter(tensors))
    save_file({**tensors, name: torch.zeros(3, 5)}, checkpoint / "student.safetensors")


@pytest.mark.parametrize("damage,named", [
    (lambda c: _rewrite_state(c, lambda s: s.update(step="x")), "state.pt: its step is 'x', not a count"),
    (lambda c: _rewrite_state(c, lambda s: s.pop("optimizers")), "state.pt: it holds no optimizers"),
    (lambda c: _rewrite_state(c, lambda s: s["optimizers"].clear()), "state.pt: it holds no optimizer state for"),
    (lambda c: _rewrite_state(c, lambda s: s.update(torch_rng=torch.zeros(7, dtype=torch.uint8))), "state.pt"),
    (lambda c: _rewrite_state(c, lambda s: s.update(noise_rng="abc")), "state.pt: its noise_rng is not"),
    (_wrong_shape, "student.safetensors"),
])
def test_resume_passes_over_a_checkpoint_wrong_inside(tmp_path, two_checkpoints, caplog, damage, named):
    damage(two_checkpoints / "step-0000004")
    resumed_at, warnings = resume_warnings(tmp_path, caplog)
    assert resumed_at == 2
    assert len(warnings) == 1 and "step-0000004 is damaged" in warnings[0] and named in warnings[0]
    assert "resuming from step-0000002" in warnings[0]


@pytest.mark.parametrize("earlier", ["a whole run", "a run stopped before its first checkpoint"])
def test_a_fresh_start_in_an_earlier_runs_folder_logs_each_step_once(tmp_path, caplog, earlier):
    if earlier == "a whole run":
        make(tmp_path, steps=3, **SUPERVISED).train()
    else:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')  # cut short by Ctrl-C
    with caplog.at_level("WARNING", logger="selfforcing.train"):
        make(tmp_path, steps=3, **SUPERVISED).train()
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert any("metrics of an earlier run" in r.getMessage() for r in caplog.records)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    from selfforcing.utils import exclusive

    trainer = make(tmp_path, steps=1, **SUPERVISED)
    (tmp_path / "run").mkdir()
    with exclusive(tmp_path / "run" / ".lock", "held"):  # the first run, still training
        with pytest.raises(SelfForcingError, match="another run is training into .*run .*choose another output_dir"):
            trainer.train()
    trainer.train()  # once it ended
    assert not (tmp_path / "run" / ".lock").exists()


def test_resume_refuses_another_configs_checkpoint(tmp_path, teacher_dir):
    make(tmp_path, teacher_dir, steps=1).train()
    other = make(tmp_path, teacher_dir, steps=2, optim={"weight_decay": 0.05})  # (a new lr may resume)
    with pytest.raises(SelfForcingError, match="written by a different config"):
        other.train(resume=True)
    with pytest.raises(SelfForcingError, match="nothing to resume"):
        make(tmp_path / "fresh", teacher_dir).train(resume=True)


def test_bad_training_inputs_name_the_problem(tmp_path, teacher_dir):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(SelfForcingError, match="no prompts in"):
        make(tmp_path, teacher_dir, data={"source": "prompts", "path": str(tmp_path / "empty.txt")})
    with pytest.raises(SelfForcingError, match="does not exist"):
        make(tmp_path, teacher_dir, data={"source": "prompts", "path": str(tmp_path / "missing.txt")})
    with pytest.raises(SelfForcingError, match="the teacher does not fit the generator"):
        make(tmp_path, teacher_dir, model={"overrides": {**TINY, "in_channels": 3, "out_channels": 3}},
             vae={"type": "pixel", "patch": 1})


def test_prompt_only_self_forcing_and_the_train_command(tmp_path, teacher_dir, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle bouncing on a black background\na blue square resting\n")
    cfg = tiny_config(tmp_path / "run", teacher={"path": str(teacher_dir)},
                      data={"source": "prompts", "path": str(tmp_path / "prompts.txt")})
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["train", str(tmp_path / "cfg.yaml"), "--set", "steps=2"]) == 0
    assert "trained test to step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "selfforcing.json").is_file()
    assert main(["train", str(tmp_path / "cfg.yaml"), "--set", "bogus=1"]) == 2
    assert "unknown config keys in top level: bogus" in capsys.readouterr().err


@pytest.mark.parametrize("paradigm,loss", [("teacher", "denoising"), ("self_forcing", "dmd")])
def test_sample_videos_for_tensorboard(tmp_path, teacher_dir, paradigm, loss):
    trainer = make(tmp_path, teacher_dir, paradigm={"name": paradigm}, loss={"name": loss},
                   logging={"sample_every": 1, "tensorboard": True})
    trainer.train()
    video = trainer.sample_video("a red circle")
    assert video.shape == (6, 16, 16, 3) and video.dtype == torch.uint8
    assert trainer.student.training  # sampling leaves the student in training mode
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_train_on_an_encoded_video_folder(tmp_path, capsys):
    """data toy -> data encode -> train with data.source latents."""
    assert main(["data", "toy", "--out", str(tmp_path / "videos"), "--n", "3", "--frames", "6", "--size", "16"]) == 0
    assert main(["data", "encode", str(tmp_path / "videos"), "--out", str(tmp_path / "cache"), "--frames", "6",
                 "--height", "16", "--width", "16"]) == 0
    trainer = make(tmp_path, paradigm={"name": "diffusion_forcing"}, loss={"name": "denoising"},
                   data={"source": "latents", "path": str(tmp_path / "cache")})
    assert len(trainer.train()) == 2


@pytest.mark.parametrize("loss", ["dmd", "sid", "gan"])
def test_an_update_waits_for_the_device_once(tmp_path, teacher_dir, monkeypatch, loss):
    """The losses log tensors and the trainer brings the loss, the gradient norm and those logs
    to the host in one copy after the backward passes are queued (the non-finite guard needs
    them): no ``.item()`` or ``float()`` before a backward stalls the device's queue."""
    import traceback

    trainer = make(tmp_path, teacher_dir, paradigm={"name": "self_forcing"}, loss={"name": loss})
    reads = []
    for name in ("item", "tolist", "__float__"):
        def read(self, *args, _method=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if "selfforcing/training" in caller.filename.replace("\\", "/"):
                reads.append((_name, caller.filename.rsplit("/", 1)[-1]))
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    generator_logs, critic_logs = trainer.generator_step(), trainer.critic_step()
    monkeypatch.undo()
    assert reads == [("tolist", "trainer.py")] * 2
    assert all(type(v) is float for v in {**generator_logs, **critic_logs}.values())
