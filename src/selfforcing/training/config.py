"""Training configuration: one YAML file per experiment, parsed into validated dataclasses.

Every key is read by something and an unknown key is an error naming it (the reference
code's SiD config silently ran DMD). Every value is checked against its field's type and
range (``selfforcing.schema``) before anything is built. Options that only make sense for one loss or paradigm
are rejected when given to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfforcing.errors import SelfForcingError
from selfforcing.files import load_yaml
from selfforcing.models.lora import BLOCK_LINEARS, LoraSpec
from selfforcing.models.text_encoders import check_config as check_text_encoder_config
from selfforcing.schema import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, OPEN_UNIT, POSITIVE, SEED, UNIT, Range,
                                bounded, build)

PARADIGMS = ("teacher", "teacher_forcing", "diffusion_forcing", "self_forcing", "ode")
LOSSES = ("denoising", "ode", "dmd", "sid", "gan")
DATA_SOURCES = ("toy", "latents", "prompts", "ode_pairs")
# Which holistic losses and supervised paradigms go together.
SUPERVISED = {"teacher": "denoising", "teacher_forcing": "denoising", "diffusion_forcing": "denoising", "ode": "ode"}
DISTILLATION_PARADIGMS = ("self_forcing", "teacher_forcing", "diffusion_forcing")
DISTILLATION_LOSSES = ("dmd", "sid", "gan")


@dataclass
class ModelConfig:
    preset: str | None = None  # architecture of a fresh student (random init) ...
    overrides: dict = field(default_factory=dict)  # ... with these WanConfig fields changed
    path: str | None = None  # ... or a model/transformer directory to start from
    init: str | None = None  # checkpoint file (ours, or original Self-Forcing .pt) loaded on top


@dataclass
class ScoreModelConfig:
    """A frozen real score (``teacher``) or the fake score's starting point (``critic``): any
    size, as long as its latent channels, patch and text width match the generator's."""

    path: str  # diffusers or original-format model/transformer directory, or a checkpoint file
    preset: str | None = None  # architecture, needed when ``path`` is a bare checkpoint file


@dataclass
class DataConfig:
    source: str = "toy"
    path: str | None = None  # latent cache dir, prompt file, or ODE pairs file
    batch_size: int = bounded(AT_LEAST_ONE, 2)
    num_frames: int = bounded(AT_LEAST_ONE, 9)  # latent frames per video
    height: int = bounded(AT_LEAST_ONE, 32)  # pixels
    width: int = bounded(AT_LEAST_ONE, 32)
    caption_dropout: float = bounded(FRACTION, 0.0)  # teacher pretraining only (for CFG)


@dataclass
class ParadigmConfig:
    name: str = "self_forcing"
    frames_per_chunk: int = bounded(AT_LEAST_ONE, 3)
    denoising_steps: list[int] = bounded(Range(1, 1000), default_factory=lambda: [1000, 750, 500, 250])
    timestep_shift: float = bounded(POSITIVE, 5.0)
    exit_per_chunk: bool = False
    hide_first_chunk_from_last: bool = True  # §3.4, self_forcing only
    context_noise: float = bounded(Range(0, 1000, high_open=True), 0.0)
    # self_forcing only: which output of a chunk stopped at the exit step fills the KV cache:
    # "exit" (released) the early estimate, "final" (ours) the chunk denoised on to the last step
    context_from: str = "exit"
    gradient_checkpointing: bool = False
    # Long horizons (self_forcing only; docs/TRAINING.md, "Long videos"). rollout_frames: stream
    # this many latent frames, the training window of data.num_frames drawn uniformly from them
    # (Self-Forcing++ / LongLive; null: the training length, as released); kv_cache_frames and
    # sink_frames: the rolling cache of that rollout (null: data.num_frames, never evicting);
    # rolling_window: Rolling Forcing's joint denoising window.
    rollout_frames: int | None = bounded(AT_LEAST_ONE, None)
    kv_cache_frames: int | None = bounded(AT_LEAST_ONE, None)
    sink_frames: int = bounded(NON_NEGATIVE, 0)
    rolling_window: bool = False

    def cache_frames(self, num_frames: int) -> int:
        """The rolling cache of a self-forcing rollout, in latent frames."""
        return num_frames if self.kv_cache_frames is None else self.kv_cache_frames


LONG_HORIZON_DEFAULTS = {"rollout_frames": None, "kv_cache_frames": None, "sink_frames": 0, "rolling_window": False}
SCORE_T_SAMPLING = ("official", "continuous")
CONTEXT_FROM = ("exit", "final")


@dataclass
class LossConfig:
    name: str = "dmd"
    # Classifier-free guidance of the real score and of the ODE-pair teacher, always in the
    # standard convention ``uncond + guidance_scale * (cond - uncond)``. The official
    # Self-Forcing code writes its DMD/SiD guidance as ``cond + s * (cond - uncond)``, so its
    # ``guidance_scale: 3.0`` is 4.0 here; its ODE-pair script already uses the standard form.
    guidance_scale: float = bounded(NON_NEGATIVE, 3.0)
    negative_prompt: str = ""  # empty: the all-padding (zero) text embedding
    # Score / critic timesteps. "official": integer t uniform in {0..999}, shifted, clamped to
    # [min_t, max_t] * 1000, noise level read from the nearest of the 1000 training timesteps
    # (the released code). "continuous": base level uniform in [min_t, max_t], then shifted.
    score_t_sampling: str = "official"
    min_t: float = bounded(UNIT, 0.02)
    max_t: float = bounded(UNIT, 0.98)
    # The released real/fake score wrappers convert flow to x0 with the sigma of their own
    # table (shift 8, WanDiffusionWrapper's default), not the generator's: 8.0 reproduces that
    # (up to 20 % apart near t = 27, 0.6 % on average); null reads one table (ours).
    score_sigma_shift: float | None = bounded(POSITIVE, None)
    generator_every: int = bounded(AT_LEAST_ONE, 5)  # critic : generator update ratio
    # Critic-only steps before the first generator update (DMD2's warm-up, an option of ours; the
    # released code: 0). A fresh critic is the teacher without guidance, so the first DMD
    # gradients are the guidance direction alone, (w - 1)(cond - uncond).
    critic_warmup: int = bounded(NON_NEGATIVE, 0)
    # ode only: Euler steps of the ODE-pair teacher (default 48)
    ode_sampling_steps: int | None = bounded(AT_LEAST_ONE, None)
    # ode only: probability that a chunk is the clean endpoint (t = 0), context for later chunks as
    # the KV cache is at inference (an option of ours; the released code: 0, every chunk noisy)
    ode_clean_context: float | None = bounded(FRACTION, None)
    sid_alpha: float | None = None  # sid only (default 1.0)
    r1_weight: float | None = bounded(NON_NEGATIVE, None)  # gan only (default 1.0; the released code: 0)
    gan_feature_layer: int | None = bounded(NON_NEGATIVE, None)  # gan only (default: the middle block)
    gan_generator_weight: float | None = bounded(NON_NEGATIVE, None)  # gan only (default 1.0; the released code: 0.01)
    gan_critic_weight: float | None = bounded(NON_NEGATIVE, None)  # gan only (default 1.0; the released code: 0.01)
    gan_shared_noise: bool | None = None  # gan only: real and fake share t and noise (default false; released: true)


@dataclass
class OptimConfig:
    lr: float = bounded(POSITIVE, 2e-6)
    critic_lr: float = bounded(POSITIVE, 4e-7)
    betas: list[float] = bounded(FRACTION, default_factory=lambda: [0.0, 0.999])
    weight_decay: float = bounded(NON_NEGATIVE, 0.01)
    grad_accum: int = bounded(AT_LEAST_ONE, 1)
    # Effective batch over all ranks (the official ``total_batch_size``): when set, the
    # accumulation is derived as total / (data.batch_size * world size) and must divide.
    total_batch_size: int | None = bounded(AT_LEAST_ONE, None)
    grad_clip: float = bounded(POSITIVE, 10.0)
    ema_decay: float | None = bounded(OPEN_UNIT, 0.99)
    ema_start: int = bounded(NON_NEGATIVE, 200)
    # Step decay of both rates: [fraction of `steps`, multiplier] pairs, e.g. [[0.64, 0.3], [0.84, 0.1]]
    # runs at lr until 64 % of the steps, then 0.3 lr, then 0.1 lr from 84 % (empty: constant, as released).
    lr_drops: list[list[float]] = field(default_factory=list)

    def lr_multiplier(self, step: int, steps: int) -> float:
        reached = [multiplier for fraction, multiplier in self.lr_drops if step >= fraction * steps]
        return reached[-1] if reached else 1.0


@dataclass
class LoraConfig:
    """Train low-rank adapters (peft LoRA) instead of the whole generator: its weights stay
    frozen, checkpoints hold the adapters and their optimiser state, and the run exports
    ``output_dir/lora.safetensors`` (diffusers' Wan LoRA layout) beside the fused model."""

    rank: int = bounded(AT_LEAST_ONE, 16)
    alpha: float | None = bounded(POSITIVE, None)  # the update is scaled by alpha / rank; default: rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # layer names (or their ends)
    dropout: float = bounded(FRACTION, 0.0)  # on the adapters' input
    critic: bool = False  # distillation: adapters on the critic too (false: the whole critic trains)

    def spec(self) -> LoraSpec:
        return LoraSpec(self.rank, float(self.rank if self.alpha is None else self.alpha), tuple(self.target_modules),
                        self.dropout)


@dataclass
class LogConfig:
    log_every: int = bounded(AT_LEAST_ONE, 10)
    checkpoint_every: int = bounded(AT_LEAST_ONE, 100)
    sample_every: int = bounded(NON_NEGATIVE, 0)  # 0: no sample videos in TensorBoard
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    name: str
    output_dir: str
    steps: int = bounded(AT_LEAST_ONE)
    seed: int = bounded(SEED, 0)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ScoreModelConfig | None = None  # real score (frozen)
    critic: ScoreModelConfig | None = None  # fake score / discriminator init (default: a copy of the teacher)
    text_encoder: dict = field(default_factory=lambda: {"type": "hash", "dim": 64, "max_length": 32})
    vae: dict = field(default_factory=lambda: {"type": "pixel", "patch": 2})
    data: DataConfig = field(default_factory=DataConfig)
    paradigm: ParadigmConfig = field(default_factory=ParadigmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig | None = None  # set: fine-tune with LoRA adapters on the frozen generator
    logging: LogConfig = field(default_factory=LogConfig)

    @property
    def distillation(self) -> bool:
        return self.loss.name in DISTILLATION_LOSSES

    def fingerprint(self, with_schedule: bool = False) -> str:
        """Hash of everything that shapes the model and optimiser state (not run length,
        logging, the learning rates and their drops, or the generator/critic schedule), so a resume
        from another experiment's checkpoint is refused. The rates may change on resume (annealing
        by hand): the trainer applies the config's. So may the schedule: a critic warmed up alone
        (a huge ``critic_warmup``) resumes into distillation with the warm-up set to its step.
        ``with_schedule`` hashes the schedule too, as checkpoints written before 2026-11-26 were
        fingerprinted: they resume under an unchanged schedule."""
        d = dataclasses.asdict(self)
        for key in ("steps", "logging", "output_dir", "device"):
            d.pop(key)
        for key in ("lr", "critic_lr", "lr_drops"):
            d["optim"].pop(key)
        if not with_schedule:
            for key in ("critic_warmup", "generator_every"):
                d["loss"].pop(key)
        for key, default in LONG_HORIZON_DEFAULTS.items():  # (checkpoints from before these keys still resume)
            if d["paradigm"][key] == default:
                d["paradigm"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise SelfForcingError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
    data = load_yaml(path)
    if not isinstance(data, dict | None):
        raise SelfForcingError(f"{path} must hold a mapping of config keys to values, got a {type(data).__name__}")
    return config_from_dict(merge_overrides(data or {}, overrides or {}))


# The models shipped in the package, each named after the run of a config in configs/toy that made it.
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "assets"


def check_model_paths(cfg: TrainConfig, config_path: Path,
                      roles: tuple[str, ...] = ("model", "teacher", "critic")) -> None:
    """Refuse, before anything loads, a model of ``roles`` that a config starts from and that is
    not there, and say where it comes from: the config beside this one whose run writes it
    (``output_dir/model``), and the shipped model of that run, if the package has one."""
    for role in roles:
        source = getattr(cfg, role)
        value = None if source is None else source.path
        if value is None or Path(value).exists():
            continue
        key = f"{role}.path"
        message = f"{key} {value} in {config_path} does not exist"
        producer = _config_writing(Path(value), config_path.parent)
        if producer is not None:
            message += f"; `selfforcing train {producer[0]}` writes it"
            shipped = SHIPPED_MODELS / producer[1]
            if shipped.is_dir():
                message += f", or start from the shipped model of that run: --set {key}={_shown(shipped)}"
        raise SelfForcingError(message)


def _config_writing(model_dir: Path, folder: Path) -> tuple[Path, str] | None:
    """The config in ``folder`` whose run exports ``model_dir``, with its run name."""
    for candidate in sorted(folder.glob("*.yaml")):
        try:
            data = load_yaml(candidate)
        except SelfForcingError:
            continue
        if isinstance(data, dict) and isinstance(data.get("output_dir"), str) \
                and Path(data["output_dir"]) / "model" == model_dir:
            return candidate, str(data.get("name"))
    return None


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory where it lies below it (shorter to type)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def merge_overrides(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base``, section by section (``data.batch_size`` keeps ``data.path``)."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = merge_overrides(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def config_from_dict(data: dict) -> TrainConfig:
    cfg = build(TrainConfig, data)
    validate(cfg)
    return cfg


def _check_lr_drops(drops: list) -> None:
    example = "e.g. [[0.64, 0.3], [0.84, 0.1]]"
    for pair in drops:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) for x in pair)):
            raise SelfForcingError(f"optim.lr_drops takes [fraction of steps, multiplier] pairs ({example}), got {pair!r}")
        if not (0 < pair[0] < 1 and pair[1] > 0):
            raise SelfForcingError(f"optim.lr_drops pair {pair}: the fraction must lie in (0, 1) and the multiplier be "
                                   "positive")
    fractions = [pair[0] for pair in drops]
    if fractions != sorted(set(fractions)):
        raise SelfForcingError(f"optim.lr_drops fractions must increase ({example}), got {fractions}")


def validate(cfg: TrainConfig) -> None:
    p, loss, data, opt = cfg.paradigm, cfg.loss, cfg.data, cfg.optim
    _one_of("paradigm.name", p.name, PARADIGMS)
    _one_of("loss.name", loss.name, LOSSES)
    _one_of("data.source", data.source, DATA_SOURCES)
    _one_of("paradigm.context_from", p.context_from, CONTEXT_FROM)
    if p.context_from != "exit" and p.name != "self_forcing":
        raise SelfForcingError(f"paradigm.context_from {p.context_from} applies to self_forcing only")
    _check_long_horizon(p, data.num_frames)
    if loss.name in DISTILLATION_LOSSES:
        if p.name not in DISTILLATION_PARADIGMS:
            raise SelfForcingError(f"loss {loss.name} needs a generator paradigm ({', '.join(DISTILLATION_PARADIGMS)}), "
                                   f"not {p.name}")
        if cfg.teacher is None:
            raise SelfForcingError(f"loss {loss.name} needs a teacher (real score and critic initialisation): "
                                   "set teacher.path")
    elif SUPERVISED.get(p.name) != loss.name:
        raise SelfForcingError(f"paradigm {p.name} trains with loss {SUPERVISED.get(p.name, 'dmd/sid/gan')}, "
                               f"not {loss.name}")
    if cfg.critic is not None and not cfg.distillation:
        raise SelfForcingError(f"critic is set but loss {loss.name} trains no critic")
    if cfg.lora is not None and cfg.lora.critic and not cfg.distillation:
        raise SelfForcingError(f"lora.critic is true but loss {loss.name} trains no critic; drop it")
    if cfg.lora is not None and not cfg.lora.target_modules:
        raise SelfForcingError("lora.target_modules is empty; name the layers to adapt, e.g. [to_q, to_k, to_v, to_out.0]")
    _one_of("loss.score_t_sampling", loss.score_t_sampling, SCORE_T_SAMPLING)
    if loss.min_t > loss.max_t:
        raise SelfForcingError(f"loss.min_t {loss.min_t} is above loss.max_t {loss.max_t}; min_t <= max_t")
    _only_for(loss.ode_sampling_steps, "loss.ode_sampling_steps", loss.name == "ode")
    _only_for(loss.ode_clean_context, "loss.ode_clean_context", loss.name == "ode")
    _only_for(loss.score_sigma_shift, "loss.score_sigma_shift", loss.name in ("dmd", "sid")
              and loss.score_t_sampling == "official")
    _only_for(loss.sid_alpha, "loss.sid_alpha", loss.name == "sid")
    _only_for(loss.r1_weight, "loss.r1_weight", loss.name == "gan")
    for key in ("gan_feature_layer", "gan_generator_weight", "gan_critic_weight", "gan_shared_noise"):
        _only_for(getattr(loss, key), f"loss.{key}", loss.name == "gan")
    if data.caption_dropout and p.name != "teacher":
        raise SelfForcingError("data.caption_dropout only applies to paradigm teacher")
    needs_video = loss.name in ("denoising", "gan") or p.name in ("teacher_forcing", "diffusion_forcing")
    if needs_video and data.source not in ("toy", "latents"):
        raise SelfForcingError(f"{p.name} with {loss.name} trains on videos: data.source must be toy or latents")
    if (p.name == "ode") != (data.source == "ode_pairs"):
        raise SelfForcingError("paradigm ode trains on data.source ode_pairs (written by `selfforcing ode-pairs`), "
                               "and only it does")
    if data.source != "toy" and not data.path:
        raise SelfForcingError(f"data.source {data.source} needs data.path")
    if (cfg.model.preset is None) == (cfg.model.path is None):
        raise SelfForcingError("set exactly one of model.preset (a fresh model) and model.path (a saved one)")
    if cfg.model.overrides and cfg.model.path is not None:
        raise SelfForcingError("model.overrides changes a preset's architecture; it does not apply to model.path")
    if data.num_frames % p.frames_per_chunk:
        raise SelfForcingError(f"data.num_frames {data.num_frames} is not a multiple of "
                               f"paradigm.frames_per_chunk {p.frames_per_chunk}")
    if opt.total_batch_size is not None and opt.grad_accum != 1:
        raise SelfForcingError("set optim.total_batch_size or optim.grad_accum, not both")
    if len(opt.betas) != 2:
        raise SelfForcingError(f"optim.betas must be two numbers, got {opt.betas}")
    _check_lr_drops(opt.lr_drops)
    if not p.denoising_steps:
        raise SelfForcingError("paradigm.denoising_steps must list at least one timestep, e.g. [1000, 750, 500, 250]")
    check_text_encoder_config(cfg.text_encoder)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise SelfForcingError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def _check_long_horizon(p: ParadigmConfig, num_frames: int) -> None:
    """The long-horizon options of self_forcing: each in one line, before anything is built."""
    given = [key for key, default in LONG_HORIZON_DEFAULTS.items() if getattr(p, key) != default]
    if not given:
        return
    if p.name != "self_forcing":
        raise SelfForcingError(f"paradigm.{given[0]} applies to self_forcing only")
    n, cache = p.frames_per_chunk, p.cache_frames(num_frames)
    rollout = num_frames if p.rollout_frames is None else p.rollout_frames
    if rollout < num_frames or rollout % n:
        raise SelfForcingError(f"paradigm.rollout_frames {rollout} must be a multiple of frames_per_chunk ({n}) and at "
                               f"least data.num_frames ({num_frames}), the window that trains")
    if cache - p.sink_frames < n:
        raise SelfForcingError(f"paradigm.kv_cache_frames ({cache}) minus sink_frames ({p.sink_frames}) must hold at "
                               f"least one chunk ({n} frames)")
    if p.hide_first_chunk_from_last and (rollout > num_frames or p.sink_frames or p.rolling_window):
        raise SelfForcingError("paradigm.hide_first_chunk_from_last (§3.4) applies to a plain rollout of the training "
                               "length; with a long rollout the rolling cache evicts the first chunk itself, sinks "
                               "must stay visible, and a rolling window hides nothing: set it false")
    if p.rolling_window and (p.context_from != "final" or p.exit_per_chunk):
        raise SelfForcingError("paradigm.rolling_window fills the cache with each chunk's final output and draws one "
                               "exit step per video (Rolling Forcing): set context_from: final and exit_per_chunk: false")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per update on each rank: ``optim.grad_accum``, or what
    ``optim.total_batch_size`` asks for at this world size."""
    total = cfg.optim.total_batch_size
    if total is None:
        return cfg.optim.grad_accum
    per_update = cfg.data.batch_size * world_size
    if total % per_update:
        raise SelfForcingError(f"optim.total_batch_size {total} is not a multiple of data.batch_size "
                               f"{cfg.data.batch_size} x {world_size} processes")
    return total // per_update


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SelfForcingError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _only_for(value: Any, name: str, applies: bool) -> None:
    if value is not None and not applies:
        raise SelfForcingError(f"{name} is set but does not apply to this loss")
