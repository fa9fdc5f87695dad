"""Multi-GPU and multi-node through PyTorch's own engine: ``torchrun`` sets the environment,
``torch.distributed`` does the work, ``DistributedDataParallel`` wraps the model.

Launch: ``torchrun --nproc_per_node N -m unet_trainer.cli train CONFIG`` (or the ``unet-train``
script under ``torchrun --no-python``). Without torchrun's variables everything runs as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Uses NCCL for CUDA and gloo for CPU; each process takes the GPU of its ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff ``flag`` is True on every rank (one tiny all-reduce).

    Used so that a decision taken on one rank (a NaN loss, a stop signal) is taken by all,
    instead of leaving the others waiting in a collective forever.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def smallest_on_any_rank(value: int, device: torch.device) -> int:
    """The minimum of ``value`` over the ranks (one tiny all-reduce); ``value`` alone without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average every parameter's gradient over the ranks, as DDP's reducer does: each gradient is
    divided by ``world_size`` first, then summed across ranks. Parameters without a gradient are
    skipped (they must be the same ones on every rank). A no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for param in model.parameters():
        if param.grad is not None:
            param.grad.div_(world_size)
            dist.all_reduce(param.grad)
