"""Crash-safe file writes, used for checkpoints, prepared data, NIfTI outputs and plots.

Every file is written under a hidden temporary name in the same folder, flushed to disk, then
renamed over its final name (an atomic step on POSIX), and the folder entry is flushed too. A
crash at any moment leaves either the previous file or the complete new one, never a half file
under the real name; leftovers start with "." and end in ".tmp<ext>", which no reader picks up.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

# Known multi-part extensions kept last on temporary names, so writers that choose their format
# from the file name (nibabel's .nii.gz, matplotlib's .png) still see it.
_EXTENSIONS = (".nii.gz", ".nii", ".npy", ".json", ".png", ".pt", ".csv", ".yaml", ".txt")


def temporary_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` that keeps its extension last."""
    extension = next((ext for ext in _EXTENSIONS if path.name.endswith(ext)), "")
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{extension}")


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (ignored where the OS does not support it)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` in one rename.

    Raises:
        whatever ``write`` raises (the temporary file is removed first), or OSError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data) -> None:
    """Write JSON atomically (indented, for people to read)."""
    atomic_write_text(path, json.dumps(data, indent=1))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` atomically, never pickling."""
    atomic_write(path, lambda temporary: np.save(temporary, array, allow_pickle=False))


def atomic_symlink(target_name: str, link: Path) -> None:
    """Point ``link`` at ``target_name`` (relative, same folder), replacing it atomically."""
    link = Path(link)
    temporary = temporary_sibling(link)
    os.symlink(target_name, temporary)
    os.replace(temporary, link)
    fsync_path(link.parent)
