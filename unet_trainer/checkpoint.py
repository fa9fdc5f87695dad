"""Checkpoints: atomic writes, safe loads and the capture of every random stream.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over its final name, and the folder is fsynced, so a crash at any moment leaves either the old
file or the complete new one: a partial file is never taken for a checkpoint. Loading uses
``torch.load(..., weights_only=True)``, so a checkpoint from a stranger cannot run code; every
value stored is therefore a tensor or a plain Python container/scalar.

Names follow Composer: ``ep{epoch}-ba{batch}-rank{rank}.pt``, a ``latest-rank{rank}.pt`` symlink
to the newest, and ``best-rank{rank}.pt`` for the best validation Dice.

Every checkpoint carries its run's identity (``run_id``): a fresh run draws a new one, a resumed
run keeps the one it resumed. Rotation and the ``latest`` link only touch the files of the run
that writes them (see :mod:`unet_trainer.runfolder` for the check at start-up).
"""

from __future__ import annotations

import pickle
import random
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write, os_error_line

CHECKPOINT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")
BEST_RE = re.compile(r"^best-rank(\d+)\.pt$")
# Checkpoints written before runs had identities belong to this unnamed run.
LEGACY_RUN_ID = ""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; one line naming the file."""


class UnsafeCheckpointError(CheckpointError):
    """A file the weights-only loader refuses: it would run code or build arbitrary objects."""


def new_run_id() -> str:
    """A fresh run identity (32 hex digits)."""
    return uuid.uuid4().hex


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (lines joined with "; "), cut at ``limit`` characters."""
    joined = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class _WriteErrorKeeper:
    """A binary file wrapper that remembers the OSError of a failed write: torch's zip writer
    replaces it with a RuntimeError ("unexpected pos ...") that has lost the errno, so a full
    disk could not be told from a bug."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (see :mod:`unet_trainer.fileio`).

    Raises:
        DiskFullError: no space left; the temporary is gone and ``path`` is untouched.
    """

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            keeper = _WriteErrorKeeper(handle)
            try:
                torch.save(obj, keeper)
            except RuntimeError:
                if keeper.error is not None:
                    raise keeper.error from None
                raise

    atomic_write(path, write)


def _asks_for_code(exc: BaseException) -> bool:
    """Whether the weights-only loader refused a global, a call or a class (code or arbitrary
    objects), as opposed to bytes that are no pickle at all ("Unsupported operand")."""
    text = str(exc)
    return "GLOBAL" in text or "reduce" in text or "Unsupported class" in text


def _refusal_reason(exc: BaseException) -> str:
    """What torch's weights-only loader objected to, e.g. "Unsupported global: GLOBAL posix.system"."""
    text = str(exc)
    if "WeightsUnpickler error:" not in text:
        return one_line(text)
    text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load")[0]
    if " was not an allowed global" in text:  # the rest is torch's advice to allow it
        text = text.split(" was not an allowed global")[0] + " is not allowed"
    return one_line(text)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Read a checkpoint safely onto the CPU.

    Args:
        mmap: map the tensors' storage instead of reading it (cheap when only the small values,
            such as the run identity, are wanted).

    Raises:
        UnsafeCheckpointError: a pickle the weights-only loader refuses (code or foreign objects).
        CheckpointError: missing, truncated or not a checkpoint of ours (one line with the path).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not _asks_for_code(exc):  # a broken pickle stream, not a refused one
            raise CheckpointError(f"{path}: not a readable checkpoint ({_refusal_reason(exc)})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused, it holds code or objects that a weights-only load never "
            f"runs ({_refusal_reason(exc)}); it was not loaded"
        ) from None
    except OSError as exc:  # a folder, no permission: the file and what was wrong, in words
        raise CheckpointError(f"{os_error_line(exc, path)} (reading a checkpoint)") from None
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same here
        reason = one_line(str(exc)) if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a unet-trainer checkpoint (no model weights)")
    return state


def checkpoint_identity(path: Path) -> tuple[str, int]:
    """(run id, batch) of a checkpoint, reading only its small values (tensors are mapped).

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    state = load_checkpoint(path, mmap=True)
    timestamp = state.get("timestamp") or {}
    return str(state.get("run_id", LEGACY_RUN_ID)), int(timestamp.get("batch", 0))


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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def newest_loadable_checkpoint(
    folder: Path, rank: int = 0, warn: Callable[[str], None] = _warn
) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads, with its contents, for autoresume.

    Tries the ``latest`` link's target, then the others from the highest batch down. A file that
    does not load (truncated, damaged) is skipped with a one-line warning naming it, as a
    checkpoint only counts once complete; one the safe loader refuses (a pickle with code) is
    never a candidate and is reported by name. Nothing is deleted.

    Returns:
        (path, state), or None when no checkpoint loads (or there is none).
    """
    folder = Path(folder)
    candidates = []
    link = latest_checkpoint(folder, rank)
    if link is not None:
        candidates.append(link)
    candidates += [p for p in reversed(list_checkpoints(folder, rank)) if p not in candidates]
    for path in candidates:
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError as exc:
            warn(f"{exc}; skipped, never resumed from; remove it if you did not put it there")
        except CheckpointError as exc:
            warn(
                f"skipped {path} for resuming: {str(exc).removeprefix(f'{path}: ')}; trying the next newest checkpoint"
            )
    return None


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
