"""A run folder's checkpoints: their names, which one stands for the run, and the rules that keep
one run's checkpoints apart from another's (:class:`CheckpointManager`).

Names follow Composer, in ``<run>/checkpoints/``: ``ep{epoch}-ba{batch}-rank{rank}.pt`` (periodic),
a ``latest-rank{rank}.pt`` symlink to the newest and ``best-rank{rank}.pt`` for the best validation
Dice. They are made and matched here only.

Every checkpoint carries its run's identity (``run_id``, see :mod:`unet_trainer.core.checkpoint`).
The folder belongs to one run (:meth:`CheckpointManager.run_id`): resuming continues only that
run's newest checkpoint that loads (:meth:`CheckpointManager.newest_loadable`), rotation and the
``latest`` link touch only the writing run's files, and another run's file where a checkpoint is
about to be written, or another run's best next to this run's history, is moved into
``<run>/previous/<time>-<run>/checkpoints/``: nothing is overwritten or deleted. A refused best
(another run's, unreadable, or needing code) is never used: :meth:`CheckpointManager.choose`
substitutes the newest checkpoint and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import (
    LEGACY_RUN_ID,
    CheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    checkpoint_identity,
    load_checkpoint,
)
from .fileio import atomic_symlink
from .runfolder import (
    PREVIOUS_RUNS,
    RUN_FILES,
    RUN_FOLDERS,
    RUN_LOCK_NAME,
    RunFolderError,
    recorded_run_id,
    short_run_id,
)

CHECKPOINTS_FOLDER = "checkpoints"
CHECKPOINT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")
BEST_RE = re.compile(r"^best-rank(\d+)\.pt$")
LATEST_GLOB = "latest-rank*.pt"
# Which checkpoint of a finished run stands for it (:meth:`CheckpointManager.choose`); the first is the default.
CHECKPOINT_CHOICES = ("best", "latest")

# (path, run id, batch) of a checkpoint file.
Entry = tuple[Path, str, int]


def checkpoint_name(epoch: int, batch: int, rank: int = 0) -> str:
    """A periodic checkpoint's file name: ``ep{epoch}-ba{batch}-rank{rank}.pt``."""
    return f"ep{epoch}-ba{batch}-rank{rank}.pt"


def best_name(rank: int = 0) -> str:
    """The best checkpoint's file name: ``best-rank{rank}.pt``."""
    return f"best-rank{rank}.pt"


def latest_name(rank: int = 0) -> str:
    """The name of the link to the newest checkpoint: ``latest-rank{rank}.pt``."""
    return f"latest-rank{rank}.pt"


def named_counters(path: Path) -> tuple[int, int] | None:
    """(epoch, batch) a periodic checkpoint's name says; None for other names."""
    match = CHECKPOINT_RE.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _name_batch(path: Path) -> int:
    """The batch a periodic checkpoint's name says (-1 for other names)."""
    counters = named_counters(path)
    return counters[1] if counters else -1


def list_checkpoints(folder: Path, rank: int = 0) -> list[Path]:
    """Complete periodic checkpoints of ``rank`` in the checkpoints ``folder``, oldest first (by batch)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and int(match.group(3)) == rank:
            found.append((int(match.group(2)), path))
    return [p for _, p in sorted(found)]


def run_file_name(name: str) -> bool:
    """Whether ``name`` is a file the run writes in its folder (for orphan-temporary clean-up)."""
    return name in RUN_FILES or CHECKPOINT_RE.match(name) is not None or BEST_RE.match(name) is not None


def checkpoint_run_folder(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: the parent of the ``checkpoints/`` folder holding it
    (symlinks such as ``latest-rank0.pt`` resolved), else the checkpoint's own folder."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_FOLDER else checkpoint.parent


def describe_others(others: list[Entry]) -> str:
    """ "3 checkpoints of run 1a2b3c4d, newest ep0-ba3-rank0.pt (batch 3)"."""
    newest = max(others, key=lambda entry: entry[2])
    runs = sorted({short_run_id(run_id) for _, run_id, _ in others})
    return f"{len(others)} checkpoint(s) of run {', '.join(runs)}, newest {newest[0].name} (batch {newest[2]})"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass(frozen=True)
class ChosenCheckpoint:
    """The checkpoint that stands for a finished run, and why.

    Attributes:
        path: the checkpoint.
        why: "best" or "latest".
        refused: the best checkpoint that was there but not used (None when none was refused).
        reason: why it was refused, in words ("" when none was).
    """

    path: Path
    why: str
    refused: Path | None = None
    reason: str = ""


class CheckpointManager:
    """The checkpoints of one run folder: names, picks and the foreign-file rules.

    Args:
        folder: the run's checkpoints folder (``<run>/checkpoints``; see :meth:`of_run`).
        rank: whose files (the names carry it); only rank 0 writes.
    """

    def __init__(self, folder: Path, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank
        # path -> ((size, mtime), (run id, batch) or None when unreadable): each file is read once.
        self._identities: dict[Path, tuple[tuple[int, int], tuple[str, int] | None]] = {}

    @classmethod
    def of_run(cls, run_dir: Path, rank: int = 0) -> CheckpointManager:
        """The manager of the run folder ``run_dir`` (its ``checkpoints/`` folder)."""
        return cls(Path(run_dir) / CHECKPOINTS_FOLDER, rank)

    @property
    def run_dir(self) -> Path:
        return self.folder.parent

    @property
    def best_path(self) -> Path:
        return self.folder / best_name(self.rank)

    @property
    def latest_link(self) -> Path:
        return self.folder / latest_name(self.rank)

    def path_for(self, epoch: int, batch: int) -> Path:
        """Where the periodic checkpoint after ``epoch`` finished epochs and ``batch`` batches goes."""
        return self.folder / checkpoint_name(epoch, batch, self.rank)

    # ----------------------------------------------------------------------------------------
    # What is there
    # ----------------------------------------------------------------------------------------

    def periodic(self) -> list[Path]:
        """This rank's complete periodic checkpoints, oldest first (by batch)."""
        return list_checkpoints(self.folder, self.rank)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the ``latest`` link if it resolves, else the highest batch."""
        if self.latest_link.is_symlink() and self.latest_link.exists():
            return self.latest_link.resolve()
        found = self.periodic()
        return found[-1] if found else None

    def identity(self, path: Path) -> tuple[str, int] | None:
        """(run id, batch) a checkpoint file carries; None when it is gone or does not load.
        Read once per file version (size and modification time)."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._identities.get(path)
        if cached is None or cached[0] != key:
            try:
                identity = checkpoint_identity(path)
            except CheckpointError:
                identity = None
            cached = self._identities[path] = (key, identity)
        return cached[1]

    def _files(self) -> list[Path]:
        """Periodic and best checkpoints (regular files, every rank), by name."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p
            for p in self.folder.iterdir()
            if (CHECKPOINT_RE.match(p.name) or BEST_RE.match(p.name)) and p.is_file() and not p.is_symlink()
        )

    def identities(self) -> list[Entry]:
        """(path, run id, batch) of each readable checkpoint, by name. Unreadable files are left
        out: they identify no run (resuming warns about them)."""
        found = []
        for path in self._files():
            identity = self.identity(path)
            if identity is not None:
                found.append((path, *identity))
        return found

    # ----------------------------------------------------------------------------------------
    # Whose folder, and where to resume
    # ----------------------------------------------------------------------------------------

    def run_id(self) -> str | None:
        """The run the folder belongs to, the one whose checkpoints a resume may continue.

        In this order: the run of the ``latest`` link's target (only the folder's own run writes
        the link, after each save); else the run the lock file records
        (:meth:`runfolder.FolderLock.record_run_id`, written once a run has claimed the folder,
        kept when it dies); else the one run every readable checkpoint belongs to (a copied-in
        checkpoint in an otherwise empty folder).

        Returns:
            The run id, or None when no readable checkpoint is there.

        Raises:
            RunFolderError: checkpoints of several runs, and neither the link nor the record says
                which is the folder's (one line naming them).
        """
        link = self.latest_link
        if link.is_symlink() and link.exists():
            identity = self.identity(link.resolve())
            if identity is not None:  # else damaged since it was saved: the record still knows the run
                return identity[0]
        recorded = recorded_run_id(self.run_dir)
        if recorded is not None:
            return recorded
        found = self.identities()
        runs = {run_id for _, run_id, _ in found}
        if len(runs) <= 1:
            return runs.pop() if runs else None
        raise RunFolderError(
            f"{self.folder}: holds {describe_others(found)}, and nothing says which run is this folder's (its latest "
            f"link is missing or does not load, and {self.run_dir / RUN_LOCK_NAME} records none); continue the one "
            "you mean with load_path=PATH, or move the other run's files out"
        )

    def newest_loadable(self, mmap: bool = False, warn: Callable[[str], None] = _warn) -> tuple[Path, dict] | None:
        """The newest checkpoint of the folder's own run (:meth:`run_id`) that loads, with its
        contents: what autoresume continues and what a run folder's "latest" stands for.

        Tries the checkpoints from the highest batch down, then the ``latest`` link's target if it
        is none of them: a run killed between writing a checkpoint and moving its link leaves the
        link one behind, and the newer file is still the run's own and whole. Each one
        passed over gets a one-line warning naming it: another run's (never a candidate, left in
        place), one that does not load (truncated, damaged: a checkpoint only counts once
        complete), one the safe loader refuses (a pickle with code). Nothing is moved or deleted.

        Args:
            mmap: map the tensors' storage instead of reading it (when only the small values are wanted).
            warn: where the one-line warnings go (default stderr, "warning: ...").

        Returns:
            (path, state), or None when no checkpoint of the folder's run loads (or there is none).

        Raises:
            RunFolderError: as :meth:`run_id`.
        """
        own = self.run_id()
        link = self.latest()
        candidates = list(reversed(self.periodic()))
        if link is not None and link not in candidates:
            candidates.append(link)

        def not_resumed(path: Path, run_id: str) -> None:
            warn(
                f"{path} belongs to run {short_run_id(run_id)}, not this run ({short_run_id(own)}); not resumed, "
                "left in place"
            )

        for path in candidates:
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
            return path, state
        return None

    def others(self, run_id: str, resumed_batch: int | None) -> list[Entry]:
        """The checkpoints that would mix with run ``run_id``'s.

        For a fresh run (``resumed_batch`` None): every checkpoint. For a run resumed at
        ``resumed_batch``: its own periodic checkpoints past that point (a future that rotation
        would otherwise remove), and, when the folder holds none of its history (it was resumed
        from elsewhere), every other run's. A stray file next to a run's own history is left
        alone: its rotation and ``latest`` link never touch it.

        Returns:
            (path, run id, batch) for each, by name.
        """
        found = self.identities()
        if resumed_batch is None:
            return found
        own = [entry for entry in found if entry[1] == run_id]
        future = [e for e in own if e[2] > resumed_batch and CHECKPOINT_RE.match(e[0].name)]
        history = [e for e in own if e not in future]
        others = [] if history else [e for e in found if e[1] != run_id]
        return sorted(future + others)

    # ----------------------------------------------------------------------------------------
    # Which checkpoint stands for a finished run
    # ----------------------------------------------------------------------------------------

    def choose(self, choice: str, newest: Path, run_id: str) -> ChosenCheckpoint:
        """The checkpoint a finished run is scored and predicted with, and why.

        ``choice`` "best": the best checkpoint when the run saved one, else ``newest``; "latest":
        ``newest``. A best checkpoint that is there but cannot stand for the run (another run's,
        unreadable, or needing code to load) is never used: ``newest`` takes its place, and the
        result names the refused file and why (the caller says so).

        Args:
            newest: the run's newest checkpoint that loads (:meth:`newest_loadable`).
            run_id: the run's identity.

        Raises:
            ValueError: an unknown choice.
        """
        if choice not in CHECKPOINT_CHOICES:
            raise ValueError(f"checkpoint choice {choice!r} is not one of {', '.join(CHECKPOINT_CHOICES)}")
        assert newest is not None, "a run without checkpoints has none to choose"
        best = self.best_path
        if choice != "best" or not (best.is_file() or best.is_symlink()):
            return ChosenCheckpoint(newest, "latest")
        try:
            owner = checkpoint_identity(best)[0]
        except CheckpointError as exc:
            return ChosenCheckpoint(newest, "latest", best, exc.reason)
        if owner == run_id:
            return ChosenCheckpoint(best, "best")
        reason = f"belongs to run {short_run_id(owner)}, not this run ({short_run_id(run_id)})"
        return ChosenCheckpoint(newest, "latest", best, reason)

    # ----------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------

    def save(self, payload: Any, path: Path, run_id: str, batch: int, note: Callable[[str], None] = _note) -> None:
        """Save ``payload`` (run ``run_id``'s, at ``batch``) as ``path`` atomically, after moving
        a file there that is not this run's into ``previous/`` (one line to ``note``).

        Raises:
            DiskFullError: no space left; ``path`` is untouched.
        """
        if path.is_file() and not path.is_symlink():
            identity = self.identity(path)
            if identity is None or identity[0] != run_id:
                this_run = short_run_id(run_id)
                whose = (
                    f"belongs to run {short_run_id(identity[0])}, not this run ({this_run})"
                    if identity
                    else f"does not load, so nothing says it is this run's ({this_run})"
                )
                entry = (path, identity[0] if identity else "", identity[1] if identity else 0)
                moved = self.move_aside([entry], None if identity else "unreadable")
                note(f"{path} {whose}; moved to {moved / CHECKPOINTS_FOLDER} rather than overwritten")
        atomic_torch_save(payload, path)
        stat = path.stat()
        self._identities[path] = ((stat.st_size, stat.st_mtime_ns), (run_id, batch))

    def save_periodic(
        self, payload: Any, epoch: int, run_id: str, batch: int, note: Callable[[str], None] = _note
    ) -> Path:
        """Save the periodic checkpoint after ``epoch`` finished epochs and point ``latest`` at it."""
        path = self.path_for(epoch, batch)
        self.save(payload, path, run_id, batch, note)
        atomic_symlink(path.name, self.latest_link)
        return path

    def rotate(self, run_id: str, keep: int) -> None:
        """Remove all but the newest ``keep`` (at least 1) periodic checkpoints of run ``run_id``:
        files carrying its identity and the batch their name says (a renamed copy is left alone)."""
        own = [p for p in self.periodic() if self.identity(p) == (run_id, _name_batch(p))]
        for old in own[: max(len(own) - max(keep, 1), 0)]:
            old.unlink(missing_ok=True)
            self._identities.pop(old, None)

    def move_aside(self, entries: list[Entry], label: str | None = None) -> Path:
        """Move checkpoint files into a new ``<run>/previous/<time>-<run>/checkpoints/``.

        Args:
            entries: (path, run id, batch) of each file (:meth:`identities`).
            label: the ``<run>`` part of the folder name (default: the newest entry's short run id).

        Returns:
            The new ``previous/<time>-<run>`` folder.
        """
        newest = max(entries, key=lambda entry: entry[2])
        label = label or newest[1][:8] or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.run_dir / PREVIOUS_RUNS / f"{stamp}-{label}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = target.with_name(f"{stamp}-{label}-{suffix}")
        (target / CHECKPOINTS_FOLDER).mkdir(parents=True)
        for path, _, _ in entries:
            os.replace(path, target / CHECKPOINTS_FOLDER / path.name)
            self._identities.pop(path, None)
        return target

    def move_run_aside(self, others: list[Entry], whole_run: bool) -> Path:
        """Move ``others`` (from :meth:`others`) into ``<run>/previous/<time>-<run>/``.

        Args:
            whole_run: the new run starts fresh, so the old run's logs, config, split and curves
                move with its checkpoints (the ``latest`` link too); else they are copied, as the
                resumed run keeps writing its own.

        Returns:
            The folder they were moved into.
        """
        run_dir = self.run_dir
        target = self.move_aside(others)
        for link in self.folder.glob(LATEST_GLOB) if whole_run else ():
            os.replace(link, target / CHECKPOINTS_FOLDER / link.name)
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

    def move_foreign_best_aside(self, run_id: str, note: Callable[[str], None] = _note) -> None:
        """Move another run's ``best-rank*.pt`` (left next to run ``run_id``'s history, which it
        is not part of) into ``previous/``, one line to ``note`` each: this run writes its own best."""
        for path, owner, batch in self.identities():
            if BEST_RE.match(path.name) and owner != run_id:
                moved = self.move_aside([(path, owner, batch)])
                note(
                    f"{path} belongs to run {short_run_id(owner)}, not this run ({short_run_id(run_id)}); "
                    f"moved to {moved / CHECKPOINTS_FOLDER} rather than overwritten by this run's best"
                )
