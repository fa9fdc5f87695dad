"""Checkpoints: atomic writes, safe loads and the capture of every random stream.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over its final name, and the folder is fsynced, so a crash at any moment leaves either the old
file or the complete new one: a partial file is never taken for a checkpoint. Loading uses
``torch.load(..., weights_only=True)``, so a checkpoint from a stranger cannot run code; every
value stored is therefore a tensor or a plain Python container/scalar.

Every checkpoint carries its run's identity (``run_id``): a fresh run draws a new one, a resumed
run keeps the one it resumed. The files' names, which of them a run resumes or is judged by, and
the rules that keep runs apart are the checkpoint manager's (:mod:`unet_trainer.core.checkpoints`).
"""

from __future__ import annotations

import pickle
import random
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write, os_error_line

# Checkpoints written before runs had identities belong to this unnamed run.
LEGACY_RUN_ID = ""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; one line naming the file.

    Attributes:
        reason: what is wrong, without the file's name (for a line that names it otherwise,
            e.g. "best-rank0.pt refused (<reason>)"); the whole message when not given.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


class UnsafeCheckpointError(CheckpointError):
    """A file the weights-only loader refuses: it would run code or build arbitrary objects."""


def new_run_id() -> str:
    """A fresh run identity (32 hex digits)."""
    return uuid.uuid4().hex


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (lines joined with "; "), cut after the last whole word within
    ``limit`` characters (then ending in "...")."""
    joined = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(joined) <= limit:
        return joined
    cut = joined[: limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ;,.") + "..."


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
    """``torch.save`` to ``path`` atomically (see :mod:`unet_trainer.core.fileio`).

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


# What a refused pickle asks for, in torch's messages: "GLOBAL posix.system", "Unsupported class x.Y".
_ASKED_FOR_RE = re.compile(r"\b(GLOBAL [\w.]+|Unsupported class [\w.]+)")


def _code_asked_for(exc: BaseException) -> str:
    """What the refused pickle asks for ("GLOBAL posix.system"), else what kind of thing it is."""
    found = _ASKED_FOR_RE.search(str(exc))
    if found:
        return found.group(1).removeprefix("Unsupported ")
    return "a call to build an object" if "reduce" in str(exc) else "objects beyond tensors and plain values"


def _unpickling_problem(exc: BaseException) -> str:
    """Why torch could not unpickle a file that is no valid pickle, without torch's advice on
    ``torch.load``'s options (which do not apply: checkpoints are only ever loaded weights-only)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.split("Check the documentation of torch.load")[0]
    lines = [line for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return one_line("\n".join(lines)) or type(exc).__name__


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
        raise CheckpointError(f"{path}: no such checkpoint", "no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not _asks_for_code(exc):  # a broken pickle stream, not a refused one
            reason = f"not a readable checkpoint ({_unpickling_problem(exc)})"
            raise CheckpointError(f"{path}: {reason}", reason) from None
        reason = f"needs code to load (its pickle asks for {_code_asked_for(exc)}), so it is never loaded"
        raise UnsafeCheckpointError(f"{path}: {reason}", reason) from None
    except OSError as exc:
        if exc.filename is None:  # raised inside torch's reader (e.g. EINVAL on a cut file): damaged
            reason = f"not a readable checkpoint ({exc.strerror or one_line(str(exc)) or type(exc).__name__})"
            raise CheckpointError(f"{path}: {reason}", reason) from None
        # Opening it failed (a folder, no permission): the file and what was wrong, in words.
        line = os_error_line(exc, path)
        reason = line.removeprefix(f"{path}: ")
        raise CheckpointError(f"{line} (reading a checkpoint)", f"{reason} (reading a checkpoint)") from None
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same here
        reason = f"not a readable checkpoint ({one_line(str(exc)) if str(exc) else type(exc).__name__})"
        raise CheckpointError(f"{path}: {reason}", reason) from None
    if not isinstance(state, dict) or "model" not in state:
        reason = "not a unet-trainer checkpoint (no model weights)"
        raise CheckpointError(f"{path}: {reason}", reason)
    return state


def checkpoint_identity(path: Path) -> tuple[str, int]:
    """(run id, batch) of a checkpoint, reading only its small values (tensors are mapped).

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    state = load_checkpoint(path, mmap=True)
    timestamp = state.get("timestamp") or {}
    return str(state.get("run_id", LEGACY_RUN_ID)), int(timestamp.get("batch", 0))


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
