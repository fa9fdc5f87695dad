"""Resume: which run a run folder holds and where a run starts from, decided before anything is
written: lock the folder (:func:`_lock_run_folder`), pick the checkpoint (:func:`_resume_checkpoint`),
claim the folder (:func:`_claim_run_folder`), all in :func:`setup_resume`, which returns the
:class:`ResumePoint`; then :func:`restore_checkpoint` loads it into the loop's state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..config.components import upgrade_config
from ..config.engine import config_differences
from ..core.checkpoint import (
    LEGACY_RUN_ID,
    CheckpointError,
    load_checkpoint,
    new_run_id,
    one_line,
    restore_rng_state,
)
from ..core.checkpoints import CheckpointManager, describe_others, run_file_name
from ..core.distributed import DistInfo, barrier, broadcast_object
from ..core.fileio import remove_orphan_temporaries
from ..core.runfolder import FolderLock, RunFolderError
from ..training.trainer import State, rank_entry

# Config keys that may change between a checkpoint and its resume without a warning.
RESUME_FREE_KEYS = {"load_path", "autoresume", "max_duration", "load_weights_only", "save_overwrite"}


@dataclass
class ResumePoint:
    """Which run this is, decided before anything is written into the run folder.

    Attributes:
        run_id: the run's identity (the checkpoint's when continuing it, else a new one).
        checkpoint_path: the checkpoint to start from (``load_path``, or the newest with
            ``autoresume``), None for a fresh start.
        checkpoint: its contents.
        resuming: whether the run continues that checkpoint's run (not with ``load_weights_only``).
    """

    run_id: str
    checkpoint_path: Path | None = None
    checkpoint: dict | None = None
    resuming: bool = False


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resume_checkpoint(cfg: dict, run_dir: Path, dist_info: DistInfo) -> tuple[Path, dict] | None:
    """The checkpoint to start from and its contents: ``load_path``, else with ``autoresume`` the
    newest of the folder's own run that loads (:meth:`CheckpointManager.newest_loadable`: another
    run's or a damaged one is passed over with a warning), else None. Under torchrun rank 0 picks
    it (it alone holds the folder and warns) and every rank loads the file it picked.

    Raises:
        CheckpointError: ``load_path`` cannot be read.
        RunFolderError: the folder holds several runs' checkpoints and nothing says which is its own.
    """
    if cfg["load_path"]:
        path = Path(cfg["load_path"]).expanduser()
        return path, load_checkpoint(path)
    if not cfg["autoresume"]:
        return None
    found, picked = None, None
    if dist_info.is_main:
        try:
            found = CheckpointManager.of_run(run_dir).newest_loadable(warn=_warn)
            picked = str(found[0]) if found else None
        except RunFolderError as exc:
            picked = exc
    picked = broadcast_object(picked)
    if isinstance(picked, RunFolderError):
        raise picked
    if found is None and picked is not None:
        found = Path(picked), load_checkpoint(Path(picked))
    return found


def _lock_run_folder(run_dir: Path) -> FolderLock:
    """Lock the run folder for this process, then clear what a killed run left half-written.

    Raises:
        RunFolderError: another live process holds the folder (names it).
    """
    lock = FolderLock(run_dir).acquire()
    # Under the lock no other run can be writing here, so every temporary is an orphan.
    checkpoints = CheckpointManager.of_run(run_dir).folder
    removed = remove_orphan_temporaries(checkpoints) + remove_orphan_temporaries(run_dir, run_file_name)
    if removed:
        print(
            f"note: removed {len(removed)} temporary file(s) left in {run_dir} by an interrupted run", file=sys.stderr
        )
    return lock


def _claim_run_folder(
    cfg: dict, run_dir: Path, run_id: str, resumed_batch: int | None, resumed_from: Path | None
) -> None:
    """Make sure ``checkpoints/`` holds nothing but this run's history before anything is written.

    With ``save_overwrite`` the other files are moved into ``previous/`` (the whole old run for a
    fresh start); never deleted. Another run's ``best-rank0.pt`` next to this run's own history
    is moved there too, whatever ``save_overwrite`` says, as this run is about to write its own.

    Raises:
        RunFolderError: other files are there and ``save_overwrite`` is false (one line saying
            what is there and how to go on).
    """
    checkpoints = CheckpointManager.of_run(run_dir)
    folder = checkpoints.folder
    others = checkpoints.others(run_id, resumed_batch)
    if not others:
        checkpoints.move_foreign_best_aside(run_id)
        return
    fresh = resumed_batch is None
    if cfg["save_overwrite"]:
        moved = checkpoints.move_run_aside(others, whole_run=fresh)
        print(
            f"save_overwrite: moved {describe_others(others)}{' and its logs' if fresh else ''} to {moved}",
            file=sys.stderr,
        )
        checkpoints.move_foreign_best_aside(run_id)
        return
    if fresh:
        why = (
            "load_weights_only=true starts a new run"
            if cfg["load_weights_only"]
            else "autoresume=false"
            if not cfg["autoresume"]
            else "nothing there to resume"
        )
        situation = f"this run starts fresh ({why}) and would mix with them"
        carry_on = "to continue that run instead, run without autoresume=false and load_path; "
    else:
        situation = (
            f"this run resumes from {resumed_from} (batch {resumed_batch}), so they are not its history "
            "and would mix with it"
        )
        carry_on = ""
    raise RunFolderError(
        f"{folder}: holds {describe_others(others)}; {situation}. To keep both, give this run its own folder "
        f"(run_name=NEW or save_folder=PATH); {carry_on}or add save_overwrite=true to move them aside into "
        f"{run_dir / 'previous'} (nothing is deleted)"
    )


def setup_resume(cfg: dict, run_dir: Path, dist_info: DistInfo, held: list[FolderLock]) -> ResumePoint:
    """Lock the run folder (rank 0 only: under torchrun the other ranks are part of the same run;
    the lock goes into ``held``), pick the checkpoint to start from (never another run's), make
    sure the folder holds nothing but this run's history (:func:`_claim_run_folder`), then record
    in the lock file that the folder is this run's.

    Raises:
        RunFolderError: the folder is locked by another live process, holds another run's
            checkpoints without ``save_overwrite``, or several runs' without saying which is its own.
        CheckpointError: ``load_path`` cannot be read.
    """
    lock = _lock_run_folder(run_dir) if dist_info.is_main else None
    if lock is not None:
        held.append(lock)
    found = _resume_checkpoint(cfg, run_dir, dist_info)
    if found is None:
        resume = ResumePoint(new_run_id())
    elif cfg["load_weights_only"]:
        resume = ResumePoint(new_run_id(), *found)
    else:
        resume = ResumePoint(str(found[1].get("run_id", LEGACY_RUN_ID)), *found, resuming=True)
    barrier()  # every rank has read its checkpoint before rank 0 may move files aside
    if dist_info.is_main:
        _claim_run_folder(
            cfg,
            run_dir,
            resume.run_id,
            int((resume.checkpoint.get("timestamp") or {}).get("batch", 0)) if resume.resuming else None,
            resume.checkpoint_path,
        )
        lock.record_run_id(resume.run_id)  # the folder is this run's now (see runfolder.folder_run_id)
    return resume


def restore_checkpoint(state: State, cfg: dict, resume: ResumePoint, dist_info: DistInfo) -> Path | None:
    """Load the resume point's checkpoint into ``state``: all of it (and this rank's random
    streams) when resuming, the weights only with ``load_weights_only``. Warns (rank 0) about
    config keys that differ from the checkpoint's, except those free to change on resume.

    Returns:
        The checkpoint loaded, or None for a fresh start.

    Raises:
        CheckpointError: it does not fit this model/config.
    """
    if resume.checkpoint is None:
        return None
    path, checkpoint = resume.checkpoint_path, resume.checkpoint
    differing = [
        k
        for k in config_differences(upgrade_config(checkpoint.get("config", {}), str(path)), cfg)
        if k.split(".")[0] not in RESUME_FREE_KEYS
    ]
    if differing and dist_info.is_main:
        shown = ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else "")
        print(f"warning: the config differs from the checkpoint's in: {shown}", file=sys.stderr)
    try:
        state.load_state_dict(checkpoint, weights_only=cfg["load_weights_only"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: does not fit this model/config ({one_line(str(exc))})") from None
    if not cfg["load_weights_only"]:
        restore_rng_state(rank_entry(checkpoint, "rng", dist_info.rank, dist_info.world_size))
    if dist_info.is_main:
        ts = state.timestamp
        print(f"Resuming from {path} (epoch {state.finished_epochs}, batch {ts.batch})", file=sys.stderr)
    return path
