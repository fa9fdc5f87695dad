"""The run folder belongs to one run: an exclusive lock, and no mixing with another run's checkpoints.

* :class:`FolderLock` takes an exclusive POSIX lock (``fcntl.lockf``) on a lock file for as long
  as the run (or a data preparation) lives. The OS drops it when the process ends, however it
  ends (SIGKILL too), so a lock is never stale; the file keeps the holder's PID for the message
  a second command prints. A POSIX lock belongs to the process, not to the open file: the data
  loader's and the preparation pool's forked workers do not inherit it (with ``flock`` they
  would, and keep a killed run's folder locked until they notice and exit).
* :func:`folder_run_id` says which run a folder belongs to, and :func:`newest_own_checkpoint`
  picks that run's newest checkpoint to resume from: a checkpoint of another run is never one.
* :func:`other_runs_checkpoints` lists what in ``checkpoints/`` is not the current run's history,
  and :func:`move_run_aside` moves such files into ``previous/`` (``save_overwrite=true``), as
  :func:`move_checkpoints_aside` does with another run's file where the run is about to write:
  nothing is ever deleted or overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import (
    BEST_RE,
    CHECKPOINT_RE,
    LEGACY_RUN_ID,
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_identity,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)

RUN_LOCK_NAME = "run.lock"
PREPARE_LOCK_NAME = "prepare.lock"
# In a folder of the user's own (unet-predict's OUTPUT): hidden, no data file's extension, and
# removed when the command ends.
PREDICT_LOCK_NAME = ".unet-predict.lock"
RUN_FOLDER_ADVICE = (
    "one run per folder: wait for it to finish (or stop it), or give this run its own folder with run_name=NEW or "
    "save_folder=PATH"
)
PREVIOUS_RUNS = "previous"


class RunFolderError(RuntimeError):
    """The run folder is in use by another process or holds another run's files; one line."""


class FolderLock:
    """An exclusive lock on ``folder/name``, held until :meth:`release` or the process ends.

    The file records its holder as JSON (``pid``, ``host``, ``since``) and, in a run folder, the
    run the folder belongs to (``run_id``, :meth:`record_run_id`), which the next holder keeps:
    the record outlives the process.

    POSIX locks do not exclude their own process, so the locks this process holds are also kept
    by file: a second lock on the same folder fails within one process too. And closing any
    descriptor of a locked file drops the process's lock on it, so this process reads the record
    of a lock it holds from here, never by opening the file again.
    """

    _held_here: dict[str, FolderLock] = {}

    def __init__(
        self, folder: Path, name: str = RUN_LOCK_NAME, advice: str = RUN_FOLDER_ADVICE, remove_on_release: bool = False
    ):
        """``advice``: what the one-line "in use" error tells the user to do instead;
        ``remove_on_release``: leave no lock file behind (in a folder of the user's own)."""
        self.folder = Path(folder)
        self.path = self.folder / name
        self.advice = advice
        self.remove_on_release = remove_on_release
        self._descriptor: int | None = None
        self._record: dict = {}

    @staticmethod
    def _holder_from(descriptor: int) -> str:
        """The holder as its lock file records it ("process 123 on host, since ..."), best effort."""
        for _ in range(20):  # the holder writes its PID just after locking
            try:
                record = json.loads(os.pread(descriptor, 4096, 0).decode() or "null")
            except (OSError, ValueError):
                record = None
            if isinstance(record, dict) and "pid" in record:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
                return f"process {record['pid']} on {record.get('host', '?')}, since {since}"
            time.sleep(0.01)
        return "another process"

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> FolderLock:
        """Take the lock.

        Args:
            wait: block until the holder is done (else raise at once).
            on_wait: called with the holder's description before blocking.

        Raises:
            RunFolderError: held by another process and ``wait`` is false.
            OSError: the folder cannot be created or the lock file written.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        busy = f"{self.folder}: in use by {{}}; {self.advice}"
        if key in self._held_here:
            raise RunFolderError(busy.format(f"this process ({os.getpid()})"))
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                # Read through this descriptor: closing another one on the file would drop our locks.
                holder = self._holder_from(descriptor)
                if not wait:
                    raise RunFolderError(busy.format(holder)) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.lockf(descriptor, fcntl.LOCK_EX)
            self._record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            run_id = _read_record(descriptor).get("run_id")
            if isinstance(run_id, str):  # the folder's run, until the new holder records its own
                self._record["run_id"] = run_id
            _write_record(descriptor, self._record)
        except BaseException:
            os.close(descriptor)
            raise
        if self.remove_on_release and not self._still_linked(descriptor):
            # Its holder removed the file as it released it: lock the one now under that name.
            os.close(descriptor)
            return self.acquire(wait, on_wait)
        self._descriptor, self._key = descriptor, key
        self._held_here[key] = self
        return self

    def _still_linked(self, descriptor: int) -> bool:
        """Whether the file open as ``descriptor`` is still the one named :attr:`path`."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(descriptor)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def record_run_id(self, run_id: str) -> None:
        """Record in the lock file that the folder belongs to run ``run_id`` (see :func:`folder_run_id`).

        Raises:
            OSError: the lock file cannot be written.
        """
        assert self._descriptor is not None, "record_run_id needs the lock held"
        self._record["run_id"] = run_id
        _write_record(self._descriptor, self._record)

    def release(self) -> None:
        """Drop the lock. The file stays, unless ``remove_on_release``: it is then removed while
        still locked, and a process that locked it meanwhile sees it gone and locks the new one."""
        if self._descriptor is not None:
            if self.remove_on_release:
                self.path.unlink(missing_ok=True)
            os.close(self._descriptor)
            self._descriptor = None
            self._held_here.pop(self._key, None)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_record(descriptor: int) -> dict:
    """The JSON record of a lock file ({} when empty or not JSON)."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(descriptor: int, record: dict) -> None:
    """Write a lock file's record: the new bytes first, then the file cut to them, so that a
    reader never finds it empty."""
    data = json.dumps(record).encode()
    os.pwrite(descriptor, data, 0)
    os.ftruncate(descriptor, len(data))


def _open_record(folder: Path, name: str) -> int | None:
    """A read-only descriptor on ``folder/name``, None when there is no such file."""
    try:
        return os.open(Path(folder) / name, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None


def recorded_run_id(run_dir: Path) -> str | None:
    """The run id the run folder's lock file records (:meth:`FolderLock.record_run_id`), if any."""
    held = FolderLock._held_here.get(str((Path(run_dir) / RUN_LOCK_NAME).resolve()))
    if held is not None:  # opening the file again would drop the lock when closed
        return held._record.get("run_id")
    descriptor = _open_record(run_dir, RUN_LOCK_NAME)
    if descriptor is None:
        return None
    try:
        run_id = _read_record(descriptor).get("run_id")
    finally:
        os.close(descriptor)
    return run_id if isinstance(run_id, str) else None


def live_holder(folder: Path, name: str = RUN_LOCK_NAME) -> str | None:
    """Who holds the lock on ``folder/name`` right now ("process 123 on host, since ..."), or None
    when nobody does. Only tests the lock (``F_GETLK``): never takes it, never writes the file.

    Raises:
        OSError: the lock file exists but cannot be read.
    """
    folder = Path(folder)
    if str((folder / name).resolve()) in FolderLock._held_here:
        return f"this process ({os.getpid()})"
    descriptor = _open_record(folder, name)
    if descriptor is None:
        return None
    try:
        try:
            os.lockf(descriptor, os.F_TEST, 0)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return FolderLock._holder_from(descriptor)
        return None
    finally:
        os.close(descriptor)


def short_run_id(run_id: str) -> str:
    """A run id as messages show it: its first 8 digits."""
    return run_id[:8] or "from before run ids"


def _checkpoint_files(folder: Path) -> list[Path]:
    """Periodic and best checkpoints in ``folder`` (regular files, every rank), by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if (CHECKPOINT_RE.match(p.name) or BEST_RE.match(p.name)) and p.is_file() and not p.is_symlink()
    )


def checkpoint_identities(folder: Path) -> list[tuple[Path, str, int]]:
    """(path, run id, batch) of each readable checkpoint in ``folder``, by name.

    Unreadable files are left out: they identify no run (autoresume warns about them).
    """
    found = []
    for path in _checkpoint_files(Path(folder)):
        try:
            run_id, batch = checkpoint_identity(path)
        except CheckpointError:
            continue
        found.append((path, run_id, batch))
    return found


def other_runs_checkpoints(folder: Path, run_id: str, resumed_batch: int | None) -> list[tuple[Path, str, int]]:
    """The checkpoints in ``folder`` that would mix with the current run's.

    For a fresh run (``resumed_batch`` None): every checkpoint. For a run resumed at
    ``resumed_batch``: its own periodic checkpoints past that point (a future that rotation
    would otherwise remove), and, when the folder holds none of its history (it was resumed from
    elsewhere), every other run's. A stray file next to a run's own history is left alone: its
    rotation and ``latest`` link never touch it.

    Returns:
        (path, run id, batch) for each, by name.
    """
    found = checkpoint_identities(folder)
    if resumed_batch is None:
        return found
    own = [entry for entry in found if entry[1] == run_id]
    future = [e for e in own if e[2] > resumed_batch and CHECKPOINT_RE.match(e[0].name)]
    history = [e for e in own if e not in future]
    others = [] if history else [e for e in found if e[1] != run_id]
    return sorted(future + others)


def describe_others(others: list[tuple[Path, str, int]]) -> str:
    """ "3 checkpoints of run 1a2b3c4d, newest ep0-ba3-rank0.pt (batch 3)"."""
    newest = max(others, key=lambda entry: entry[2])
    runs = sorted({short_run_id(run_id) for _, run_id, _ in others})
    return f"{len(others)} checkpoint(s) of run {', '.join(runs)}, newest {newest[0].name} (batch {newest[2]})"


def folder_run_id(run_dir: Path, rank: int = 0) -> str | None:
    """The run a run folder belongs to, the one whose checkpoints a resume may continue.

    In this order: the run of the ``latest`` link's target (only the folder's own run writes the
    link, after each save); else the run the lock file records (:meth:`FolderLock.record_run_id`,
    written once a run has claimed the folder, kept when it dies); else the one run every readable
    checkpoint in ``checkpoints/`` belongs to (a copied-in checkpoint in an otherwise empty folder).

    Returns:
        The run id, or None when no readable checkpoint is there.

    Raises:
        RunFolderError: checkpoints of several runs, and neither the link nor the record says
            which is the folder's (one line naming them).
    """
    folder = Path(run_dir) / "checkpoints"
    link = folder / f"latest-rank{rank}.pt"
    if link.is_symlink() and link.exists():
        try:
            return checkpoint_identity(link.resolve())[0]
        except CheckpointError:
            pass  # damaged since it was saved: the record still knows the run
    recorded = recorded_run_id(run_dir)
    if recorded is not None:
        return recorded
    found = checkpoint_identities(folder)
    runs = {run_id for _, run_id, _ in found}
    if len(runs) <= 1:
        return runs.pop() if runs else None
    raise RunFolderError(
        f"{folder}: holds {describe_others(found)}, and nothing says which run is this folder's (its latest link "
        f"is missing or does not load, and {Path(run_dir) / RUN_LOCK_NAME} records none); continue the one you "
        "mean with load_path=PATH, or move the other run's files out"
    )


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def newest_own_checkpoint(
    run_dir: Path, rank: int = 0, mmap: bool = False, warn: Callable[[str], None] = _warn
) -> tuple[Path, dict] | None:
    """The newest checkpoint of the folder's own run (:func:`folder_run_id`) that loads, with its
    contents: what autoresume continues and what a run folder's "latest" stands for.

    Tries the ``latest`` link's target, then the others from the highest batch down. Each one
    passed over gets a one-line warning naming it: another run's (never a candidate, left in
    place), one that does not load (truncated, damaged: a checkpoint only counts once complete),
    one the safe loader refuses (a pickle with code). Nothing is moved or deleted.

    Args:
        mmap: map the tensors' storage instead of reading it (when only the small values are wanted).
        warn: where the one-line warnings go (default stderr, "warning: ...").

    Returns:
        (path, state), or None when no checkpoint of the folder's run loads (or there is none).

    Raises:
        RunFolderError: as :func:`folder_run_id`.
    """
    folder = Path(run_dir) / "checkpoints"
    own = folder_run_id(run_dir, rank)
    candidates = []
    link = latest_checkpoint(folder, rank)
    if link is not None:
        candidates.append(link)
    candidates += [p for p in reversed(list_checkpoints(folder, rank)) if p not in candidates]

    def not_resumed(path: Path, run_id: str) -> None:
        warn(
            f"{path} belongs to run {short_run_id(run_id)}, not this run ({short_run_id(own)}); not resumed, left in place"
        )

    for index, path in enumerate(candidates):
        try:
            state = load_checkpoint(path, mmap=mmap)
        except UnsafeCheckpointError as exc:
            warn(f"{exc}; skipped, never resumed from; remove it if you did not put it there")
            continue
        except CheckpointError as exc:
            warn(f"skipped {path} for resuming: {exc.reason}; trying the next newest checkpoint")
            continue
        run_id = str(state.get("run_id", LEGACY_RUN_ID))
        if own is not None and run_id != own:
            not_resumed(path, run_id)
            continue
        # Another run's checkpoint named as if newer (the link pointed past it): named too.
        for later in candidates[index + 1 :]:
            if _name_batch(later) > _name_batch(path):
                try:
                    later_id = checkpoint_identity(later)[0]
                except CheckpointError:
                    continue  # unreadable: nothing says whose it is; rotation never touches it
                if later_id != run_id:
                    not_resumed(later, later_id)
        return path, state
    return None


def _name_batch(path: Path) -> int:
    """The batch a periodic checkpoint's name says (-1 for other names)."""
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(2)) if match else -1


# What a run writes in its folder besides checkpoints/, moved or copied aside with them.
RUN_FILES = (
    "config.yaml",
    "split.json",
    "metrics.jsonl",
    "train_metrics.csv",
    "eval_metrics.csv",
    "eval_cases.csv",
    "progress.png",
    "postprocessing.json",  # chosen on this run's checkpoints (unet-eval --choose-postprocessing)
)
RUN_FOLDERS = ("tensorboard", "overlays")


def move_checkpoints_aside(run_dir: Path, entries: list[tuple[Path, str, int]], label: str | None = None) -> Path:
    """Move checkpoint files into a new ``run_dir/previous/<time>-<run>/checkpoints/``.

    Args:
        entries: (path, run id, batch) of each file (:func:`checkpoint_identities`).
        label: the ``<run>`` part of the folder name (default: the newest entry's short run id).

    Returns:
        The new ``previous/<time>-<run>`` folder.
    """
    run_dir = Path(run_dir)
    newest = max(entries, key=lambda entry: entry[2])
    label = label or newest[1][:8] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / PREVIOUS_RUNS / f"{stamp}-{label}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{stamp}-{label}-{suffix}")
    (target / "checkpoints").mkdir(parents=True)
    for path, _, _ in entries:
        os.replace(path, target / "checkpoints" / path.name)
    return target


def move_run_aside(run_dir: Path, others: list[tuple[Path, str, int]], whole_run: bool) -> Path:
    """Move ``others`` (from :func:`other_runs_checkpoints`) into ``run_dir/previous/<time>-<run>/``.

    Args:
        whole_run: the new run starts fresh, so the old run's logs, config, split and curves move
            with its checkpoints (the ``latest`` link too); else they are copied, as the resumed
            run keeps writing its own.

    Returns:
        The folder they were moved into.
    """
    run_dir = Path(run_dir)
    target = move_checkpoints_aside(run_dir, others)
    checkpoints = run_dir / "checkpoints"
    for link in checkpoints.glob("latest-rank*.pt") if whole_run else ():
        os.replace(link, target / "checkpoints" / link.name)
    # unet-eval's default score tables (eval_<checkpoint>_<cases>.csv) belong to the old run too.
    scores = sorted(p.name for p in run_dir.glob("eval_*.csv") if p.name not in RUN_FILES)
    for name in (*RUN_FILES, *RUN_FOLDERS, *scores):
        source = run_dir / name
        if not source.exists():
            continue
        if whole_run:
            os.replace(source, target / name)
        elif source.is_dir():
            shutil.copytree(source, target / name)
        else:
            shutil.copy2(source, target / name)
    return target


def run_file_name(name: str) -> bool:
    """Whether ``name`` is a file the run writes in its folder (for orphan-temporary clean-up)."""
    return name in RUN_FILES or CHECKPOINT_RE.match(name) is not None or BEST_RE.match(name) is not None


def checkpoint_run_folder(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the parent of the ``checkpoints/`` folder holding it
    (symlinks such as ``latest-rank0.pt`` resolved), else the checkpoint's own folder."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
