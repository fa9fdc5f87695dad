"""Crash-safe file writes, used for checkpoints, prepared data, NIfTI outputs and plots.

Every file is written under a hidden temporary name in the same folder, flushed to disk, then
renamed over its final name (an atomic step on POSIX), and the folder entry is flushed too. A
crash at any moment leaves either the previous file or the complete new one, never a half file
under the real name. Temporaries are named ``.<name>.<32 hex digits>.tmp``: hidden, and ending in
no file extension, so that no reader and no glob for data files (``*.nii.gz``, ``*.npy``, ``*.csv``
...) picks up the half file a killed writer leaves; :func:`remove_orphan_temporaries` clears them
once the folder's lock shows no writer is alive. Writers that choose a format from the file name
(numpy's ``np.save`` adds ``.npy``, nibabel reads ``.nii.gz``) are therefore given an open file or
the format explicitly.

A write that fails because the disk is full raises :class:`DiskFullError`: one line naming the
file and the space left, with the partial temporary already removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

# What temporary_sibling names look like: ".{name}.{32 hex digits}.tmp". Earlier versions kept the
# final name's extension last (".tmp.nii.gz"); those leftovers are recognised and cleared too.
_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp(\.[A-Za-z0-9.]+)?$")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# numpy's ndarray.tofile (behind np.save on a real file) reports a short write as this OSError,
# without an errno; on a regular file a write falls short only when the disk (or quota) is full.
_SHORT_WRITE_RE = re.compile(r"^\d+ requested and \d+ written$")


class DiskFullError(OSError):
    """No space left while writing a file; the message names the file and the free space."""


def temporary_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path``, ``.<name>.<32 hex digits>.tmp``, that no glob for
    ``path``'s extension matches."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def temporary_target(path: Path) -> str | None:
    """The file name a temporary of :func:`temporary_sibling` was standing in for, else None."""
    match = _TEMPORARY_RE.match(Path(path).name)
    return match.group("name") if match else None


def remove_orphan_temporaries(folder: Path, targets=None) -> list[Path]:
    """Delete the temporaries in ``folder`` (not below) left by a writer that died mid-write.

    Call it only while holding the folder's lock (:mod:`unet_trainer.core.runfolder`): a temporary
    of a live writer would otherwise vanish under it.

    Args:
        targets: if given, a predicate on the final file name; only temporaries standing in for
            a name it accepts are removed (a folder shared with other tools keeps theirs).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        name = temporary_target(path)
        if name is None or (targets is not None and not targets(name)) or not path.is_file():
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def free_space_text(folder: Path) -> str:
    """ "1.2 GiB free" on the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{size_text(free)} free"


def size_text(size: int) -> str:
    """A byte count for people: "1.2 GiB", "3.0 MiB", "12 bytes"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from or while handling, says the disk is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (
            exc.errno in _DISK_FULL_ERRNOS or (exc.errno is None and _SHORT_WRITE_RE.match(str(exc)))
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: Path) -> DiskFullError:
    """The one-line error for a full disk while writing ``path`` (call after removing partial files)."""
    path = Path(path)
    error = DiskFullError(
        f"{path}: no space left on the device while writing it "
        f"({free_space_text(path.parent)} in {path.parent}); "
        "nothing was replaced: free some space and run again"
    )
    error.errno = errno.ENOSPC  # str() stays the plain line, without an "[Errno 28]" prefix
    return error


# What an OSError of these numbers means, in words that say what was expected.
_ERRNO_WORDS = {
    errno.EISDIR: "is a directory, expected a file",
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "a name on this path is too long for the file system",
    errno.EROFS: "is on a read-only file system",
    errno.ELOOP: "too many levels of symbolic links",
}


def os_error_line(exc: OSError, path: Path | None = None) -> str:
    """An OSError as one line that names the file and says in words what was wrong, e.g.
    ``runs/a.csv: is a directory, expected a file``; never Python's ``[Errno 21] ...``.

    Args:
        exc: the error.
        path: the file the caller was reading or writing, named when the error carries no file
            name of its own (some libraries raise an OSError with only a number).
    """
    if isinstance(exc, DiskFullError):
        return str(exc)
    where = Path(exc.filename) if exc.filename else (Path(path) if path is not None else None)
    code = exc.errno if exc.errno is not None else next((a for a in exc.args[:1] if isinstance(a, int)), None)
    if code in _DISK_FULL_ERRNOS:
        where = where or Path(".")
        return (
            f"{where}: no space left on the device while writing there ({free_space_text(where.parent)}); "
            "free some space and run again"
        )
    if code == errno.EEXIST:
        # mkdir where something else than a folder has the name; else the name is taken.
        words = (
            "already exists"
            if where is None or not where.exists() or where.is_dir()
            else f"exists and is {'a file, expected a folder' if where.is_file() else 'not a folder'}"
        )
    elif code == errno.ENOTDIR:
        # Something else than a folder where the path needs one: name it (the path or a parent).
        blocking = next((p for p in ([where, *where.parents] if where else []) if p.exists() and not p.is_dir()), None)
        what = "is a file, expected a folder" if blocking is None or blocking.is_file() else "is not a folder"
        words = what if blocking in (where, None) else f"{blocking} {what}"
    elif code in _ERRNO_WORDS:
        words = _ERRNO_WORDS[code]
    elif exc.strerror:
        words = exc.strerror
    elif code is not None:
        words = os.strerror(code)
    else:
        words = " ".join(str(exc).split()) or type(exc).__name__
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    if where is None or words.startswith(f"{where}:"):  # our own message, which names the file already
        return words
    return f"{where}: {words}"


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
        DiskFullError: no space left (the temporary is removed, ``path`` is untouched).
        IsADirectoryError: ``path`` is a folder (naming it, not the temporary); nothing is written.
        whatever ``write`` raises (the temporary file is removed first), or OSError.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    temporary = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    except Exception as exc:
        if is_disk_full(exc):
            temporary.unlink(missing_ok=True)
            raise disk_full_error(path) from None
        raise
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
    """``np.save`` atomically, never pickling.

    Raises:
        DiskFullError: no space left (the temporary is removed, ``path`` is untouched).
    """

    def write(temporary: Path) -> None:
        # An open file: given a name without ".npy", np.save would append one.
        with open(temporary, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def atomic_symlink(target_name: str, link: Path) -> None:
    """Point ``link`` at ``target_name`` (relative, same folder), replacing it atomically."""
    link = Path(link)
    temporary = temporary_sibling(link)
    os.symlink(target_name, temporary)
    os.replace(temporary, link)
    fsync_path(link.parent)
