"""What one optimisation step computes, for every (paradigm, loss) pair of the config.

* supervised: teacher / teacher_forcing / diffusion_forcing with the denoising loss, ode
  with ODE regression: one loss on the student;
* distillation: a generator paradigm (self_forcing, teacher_forcing, diffusion_forcing)
  produces few-step student videos, scored as a whole by DMD, SiD or a GAN; the critic
  (fake score / discriminator) has its own loss on detached student samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfforcing.diffusion.samplers import cfg_flow
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.models.wan import BlockCausal, CausalWanModel
from selfforcing.training.config import TrainConfig
from selfforcing.training.losses.dmd import DMDLoss, ScoreTimesteps
from selfforcing.training.losses.gan import DiscriminatorHead, GANLoss, block_features
from selfforcing.training.losses.sid import SiDLoss
from selfforcing.training.paradigms import diffusion_forcing, ode, self_forcing, teacher, teacher_forcing


@dataclass
class Batch:
    text: torch.Tensor  # (B, L, text_dim) text-encoder output
    latents: torch.Tensor | None = None  # (B, C, F, h, w) ground-truth video latents
    trajectories: torch.Tensor | None = None  # (B, S+1, C, F, h, w) ODE pairs


@dataclass
class Rngs:
    noise: torch.Generator  # per-rank: noise, timesteps
    shared: torch.Generator  # identical on every rank: the exit step


class Objective:
    def __init__(
        self, cfg: TrainConfig, student: CausalWanModel, schedule: FlowMatchSchedule, uncond_text: torch.Tensor,
        latent_hw: tuple[int, int], teacher_model: CausalWanModel | None = None, critic: CausalWanModel | None = None,
        head: DiscriminatorHead | None = None, ode_timesteps: torch.Tensor | None = None,
    ):
        self.cfg, self.student, self.schedule = cfg, student, schedule
        self.teacher, self.critic, self.head = teacher_model, critic, head
        self.uncond_text = uncond_text  # (1, L, text_dim): caption dropout and the negative prompt
        self.latent_hw = latent_hw
        p = cfg.paradigm
        self.attention = BlockCausal(p.frames_per_chunk, hide_first_chunk_from_last=False)
        self.timesteps = schedule.few_step_timesteps(p.denoising_steps)
        # ODE regression labels each state with the timestep stored beside it in the pairs file.
        self.ode_timesteps = self.timesteps if ode_timesteps is None else ode_timesteps
        loss = cfg.loss
        score_t = ScoreTimesteps(schedule, loss.score_t_sampling, loss.min_t, loss.max_t, loss.score_sigma_shift)
        if loss.name == "dmd":
            self.distribution_loss = DMDLoss(schedule, score_t)
        elif loss.name == "sid":
            self.distribution_loss = SiDLoss(schedule, score_t, alpha=_default(loss.sid_alpha, 1.0))
        elif loss.name == "gan":
            self.distribution_loss = GANLoss(
                schedule, score_t, r1_weight=_default(loss.r1_weight, 1.0),
                generator_weight=_default(loss.gan_generator_weight, 1.0),
                critic_weight=_default(loss.gan_critic_weight, 1.0), shared_noise=bool(loss.gan_shared_noise),
            )
            self.feature_layer = _default(loss.gan_feature_layer, len(critic.blocks) // 2)

    @property
    def has_critic(self) -> bool:
        return self.cfg.distillation

    # ---- the student ------------------------------------------------------
    def generator_loss(self, batch: Batch, rngs: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        name = self.cfg.paradigm.name
        if not self.cfg.distillation:
            return self._supervised_loss(name, batch, rngs.noise), {}
        x = self.student_samples(batch, rngs, grad=True)
        if self.cfg.loss.name == "gan":
            return self.distribution_loss.generator_loss(x, self._logits(batch.text), rngs.noise)
        return self.distribution_loss.generator_loss(x, self.real_flow(batch.text), self.fake_flow(batch.text),
                                                     rngs.noise)

    def _supervised_loss(self, name: str, batch: Batch, g: torch.Generator) -> torch.Tensor:
        model, schedule = self.student, self.schedule
        if name == "teacher":
            text = teacher.drop_captions(batch.text, self.uncond_text, self.cfg.data.caption_dropout, g)
            return teacher.loss(model, batch.latents, text, schedule, g)
        if name == "teacher_forcing":
            return teacher_forcing.loss(model, batch.latents, batch.text, schedule, self.attention, g)
        if name == "diffusion_forcing":
            return diffusion_forcing.loss(model, batch.latents, batch.text, schedule, self.attention, g)
        return ode.loss(model, batch.trajectories, batch.text, schedule, self.attention, self.ode_timesteps, g,
                        clean_context=self.cfg.loss.ode_clean_context or 0.0)

    def student_samples(self, batch: Batch, rngs: Rngs, grad: bool) -> torch.Tensor:
        """Few-step student videos; with ``grad`` only the exit steps carry gradient."""
        p, ts = self.cfg.paradigm, self.timesteps.to(batch.text.device)
        with torch.set_grad_enabled(grad):
            if p.name == "self_forcing":
                shape = self.video_shape(batch)
                return self_forcing.generate(
                    self.student, shape, batch.text, self.schedule, p.frames_per_chunk, ts, rngs.shared, rngs.noise,
                    context_t=p.context_noise, exit_per_chunk=p.exit_per_chunk,
                    hide_first_chunk_from_last=p.hide_first_chunk_from_last, grad=grad, context_from=p.context_from,
                    rollout_frames=p.rollout_frames, kv_cache_frames=p.kv_cache_frames, sink_frames=p.sink_frames,
                    rolling_window=p.rolling_window,
                )
            paradigm = teacher_forcing if p.name == "teacher_forcing" else diffusion_forcing
            return paradigm.generate(self.student, batch.latents, batch.text, self.schedule, self.attention, ts,
                                     rngs.shared, rngs.noise, grad=grad)

    def video_shape(self, batch: Batch) -> tuple[int, ...]:
        return (batch.text.shape[0], self.student.config.in_channels, self.cfg.data.num_frames, *self.latent_hw)

    # ---- the critic -------------------------------------------------------
    def critic_loss(self, batch: Batch, rngs: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.student_samples(batch, rngs, grad=False)
        if self.cfg.loss.name == "gan":
            return self.distribution_loss.critic_loss(x, batch.latents, self._logits(batch.text), rngs.noise)
        return self.distribution_loss.critic_loss(x, self.fake_flow(batch.text), rngs.noise)

    def critic_parameters(self) -> list[nn.Parameter]:
        params = list(self.critic.parameters())
        return params + (list(self.head.parameters()) if self.head is not None else [])

    # ---- scores -----------------------------------------------------------
    def teacher_flows(self, text: torch.Tensor):
        """The frozen teacher's conditional and unconditional (negative-prompt) flows, as one
        function of ``(xt, t)`` returning both."""
        cond, neg = self.teacher.encode_text(text), self.teacher.encode_text(self.uncond_text.expand_as(text))
        return lambda xt, t: (self.teacher(xt, t, cond), self.teacher(xt, t, neg))

    def real_flow(self, text: torch.Tensor):
        """Frozen teacher with classifier-free guidance (the "real" score), standard convention
        ``uncond + w (cond - uncond)`` (the released code's ``guidance_scale: 3.0`` is w = 4)."""
        flows, w = self.teacher_flows(text), self.cfg.loss.guidance_scale
        return lambda xt, t: cfg_flow(*flows(xt, t), w)

    def fake_flow(self, text: torch.Tensor):
        ctx = self.critic.encode_text(text)
        return lambda xt, t: self.critic(xt, t, ctx)

    def _logits(self, text: torch.Tensor):
        ctx = self.critic.encode_text(text)

        def logits(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with block_features(self.critic, self.feature_layer) as features:
                self.critic(xt, t, ctx)
            return self.head(features[-1])

        return logits


def _default(value, default):
    return default if value is None else value
