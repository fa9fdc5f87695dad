"""Multi-GPU and multi-node through PyTorch's own engine: ``torchrun`` sets the environment,
``torch.distributed`` does the work, ``DistributedDataParallel`` wraps the model.

Launch: ``torchrun --nproc_per_node N -m unet_trainer.cli train CONFIG`` (or the ``unet-train``
script under ``torchrun --no-python``). Without torchrun's variables everything runs as one process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# (host, pid) of each rank, in rank order, gathered when the process group is joined, so that a
# rank whose collective fails can tell which peer went away.
_PEERS: list[tuple[str, int]] = []

# What gloo and NCCL say when the other end of a collective has gone.
_LOST_CONNECTION = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited")


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
    if not _PEERS:
        _PEERS.extend(all_gather_objects((socket.gethostname(), os.getpid())))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def _ended(pid: int) -> bool:
    """Whether the process ``pid`` of this machine has ended (a zombie its launcher has not
    reaped yet counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


@dataclass(frozen=True)
class LostPeer:
    """A collective failed because a peer rank went away.

    Attributes:
        line: one line naming the rank(s) gone (those of this machine; "a peer rank" when the one
            gone ran elsewhere).
        reporter: whether this rank prints it: the lowest surviving rank of its machine, so that
            each machine says it once instead of once per rank.
    """

    line: str
    reporter: bool


def lost_peer(exc: BaseException) -> LostPeer | None:
    """What ``exc`` means when a peer rank of the process group went away (killed, crashed).

    A peer of this machine whose process has ended is named by its rank and PID; otherwise an
    error that says the connection to a peer was lost speaks of "a peer rank".

    Returns:
        None when this process is in no process group of several ranks, or ``exc`` shows no lost peer.
    """
    if not (_PEERS and dist.is_available() and dist.is_initialized()):
        return None
    rank, host = dist.get_rank(), socket.gethostname()
    gone = [r for r, (peer_host, pid) in enumerate(_PEERS) if r != rank and peer_host == host and _ended(pid)]
    text = str(exc)
    if not gone and not (isinstance(exc, dist.DistError) or any(words in text for words in _LOST_CONNECTION)):
        return None
    if gone:
        who = ", ".join(f"rank {r} (pid {_PEERS[r][1]})" for r in gone)
        what = f"{who} of {len(_PEERS)} went away"
    else:
        what = f"a peer rank of {len(_PEERS)} went away (on another machine, or it closed the connection)"
    line = (
        f"{what}, so rank {rank} stops too (its collective could not finish); the launcher's report below and "
        "that rank's own output say why it went (killed, out of memory, crashed); run the same command again "
        "to resume from the latest checkpoint"
    )
    survivors = [r for r, (peer_host, _) in enumerate(_PEERS) if peer_host == host and r not in gone]
    return LostPeer(line, reporter=rank == min(survivors))


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
    _PEERS.clear()


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
