"""Run folders of a cross-validation and the checkpoint each is judged by: where the folds of a
``unet-cv`` folder are (:func:`fold_folders`), where one stands (:func:`fold_state`) and which of its
checkpoints stands for it (:func:`chosen_checkpoint`). Shared by ``unet-cv`` (:mod:`cv`), which trains
and scores the folds, and by the ensembles of ``unet-predict`` (:mod:`loading`), which predict with them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.checkpoint import LEGACY_RUN_ID
from ..core.checkpoints import CHECKPOINT_CHOICES as CHECKPOINT_CHOICES  # read by the command line
from ..core.checkpoints import CheckpointManager, named_counters
from ..core.schema import Duration
from ..training import callbacks as cb
from ..training.trainer import Timestamp

CV_CONFIG = "cv_config.yaml"
# What makes a run finished: its max_duration and its early stopper (None when off).
FinishRule = tuple[Duration, cb.EarlyStopper | None]


def fold_folder(cv_dir: Path, fold: int) -> Path:
    """The run folder of fold ``fold``: ``<cv_dir>/fold_<fold>``."""
    return Path(cv_dir) / f"fold_{fold}"


def fold_folders(cv_dir: Path) -> list[tuple[int, Path]]:
    """(fold, run folder) of every ``fold_<k>/`` folder in ``cv_dir``, by fold."""
    found = []
    for path in Path(cv_dir).glob("fold_*"):
        number = path.name.removeprefix("fold_")
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Where a fold stands
# --------------------------------------------------------------------------------------------


@dataclass
class FoldState:
    """Where one fold's run stands.

    Attributes:
        fold: the fold number.
        run_dir: its run folder.
        checkpoint: its newest checkpoint that loads (None: not started).
        batch: the optimizer steps that checkpoint has taken (0 when not started).
        finished: it reached ``max_duration`` or the early stopper stopped it.
        status: in words, e.g. "finished (max_duration 2ep reached)", "at batch 3 of 4ba".
        run_id: the run identity of the checkpoint ("" when not started).
        config: the config stored in the checkpoint (None when not started).
    """

    fold: int
    run_dir: Path
    checkpoint: Path | None = None
    batch: int = 0
    finished: bool = False
    status: str = "not started"
    run_id: str = ""
    config: dict | None = field(default=None, repr=False)


def fold_state(
    run_dir: Path,
    fold: int,
    max_duration: Duration | None = None,
    early_stopper: cb.EarlyStopper | None = None,
    own_rule: Callable[[Path, dict], FinishRule] | None = None,
) -> FoldState:
    """Where the run in ``run_dir`` stands against ``max_duration`` (and the early stopper's rule).

    Args:
        max_duration: None: judge the run by its own config: ``own_rule(checkpoint, its stored
            config)`` gives its ``max_duration`` and early stopper, ``early_stopper`` then unused.
        own_rule: the rule of a stored config (required when ``max_duration`` is None), e.g.
            :func:`loading.stored_finish_rule`.

    Reads only the run's checkpoints, the newest of its own run as autoresume picks it
    (:meth:`CheckpointManager.newest_loadable`, quietly: training warns about the others); a folder
    without one is "not started".

    Raises:
        ConfigError: (``max_duration`` None) the checkpoint's stored config cannot be read (from ``own_rule``).
        RunFolderError: checkpoints of several runs, and nothing says which is the folder's.
    """
    found = CheckpointManager.of_run(run_dir).newest_loadable(mmap=True, warn=lambda _: None)
    if found is None:
        return FoldState(fold, Path(run_dir))
    path, state = found
    if max_duration is None:
        max_duration, early_stopper = own_rule(path, state.get("config") or {})
    timestamp = Timestamp(**dict(state.get("timestamp") or {}))
    # A checkpoint saved at an epoch's last step is written before the loop counts that epoch in
    # timestamp.epoch; its name carries the epochs finished (State.finished_epochs).
    named = named_counters(path)
    if named:
        timestamp.epoch = max(timestamp.epoch, named[0])
    # reached() reads only the counters; the per-epoch sizes are not needed.
    reason = None
    if timestamp.reached(max_duration, batches_per_epoch=0, samples_per_epoch=0):
        reason = f"max_duration {max_duration} reached"
    elif early_stopper is not None:
        reason = early_stopper.stop_reason(list(state.get("eval_history") or []))
    status = f"finished ({reason})" if reason else f"stopped at batch {timestamp.batch} of {max_duration}"
    return FoldState(
        fold,
        Path(run_dir),
        path,
        timestamp.batch,
        reason is not None,
        status,
        str(state.get("run_id", LEGACY_RUN_ID)),
        state.get("config") if isinstance(state.get("config"), dict) else None,
    )


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def chosen_checkpoint(state: FoldState, choice: str = "best", warn: Callable[[str], None] = _warn) -> tuple[Path, str]:
    """The checkpoint a finished run (a fold, or any run folder) is scored and predicted with,
    and why: the one place a folder's checkpoint is chosen for it.

    ``choice`` "best": ``best-rank0.pt`` when the run saved one, else the newest checkpoint;
    "latest": the newest checkpoint. A ``best-rank0.pt`` that is there but cannot stand for the
    run (another run's, unreadable, or needing code to load) is never used: the newest
    checkpoint takes its place (:meth:`CheckpointManager.choose`), and ``warn`` gets one line
    naming both and why.

    Returns:
        (checkpoint, "best" or "latest").

    Raises:
        ValueError: an unknown choice.
    """
    chosen = CheckpointManager.of_run(state.run_dir).choose(choice, state.checkpoint, state.run_id)
    if chosen.refused is not None:
        warn(f"{chosen.refused} refused ({chosen.reason}); using {chosen.path.name}")
    return chosen.path, chosen.why
