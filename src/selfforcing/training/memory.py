"""Per-GPU memory of a training config, before launching it (``selfforcing train --dry-run``).

Every network is built on the meta device from its architecture alone (no weights, data,
text encoder, VAE or process group), so a user learns on a laptop whether the run needs 8
or 64 80 GB GPUs. The layout is the trainer's (see ``trainer.py`` and ``distributed.shard``):
FSDP2 shards every network fully over the N ranks with fp32 master weights, gathers them in
bf16 for compute, and reduces gradients in fp32.

What is counted, per GPU:

* weights: fp32 / N for the generator, its EMA copy (``optim.ema_decay``), the frozen
  teacher and the critic; gradients (fp32 / N) and AdamW's two fp32 moments (2 x fp32 / N)
  for the two trained networks only. The GAN head is small and is not sharded (whole on
  every rank).
* gathered: FSDP2 all-gathers one block at a time in bf16 and prefetches the next, so two
  blocks of the widest network; each network's root unit (embeddings, head) stays gathered
  through its forward and backward; and one block's unsharded gradient of the widest trained
  network (bf16, cast to fp32 for the reduction).
* activations (an estimate, bf16): see :func:`_saved` and :func:`_internals`; the peak over
  the steps of one iteration (generator step, critic step).
* the Self Forcing KV cache: K and V of every latent frame for every generator layer.

Not counted: the CUDA context, NCCL buffers, allocator fragmentation (the 80 GB threshold
leaves ~5 GiB of an H100 for them), text embeddings and the text K/V (MBs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfforcing.errors import SelfForcingError
from selfforcing.models.wan import CausalWanModel, WanConfig, preset
from selfforcing.training import loading
from selfforcing.training.config import ScoreModelConfig, TrainConfig, grad_accum_steps
from selfforcing.training.losses.gan import DiscriminatorHead
from selfforcing.training.paradigms.self_forcing import rollout_cache

GIB = 2**30
FP32, BF16 = 4, 2
GPU_BYTES = 80 * 10**9  # "80 GB" in decimal bytes (74.5 GiB): an H100 shows ~79.6 GiB
# A model path missing on this machine still names its size (the Wan2.1 directory names do).
_SIZE_PRESETS = (("14b", "wan2.1-14b"), ("1.3b", "wan2.1-1.3b"))


@dataclass(frozen=True)
class Row:
    """One network's sharded state on each GPU."""

    role: str
    parameters: int
    params_gib: float
    grads_gib: float = 0.0
    optim_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return self.params_gib + self.grads_gib + self.optim_gib


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    rows: list[Row]
    gathered_gib: float  # bf16 blocks and roots gathered at a time (not sharded)
    activations_gib: float  # estimate, at the peak step
    peak_step: str  # which step of the iteration holds the activation peak
    kv_cache_gib: float  # Self Forcing rollout; 0 for other paradigms
    tokens: int  # tokens of one forward over the whole batch of videos
    batch_size: int
    grad_accum: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def unsharded_gib(self) -> float:
        """What more GPUs do not reduce."""
        return self.gathered_gib + self.activations_gib + self.kv_cache_gib

    @property
    def total_gib(self) -> float:
        return sum(r.total_gib for r in self.rows) + self.unsharded_gib

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def fits(self) -> bool:
        return self.total_gib * GIB <= GPU_BYTES


def plan_memory(cfg: TrainConfig, world_size: int) -> MemoryPlan:
    """The per-GPU memory of training ``cfg`` with FSDP2 over ``world_size`` GPUs."""
    if not isinstance(world_size, int) or world_size < 1:
        raise SelfForcingError(f"world size must be a positive integer, got {world_size!r}")
    notes: list[str] = []
    if cfg.lora is not None:  # adapters are a fraction of a percent of the weights
        notes.append("lora: planned as a full fine-tune, an upper bound (only the adapters train and keep EMA, "
                     "gradients and AdamW moments)")
    nets = _networks(cfg, notes)
    tokens = _tokens(cfg, nets["generator"].config)
    steps = {name: _step_bytes(forwards) for name, forwards in _steps(cfg, nets, tokens).items()}
    peak_step = max(steps, key=steps.get)
    return MemoryPlan(
        world_size=world_size, rows=_rows(cfg, nets, world_size), gathered_gib=_gathered_bytes(cfg, nets) / GIB,
        activations_gib=steps[peak_step] / GIB, peak_step=peak_step,
        kv_cache_gib=_kv_cache_bytes(cfg, nets, tokens) / GIB,
        tokens=tokens, batch_size=cfg.data.batch_size, grad_accum=grad_accum_steps(cfg, world_size),
        checkpointing=cfg.paradigm.gradient_checkpointing, notes=notes,
    )


# ---- networks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Net:
    """A network's sizes, counted on a meta-device build, and whether its forwards that carry
    gradient are recomputed block by block (the trainer checkpoints every network as
    ``paradigm.gradient_checkpointing`` says; only SiD backpropagates through the teacher)."""

    config: WanConfig
    parameters: int
    block_parameters: int
    checkpointed: bool

    @property
    def root_parameters(self) -> int:
        return self.parameters - self.config.num_layers * self.block_parameters


def _net(config: WanConfig, checkpointed: bool) -> _Net:
    with torch.device("meta"):
        model = CausalWanModel(config)
    return _Net(config, _count(model), _count(model.blocks[0]), checkpointed)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _networks(cfg: TrainConfig, notes: list[str]) -> dict[str, _Net]:
    """generator, and the teacher and critic when the trainer builds them (the critic defaults
    to a copy of the teacher)."""
    ckpt = cfg.paradigm.gradient_checkpointing
    gen = _architecture(cfg.model.path, lambda: loading.generator_config(cfg.model), "model", notes)
    configs = {"generator": gen}
    if cfg.distillation:  # (an ODE-init config's teacher only serves `ode-pairs`)
        configs["teacher"] = _score_architecture(cfg.teacher, "teacher", notes)
        critic = cfg.critic
        configs["critic"] = configs["teacher"] if critic is None else _score_architecture(critic, "critic", notes)
    for role in ("teacher", "critic"):
        if role in configs:
            loading.check_compatible(gen, configs[role], role)
    return {role: _net(c, ckpt) for role, c in configs.items()}


def _score_architecture(src: ScoreModelConfig, role: str, notes: list[str]) -> WanConfig:
    return _architecture(src.path, lambda: loading.score_model_config(src, role), role, notes,
                         known=src.preset is not None)


def _architecture(path: str | None, read, role: str, notes: list[str], known: bool = False) -> WanConfig:
    """``read()`` (the directory's config.json, or the preset); for a path not on this machine,
    the Wan2.1 preset its name gives, so the shipped configs plan without the weights."""
    if path is None or known or Path(path).exists():
        return read()
    name = Path(path).name.lower()
    for size, preset_name in _SIZE_PRESETS:
        if size in name:
            notes.append(f"{role}.path {path} not found: planned with preset {preset_name} (from its name)")
            return preset(preset_name)
    raise SelfForcingError(f"{role}.path {path} does not exist and its name gives no Wan2.1 size (14B or 1.3B): "
                           "point it at the model directory (its config.json is all the dry run reads)")


# ---- sharded state ----------------------------------------------------------------------
def _rows(cfg: TrainConfig, nets: dict[str, _Net], world_size: int) -> list[Row]:
    gen = nets["generator"].parameters
    rows = [_row("generator", gen, world_size, trained=True)]
    if cfg.optim.ema_decay:
        rows.append(_row("EMA", gen, world_size))
    if "teacher" in nets:
        rows.append(_row("teacher", nets["teacher"].parameters, world_size))
    if "critic" in nets:
        rows.append(_row("critic", nets["critic"].parameters, world_size, trained=True))
    if cfg.loss.name == "gan":
        with torch.device("meta"):
            head = _count(DiscriminatorHead(nets["critic"].config.dim))
        rows.append(_row("GAN head", head, 1, trained=True))  # the trainer does not shard it
    return rows


def _row(role: str, parameters: int, shards: int, trained: bool = False) -> Row:
    """fp32 weights over ``shards`` ranks; a trained network adds fp32 gradients and AdamW's
    two fp32 moments, sharded alike."""
    per = parameters * FP32 / shards / GIB
    return Row(role, parameters, per, per if trained else 0.0, 2 * per if trained else 0.0)


def _gathered_bytes(cfg: TrainConfig, nets: dict[str, _Net]) -> int:
    blocks = 2 * max(n.block_parameters for n in nets.values()) * BF16
    roots = sum(n.root_parameters for n in nets.values()) * BF16
    trained = [nets["generator"]] + ([nets["critic"]] if "critic" in nets else [])
    grads = max(n.block_parameters for n in trained) * (BF16 + FP32)
    return blocks + roots + grads


# ---- activations ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Forward:
    net: _Net
    tokens: int
    cache: int = 0  # tokens of the KV cache it attends (Self Forcing rollout)
    grad: bool = False
    masked: bool = False  # block-causal (tokens x tokens) mask: teacher / diffusion forcing, ODE


def _saved(f: _Forward) -> int:
    """Bytes a forward that carries gradient keeps until its backward. Checkpointed: each
    block's input (tokens x dim); the K/V window it attended is a view of the KV cache (counted
    there), not a copy. Not checkpointed: each block's input and internals. A block-causal mask
    (1 byte per token pair) is held for the backward too."""
    if not f.grad:
        return 0
    c = f.net.config
    mask = f.tokens**2 if f.masked else 0
    if f.net.checkpointed:
        return c.num_layers * f.tokens * c.dim * BF16 + mask
    return c.num_layers * (f.tokens * c.dim * BF16 + _internals(f)) + mask


def _internals(f: _Forward) -> int:
    """One block's intermediate tensors, alive while it runs (and while the backward recomputes
    it): normed input, q, k, v, attention output (5 x dim), the FFN hidden before and after GELU
    (2 x ffn_dim) per token; the cache's keys and values joined to the chunk's and the rotated
    keys (3 x dim per cached token); a mask's bool and the bf16 bias attention builds of it."""
    c = f.net.config
    mask = 3 * f.tokens**2 if f.masked else 0
    return (f.tokens * (5 * c.dim + 2 * c.ffn_dim) + 3 * f.cache * c.dim) * BF16 + mask


def _step_bytes(forwards: list[_Forward]) -> int:
    """Peak of one step: everything saved for its backward, plus the largest block at work."""
    return sum(_saved(f) for f in forwards) + max(_internals(f) for f in forwards)


def _steps(cfg: TrainConfig, nets: dict[str, _Net], tokens: int) -> dict[str, list[_Forward]]:
    """The forwards of each step of one iteration (the steps run one after the other)."""
    gen, p, loss = nets["generator"], cfg.paradigm, cfg.loss
    if not cfg.distillation:
        doubled = 2 if p.name == "teacher_forcing" else 1  # [clean ; noisy] frames in one sequence
        return {"training step": [_Forward(gen, doubled * tokens, grad=True, masked=p.name != "teacher")]}
    teacher, critic = nets["teacher"], nets["critic"]
    sid = loss.name == "sid"  # SiD backpropagates through both scores; DMD runs them without gradient
    scores = [_Forward(teacher, tokens, grad=sid)] * 2 + [_Forward(critic, tokens, grad=sid)]
    if loss.name == "gan":
        scores = [_Forward(critic, tokens, grad=True)]
    r1 = (1.0 if loss.r1_weight is None else loss.r1_weight) > 0
    critic_forwards = 1 if loss.name != "gan" else 3 if r1 else 2  # GAN: fake, real (+ R1's perturbed real)
    return {"generator step": _student_samples(cfg, gen, tokens, grad=True) + scores,
            "critic step": _student_samples(cfg, gen, tokens, grad=False)
            + [_Forward(critic, tokens, grad=True)] * critic_forwards}


def _student_samples(cfg: TrainConfig, gen: _Net, tokens: int, grad: bool) -> list[_Forward]:
    """Self Forcing: per chunk, one forward with gradient (its exit step) attending to the KV
    cache of the chunks before it; the other denoising steps and the cache fill run without
    gradient at the same sizes. Teacher / diffusion forcing: one forward over [context ; noisy]."""
    p, frames = cfg.paradigm, cfg.data.num_frames
    if p.name != "self_forcing":
        return [_Forward(gen, 2 * tokens, grad=grad, masked=True)]
    chunks, per_frame = frames // p.frames_per_chunk, tokens // frames
    chunk = tokens // chunks
    before = (p.rollout_frames or frames) - frames  # frames a long rollout's window may come after, at most
    held = [min(before + i * p.frames_per_chunk, p.cache_frames(frames)) * per_frame for i in range(chunks)]
    if p.rolling_window:  # the windows with gradient tile the video: one in every len(steps), each that many chunks
        steps = len(p.denoising_steps)
        return [_Forward(gen, steps * chunk, cache=held[-1], grad=grad) for _ in range(-(-(chunks + steps - 1) // steps))]
    return [_Forward(gen, chunk, cache=cache, grad=grad) for cache in held]


def _kv_cache_bytes(cfg: TrainConfig, nets: dict[str, _Net], tokens: int) -> int:
    """K and V (dim each per token, bf16) of every latent frame the cache holds, for every generator layer;
    counted as alive through the whole step (it is freed once the rollout ends)."""
    p, frames = cfg.paradigm, cfg.data.num_frames
    if p.name != "self_forcing":
        return 0
    c = nets["generator"].config
    held, _ = rollout_cache(frames, p.rollout_frames, p.kv_cache_frames)  # hidden frames included
    return c.num_layers * 2 * (tokens // frames) * held * c.dim * BF16


def _tokens(cfg: TrainConfig, model: WanConfig) -> int:
    """batch x frames x (h / patch) x (w / patch), with h, w the latent size."""
    d, ratio = cfg.data, _vae_ratio(cfg.vae)
    if d.height % ratio or d.width % ratio:
        raise SelfForcingError(f"data.height/width {d.height}x{d.width} must be multiples of the VAE's spatial "
                               f"ratio {ratio}")
    pt, ph, pw = model.patch_size
    h, w = d.height // ratio, d.width // ratio
    if d.num_frames % pt or h % ph or w % pw:
        raise SelfForcingError(f"latent size {d.num_frames}x{h}x{w} is not divisible by the patch size "
                               f"{model.patch_size}: change data.num_frames/height/width")
    return d.batch_size * (d.num_frames // pt) * (h // ph) * (w // pw)


def _vae_ratio(vae: dict) -> int:
    """Pixels per latent cell, from the config alone (nothing is loaded)."""
    kind = vae.get("type") if isinstance(vae, dict) else None
    if kind == "wan":
        return 8
    if kind == "pixel":
        return vae.get("patch", 2)
    raise SelfForcingError(f"unknown VAE type {kind!r} in vae; expected 'pixel' or 'wan'")


# ---- report -----------------------------------------------------------------------------
def format_plan(plan: MemoryPlan) -> str:
    """A markdown table of the per-GPU figures and a few lines on how to read it."""
    lines = [(f"Per-GPU memory (GiB), FSDP2 full sharding over {plan.world_size} GPU(s), bf16 compute, "
              f"gradient checkpointing {'on' if plan.checkpointing else 'off'}:"), "",
             "| | parameters | weights | gradients | optimizer | total |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in plan.rows:
        lines.append(f"| {r.role} | {_human(r.parameters)} | {r.params_gib:.2f} | {_gib(r.grads_gib)} | "
                     f"{_gib(r.optim_gib)} | {r.total_gib:.2f} |")
    extra = [("gathered bf16 blocks and roots", plan.gathered_gib),
             (f"activations (estimate, {plan.peak_step})", plan.activations_gib)]
    if plan.kv_cache_gib:
        extra.append(("KV cache (Self Forcing rollout)", plan.kv_cache_gib))
    lines += [f"| {name} | | | | | {value:.2f} |" for name, value in extra]
    lines += [f"| **total per GPU** | | | | | **{plan.total_gib:.2f}** |", ""]
    verdict = "fits" if plan.fits else "does not fit"
    lines += [
        (f"total per GPU: {plan.total_gib:.1f} GiB: {verdict} an 80 GB GPU ({GPU_BYTES / GIB:.1f} GiB); "
         f"{plan.unsharded_gib:.1f} GiB of it (gathered, activations, KV cache) does not shrink with more GPUs"),
        (f"effective batch: {plan.batch_size} per GPU x {plan.world_size} GPUs x {plan.grad_accum} accumulation "
         f"= {plan.effective_batch}"),
        f"tokens per forward over the whole video batch: {plan.tokens}",
        *(f"note: {n}" for n in plan.notes),
        ("Activations are an estimate (block inputs kept by checkpointing, one block's internals at work); "
         "the CUDA context, NCCL buffers and fragmentation are not counted."),
    ]
    return "\n".join(lines)


def _human(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _gib(value: float) -> str:
    return f"{value:.2f}" if value else "-"
