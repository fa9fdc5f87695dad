"""The run folder belongs to one run: an exclusive lock, and no mixing with another run's checkpoints.

* :class:`FolderLock` takes an exclusive POSIX lock (``fcntl.lockf``) on a lock file for as long
  as the run (or a data preparation) lives. The OS drops it when the process ends, however it
  ends (SIGKILL too), so a lock is never stale; the file keeps the holder's PID for the message
  a second command prints. A POSIX lock belongs to the process, not to the open file: the data
  loader's and the preparation pool's forked workers do not inherit it (with ``flock`` they
  would, and keep a killed run's folder locked until they notice and exit).
* :func:`other_runs_checkpoints` lists what in ``checkpoints/`` is not the current run's history,
  and :func:`move_run_aside` moves such files into ``previous/`` (``save_overwrite=true``):
  nothing is ever deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import BEST_RE, CHECKPOINT_RE, CheckpointError, checkpoint_identity

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

    POSIX locks do not exclude their own process, so the lock files this process holds are also
    kept in a set: a second lock on the same folder fails within one process too.
    """

    _held_here: set[str] = set()

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
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, record.encode(), 0)
        except BaseException:
            os.close(descriptor)
            raise
        if self.remove_on_release and not self._still_linked(descriptor):
            # Its holder removed the file as it released it: lock the one now under that name.
            os.close(descriptor)
            return self.acquire(wait, on_wait)
        self._descriptor, self._key = descriptor, key
        self._held_here.add(key)
        return self

    def _still_linked(self, descriptor: int) -> bool:
        """Whether the file open as ``descriptor`` is still the one named :attr:`path`."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(descriptor)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def release(self) -> None:
        """Drop the lock. The file stays, unless ``remove_on_release``: it is then removed while
        still locked, and a process that locked it meanwhile sees it gone and locks the new one."""
        if self._descriptor is not None:
            if self.remove_on_release:
                self.path.unlink(missing_ok=True)
            os.close(self._descriptor)
            self._descriptor = None
            self._held_here.discard(self._key)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
    runs = sorted({(run_id[:8] or "from before run ids") for _, run_id, _ in others})
    return f"{len(others)} checkpoint(s) of run {', '.join(runs)}, newest {newest[0].name} (batch {newest[2]})"


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
    newest = max(others, key=lambda entry: entry[2])
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / PREVIOUS_RUNS / f"{stamp}-{newest[1][:8] or 'run'}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{stamp}-{newest[1][:8] or 'run'}-{suffix}")
    (target / "checkpoints").mkdir(parents=True)
    for path, _, _ in others:
        os.replace(path, target / "checkpoints" / path.name)
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
