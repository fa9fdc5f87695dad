"""The run folder belongs to one run: an exclusive lock, and the record of whose folder it is.

* :class:`FolderLock` takes an exclusive POSIX lock (``fcntl.lockf``) on a lock file for as long
  as the run (or a data preparation) lives. The OS drops it when the process ends, however it
  ends (SIGKILL too), so a lock is never stale; the file keeps the holder's PID for the message
  a second command prints. A POSIX lock belongs to the process, not to the open file: the data
  loader's and the preparation pool's forked workers do not inherit it (with ``flock`` they
  would, and keep a killed run's folder locked until they notice and exit).
* The lock file records the run the folder belongs to (:meth:`FolderLock.record_run_id`,
  :func:`recorded_run_id`), and :data:`RUN_FILES` names what a run writes beside its checkpoints.
  Which checkpoints are the run's, which one it resumes, and moving another run's files into
  ``previous/`` are the checkpoint manager's (:mod:`unet_trainer.core.checkpoints`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

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
