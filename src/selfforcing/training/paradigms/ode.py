"""ODE initialisation (the paper's first stage, from CausVid): the bidirectional teacher's
many-step CFG sampler is run on prompts and its states at the few-step timesteps are stored
as "ODE pairs"; the causal student then learns to map each state straight to the endpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from selfforcing import threads
from selfforcing.diffusion.samplers import euler_sample_cfg
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.errors import SelfForcingError
from selfforcing.models.text_encoders import negative_text
from selfforcing.models.wan import BlockCausal, CausalWanModel
from selfforcing.training.losses.ode import ode_regression_loss
from selfforcing.utils import atomic_path, check_writable, progress_bar


@torch.no_grad()
def teacher_trajectories(
    teacher: CausalWanModel, text: torch.Tensor, uncond: torch.Tensor, shape: tuple[int, ...],
    schedule: FlowMatchSchedule, timesteps: torch.Tensor, num_steps: int, guidance_scale: float,
    generator: torch.Generator | None = None, on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """(B, S+1, C, F, h, w): states at the S few-step ``timesteps``, then the clean endpoint
    (``on_step()`` after each Euler step)."""
    cond, neg = teacher.encode_text(text), teacher.encode_text(uncond.expand_as(text))
    noise = torch.randn(shape, generator=generator, device=text.device)
    x0, states = euler_sample_cfg(
        lambda x, t, c: teacher(x, t, cond if c else neg), noise, schedule, num_steps, guidance_scale,
        record_at=timesteps, on_step=on_step,
    )
    return torch.cat([states, x0[:, None]], dim=1)


def save_pairs(path: str | Path, trajectories: torch.Tensor, captions: list[str], timesteps: torch.Tensor) -> None:
    """One safetensors file: trajectories + captions and timesteps in its metadata (atomic)."""
    meta = {"captions": json.dumps(captions), "timesteps": json.dumps(timesteps.tolist())}
    with atomic_path(path) as tmp:
        save_file({"trajectories": trajectories.contiguous().cpu()}, str(tmp), metadata=meta)


@dataclass
class OdePairs(torch.utils.data.Dataset):
    """Reads a file written by :func:`save_pairs`."""

    trajectories: torch.Tensor
    captions: list[str]
    timesteps: torch.Tensor

    @classmethod
    def load(cls, path: str | Path) -> "OdePairs":
        path = Path(path)
        if not path.is_file():
            raise SelfForcingError(f"no ODE pairs at {path}: run `selfforcing ode-pairs` first")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "captions" not in meta or "trajectories" not in f.keys():
                raise SelfForcingError(f"{path} is not an ODE pairs file")
            trajectories = f.get_tensor("trajectories")
        return cls(trajectories, json.loads(meta["captions"]), torch.tensor(json.loads(meta["timesteps"])))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"trajectory": self.trajectories[i], "caption": self.captions[i], "index": i}


def loss(
    model: CausalWanModel, trajectory: torch.Tensor, text: torch.Tensor, schedule: FlowMatchSchedule,
    attention: BlockCausal, timesteps: torch.Tensor, generator: torch.Generator | None = None,
    clean_context: float = 0.0,
) -> torch.Tensor:
    """ODE regression of the causal student (block-causal, one random state per chunk)."""
    ctx = model.encode_text(text)
    return ode_regression_loss(lambda xt, t: model(xt, t, ctx, attention=attention), trajectory, timesteps,
                               schedule, attention.frames_per_chunk, generator, clean_context)


def make_ode_pairs(config_path: str | Path, prompts_path: str | Path, output: str | Path | None = None,
                   num_steps: int | None = None, batch_size: int = 8, overrides: dict | None = None) -> Path:
    """`selfforcing ode-pairs`: sample the config's teacher on every prompt and store the pairs
    at ``output`` (default: the config's ``data.path``, where ODE-init training reads them).

    The teacher's Euler grid uses the config's ``paradigm.timestep_shift`` and
    ``loss.ode_sampling_steps`` (default 48), with CFG ``loss.guidance_scale`` against
    ``loss.negative_prompt``; the states are stored at the config's few-step timesteps, which
    must lie on that grid (the official recipe: shift 8, 48 steps, CFG 6, states 0/12/24/36).
    """
    from selfforcing.data.prompts import read_prompts
    from selfforcing.training import loading
    from selfforcing.training.config import check_model_paths, load_config

    cfg = load_config(config_path, overrides=overrides)
    if cfg.teacher is None:
        raise SelfForcingError(f"{config_path} has no teacher to sample")
    num_steps = num_steps or cfg.loss.ode_sampling_steps or 48
    if not (output or cfg.data.path):
        raise SelfForcingError(f"{config_path} has no data.path to write the pairs to: pass -o PAIRS.safetensors")
    output = Path(output or cfg.data.path)
    check_writable(output)  # before the teacher samples for minutes
    check_model_paths(cfg, Path(config_path), roles=("teacher",))  # the one model it reads
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    prompts = read_prompts(prompts_path)
    text_encoder = loading.load_text_encoder(cfg, device)
    vae = loading.load_vae(cfg, device)
    teacher = loading.load_score_model(cfg.teacher, "teacher", device)
    loading.check_io(teacher.config, text_encoder, vae, "teacher")
    schedule = FlowMatchSchedule(shift=cfg.paradigm.timestep_shift)
    timesteps = schedule.few_step_timesteps(cfg.paradigm.denoising_steps).to(device)
    uncond = negative_text(text_encoder, cfg.loss.negative_prompt, device)
    latent = (teacher.config.in_channels, cfg.data.num_frames,
              cfg.data.height // vae.spatial_ratio, cfg.data.width // vae.spatial_ratio)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    trajectories = []
    batches = range(0, len(prompts), batch_size)
    with progress_bar(total=len(batches) * num_steps, unit="step", desc=f"ode pairs, {len(prompts)} prompts") as bar:
        for start in batches:  # each batch of prompts, num_steps teacher steps
            threads.adapt(device)  # the cores other work leaves free
            batch = prompts[start:start + batch_size]
            text = text_encoder.encode(batch).to(device)
            trajectories.append(teacher_trajectories(teacher, text, uncond, (len(batch), *latent), schedule,
                                                     timesteps, num_steps, cfg.loss.guidance_scale, generator,
                                                     on_step=bar.update).cpu())
            bar.set_postfix_str(f"{min(start + batch_size, len(prompts))}/{len(prompts)} prompts")
    save_pairs(output, torch.cat(trajectories), prompts, timesteps.cpu())
    return output
