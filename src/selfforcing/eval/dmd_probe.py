"""What a DMD run's generator gradient is made of, measured on the run's own samples.

DMD pushes each student video ``x`` along ``fake_x0 - real_x0`` (``training.losses.dmd``), where
``real`` is the teacher with CFG scale ``w`` and ``fake`` the critic. Split it at the teacher's
conditional prediction ``cond_x0``:

    fake - real = (fake - cond)  +  (cond - real)
                  learned part      guidance part = (w - 1) (uncond - cond)

At initialisation the critic *is* the teacher, so the learned part is zero and DMD only adds
guidance on top of a student that was distilled from guided samples already. The probe
measures, for student videos and several draws of (timestep, noise) each:

* ``critic_gain``: 1 - (critic's x0 error) / (teacher's conditional x0 error) on the student's
  videos: how much of the student's distribution the critic has learnt beyond the teacher
  (0 at initialisation);
* ``learned_share``: |fake - cond| / (|fake - cond| + |cond - real|), per draw: how much of
  the DMD direction comes from the critic rather than from guidance;
* ``coherence``: |mean over draws of the gradient| / root-mean-square of the gradient, per
  video: 1 when every draw pushes the video the same way, about 1/sqrt(draws) for noise.

and, for toy-world models (3-channel decodes), where the update ``-(fake - real)`` moves the
pixels of the objects the student drew, per band of score timesteps:

* ``object_push``: the update at object pixels (any palette colour the detector finds),
  decoded to pixels and projected on the unit vector from the pixel towards its frame's
  background colour (the frame's median), averaged over object pixels: > 0 fades objects into
  the background, < 0 strengthens them. Given for the whole update and its two parts.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from selfforcing.diffusion.samplers import cfg_flow
from selfforcing.eval.metrics import OBJECT_NAMES, palette_labels
from selfforcing.training.losses.dmd import normaliser
from selfforcing.training.objective import Objective, Rngs
from selfforcing.training.trainer import Trainer


LEVELS = 5  # bands of score timesteps for object_push: [0, 200), [200, 400), ... of 1000 training timesteps
PARTS = ("update", "guidance", "learned")


@torch.no_grad()
def probe_dmd(trainer: Trainer, videos: int, draws: int, seed: int = 0) -> dict[str, float]:
    """The figures above, averaged over ``videos`` student videos (rollouts of the trainer's
    current student on its training prompts) and ``draws`` score draws per video;
    ``object_push`` as ``object_push/<part>/<band>`` (band ``0-200`` etc.; absent where no draw
    fell, or for a codec that does not decode to RGB)."""
    objective: Objective = trainer.objective
    if trainer.cfg.loss.name != "dmd":
        raise ValueError(f"the DMD probe needs a DMD run; this config's loss is {trainer.cfg.loss.name!r}")
    g = torch.Generator(trainer.env.device).manual_seed(seed)
    rngs = Rngs(g, torch.Generator().manual_seed(seed))
    sums = {"critic_error": 0.0, "teacher_error": 0.0, "learned_share": 0.0, "coherence": 0.0}
    steps = objective.schedule.num_train_timesteps
    pushes: dict[tuple[str, int], list[float]] = {}
    done = 0
    while done < videos:
        batch = trainer.next_batch()
        x = objective.student_samples(batch, rngs, grad=False).double()
        t, cond, real, fake = _x0_predictions(objective, batch.text, x, draws, g)  # (draws, B, ...)
        scale = torch.stack([normaliser(x, r) for r in real])  # DMD's per-sample weighting, per draw
        updates = {"update": real - fake, "guidance": real - cond, "learned": cond - fake}  # -gradient, split
        for part, update in updates.items():
            for level, push in _object_push(trainer.vae, x, update / scale, t / steps):
                pushes.setdefault((part, level), []).append(push)
        dims = tuple(range(2, x.ndim + 1))
        sums["critic_error"] += (fake - x).square().mean(dims).sum().item()
        sums["teacher_error"] += (cond - x).square().mean(dims).sum().item()
        learned, guidance = _norms(fake - cond, dims), _norms(cond - real, dims)
        sums["learned_share"] += (learned / (learned + guidance)).sum().item() / draws
        grad = torch.stack([(f - r) / normaliser(x, r) for f, r in zip(fake, real)])  # DMD's gradient, per draw
        rms_of_mean = grad.mean(0).square().mean(tuple(range(1, x.ndim))).sqrt()
        sums["coherence"] += (rms_of_mean / grad.square().mean(dims).mean(0).sqrt()).sum().item()
        done += x.shape[0]
    band = steps // LEVELS
    return {
        "critic_gain": 1.0 - sums["critic_error"] / sums["teacher_error"],
        "learned_share": sums["learned_share"] / done,
        "coherence": sums["coherence"] / done,
        "coherence_if_noise": 1.0 / math.sqrt(draws),
        **{f"object_push/{part}/{level * band}-{(level + 1) * band}": float(np.mean(pushes[part, level]))
           for part in PARTS for level in range(LEVELS) if (part, level) in pushes},
    }


def _object_push(vae, x: torch.Tensor, updates: torch.Tensor, level: torch.Tensor) -> list[tuple[int, float]]:
    """(band, object_push) per draw and video that shows an object; ``updates`` (draws, B, ...)
    in latent space, ``level`` (draws, B) the score timesteps as fractions of the schedule."""
    pixels = vae.decode(x.float()).double()  # (B, 3, T, H, W) in [-1, 1]
    if pixels.shape[1] != 3:
        return []
    frames = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 4, 1).cpu().numpy()
    objects = torch.from_numpy(palette_labels(frames) < len(OBJECT_NAMES))  # (B, T, H, W)
    background = pixels.flatten(3).median(dim=-1).values[..., None, None]  # (B, 3, T, 1, 1): the frame's median
    towards = background - pixels
    towards = towards / towards.norm(dim=1, keepdim=True).clamp_min(1e-6)
    eps = 1e-3  # the decoder's response to the update, by a finite difference (exact for the pixel codec)
    out = []
    for draw in range(updates.shape[0]):
        moved = (vae.decode((x + eps * updates[draw]).float()).double() - pixels) / eps
        push = (moved * towards).sum(1)  # (B, T, H, W)
        for b in range(x.shape[0]):
            if objects[b].sum() >= 4:  # a few pixels: a detected object, not one stray pixel
                band = min(LEVELS - 1, int(level[draw, b].item() * LEVELS))
                out.append((band, push[b][objects[b]].mean().item()))
    return out


def _x0_predictions(objective: Objective, text: torch.Tensor, x: torch.Tensor, draws: int, g: torch.Generator):
    """Score timesteps, then teacher-conditional, guided (real) and critic (fake) x0 of ``x``
    noised ``draws`` times, with the run's own score-timestep draw (``DMDLoss.noised``) and scores."""
    dmd, schedule, w = objective.distribution_loss, objective.schedule, objective.cfg.loss.guidance_scale
    teacher_flows, fake_flow = objective.teacher_flows(text), objective.fake_flow(text)
    out = []
    for _ in range(draws):
        t, xt, score_t = dmd.noised(x, g)
        xt = xt.float()
        v_cond, v_uncond = teacher_flows(xt, t)
        out.append([t] + [schedule.x0_from_flow(xt, v, score_t).double()
                          for v in (v_cond, cfg_flow(v_cond, v_uncond, w), fake_flow(xt, t))])
    return [torch.stack(parts) for parts in zip(*out)]


def _norms(d: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return d.square().sum(dims).sqrt()
