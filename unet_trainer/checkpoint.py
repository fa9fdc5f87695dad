"""Checkpoints: atomic writes, safe loads and the capture of every random stream.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over its final name, and the folder is fsynced, so a crash at any moment leaves either the old
file or the complete new one: a partial file is never taken for a checkpoint. Loading uses
``torch.load(..., weights_only=True)``, so a checkpoint from a stranger cannot run code; every
value stored is therefore a tensor or a plain Python container/scalar.

Names follow Composer: ``ep{epoch}-ba{batch}-rank{rank}.pt``, a ``latest-rank{rank}.pt`` symlink
to the newest, and ``best-rank{rank}.pt`` for the best validation Dice.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write

CHECKPOINT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; one line naming the file."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (see :mod:`unet_trainer.fileio`)."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely onto the CPU.

    Raises:
        CheckpointError: missing, truncated or not a checkpoint of ours (one line with the path).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same here
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:120]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a unet-trainer checkpoint (no model weights)")
    return state


def checkpoint_name(epoch: int, batch: int, rank: int = 0) -> str:
    return f"ep{epoch}-ba{batch}-rank{rank}.pt"


def list_checkpoints(folder: Path, rank: int = 0) -> list[Path]:
    """Complete checkpoints of ``rank`` in ``folder``, oldest first (by batch count)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and int(match.group(3)) == rank:
            found.append((int(match.group(2)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path, rank: int = 0) -> Path | None:
    """The newest complete checkpoint: the ``latest`` link if it resolves, else the highest batch."""
    folder = Path(folder)
    link = folder / f"latest-rank{rank}.pt"
    if link.is_symlink() and link.exists():
        return link.resolve()
    found = list_checkpoints(folder, rank)
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as weights-only-loadable values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
