"""The training loop: one loop for every experiment, driven by a :class:`TrainConfig`.

Per step: (distillation) the generator is updated every ``loss.generator_every`` steps and
the critic every step (the paper's 1:5 ratio); each update accumulates gradients over
``optim.grad_accum`` micro-batches, clips them, and is skipped, with a message, if the loss
or the gradient is not finite. The student's EMA follows every generator update after
``optim.ema_start``. Checkpoints hold everything needed to resume exactly (trainable weights,
EMA, optimisers, random states, data position) and are written atomically. With a ``lora``
section only adapters train (and are checkpointed); the base weights stay frozen.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from selfforcing import threads
from selfforcing.diffusion.schedule import FlowMatchSchedule
from selfforcing.errors import DamagedFileError, SelfForcingError, reading
from selfforcing.memory import check_fits
from selfforcing.models import lora
from selfforcing.models.text_encoders import negative_text
from selfforcing.models.wan import CausalWanModel
from selfforcing.training import distributed as D
from selfforcing.training import loading
from selfforcing.training.checkpoint import CheckpointStore
from selfforcing.training.config import ScoreModelConfig, TrainConfig, grad_accum_steps
from selfforcing.training.data import DataStream, build_dataset
from selfforcing.training.ema import TrainableEMA
from selfforcing.training.losses.gan import DiscriminatorHead
from selfforcing.training.objective import Batch, Objective, Rngs
from selfforcing.training.paradigms.ode import OdePairs
from selfforcing.utils import atomic_path, check_writable, exclusive, progress_bar

log = logging.getLogger("selfforcing.train")
METRICS_FILE = "metrics.jsonl"
RUN_LOCK = ".lock"  # held by the run training into output_dir
LORA_FILE = "lora.safetensors"  # a LoRA run's adapter, in output_dir


class Trainer:
    def __init__(self, cfg: TrainConfig, env: D.DistEnv | None = None):
        self.cfg = cfg
        self.env = env or D.init_distributed(cfg.device)
        if self.env.is_main:
            check_writable(Path(cfg.output_dir) / METRICS_FILE)  # before minutes of model loading
        device = self.env.device
        self._check_memory()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.schedule = FlowMatchSchedule(shift=cfg.paradigm.timestep_shift)
        self.text_encoder = loading.load_text_encoder(cfg, device)
        self.vae = loading.load_vae(cfg, device)
        self.grad_accum = grad_accum_steps(cfg, self.env.world_size)
        latent_hw = self._latent_hw()

        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        self.student = loading.load_generator(cfg.model, device)
        if cfg.lora is not None:
            lora.add_adapter(self.student, cfg.lora.spec())
        loading.check_io(self.student.config, self.text_encoder, self.vae, "generator")
        self.teacher = self.critic = self.head = None
        if cfg.distillation:  # (an ODE-init config names its teacher for `ode-pairs` only)
            self.teacher = self._load_score_model(cfg.teacher, "teacher")
            # The fake score starts from its own model (official: the 1.3B model beside a 14B
            # real score) or, by default, from the teacher.
            critic = self._load_score_model(cfg.critic, "critic") or copy.deepcopy(self.teacher)
            adapted = cfg.lora is not None and cfg.lora.critic
            self.critic = lora.add_adapter(critic, cfg.lora.spec()) if adapted else critic.requires_grad_(True)
            if cfg.loss.name == "gan":
                self.head = DiscriminatorHead(self.critic.config.dim).to(device)
        for model in (self.student, self.teacher, self.critic):
            if model is not None:
                D.shard(model, self.env)
        self.ema = TrainableEMA(self.student) if cfg.optim.ema_decay else None  # of the shards, under FSDP
        for model in (self.student, self.critic, self.teacher):  # SiD backpropagates through the teacher too
            if model is not None:
                model.gradient_checkpointing = cfg.paradigm.gradient_checkpointing

        opt = cfg.optim
        self.gen_opt = torch.optim.AdamW(_trainable(self.student.parameters()), lr=opt.lr, betas=tuple(opt.betas),
                                         weight_decay=opt.weight_decay)
        dataset = build_dataset(cfg, self.vae)
        self.objective = Objective(cfg, self.student, self.schedule,
                                   negative_text(self.text_encoder, cfg.loss.negative_prompt, device),
                                   latent_hw, self.teacher, self.critic, self.head,
                                   ode_timesteps=self._check_ode_pairs(dataset, latent_hw))
        self.critic_opt = None
        if self.objective.has_critic:
            self.critic_opt = torch.optim.AdamW(_trainable(self.objective.critic_parameters()), lr=opt.critic_lr,
                                                betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        self.data = DataStream(dataset, cfg.data.batch_size, cfg.seed, self.env)
        self.noise_rng = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + self.env.rank)
        self.store = CheckpointStore(Path(cfg.output_dir) / "checkpoints", cfg.fingerprint(), self.env,
                                     also_accepted=(cfg.fingerprint(with_schedule=True),))
        self.step = 0
        self.skipped = 0
        self.threads: int | None = None  # the run's CPU thread count, kept by its resumes (threads.settle)

    # ---- construction -----------------------------------------------------
    def _check_memory(self) -> None:
        """Refuse, before any model loads, a run whose activations and rollout KV cache alone (the
        part of the memory plan that neither more GPUs nor LoRA shrink; the weights are checked as
        each model is built) cannot fit: ``data.height: 1e6`` must not take the machine down."""
        from selfforcing.training.memory import GIB, plan_memory

        plan = plan_memory(self.cfg, self.env.world_size)
        d = self.cfg.data
        check_fits(int(plan.unsharded_gib * GIB), f"training on {d.batch_size} x {d.num_frames} frames of "
                   f"{d.width}x{d.height} ({plan.tokens:,} tokens a forward)", self.env.device,
                   "lower data.height, data.width, data.num_frames or data.batch_size")

    def _load_score_model(self, src: ScoreModelConfig | None, role: str) -> CausalWanModel | None:
        if src is None:
            return None
        model = loading.load_score_model(src, role, self.env.device)
        loading.check_compatible(self.student.config, model.config, role)
        return model

    def _check_ode_pairs(self, dataset, latent_hw: tuple[int, int]) -> torch.Tensor | None:
        """ODE regression labels each stored state with the timestep it was stored at; a file
        made for another few-step list, shift or video shape is refused rather than mislabelled."""
        if not isinstance(dataset, OdePairs):
            return None
        cfg = self.cfg
        expected = self.schedule.few_step_timesteps(cfg.paradigm.denoising_steps)
        stored = dataset.timesteps.to(expected.dtype)
        if stored.shape != expected.shape or not torch.allclose(stored, expected, atol=1e-2):
            raise SelfForcingError(
                f"ODE pairs {cfg.data.path} hold states at timesteps {_fmt(stored)}, but paradigm.denoising_steps "
                f"{cfg.paradigm.denoising_steps} with timestep_shift {cfg.paradigm.timestep_shift} give {_fmt(expected)}; "
                "regenerate the pairs with this config or match the config to the file")
        shape = (len(expected) + 1, self.student.config.in_channels, cfg.data.num_frames, *latent_hw)
        if tuple(dataset.trajectories.shape[1:]) != shape:
            raise SelfForcingError(f"ODE pairs {cfg.data.path} have (states, channels, frames, h, w) "
                                   f"{tuple(dataset.trajectories.shape[1:])}, this config needs {shape}")
        return stored

    def _latent_hw(self) -> tuple[int, int]:
        d, r = self.cfg.data, self.vae.spatial_ratio
        if d.height % r or d.width % r:
            raise SelfForcingError(f"data.height/width must be multiples of the VAE's spatial ratio {r}")
        return d.height // r, d.width // r

    def _modules(self) -> dict[str, nn.Module]:
        named = {"student": self.student, "critic": self.critic, "head": self.head}
        return {k: v for k, v in named.items() if v is not None}

    def _averaged(self):
        """The student holds the EMA weights inside this block (when there is an EMA)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _averaged_state(self, read) -> dict[str, torch.Tensor]:
        """``read(student)``, a state dict, of the EMA weights (else the student's), copied inside the
        block: on one process its tensors share storage with the parameters, which swap back after it."""
        with self._averaged():
            return {k: v.clone() for k, v in read(self.student).items()}

    def _optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        opts = {"student": (self.student, self.gen_opt)}
        if self.critic_opt is not None:
            opts["critic"] = (_CriticGroup(self.critic, self.head), self.critic_opt)
        return opts

    # ---- the loop ---------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict[str, float]]:
        """Run to ``cfg.steps``; returns the logged figures of every step run here. One run at a
        time writes an output_dir: a second is refused while the first holds its lock."""
        out = Path(self.cfg.output_dir)
        busy = f"another run is training into {out} (it holds {out / RUN_LOCK}): wait for it, or choose another output_dir"
        if not resume:
            out.mkdir(parents=True, exist_ok=True)
        # (A resume into a folder that does not exist stops at "nothing to resume", having made nothing.)
        with exclusive(out / RUN_LOCK, busy) if self.env.is_main and out.is_dir() else contextlib.nullcontext():
            return self._train(resume)

    def _train(self, resume: bool) -> list[dict[str, float]]:
        cfg = self.cfg
        if resume:
            self.resume()
        elif self.env.is_main:
            self._truncate_metrics()  # a fresh start in an earlier run's output_dir logs its steps anew
        writer = self._tensorboard()
        history = []
        bar = progress_bar(total=cfg.steps, initial=self.step, unit="it", desc=cfg.name,
                           quiet=not (cfg.logging.progress and self.env.is_main))
        # The cores other work leaves free now, or the count of the run resumed: kept for the whole
        # run, since a thread count changes float rounding and a resume repeats the run bit for bit.
        self.threads = threads.settle(self.env.device, self.threads)
        while self.step < cfg.steps:
            start = time.perf_counter()
            self._set_learning_rates()
            logs = self.train_step()
            self.step += 1
            logs["it_per_s"] = 1.0 / (time.perf_counter() - start)
            history.append(logs)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
            since_logged = self.step % cfg.logging.log_every
            if since_logged == 0 or self.step == cfg.steps:  # the last step too: a short run logs its figures
                self._log_metrics(window_means(history[-(since_logged or cfg.logging.log_every):]), writer)
            if cfg.logging.sample_every and self.step % cfg.logging.sample_every == 0:
                frames = self.sample_video(self._sample_prompt())  # collective under FSDP: every rank samples
                if writer is not None:
                    writer.add_images("sample", frames.permute(0, 3, 1, 2), self.step)
            if self.step % cfg.logging.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if writer is not None:
            writer.close()
        return history

    def _log_metrics(self, logs: dict[str, float], writer) -> None:
        """Main rank: one JSON line per logged step (the means since the last one) in
        ``output_dir/metrics.jsonl`` (appended, so a resumed run continues the file), and the
        same figures in TensorBoard if enabled."""
        if not self.env.is_main:
            return
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": self.step, **logs}) + "\n")
        if writer is not None:
            for k, v in logs.items():
                writer.add_scalar(k, v, self.step)

    def _sample_prompt(self) -> str:
        """A toy-world scene, or the first cached prompt when the text encoder is a prompt
        cache (it knows no other prompt)."""
        cached = getattr(self.text_encoder, "prompts", None)
        return cached[0] if cached else "a red circle bouncing and a yellow square moving left on a dark blue background"

    @torch.no_grad()
    def sample_video(self, prompt: str) -> torch.Tensor:
        """One (T, H, W, 3) uint8 video from the EMA (else the student), as it would be used:
        the Euler CFG sampler for a bidirectional teacher, the streaming rollout otherwise."""
        from selfforcing.diffusion.samplers import euler_sample_cfg
        from selfforcing.inference.pipeline import to_uint8
        from selfforcing.inference.rollout import rollout
        from selfforcing.models.kv_cache import KVCache

        model, p, d = self.student, self.cfg.paradigm, self.cfg.data
        was_training = model.training
        model.eval()
        with self._averaged():
            text = model.encode_text(self.text_encoder.encode([prompt]).to(self.env.device))
            shape = (1, model.config.in_channels, d.num_frames, *self.objective.latent_hw)
            g = torch.Generator(self.env.device).manual_seed(self.cfg.seed)
            if p.name == "teacher":
                neg = model.encode_text(self.objective.uncond_text)
                noise = torch.randn(shape, generator=g, device=self.env.device)
                x0 = euler_sample_cfg(lambda x, t, c: model(x, t, text if c else neg), noise, self.schedule, 32,
                                      self.cfg.loss.guidance_scale)
            else:
                chunk = (*shape[:2], p.frames_per_chunk, *shape[3:])
                cache = KVCache(len(model.blocks), p.cache_frames(d.num_frames), p.sink_frames, "relative")
                x0 = torch.cat(list(rollout(model, text, cache, self.schedule, self.objective.timesteps.to(self.env.device),
                                            chunk, d.num_frames // p.frames_per_chunk, generator=g,
                                            rolling_window=p.rolling_window)), dim=2)
        model.train(was_training)
        return to_uint8(self.vae.decode(x0))[0]

    def train_step(self) -> dict[str, float]:
        """One iteration: the generator every ``generator_every`` steps once ``critic_warmup``
        steps have passed (always, when supervised), the critic every step."""
        logs = {}
        loss = self.cfg.loss
        if not self.cfg.distillation or (self.step >= loss.critic_warmup and self.step % loss.generator_every == 0):
            logs.update(self.generator_step())
        if self.critic_opt is not None:
            logs.update(self.critic_step())
        return logs

    def _rngs(self) -> Rngs:
        # The exit-step generator depends only on (seed, step): every rank draws the same exit step.
        return Rngs(self.noise_rng, torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step))

    def generator_step(self) -> dict[str, float]:
        rngs = self._rngs()
        with _frozen(self.critic, self.head):  # SiD / GAN backpropagate through the critic: keep it fixed
            updated, logs = self._update("generator", self.student.parameters(), self.gen_opt,
                                         lambda b: self.objective.generator_loss(b, rngs))
        if updated:
            self._update_ema()
        return logs

    def critic_step(self) -> dict[str, float]:
        rngs = self._rngs()
        _, logs = self._update("critic", self.objective.critic_parameters(), self.critic_opt,
                               lambda b: self.objective.critic_loss(b, rngs))
        return logs

    def _set_learning_rates(self) -> None:
        """The config's rates at this step (``optim.lr_drops``). Set every step, so they also
        replace the rate a resumed optimiser state was saved with: a resume with another
        ``optim.lr`` anneals by hand."""
        opt = self.cfg.optim
        multiplier = opt.lr_multiplier(self.step, self.cfg.steps)
        rates = {"student": opt.lr * multiplier, "critic": opt.critic_lr * multiplier}
        for name, (_, optimizer) in self._optimizers().items():
            for group in optimizer.param_groups:
                group["lr"] = rates[name]

    def _update(self, role: str, params, optimizer, loss_fn) -> tuple[bool, dict[str, float]]:
        """One optimiser step with gradient accumulation, clipping and a non-finite guard."""
        params = [p for p in params if p.requires_grad]
        accum = self.grad_accum
        optimizer.zero_grad(set_to_none=True)
        losses, extra = [], {}
        for _ in range(accum):
            with self.autocast:
                loss, extra = loss_fn(self.next_batch())
            (loss / accum).backward()
            losses.append(loss.detach())
        grad_norm = D.full_norm(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip))
        # The update's one wait for the device: the loss (averaged over ranks there), the norm
        # and the loss's own logs come to the host together, once the backward passes are
        # queued (the guard needs them).
        total = D.mean_across_ranks(torch.stack(losses).mean(), self.env)
        total, grad_norm, *values = _to_host(total, grad_norm, *extra.values())
        logs = {f"{role}_loss": total, f"{role}_grad_norm": grad_norm, **dict(zip(extra, values))}
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            if self.env.is_main:
                log.warning("step %d: %s loss %s / grad norm %s is not finite; update skipped",
                            self.step, role, total, grad_norm)
            return False, {**logs, f"{role}_skipped": 1.0}
        optimizer.step()
        return True, logs

    def _update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.cfg.optim.ema_decay if self.step >= self.cfg.optim.ema_start else 0.0)

    def next_batch(self) -> Batch:
        items = self.data.next_items()
        device = self.env.device
        captions = [it.get("caption", it.get("prompt")) for it in items]
        batch = Batch(text=self.text_encoder.encode(captions).to(device))
        if "video" in items[0]:
            with torch.no_grad():
                batch.latents = self.vae.encode(torch.stack([it["video"] for it in items]).to(device))
        elif "latents" in items[0]:
            batch.latents = torch.stack([it["latents"] for it in items]).to(device)
        elif "trajectory" in items[0]:
            batch.trajectories = torch.stack([it["trajectory"] for it in items]).to(device)
        return batch

    def _tensorboard(self):
        if not (self.cfg.logging.tensorboard and self.env.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run replaces what the interrupted one logged after its last checkpoint.
        return SummaryWriter(str(Path(self.cfg.output_dir) / "tensorboard"), purge_step=self.step or None)

    # ---- checkpoints ------------------------------------------------------
    def save(self) -> None:
        weights = {name: D.trainable_state_dict(module) for name, module in self._modules().items()}
        if self.ema is not None:
            weights["ema"] = self._averaged_state(D.trainable_state_dict)
        optim = {name: D.optimizer_state_dict(module, opt) for name, (module, opt) in self._optimizers().items()}
        state = {"step": self.step, "skipped": self.skipped, "data_position": self.data.position,
                 "optimizers": optim, "noise_rng": self.noise_rng.get_state(), "torch_rng": torch.get_rng_state(),
                 "threads": self.threads}
        self.store.save(self.step, weights, state)

    def resume(self) -> None:
        """Continue from the newest complete checkpoint (see ``CheckpointStore.resume``)."""
        path = self.store.resume([*self._modules(), *(["ema"] if self.ema else [])], self._load_checkpoint)
        if self.env.is_main:
            log.info("resumed from %s at step %d", path, self.step)
            self._truncate_metrics()

    def _load_checkpoint(self, path: Path, weights: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        """Take every model, optimiser and random state from a checkpoint. What does not fit (a
        tensor of another shape, an optimiser or random state torch refuses) is a damaged file, so
        that the resume falls back to the checkpoint before; that one then sets all of it again."""
        if self.ema is not None:  # through the student, which takes its own weights next
            with reading(path / "ema.safetensors"):
                D.load_trainable_state_dict(self.student, weights["ema"])
            self.ema.capture()
        for name, module in self._modules().items():
            with reading(path / f"{name}.safetensors"):
                D.load_trainable_state_dict(module, weights[name])
        missing = [name for name in self._optimizers() if name not in state["optimizers"]]
        if missing:
            raise DamagedFileError(path / "state.pt", f"it holds no optimizer state for {', '.join(missing)}")
        with reading(path / "state.pt"):
            for name, (module, opt) in self._optimizers().items():
                D.load_optimizer_state_dict(module, opt, state["optimizers"][name])
            self.noise_rng.set_state(state["noise_rng"])
            torch.set_rng_state(state["torch_rng"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.data.position = state["data_position"]
        self.threads = state.get("threads")  # absent from checkpoints written before 2026-12-07

    def _truncate_metrics(self) -> None:
        """Keep the metrics of the steps up to the resumed one (none on a fresh start): the steps
        after it run again and would be logged twice. A line cut short by a kill goes too."""
        path = Path(self.cfg.output_dir) / METRICS_FILE
        if not path.is_file():
            return
        lines = [(_logged_step(line), line) for line in path.read_text(errors="replace").splitlines()]
        kept = [line for step, line in lines if step is not None and step <= self.step]
        if len(kept) == len(lines):
            return
        if self.step == 0 and any(step is not None for step, _ in lines):
            log.warning("%s holds the metrics of an earlier run in %s: starting afresh, its lines are dropped "
                        "(pass --resume to continue that run instead)", path.name, self.cfg.output_dir)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def export(self, path: str | Path) -> list[Path]:
        """Write a selfforcing model directory (EMA weights if kept) for `generate`; a LoRA run
        fuses its adapter into it and also writes the adapter alone, ``output_dir/lora.safetensors``
        (diffusers' Wan LoRA layout, for ``generate --lora`` on the base model). Returns what it wrote."""
        from selfforcing.inference.pipeline import SamplingConfig, StreamingPipeline

        p, d = self.cfg.paradigm, self.cfg.data
        weights = self._averaged_state(D.full_state_dict)
        if not self.env.is_main:
            return []
        written = [Path(path)]
        model = CausalWanModel(self.student.config)
        if self.cfg.lora is not None:
            weights = self._export_adapter(weights, written)
        model.load_weights(weights)
        # Cache-relative RoPE positions: with no sink frames they equal the absolute ones up to
        # rounding (attention sees position differences only; 240 frames of the shipped model:
        # 1 uint8 level apart on 0.005 % of pixels), and a stream is no longer stopped at the
        # end of the RoPE table (1024 latent frames).
        sampling = SamplingConfig(frames_per_chunk=p.frames_per_chunk, denoising_steps=tuple(p.denoising_steps),
                                  timestep_shift=p.timestep_shift, kv_cache_frames=p.cache_frames(d.num_frames),
                                  sink_frames=p.sink_frames, rope_positions="relative", context_noise=p.context_noise,
                                  rolling_window=p.rolling_window, height=d.height, width=d.width)
        # A prompt-embedding cache exports as the encoder it came from: streaming takes any prompt.
        text_config = getattr(self.text_encoder, "source_config", None)
        StreamingPipeline(model, self.text_encoder, self.vae, sampling).save_pretrained(path, text_config)
        self._link_components(Path(path))
        return written

    def _export_adapter(self, weights: dict[str, torch.Tensor], written: list[Path]) -> dict[str, torch.Tensor]:
        """Write the adapter of the student's (peft-named) ``weights``; return the base weights with it fused."""
        spec = self.cfg.lora.spec()
        model = lora.add_adapter(CausalWanModel(self.student.config), spec)
        model.load_state_dict(weights)
        written.append(Path(self.cfg.output_dir) / LORA_FILE)
        lora.save_file(written[-1], lora.adapter_state_dict(model), spec)
        lora.fuse(model)
        return lora.base_state_dict(model)

    def _link_components(self, path: Path) -> None:
        """A Wan-scale export reads UMT5 and the VAE from beside its transformer: link them from
        the generator's model directory rather than copy gigabytes."""
        root = loading.model_dir(self.cfg)
        for name in ("text_encoder", "tokenizer", "vae"):
            source, target = (root / name if root else None), path / name
            if source is not None and source.is_dir() and not target.exists():
                target.symlink_to(source.resolve(), target_is_directory=True)


def _to_host(*values: torch.Tensor) -> list[float]:
    """0-d tensors as floats, in one copy to the host (one wait for the device); float32,
    which every device has (MPS has no float64)."""
    return torch.stack([v.detach().to(values[0].device, torch.float32) for v in values]).tolist()


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def _fmt(t: torch.Tensor) -> str:
    return "/".join(f"{v:.1f}" for v in t.tolist())


def window_means(window: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's mean over the steps of a logging window that report it. The last step's
    figures alone would miss the generator whenever it runs on other steps than the logged one
    (``generator_every`` 2 with ``log_every`` 10 logged critic figures only)."""
    keys = dict.fromkeys(k for logs in window for k in logs)
    return {k: sum(logs[k] for logs in window if k in logs) / sum(k in logs for logs in window) for k in keys}


class _CriticGroup(nn.Module):
    """The critic and its optional GAN head, as one module for optimiser state dicts."""

    def __init__(self, critic: nn.Module, head: nn.Module | None):
        super().__init__()
        self.critic = critic
        self.head = head


def _trainable(params) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


class _frozen:
    """Disable gradients of the given modules for the duration of a generator update, then
    give back exactly the parameters that trained (a LoRA critic's base stays frozen)."""

    def __init__(self, *modules: nn.Module | None):
        self.params = [p for m in modules if m is not None for p in _trainable(m.parameters())]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False

