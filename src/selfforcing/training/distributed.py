"""Data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

All parallelism lives here, wrapped around unmodified models: every transformer block is
its own FSDP unit, the root holds the embeddings and head. NCCL on GPUs, gloo on CPU. Under
a single process every helper degrades to the plain, unsharded behaviour.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from selfforcing.errors import SelfForcingError
from selfforcing.utils import torch_device

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; pick this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device(device)  # one that exists here, or an error naming the ones that do
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv(0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev)


def shard(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2-shard a Wan model in place (each block, then the root); no-op on one process."""
    if not env.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # On GPUs, as the released code's ``mixed_precision: true``: fp32 shards, bf16 gathers and
    # compute, fp32 gradient reduction. The CPU (gloo) path stays fp32 throughout.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if env.device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    encode_text = model.encode_text

    def encode_text_copy(context: torch.Tensor):
        # The text projection's output is a view (a 3-D Linear); FSDP2 warns about views
        # returned from a forward method, so hand back an owned copy (B x L x dim, cheap).
        ctx = encode_text(context)
        return replace(ctx, text=ctx.text.clone())

    model.encode_text = encode_text_copy
    register_fsdp_forward_method(model, "encode_text")  # runs root-level weights outside forward
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective: every rank must call it)."""
    return get_model_state_dict(model, options=FULL)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors of the parameters that train: all of a full fine-tune, only the
    adapters of a LoRA run (what a checkpoint keeps; collective)."""
    return get_model_state_dict(model, options=replace(FULL, ignore_frozen_params=True))


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` wrote; it must name exactly the trainable parameters."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise SelfForcingError(f"checkpoint weights do not match the model's trainable parameters "
                               f"({len(odd)} differ, e.g. {odd[0]})")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def mean_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a logged 0-d tensor over ranks, on the device (no wait for it), so every rank
    reports the global figure."""
    if not env.distributed:
        return value
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total / env.world_size


def full_norm(value: torch.Tensor) -> torch.Tensor:
    """A gradient norm that may be a DTensor under FSDP2, as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    """Leave the process group together: a rank that tears down gloo while another is still
    working (rank 0 writes the exported model alone) can abort the job."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(env: DistEnv) -> None:
    """End a finished torchrun worker without interpreter finalization.

    FSDP2's DTensor sharding caches keep the process group alive past
    ``destroy_process_group`` (its gloo threads are still running), so the group's C++
    destructor would otherwise run during interpreter teardown, where it can abort the
    process ("terminate called without an active exception", seen on the CI machine).
    Everything is written and the group is gone, so flush and leave. No-op on one process.
    """
    if not env.distributed:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
