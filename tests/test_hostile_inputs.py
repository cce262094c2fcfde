"""Hostile inputs to every command, as a new user or an adversary would type them.

Each case must end the way every user error does: exit status 2, one line on stderr naming
the problem, no traceback, and no file touched (outputs, inputs and damaged checkpoints
alike). The cases run in-process; the files they point at are built once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from factories import killed_write, tiny_config
from selfforcing.cli import DEFAULT_MODEL, main
from selfforcing.utils import temporary_beside

ROOT = Path(__file__).parents[1]
PROMPT = "a red circle bouncing on a dark blue background"  # in the toy grammar: no note on stderr
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


class Payload:
    """Unpickling this would run a shell command: a checkpoint must never be unpickled."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _copy_model(root: Path, name: str) -> Path:
    return Path(shutil.copytree(DEFAULT_MODEL, root / name))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _replaced(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; a config that no longer holds ``old`` fails here, not as a real run."""
    assert old in text, f"{old!r} is not in the config any more"
    return text.replace(old, new)


def _write_config(root: Path, file: str, text: str | None = None, **sections) -> None:
    """A config that trains the tiny teacher (no teacher model needed) into ``never/``: nothing
    may ever be written there."""
    if text is None:
        cfg = tiny_config(root / "never", paradigm={"name": "teacher"}, loss={"name": "denoising"},
                          optim={"lr": 1e-3, "ema_decay": 0.9, "ema_start": 0})
        for key, value in sections.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        text = yaml.safe_dump(cfg)
    (root / f"{file}.yaml").write_text(text)


def _trained_run(root: Path) -> Path:
    """One tiny run with a complete checkpoint at step 1, for the damaged-checkpoint cases."""
    run = root / "run"
    cfg = tiny_config(run, paradigm={"name": "teacher"}, loss={"name": "denoising"}, steps=1,
                      logging={"checkpoint_every": 1})
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "run.yaml")]) == 0
    return run


def _damaged_copy(root: Path, run: Path, name: str, damage) -> None:
    copy = Path(shutil.copytree(run, root / name))
    damage(copy / "checkpoints" / "step-0000001")
    cfg = yaml.safe_load((root / "run.yaml").read_text())
    (root / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(copy)}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every file a case points at, and a port that is taken."""
    from safetensors.torch import load_file, save_file

    from selfforcing.inference.video import mp4_writer

    root = tmp_path_factory.mktemp("inputs")
    (root / "afile").write_text("a file where a directory is expected\n")
    (root / "empty_dir").mkdir()
    (root / "dir.mp4").mkdir()
    (root / "report" / "results.json").mkdir(parents=True)
    (root / "prompts.txt").write_text(PROMPT + "\n")
    # models
    shutil.copy(DEFAULT_MODEL / WEIGHTS, root / "model.safetensors")
    _truncate(_copy_model(root, "truncated_model") / WEIGHTS)
    (_copy_model(root, "badjson_model") / "selfforcing.json").write_text("{")
    absolute = _copy_model(root, "absolute_model") / "selfforcing.json"  # stops at its RoPE table, 1024 frames
    absolute.write_text(_replaced(absolute.read_text(), '"rope_positions": "relative"', '"rope_positions": "absolute"'))
    bad = _copy_model(root, "badsampling_model") / "selfforcing.json"
    config = json.loads(bad.read_text())
    config["sampling"]["frames_per_chunk"] = "three"
    bad.write_text(json.dumps(config))
    for name, key, value in [("layers_model", "num_layers", 10**8), ("ffn_model", "ffn_dim", 10**9)]:
        config = _copy_model(root, name) / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    (_copy_model(root, "deepjson_model") / "selfforcing.json").write_text("[" * 200_000)
    (_copy_model(root, "latin1_model") / "selfforcing.json").write_bytes('{"sampling": "caf\xe9"}'.encode("latin-1"))
    # checkpoints
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"generator": Payload()}, root / "payload.pt")
    (root / "notes.txt").write_text("not weights")
    shutil.copy(root / "model.safetensors", root / "truncated.safetensors")
    _truncate(root / "truncated.safetensors")
    save_file({"some.tensor": torch.zeros(2)}, root / "other.safetensors")
    weights = load_file(root / "model.safetensors")
    next(iter(weights.values())).view(-1)[0] = float("nan")
    save_file(weights, root / "nan.safetensors")
    q = "blocks.0.attn1.to_q"  # LoRAs for the toy model (width 128), with a NaN in a weight or a ComfyUI alpha
    save_file({f"transformer.{q}.lora_A.weight": torch.full((2, 128), float("nan")),
               f"transformer.{q}.lora_B.weight": torch.zeros(128, 2)}, root / "nan_lora.safetensors")
    lora_pair = {f"transformer.{q}.lora_A.weight": torch.zeros(2, 128), f"transformer.{q}.lora_B.weight": torch.zeros(128, 2)}
    for name, meta in [("rank_text", {"r": "abc"}), ("rank_zero", {"r": 0}), ("targets_int", {"r": 2, "target_modules": 5}),
                       ("unknown_key", {"r": 2, "surprise": 1}), ("alpha_text", {"r": 2, "lora_alpha": "big"}),
                       ("rank_other", {"r": 4}), ("dropout_text", {"r": 2, "lora_dropout": "x"}), ("no_targets", {"r": 2}),
                       ("bias_text", {"r": 2, "bias": "sometimes"})]:
        meta = meta if name in ("targets_int", "no_targets") else {"target_modules": [q], **meta}
        packed = json.dumps({f"transformer.{k}": v for k, v in meta.items()})
        save_file(lora_pair, root / f"meta_{name}.safetensors", metadata={"lora_adapter_metadata": packed})
    comfy = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{comfy}.lora_down.weight": torch.zeros(2, 128), f"{comfy}.lora_up.weight": torch.zeros(128, 2),
               f"{comfy}.alpha": torch.tensor(float("nan"))}, root / "nan_alpha_lora.safetensors")
    # videos
    (root / "notavideo.mp4").write_text("hello, this is not a video\n")
    (root / "empty.mp4").write_bytes(b"")
    with mp4_writer(root / "small.mp4", 16) as writer:
        writer.write(np.zeros((3, 16, 16, 3), dtype=np.uint8))
    # training configs
    teacher = (ROOT / "configs" / "toy" / "teacher.yaml").read_text()
    _write_config(root, "lr_string", _replaced(teacher, "lr: 1.0e-3", "lr: 1e-3"))  # the README's sed
    _write_config(root, "lr_negative", optim={"lr": -1e-4})
    _write_config(root, "lr_nan", _replaced(teacher, "lr: 1.0e-3", "lr: .nan"))
    _write_config(root, "critic_lr_inf", optim={"critic_lr": float("inf")})
    _write_config(root, "betas_short", optim={"betas": [0.9]})
    _write_config(root, "betas_range", optim={"betas": [1.5, 0.9]})
    _write_config(root, "steps_zero", steps=0)
    _write_config(root, "steps_float", steps=2.5)
    _write_config(root, "batch_string", data={"batch_size": "2"})
    _write_config(root, "grad_clip_zero", optim={"grad_clip": 0})
    _write_config(root, "min_t_range", loss={"min_t": 1.5})
    _write_config(root, "ema_one", optim={"ema_decay": 1})
    _write_config(root, "steps_list", paradigm={"denoising_steps": [1000, "x"]})
    _write_config(root, "model_string", model="toy")
    _write_config(root, "overrides_type", model={"overrides": {"num_layers": "x"}})
    _write_config(root, "unknown_key", bogus=1)
    _write_config(root, "unparsable", "name: x\nsteps: [1, 2\n")
    _write_config(root, "top_list", "- name: x\n- steps: 2\n")
    _write_config(root, "empty", "# nothing\n")
    _write_config(root, "device_name", device="gpu")
    _write_config(root, "device_missing", device="cuda:99")
    _write_config(root, "output_under_file", output_dir=str(root / "afile" / "run"))
    _write_config(root, "seed_negative", seed=-1)
    _write_config(root, "text_encoder_string", text_encoder="hash")
    _write_config(root, "text_encoder_key", text_encoder={"type": "hash", "dim": 16, "max_length": 8, "vocab": 9})
    _write_config(root, "text_encoder_dim", text_encoder={"type": "umt5", "dim": "wide"})
    _write_config(root, "sample_every_negative", logging={"sample_every": -1})
    _write_config(root, "name_int", name=5)
    _write_config(root, "tensorboard_text", logging={"tensorboard": "yes please"})
    # damaged checkpoints, each the only one of its run
    run = _trained_run(root)
    _damaged_copy(root, run, "missing_ema", lambda step: (step / "ema.safetensors").unlink())
    _damaged_copy(root, run, "truncated_student", lambda step: _truncate(step / "student.safetensors"))
    _damaged_copy(root, run, "random_state", lambda step: shutil.copy(root / "random.pt", step / "state.pt"))
    _write_config(root, "fresh")  # its output_dir (never/) has no checkpoint
    # configs that exhaust the machine unless refused before anything is built
    _write_config(root, "huge_frames", data={"height": 1_000_000, "width": 1_000_000})
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{b}'] * 9)}]\n" for b, c in zip("abcdefgh", "bcdefghi"))
    _write_config(root, "alias_bomb", laughs + "steps: *i\n")
    _write_config(root, "deep_yaml", "steps: " + "[" * 200_000 + "\n")
    _write_config(root, "recursive_alias", "steps: &s [*s]\n")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "latin1_plan.yaml").write_bytes("# caf\xe9\n".encode("latin-1"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    yield {"in": root, "busy": busy.getsockname()[1], "free": free_port}
    busy.close()


G = ["generate", PROMPT, "-o", "{out}/out.mp4", "--quiet"]
TRAIN = ["train"]
SERVE = ["serve", "--port", "{free}"]
EVAL = ["eval", "-o", "{out}/eval"]
ENCODE = ["data", "encode", "{in}/empty_dir", "--out", "{out}/cache", "--frames", "3", "--height", "16",
          "--width", "16"]

CASES = {
    # generate: arguments
    "generate-no-prompt": (["generate"], "the following arguments are required: prompt"),
    "generate-frames-zero": (G + ["--frames", "0"], "argument --frames: must be a positive integer, got 0"),
    "generate-frames-negative": (G + ["--frames", "-5"], "must be a positive integer, got -5"),
    "generate-frames-text": (G + ["--frames", "abc"], "expected an integer, got 'abc'"),
    "generate-frames-past-rope": (G + ["--model", "{in}/absolute_model", "--frames", "1026"],
                                  "1026 frames is past this model's limit of 1023"),
    "generate-frames-not-chunked": (G + ["--frames", "10"], "not a multiple of the chunk size"),
    "generate-height-zero": (G + ["--height", "0"], "argument --height: must be a positive integer"),
    "generate-height-odd": (G + ["--height", "30"], "height and width must be multiples of 4"),
    "generate-height-huge": (G + ["--height", "100000"], "is past this model's largest side, 4096 pixels"),
    "generate-width-text": (G + ["--width", "wide"], "argument --width: expected an integer"),
    "generate-seed-negative": (G + ["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    "generate-seed-float": (G + ["--seed", "1e3"], "argument --seed: expected an integer, got '1e3'"),
    "generate-seed-huge": (G + ["--seed", "9" * 30], "must be in [0, 4294967295]"),
    "generate-device-unknown": (G + ["--device", "gpu"], "unknown device 'gpu': use cpu, cuda or cuda:N"),
    "generate-device-absent": (G + ["--device", "cuda:99"], "device 'cuda:99'"),
    "generate-text-device-unknown": (G + ["--text-encoder-device", "tpu9"], "unknown device 'tpu9'"),
    "generate-unknown-flag": (G + ["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    "generate-graphs-uncompiled": (G + ["--cuda-graphs"], "--cuda-graphs replays the compiled step: pass --compile"),
    "generate-graphs-on-cpu": (G + ["--compile", "--cuda-graphs"], "CUDA graphs need a CUDA device"),
    "generate-scope-uncompiled": (G + ["--compile-scope", "blocks"], "--compile-scope says what --compile compiles"),
    "generate-attention-backend-unknown": (G + ["--attention-backend", "sage"],
                                           "argument --attention-backend: invalid choice: 'sage'"),
    "generate-empty-prompt": (["generate", " ", "-o", "{out}/out.mp4"], "prompt 0 is empty"),
    # generate: output
    "generate-output-avi": (["generate", PROMPT, "-o", "{out}/out.avi"], "output must be an .mp4 file"),
    "generate-output-dir": (["generate", PROMPT, "-o", "{in}/dir.mp4"], "is a directory"),
    "generate-output-unwritable": (["generate", PROMPT, "-o", "/sys/x.mp4"], "cannot write /sys/x.mp4"),
    "generate-output-under-file": (["generate", PROMPT, "-o", "{in}/afile/x.mp4"], "afile is a file, not a directory"),
    # generate: model and checkpoint
    "generate-model-missing": (G + ["--model", "{in}/missing"], "model directory {in}/missing does not exist"),
    "generate-model-file": (G + ["--model", "{in}/model.safetensors"],
                            "model.safetensors is a file; a model is a directory"),
    "generate-model-truncated": (G + ["--model", "{in}/truncated_model"],
                                 f"cannot read {{in}}/truncated_model/{WEIGHTS}: Error while deserializing header"),
    "generate-model-empty-dir": (G + ["--model", "{in}/empty_dir"], "is not a model directory"),
    "generate-model-bad-json": (G + ["--model", "{in}/badjson_model"],
                                "cannot parse {in}/badjson_model/selfforcing.json: line 1, column 2"),
    "generate-model-bad-sampling": (G + ["--model", "{in}/badsampling_model"],
                                    "sampling.frames_per_chunk must be an integer, got 'three'"),
    "generate-checkpoint-missing": (G + ["--checkpoint", "{in}/missing.pt"], "checkpoint file not found"),
    "generate-checkpoint-random-bytes": (G + ["--checkpoint", "{in}/random.pt"], "not a file of plain tensors"),
    "generate-checkpoint-pickle-payload": (G + ["--checkpoint", "{in}/payload.pt"], "not a file of plain tensors"),
    "generate-checkpoint-text": (G + ["--checkpoint", "{in}/notes.txt"], "unsupported checkpoint file type '.txt'"),
    "generate-checkpoint-truncated": (G + ["--checkpoint", "{in}/truncated.safetensors"], "incomplete metadata"),
    "generate-checkpoint-foreign": (G + ["--checkpoint", "{in}/other.safetensors"], "cannot tell the checkpoint format"),
    # generate: video to extend
    "generate-extend-not-video": (G + ["--extend", "{in}/notavideo.mp4"],
                                  "cannot read {in}/notavideo.mp4 as a video"),
    "generate-extend-empty": (G + ["--extend", "{in}/empty.mp4"], "cannot read {in}/empty.mp4 as a video"),
    "generate-extend-missing": (G + ["--extend", "{in}/missing.mp4"], "video {in}/missing.mp4 does not exist"),
    "generate-extend-dir": (G + ["--extend", "{in}"], "is not a file"),
    "generate-checkpoint-nan": (G + ["--checkpoint", "{in}/nan.safetensors"], "holds non-finite values (NaN or"),
    "generate-lora-nan": (G + ["--lora", "{in}/nan_lora.safetensors"], "nan_lora.safetensors holds non-finite"),
    "generate-lora-meta-rank-text": (G + ["--lora", "{in}/meta_rank_text.safetensors"],
                                     "gives r (the rank) as 'abc', not a positive integer"),
    "generate-lora-meta-rank-zero": (G + ["--lora", "{in}/meta_rank_zero.safetensors"],
                                     "gives r (the rank) as 0, not a positive integer"),
    "generate-lora-meta-targets-int": (G + ["--lora", "{in}/meta_targets_int.safetensors"],
                                       "gives target_modules as 5, not a name or a list of names"),
    "generate-lora-meta-unknown-key": (G + ["--lora", "{in}/meta_unknown_key.safetensors"],
                                       "has keys peft's LoraConfig does not know: surprise"),
    "generate-lora-meta-alpha-text": (G + ["--lora", "{in}/meta_alpha_text.safetensors"],
                                      "gives lora_alpha as 'big', not a finite number"),
    "generate-lora-meta-rank-other": (G + ["--lora", "{in}/meta_rank_other.safetensors"],
                                      "gives rank 4 but its weights have rank 2"),
    "generate-lora-meta-dropout-text": (G + ["--lora", "{in}/meta_dropout_text.safetensors"],
                                        "gives lora_dropout as 'x', not a number in [0, 1)"),
    "generate-lora-meta-no-targets": (G + ["--lora", "{in}/meta_no_targets.safetensors"],
                                      "gives target_modules as None"),
    "generate-lora-meta-bias-text": (G + ["--lora", "{in}/meta_bias_text.safetensors"],
                                     "is not a LoRA config peft can apply: Requested bias: sometimes"),
    "generate-lora-alpha-nan": (G + ["--lora", "{in}/nan_alpha_lora.safetensors"], "non-finite values (NaN or "
                                "infinity) in diffusion_model.blocks.0.self_attn.q.alpha"),
    "generate-extend-onto-itself": (["generate", PROMPT, "-o", "{in}/small.mp4", "--extend", "{in}/small.mp4"],
                                    "is the video to extend"),
    "generate-strip-a-directory": (G + ["--strip", "{in}/empty_dir"], "empty_dir: it is a directory"),
    "generate-extend-wrong-size": (G + ["--extend", "{in}/small.mp4"], "video to extend must be 32x32"),
    # train: values of the wrong type or out of range
    "train-lr-yaml-string": (TRAIN + ["{in}/lr_string.yaml"],
                             "optim.lr must be a number, got '1e-3' (a string; YAML needs a dot and a signed exponent"),
    "train-lr-negative": (TRAIN + ["{in}/lr_negative.yaml"], "optim.lr must be > 0, got -0.0001"),
    "train-lr-nan": (TRAIN + ["{in}/lr_nan.yaml"], "optim.lr must be a finite number, got nan"),
    "train-critic-lr-inf": (TRAIN + ["{in}/critic_lr_inf.yaml"], "optim.critic_lr must be a finite number, got inf"),
    "train-betas-short": (TRAIN + ["{in}/betas_short.yaml"], "optim.betas must be two numbers"),
    "train-betas-range": (TRAIN + ["{in}/betas_range.yaml"], "optim.betas[0] must be in [0, 1), got 1.5"),
    "train-steps-zero": (TRAIN + ["{in}/steps_zero.yaml"], "steps must be a positive integer, got 0"),
    "train-steps-float": (TRAIN + ["{in}/steps_float.yaml"], "steps must be an integer, got 2.5"),
    "train-batch-string": (TRAIN + ["{in}/batch_string.yaml"], "data.batch_size must be an integer, got '2'"),
    "train-grad-clip-zero": (TRAIN + ["{in}/grad_clip_zero.yaml"], "optim.grad_clip must be > 0, got 0"),
    "train-min-t-range": (TRAIN + ["{in}/min_t_range.yaml"], "loss.min_t must be in [0, 1], got 1.5"),
    "train-ema-one": (TRAIN + ["{in}/ema_one.yaml"], "optim.ema_decay must be in (0, 1), got 1"),
    "train-steps-list-text": (TRAIN + ["{in}/steps_list.yaml"], "paradigm.denoising_steps[1] must be an integer"),
    "train-model-string": (TRAIN + ["{in}/model_string.yaml"], "model must be a mapping of keys to values, got 'toy'"),
    "train-overrides-type": (TRAIN + ["{in}/overrides_type.yaml"], "model.overrides.num_layers must be an integer"),
    "train-unknown-key": (TRAIN + ["{in}/unknown_key.yaml"], "unknown config keys in top level: bogus"),
    "train-device-name": (TRAIN + ["{in}/device_name.yaml"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    "train-device-absent": (TRAIN + ["{in}/device_missing.yaml"], "device 'cuda:99'"),
    "train-seed-negative": (TRAIN + ["{in}/seed_negative.yaml"], "seed must be in [0, 4294967295], got -1"),
    "train-text-encoder-string": (TRAIN + ["{in}/text_encoder_string.yaml"], "text_encoder must be a mapping"),
    "train-sample-every-negative": (TRAIN + ["{in}/sample_every_negative.yaml"],
                                    "logging.sample_every must be >= 0, got -1"),
    "train-name-int": (TRAIN + ["{in}/name_int.yaml"], "name must be a string, got 5"),
    "train-bool-text": (TRAIN + ["{in}/tensorboard_text.yaml"], "logging.tensorboard must be true or false"),
    # train: the file and the command line
    "train-no-config": (TRAIN, "the following arguments are required: config"),
    "train-config-missing": (TRAIN + ["{in}/missing.yaml"], "config file {in}/missing.yaml does not exist"),
    "train-config-dir": (TRAIN + ["{in}"], "is not a file"),
    "train-config-unparsable": (TRAIN + ["{in}/unparsable.yaml"], "cannot parse {in}/unparsable.yaml: line 3"),
    "train-config-list": (TRAIN + ["{in}/top_list.yaml"], "top_list.yaml must hold a mapping of config keys to values"),
    "train-config-empty": (TRAIN + ["{in}/empty.yaml"], "missing config keys in top level: name, output_dir, steps"),
    "train-set-no-value": (TRAIN + ["{in}/fresh.yaml", "--set", "steps"], "--set expects KEY=VALUE, got 'steps'"),
    "train-set-text-lr": (TRAIN + ["{in}/fresh.yaml", "--set", "optim.lr=abc"], "optim.lr must be a number, got 'abc'"),
    "train-set-bad-yaml": (TRAIN + ["{in}/fresh.yaml", "--set", "steps=[1"], "cannot parse --set 'steps=[1': line 1, column 3"),
    "train-set-conflict": (TRAIN + ["{in}/fresh.yaml", "--set", "data=1", "--set", "data.batch_size=2"],
                           "which another --set gave a value"),
    "train-world-size-without-dry-run": (TRAIN + ["{in}/fresh.yaml", "--world-size", "2"], "only applies to --dry-run"),
    "train-output-under-file": (TRAIN + ["{in}/output_under_file.yaml"], "afile is a file, not a directory"),
    # train: resume
    "train-resume-nothing": (TRAIN + ["{in}/fresh.yaml", "--resume"], "nothing to resume: no checkpoint in"),
    "train-resume-missing-ema": (TRAIN + ["{in}/missing_ema.yaml", "--resume"],
                                 "step-0000001/ema.safetensors: the file is missing; no earlier complete checkpoint"),
    "train-resume-truncated-student": (TRAIN + ["{in}/truncated_student.yaml", "--resume"],
                                       "step-0000001/student.safetensors: Error while deserializing header"),
    "train-resume-random-state": (TRAIN + ["{in}/random_state.yaml", "--resume"],
                                  "step-0000001/state.pt: not a file of plain tensors"),
    # eval
    "eval-no-output": (["eval"], "the following arguments are required: -o/--output"),
    "eval-one-video": (EVAL + ["--n", "1"], "argument --n: must be at least 2"),
    "eval-window-zero": (EVAL + ["--window", "0"], "argument --window: must be a positive integer"),
    "eval-batch-zero": (EVAL + ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    "eval-seed-text": (EVAL + ["--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    "eval-frames-past-rope": (EVAL + ["--model", "{in}/absolute_model", "--frames", "1026"],
                              "1026 frames is past this model's limit"),
    "eval-model-missing": (EVAL + ["--model", "{in}/missing"], "does not exist"),
    "eval-model-truncated": (EVAL + ["--model", "{in}/truncated_model"], "Error while deserializing header"),
    "eval-device-unknown": (EVAL + ["--device", "gpu"], "unknown device 'gpu'"),
    "eval-checkpoint-missing": (EVAL + ["--checkpoint", "{in}/missing.pt"], "checkpoint file not found"),
    "eval-checkpoint-foreign": (EVAL + ["--checkpoint", "{in}/other.safetensors"], "cannot tell the checkpoint format"),
    "eval-teacher-steps-zero": (EVAL + ["--teacher-steps", "0"], "argument --teacher-steps: must be a positive integer"),
    "eval-guidance-below-one": (EVAL + ["--guidance", "0.5"], "argument --guidance: must be at least 1"),
    "eval-output-file": (["eval", "-o", "{in}/afile"], "afile is a file, not a directory"),
    "eval-results-a-directory": (["eval", "-o", "{in}/report"], "results.json: it is a directory"),
    # serve
    "serve-max-streams-zero": (SERVE + ["--max-streams", "0"], "argument --max-streams: must be a positive integer"),
    "serve-origin-not-an-origin": (SERVE + ["--allow-origin", "app.example.org"],
                                   "allowed origin 'app.example.org' is not a web origin"),
    "serve-origin-with-a-path": (SERVE + ["--allow-origin", "https://a.example/page"], "is not a web origin"),
    "serve-max-connections-zero": (SERVE + ["--max-connections", "0"],
                                   "argument --max-connections: must be a positive integer"),
    "serve-max-connections-past-the-file-limit": (SERVE + ["--max-connections", "100000000"],
                                                  "needs 100000064 open files"),
    "serve-port-too-large": (["serve", "--port", "70000"], "argument --port: must be in [1, 65535], got 70000"),
    "serve-port-negative": (["serve", "--port", "-1"], "argument --port: must be in [1, 65535], got -1"),
    "serve-port-text": (["serve", "--port", "http"], "argument --port: expected an integer, got 'http'"),
    "serve-port-taken": (["serve", "--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: Address already in use"),
    "serve-host-foreign": (SERVE + ["--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),
    "serve-idle-timeout-zero": (SERVE + ["--idle-timeout", "0"], "argument --idle-timeout: must be > 0, got 0"),
    "serve-min-fps-nan": (SERVE + ["--min-fps", "nan"], "argument --min-fps: must be > 0, got nan"),
    "serve-min-fps-too-high": (SERVE + ["--min-fps", "500"], "the minimum frame rate must be in (0, 120]"),
    "serve-model-file": (SERVE + ["--model", "{in}/model.safetensors"], "is a file; a model is a directory"),
    "serve-model-truncated": (SERVE + ["--model", "{in}/truncated_model"], "Error while deserializing header"),
    "serve-device-absent": (SERVE + ["--device", "cuda:99"], "device 'cuda:99'"),
    # data
    "data-no-command": (["data"], "the following arguments are required: data_command"),
    "data-toy-n-zero": (["data", "toy", "--out", "{out}/toy", "--n", "0"], "argument --n: must be a positive integer"),
    "data-toy-size-tiny": (["data", "toy", "--out", "{out}/toy", "--n", "1", "--size", "3"], "must be an integer >= 8"),
    "data-toy-out-file": (["data", "toy", "--out", "{in}/afile", "--n", "1"], "already exists and is not an empty"),
    "data-toy-unwritable": (["data", "toy", "--out", "/sys/toy", "--n", "1"], "cannot write /sys/toy"),
    "data-toy-seed-negative": (["data", "toy", "--out", "{out}/toy", "--n", "1", "--seed", "-3"],
                               "argument --seed: must be in [0, 4294967295], got -3"),
    "data-encode-missing": (["data", "encode", "{in}/missing", "--out", "{out}/cache", "--frames", "3", "--height",
                             "16", "--width", "16"], "does not exist"),
    "data-encode-no-videos": (ENCODE, "no videos in {in}/empty_dir"),
    "data-encode-vae-missing": (ENCODE + ["--wan-vae", "{in}/missing"], "Wan VAE directory not found"),
    "data-encode-out-under-file": (["data", "encode", "{in}/empty_dir", "--out", "{in}/afile/cache", "--frames", "3",
                                    "--height", "16", "--width", "16"], "afile is a file, not a directory"),
    "data-encode-frames-missing": (["data", "encode", "{in}/empty_dir", "--out", "{out}/cache"],
                                   "the following arguments are required: --frames, --height, --width"),
    "data-toy-prompts-n-zero": (["data", "toy-prompts", "--out", "{out}/p.txt", "--n", "0"],
                                "must be a positive integer"),
    "data-toy-prompts-out-a-directory": (["data", "toy-prompts", "--out", "{in}/empty_dir", "--n", "2"],
                                         "empty_dir: it is a directory"),
    "bench-append-a-directory": (["bench", "--append", "{in}/empty_dir"], "empty_dir: it is a directory"),
    "ode-pairs-output-a-directory": (["ode-pairs", "{repo}/configs/toy/ode_init.yaml", "--prompts", "{in}/prompts.txt",
                                      "-o", "{in}/empty_dir"], "empty_dir: it is a directory"),
    "data-toy-prompts-unwritable": (["data", "toy-prompts", "--out", "/sys/p.txt", "--n", "2"],
                                    "cannot write /sys/p.txt"),
    "data-encode-prompts-missing": (["data", "encode-prompts", "{in}/missing.txt", "--model", "{in}", "-o",
                                     "{out}/c.safetensors"], "does not exist"),
    "data-encode-prompts-no-encoder": (["data", "encode-prompts", "{in}/prompts.txt", "--model", "{in}/empty_dir", "-o",
                                        "{out}/c.safetensors"], "has no text_encoder/ directory"),
    "data-encode-prompts-dtype": (["data", "encode-prompts", "{in}/prompts.txt", "--model", "{in}", "-o",
                                   "{out}/c.safetensors", "--dtype", "float16"], "invalid choice: 'float16'"),
    # the command itself
    "no-command": ([], "the following arguments are required: command"),
    "unknown-command": (["fly"], "invalid choice: 'fly'"),
    "ode-pairs-missing-config": (["ode-pairs", "{in}/missing.yaml", "--prompts", "{in}/prompts.txt"], "does not exist"),
    "ode-pairs-no-output": (["ode-pairs", "{repo}/configs/toy/sf_dmd.yaml", "--prompts", "{in}/prompts.txt"],
                            "has no data.path to write the pairs to: pass -o"),
    "ode-pairs-output-under-file": (["ode-pairs", "{repo}/configs/toy/ode_init.yaml", "--prompts", "{in}/prompts.txt",
                                     "-o", "{in}/afile/pairs.safetensors"], "afile is a file, not a directory"),
    "experiment-missing-plan": (["experiment", "{in}/missing.yaml"], "does not exist"),
    "generate-sampling-unknown-key": (G + ["--sampling", "sinks=3"], "unknown sampling config keys: sinks"),
    "generate-sampling-ema-without-sinks": (G + ["--sampling", "sink_frames=0", "--sampling", "sink_ema=0.9"],
                                            "sink_ema must be in [0, 1), and > 0 only with sink_frames"),
    "generate-sampling-ema-with-recompute": (G + ["--sampling", "sink_frames=3", "--sampling", "sink_ema=0.9",
                                                  "--sampling", "kv_recompute=true"],
                                             "sink_ema and kv_recompute do not go together"),
    "generate-sampling-no-value": (G + ["--sampling", "sink_frames"], "--sampling expects KEY=VALUE, got 'sink_frames'"),
    "generate-sampling-text": (G + ["--sampling", "sink_frames=many"], "sampling.sink_frames must be an integer"),
    "serve-sampling-window-too-small": (SERVE + ["--sampling", "kv_cache_frames=2"],
                                        "kv_cache_frames (2) minus sink_frames (3) must hold at least one chunk"),
    "eval-sampling-noise-too-large": (EVAL + ["--sampling", "context_noise=2000"],
                                      "context_noise must be in [0, 1000), got 2000"),
    "train-dry-run-text-encoder-key": (TRAIN + ["{in}/text_encoder_key.yaml", "--dry-run"],
                                       "unknown text encoder config key(s) ['vocab'] for type 'hash'"),
    "train-dry-run-text-encoder-dim": (TRAIN + ["{in}/text_encoder_dim.yaml", "--dry-run"],
                                       "text encoder dim must be a positive integer, got 'wide'"),
    "experiment-plan-not-utf8": (["experiment", "{in}/latin1_plan.yaml"],
                                 "cannot read {in}/latin1_plan.yaml: not UTF-8 text (byte 0xe9 at offset 5)"),
    # defect 7: inputs that would exhaust the machine are refused before anything is allocated
    "generate-model-1e8-layers": (G + ["--model", "{in}/layers_model"], "100000000 layers"),
    "generate-model-ffn-1e9": (G + ["--model", "{in}/ffn_model"], "parameters"),
    "generate-4000x4000": (G + ["--height", "4000", "--width", "4000"], "a 4000x4000 stream of batch 1"),
    "generate-model-deep-json": (G + ["--model", "{in}/deepjson_model"], "selfforcing.json: nested too deeply"),
    "generate-model-not-utf8": (G + ["--model", "{in}/latin1_model"], "selfforcing.json: not UTF-8 text"),
    "data-toy-size-30000": (["data", "toy", "--out", "{out}/toy", "--n", "1", "--size", "30000"],
                            "a 16-frame 30000x30000 toy video needs at least"),
    "train-frames-1e6": (TRAIN + ["{in}/huge_frames.yaml"], "tokens a forward) needs at least"),
    "train-yaml-alias-bomb": (TRAIN + ["{in}/alias_bomb.yaml"], "expands to more than 100,000 values"),
    "train-yaml-deep": (TRAIN + ["{in}/deep_yaml.yaml"], "deep_yaml.yaml: nested too deeply"),
    "train-yaml-recursive-alias": (TRAIN + ["{in}/recursive_alias.yaml"], "an alias refers to a value that holds it"),
    "train-config-not-utf8": (TRAIN + ["{in}/latin1.yaml"], "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 9)"),
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (with its size and mtime) and directory under ``roots``, hidden ones too."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for root in roots for p in root.rglob("*")}


@pytest.mark.parametrize("argv,message", CASES.values(), ids=CASES.keys())
def test_hostile_input_is_one_line_exit_2_and_touches_nothing(inputs, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # where default outputs (out.mp4, outputs/) would land
    (tmp_path / "out.mp4").write_bytes(b"an earlier video that must survive")
    values = {"in": inputs["in"], "out": tmp_path, "busy": inputs["busy"], "free": inputs["free"], "repo": ROOT}
    before = snapshot(inputs["in"], tmp_path)

    assert main([a.format(**values) for a in argv]) == 2

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.format(**values) in lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    assert snapshot(inputs["in"], tmp_path) == before
    assert (tmp_path / "out.mp4").read_bytes() == b"an earlier video that must survive"


def test_there_are_many_cases_across_the_commands():
    commands = [argv[0] if argv else "" for argv, _ in CASES.values()]
    assert len(CASES) >= 60
    assert all(commands.count(c) >= 5 for c in ("generate", "train", "eval", "serve", "data"))


def test_an_internal_error_is_one_line_exit_1_with_the_traceback_only_under_debug(tmp_path, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("selfforcing.data.toy_world.write_dataset", bug)
    argv = ["data", "toy", "--out", str(tmp_path / "toy"), "--n", "1"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "internal error: KeyError: 'surprise' (rerun with --debug for the traceback; please report it)"]
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
        assert main(debug) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.splitlines()[-1].startswith("internal error: KeyError")


def test_a_stale_temporary_of_a_killed_write_is_removed_by_the_next_run(tmp_path, capsys):
    """SIGKILL runs no cleanup: the next write of the same output removes what it left."""
    stale = killed_write(tmp_path / "out.mp4")
    with temporary_beside(tmp_path / "out.mp4") as live:  # a write still running: kept
        assert main(["generate", PROMPT, "-o", str(tmp_path / "out.mp4"), "--frames", "3", "--quiet"]) == 0
        assert not stale.exists() and live.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.fixture
def namespace() -> list[str]:
    """The command prefix that runs a process in a PID namespace of its own (as another container would)."""
    import subprocess

    prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("unshare cannot make a PID namespace here (needs root or user namespaces)")
    return prefix


def test_a_live_write_in_another_pid_namespace_keeps_its_temporary(tmp_path, namespace):
    """The writer of a temporary is known by the lock it holds, not by its pid, which means nothing
    across PID namespaces (another container, or another host on a shared folder)."""
    import subprocess

    out = tmp_path / "shared.mp4"
    script = ("import sys\nfrom pathlib import Path\nfrom selfforcing.utils import atomic_path\n"
              "with atomic_path(Path(sys.argv[1])) as tmp:\n"
              "    tmp.write_bytes(b'the other run')\n    print(tmp, flush=True)\n    sys.stdin.readline()\n")
    other = subprocess.Popen([*namespace, sys.executable, "-c", script, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(other.stdout.readline().strip())
        assert theirs.read_bytes() == b"the other run"
        assert main(["generate", PROMPT, "-o", str(out), "--frames", "3", "--quiet"]) == 0
        assert theirs.read_bytes() == b"the other run"  # left alone: its writer is alive, in its namespace
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(timeout=60) == 0
    finally:
        other.kill()
    assert out.read_bytes() == b"the other run" and os.listdir(tmp_path) == ["shared.mp4"]  # the last rename won


@pytest.fixture
def full_disk(tmp_path):
    """A 16 kB file system: room for a config, not for a video, a dataset or a checkpoint."""
    import subprocess

    place = tmp_path / "full"
    place.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(place)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small file system needs root")
    yield place
    subprocess.run(["umount", str(place)], check=True)


@pytest.mark.parametrize("argv", [
    ["generate", PROMPT, "-o", "{full}/out.mp4", "--frames", "300", "--quiet"],
    ["eval", "-o", "{full}/report", "--n", "2", "--frames", "6"],
    ["data", "toy", "--out", "{full}/toy", "--n", "50"],
    ["train", str(ROOT / "configs" / "toy" / "teacher.yaml"), "--set", "output_dir={full}/run", "--set", "steps=2"],
], ids=["generate", "eval", "data-toy", "train"])
def test_a_full_disk_is_named_in_one_line_and_leaves_no_temporary(full_disk, monkeypatch, capsys, argv):
    monkeypatch.chdir(full_disk.parent)
    assert main([a.format(full=full_disk) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: the disk is full( \(writing .*\))?: free some space or choose another place", lines[-1])
    assert len(lines) == 1  # ffmpeg's own messages are kept, not printed
    assert not [p for p in full_disk.rglob(".*")]  # no temporary or lock left
    assert not (full_disk / "out.mp4").exists() and not (full_disk / "toy").exists()  # no truncated output


def test_a_run_training_in_another_pid_namespace_keeps_its_folder(tmp_path, capsys, namespace):
    """A second `train` into the folder a live run trains in (here from another PID namespace, as
    from another container) is refused at once: it would have deleted the live run's checkpoint
    temporary and interleaved its metrics."""
    import subprocess

    run = tmp_path / "run"
    run.mkdir()
    script = ("import sys\nfrom pathlib import Path\nfrom selfforcing.utils import exclusive\n"
              "with exclusive(Path(sys.argv[1]), 'busy'):\n    print('training', flush=True)\n    sys.stdin.readline()\n")
    live = subprocess.Popen([*namespace, sys.executable, "-c", script, str(run / ".lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "training"
        cfg = tiny_config(run, paradigm={"name": "teacher"}, loss={"name": "denoising"}, steps=1)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "cfg.yaml"), "--resume"]) == 2
        assert f"another run is training into {run}" in capsys.readouterr().err
        assert os.listdir(run) == [".lock"]  # nothing of the refused run
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(timeout=60) == 0
    finally:
        live.kill()
