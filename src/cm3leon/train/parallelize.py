"""Parallelism applied from outside the model: process groups, DDP, FSDP2, compile and
activation checkpointing (the model file stays plain; cf. torchtitan's ``parallelize``).

Launch with ``torchrun``: the process group is initialized from the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...), NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Who this process is: rank, world size, local rank and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str  # none | ddp | fsdp2
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local CUDA device when there is one, else the CPU."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device=auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(strategy: str, *, device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group if there is one, and pick this rank's device.

    Without ``torchrun`` (``WORLD_SIZE`` unset or 1) this is a single process and no
    process group is created, whatever ``strategy`` says.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and strategy == "none":
        raise ValueError(
            f"launched with WORLD_SIZE={world} but the run config has dist='none'; "
            "set train.dist to 'ddp' or 'fsdp2' (e.g. --override dist=ddp)"
        )
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistContext(0, 1, 0, dev, "none")
    created = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        created = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, strategy, created)


def shutdown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum/max/min) across ranks; a no-op for one process."""
    if ctx.distributed:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of repeated blocks (``model.blocks`` or ``model.layers``)."""
    for name in ("blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"{type(model).__name__} has no 'blocks'/'layers' ModuleList to parallelize")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in the backward pass instead of storing its activations."""
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True  # the model's own per-block torch.utils.checkpoint
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)  # state-dict keys are unchanged (wrapper strips its prefix)


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block in place (parameter names unchanged; small graphs compile fast)."""
    for block in transformer_blocks(model):
        block.compile()


def apply_fsdp2(model: nn.Module, ctx: DistContext, *, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard parameters, gradients and optimizer state with FSDP2: each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed right away by the backward pass: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def parallelize(
    model: nn.Module,
    ctx: DistContext,
    *,
    compile: bool = False,
    activation_checkpointing: bool = False,
    fsdp_param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply activation checkpointing, compile, then DDP/FSDP2 (in that order) to ``model``.

    ``model`` must already be on ``ctx.device`` (or on the CPU for FSDP2 on CPU). Returns
    the module to call for training (the DDP wrapper, or ``model`` itself, sharded in place).
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if not ctx.distributed:
        return model
    if ctx.strategy == "ddp":
        return apply_ddp(model, ctx)
    if ctx.strategy == "fsdp2":
        return apply_fsdp2(model, ctx, param_dtype=fsdp_param_dtype)
    raise ValueError(f"unknown dist strategy {ctx.strategy!r}; use none, ddp or fsdp2")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 shards in place, so it is its own plain model)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, ctx: DistContext, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not ctx.distributed or enabled:
        if ctx.strategy == "fsdp2" and ctx.distributed:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
        yield
        return
    if ctx.strategy == "ddp":
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        yield
