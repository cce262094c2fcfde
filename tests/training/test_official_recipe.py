"""One training step of each recipe against an independent re-statement of the released
Self-Forcing formulas (model/dmd.py, model/sid.py, model/ode_regression.py, model/base.py,
utils/wan_wrapper.py, utils/scheduler.py), written here in their own terms:

* score / critic timesteps: integer k in {0..999}, shifted, clamped to [20, 980];
* noise levels read off the scheduler's table of 1000 shifted timesteps by argmin, while the
  network sees the unrounded timestep;
* guidance in x0 space as ``cond + s (cond - uncond)`` with the released ``s = 3.0``;
* DMD: grad = (fake - real) / mean|x - real|, loss 0.5 * mse(x, sg(x - grad)) in float64;
* SiD: (real - fake) * ((real - x) - alpha (real - fake)) / sg(mean|x - real|);
* the critic: flow (xt - x0_fake) / sigma regressed onto noise - x;
* ODE regression: one stored state per block, labelled with its stored timestep, x0 MSE.

The re-statement shares with the package only the random draws (same generators, same order),
the network and its KV cache (whose chunk-by-chunk forward is checked against the block-causal
forward in tests/models); the loop, the exit step, the noising and every formula are its own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factories import TINY, tiny_config
from selfforcing.diffusion import FlowMatchSchedule
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.wan import BlockCausal, CausalWanModel, WanConfig
from selfforcing.training.config import config_from_dict
from selfforcing.training.objective import Batch, Objective, Rngs

SHIFT = 5.0
OFFICIAL_GUIDANCE = 3.0  # released guidance_scale (cond + s (cond - uncond)) ...
GUIDANCE = OFFICIAL_GUIDANCE + 1  # ... is standard CFG with w = 4
FPC = 3  # frames per chunk


# ---------------------------------------------------------------- the re-statement
def official_tables(shift: float):
    """utils/scheduler.py FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)."""
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * 1000


def official_sigma(t: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    sigmas, timesteps = official_tables(shift)
    return sigmas[(timesteps[None, :] - t.double()[:, None]).abs().argmin(dim=1)]


def official_score_timestep(g: torch.Generator, batch: int, shift: float = SHIFT) -> torch.Tensor:
    t = torch.randint(0, 1000, (batch, 1), generator=g, dtype=torch.long).double()  # _get_timestep(0, 1000)
    if shift > 1:
        t = shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) * 1000
    return t.clamp(int(0.02 * 1000), int(0.98 * 1000))[:, 0]


def bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1, 1)


def x0_of(model, xt, t, ctx, sigma):
    """WanDiffusionWrapper: x0 = xt - sigma * flow (in float64)."""
    return xt.double() - bcast(sigma) * model(xt, t.float(), ctx).double()


def official_real_x0(teacher, xt, t, cond, uncond, sigma):
    x0_cond, x0_uncond = x0_of(teacher, xt, t, cond, sigma), x0_of(teacher, xt, t, uncond, sigma)
    return x0_cond + (x0_cond - x0_uncond) * OFFICIAL_GUIDANCE


def official_rollout(student, text, shape, timesteps, exit_index, g, grad):
    """pipeline/self_forcing_training.py as the paper states it: per chunk, denoise from noise
    with the KV cache of earlier clean chunks, gradient only at the exit step, fresh noise
    between steps, then one no-grad forward of the clean chunk at t = 0 writes the cache."""
    B, C, F_, h, w = shape
    ctx = student.encode_text(text)
    cache = KVCache(len(student.blocks), capacity=F_)
    clean: list[torch.Tensor] = []
    for _ in range(F_ // FPC):
        x = torch.randn((B, C, FPC, h, w), generator=g)
        for j, t in enumerate(timesteps[: exit_index + 1]):
            with torch.set_grad_enabled(grad and j == exit_index):
                x0 = x - (t / 1000) * student(x, torch.full((B,), float(t)), ctx, kv_cache=cache)
            if j < exit_index:
                nxt = timesteps[j + 1] / 1000
                x = (1 - nxt) * x0 + nxt * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            student(x0.detach(), torch.zeros(B), ctx, kv_cache=cache, update_cache=True)
        clean.append(x0)
    return torch.cat(clean, dim=2)


def official_noised_rollout(objective, batch, r: "Rngs", grad: bool):
    """A whole step's random path: the exit step, the rollout, then t and noise of the score."""
    timesteps = objective.timesteps.tolist()
    exit_index = int(torch.randint(0, len(timesteps), (1,), generator=r.shared))
    with torch.set_grad_enabled(grad):
        x = official_rollout(objective.student, batch.text, (2, 12, 6, 8, 8), timesteps, exit_index, r.noise, grad)
    t = official_score_timestep(r.noise, 2)
    noise = torch.randn(x.shape, generator=r.noise)
    sigma = official_sigma(t)
    xt = ((1 - bcast(sigma)) * x.double() + bcast(sigma) * noise.double()).float()
    return x, t, noise, sigma, xt


# ---------------------------------------------------------------- the package's side
def tiny_model(seed: int, heads: int = 2) -> CausalWanModel:
    torch.manual_seed(seed)
    model = CausalWanModel(WanConfig.from_dict({**TINY, "num_attention_heads": heads, "rope_max_seq_len": 64}))
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised heads would hide bugs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def setup(tmp_path):
    def make(loss: str, **loss_keys):
        raw = tiny_config(tmp_path / "run", loss={"name": loss, "guidance_scale": GUIDANCE, **loss_keys},
                          paradigm={"name": "self_forcing", "frames_per_chunk": FPC, "timestep_shift": SHIFT,
                                    "hide_first_chunk_from_last": False})
        raw["teacher"] = {"path": str(tmp_path / "unused")}
        cfg = config_from_dict(raw)
        student, teacher, critic = tiny_model(0), tiny_model(1, heads=3), tiny_model(2)  # teacher: another width
        teacher.requires_grad_(False)
        schedule = FlowMatchSchedule(shift=SHIFT)
        uncond = torch.randn(1, 8, TINY["text_dim"], generator=torch.Generator().manual_seed(5))
        objective = Objective(cfg, student, schedule, uncond, (8, 8), teacher, critic)
        text = torch.randn(2, 8, TINY["text_dim"], generator=torch.Generator().manual_seed(6))
        return objective, Batch(text=text), uncond
    return make


def rngs(seed: int = 0) -> Rngs:
    return Rngs(torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(200 + seed))


def grads(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def assert_close_grads(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and theirs.norm() > 0
    assert (ours - theirs).norm() / theirs.norm() < 1e-4


# ---------------------------------------------------------------- tests
def test_score_timesteps_are_drawn_shifted_and_clamped_as_released():
    schedule = FlowMatchSchedule(shift=SHIFT)
    ours = schedule.score_timesteps(4096, torch.Generator().manual_seed(0))
    theirs = official_score_timestep(torch.Generator().manual_seed(0), 4096)
    torch.testing.assert_close(ours.double(), theirs, atol=1e-4, rtol=0)
    assert ours.min() >= 20 and ours.max() == 980  # the clamp acts on the shifted axis
    assert (ours == 980).float().mean() > 0.05  # shift 5 piles the top 8 % of draws onto the clamp
    assert (ours < 92.6).any()  # the old "base level in [0.02, 0.98], then shift" never went below 92.6
    t = torch.tensor([20.0, 333.3, 979.9])
    torch.testing.assert_close(schedule.sigma(schedule.nearest_train_timestep(t)).double(), official_sigma(t),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("exit_seed, score_shift", [(0, None), (3, None), (1, 8.0)])
def test_self_forcing_dmd_generator_step_matches_the_released_formulas(setup, exit_seed, score_shift):
    """``score_shift`` 8: the released score wrappers' own shift-8 sigma table (configs/wan)."""
    objective, batch, uncond = setup("dmd", score_sigma_shift=score_shift)
    student, teacher, critic = objective.student, objective.teacher, objective.critic
    loss, logs = objective.generator_loss(batch, rngs(exit_seed))
    loss.backward()
    ours = grads(student)
    student.zero_grad()

    x, t, noise, sigma, xt = official_noised_rollout(objective, batch, rngs(exit_seed), grad=True)
    score_sigma = sigma if score_shift is None else official_sigma(t, score_shift)
    with torch.no_grad():
        cond, neg = teacher.encode_text(batch.text), teacher.encode_text(uncond.expand_as(batch.text))
        real = official_real_x0(teacher, xt, t, cond, neg, score_sigma)
        fake = x0_of(critic, xt, t, critic.encode_text(batch.text), score_sigma)
        normalizer = (x.double() - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)
        grad = torch.nan_to_num((fake - real) / normalizer)
    official_loss = 0.5 * F.mse_loss(x.double(), (x.double() - grad).detach())
    official_loss.backward()

    assert logs["dmd_t"] == pytest.approx(t.mean().item(), abs=1e-3)
    assert loss.item() == pytest.approx(official_loss.item(), rel=1e-5)
    assert_close_grads(ours, grads(student))


def test_dmd_gradient_on_the_sample_is_the_normalised_score_gap(setup):
    """DMD's loss pushes exactly (fake - real) / normaliser / numel into the sample."""
    objective, batch, uncond = setup("dmd")
    x = torch.randn(2, 12, 6, 8, 8, generator=torch.Generator().manual_seed(9), requires_grad=True)
    g = torch.Generator().manual_seed(3)
    loss, _ = objective.distribution_loss.generator_loss(x, objective.real_flow(batch.text),
                                                         objective.fake_flow(batch.text), g)
    loss.backward()
    g = torch.Generator().manual_seed(3)
    t = official_score_timestep(g, 2)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        sigma = official_sigma(t)
        xt = ((1 - bcast(sigma)) * x.double() + bcast(sigma) * noise.double()).float()
        teacher, critic = objective.teacher, objective.critic
        real = official_real_x0(teacher, xt, t, teacher.encode_text(batch.text),
                                teacher.encode_text(uncond.expand_as(batch.text)), sigma)
        fake = x0_of(critic, xt, t, critic.encode_text(batch.text), sigma)
        grad = (fake - real) / (x.double() - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)
    torch.testing.assert_close(x.grad.double(), grad / x.numel(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("score_shift", [None, 8.0])
def test_self_forcing_dmd_critic_step_matches_the_released_formulas(setup, score_shift):
    objective, batch, _ = setup("dmd", score_sigma_shift=score_shift)
    critic = objective.critic
    loss, _ = objective.critic_loss(batch, rngs(1))
    loss.backward()
    ours = grads(critic)
    critic.zero_grad()

    x, t, noise, sigma, xt = official_noised_rollout(objective, batch, rngs(1), grad=False)
    score_sigma = sigma if score_shift is None else official_sigma(t, score_shift)
    x0_fake = x0_of(critic, xt, t, critic.encode_text(batch.text), score_sigma)  # the fake score's wrapper
    flow_pred = (xt.double() - x0_fake) / bcast(sigma)  # _convert_x0_to_flow_pred with the generator's scheduler
    official_loss = F.mse_loss(flow_pred.float(), (noise - x).float())  # FlowPredLoss
    official_loss.backward()

    assert loss.item() == pytest.approx(official_loss.item(), rel=1e-5)
    assert_close_grads(ours, grads(critic))


def test_self_forcing_sid_generator_step_matches_the_released_formulas(setup):
    objective, batch, uncond = setup("sid", sid_alpha=1.0)
    student, teacher, critic = objective.student, objective.teacher, objective.critic
    critic.requires_grad_(False)  # the trainer freezes the critic during generator updates
    loss, _ = objective.generator_loss(batch, rngs(2))
    loss.backward()
    ours = grads(student)
    student.zero_grad()

    x, t, noise, sigma, xt = official_noised_rollout(objective, batch, rngs(2), grad=True)  # xt carries gradient
    fake = x0_of(critic, xt, t, critic.encode_text(batch.text), sigma)
    real = official_real_x0(teacher, xt, t, teacher.encode_text(batch.text),
                            teacher.encode_text(uncond.expand_as(batch.text)), sigma)
    sid = (real - fake) * ((real - x.double()) - 1.0 * (real - fake))
    with torch.no_grad():
        normalizer = (x.double() - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)
    official_loss = torch.nan_to_num(sid / normalizer).mean()
    official_loss.backward()

    assert loss.item() == pytest.approx(official_loss.item(), rel=1e-4)
    assert_close_grads(ours, grads(student))


def test_ode_regression_step_matches_the_released_formulas(tmp_path):
    raw = tiny_config(tmp_path / "run", paradigm={"name": "ode", "frames_per_chunk": FPC, "timestep_shift": 8.0},
                      loss={"name": "ode"}, data={"source": "ode_pairs", "path": "unused", "num_frames": 6})
    cfg = config_from_dict(raw)
    schedule = FlowMatchSchedule(shift=8.0)
    stored = schedule.few_step_timesteps([1000, 750, 500, 250])  # 1000 / 960 / 888.9 / 727.3
    student = tiny_model(0)
    objective = Objective(cfg, student, schedule, torch.zeros(1, 8, 16), (8, 8), ode_timesteps=stored)
    trajectory = torch.randn(2, 5, 12, 6, 8, 8, generator=torch.Generator().manual_seed(4))
    text = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(6))
    loss = objective.generator_loss(Batch(text=text, trajectories=trajectory), rngs(3))[0]
    loss.backward()
    ours = grads(student)
    student.zero_grad()

    g = rngs(3).noise
    index = torch.randint(0, 4, (2, 6 // FPC), generator=g).repeat_interleave(FPC, dim=1)  # one state per block
    noisy = torch.stack([torch.stack([trajectory[b, index[b, f], :, f] for f in range(6)], dim=1) for b in range(2)])
    t = stored[index]  # the stored timestep labels the stored state
    v = student(noisy, t, student.encode_text(text), attention=BlockCausal(FPC))
    x0 = noisy - (t / 1000).view(2, 1, 6, 1, 1) * v
    official_loss = F.mse_loss(x0, trajectory[:, -1])
    official_loss.backward()

    assert loss.item() == pytest.approx(official_loss.item(), rel=1e-5)
    assert_close_grads(ours, grads(student))


def test_defaults_and_wan_configs_carry_the_released_values():
    """The dataclass defaults and configs/wan/ hold the released configs' numbers
    (self_forcing_dmd.yaml / self_forcing_sid.yaml / default_config.yaml / generate_ode_pairs.py)."""
    from pathlib import Path

    from selfforcing.models.text_encoders import WAN_NEGATIVE_PROMPT
    from selfforcing.training.config import LossConfig, OptimConfig, ParadigmConfig, load_config

    opt, loss = OptimConfig(), LossConfig()
    assert (opt.lr, opt.critic_lr, opt.betas, opt.weight_decay, opt.grad_clip) == (2e-6, 4e-7, [0.0, 0.999], 0.01, 10.0)
    assert (opt.ema_decay, opt.ema_start, loss.generator_every) == (0.99, 200, 5)
    assert (opt.lr_drops, loss.critic_warmup) == ([], 0)  # constant rates, no critic warm-up
    assert (loss.score_t_sampling, loss.min_t, loss.max_t) == ("official", 0.02, 0.98)

    wan = Path(__file__).resolve().parents[2] / "configs" / "wan"
    dmd = load_config(wan / "self_forcing_dmd.yaml")
    assert dmd.loss.guidance_scale == OFFICIAL_GUIDANCE + 1 and dmd.loss.negative_prompt == WAN_NEGATIVE_PROMPT
    assert (dmd.loss.score_sigma_shift, dmd.optim.total_batch_size, dmd.data.batch_size) == (8.0, 64, 1)
    assert (dmd.paradigm.denoising_steps, dmd.paradigm.timestep_shift, dmd.paradigm.frames_per_chunk) == \
        ([1000, 750, 500, 250], 5.0, 3)
    assert (dmd.data.num_frames, dmd.data.height, dmd.data.width) == (21, 480, 832)
    assert "14B" in dmd.teacher.path and "1.3B" in dmd.critic.path
    sid = load_config(wan / "self_forcing_sid.yaml")
    assert (sid.loss.name, sid.optim.critic_lr, sid.optim.weight_decay) == ("sid", 2e-6, 0.0)
    # The cache takes the exit step's estimate (the toy configs choose "final", an option of ours).
    assert ParadigmConfig().context_from == dmd.paradigm.context_from == sid.paradigm.context_from == "exit"
    ode = load_config(wan / "ode_init.yaml")
    assert (ode.paradigm.timestep_shift, ode.loss.guidance_scale, ode.loss.ode_sampling_steps) == (8.0, 6.0, 48)
    assert ode.loss.negative_prompt == WAN_NEGATIVE_PROMPT
