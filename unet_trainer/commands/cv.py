"""Cross-validation in one command (``unet-cv``): train every fold, then score the out-of-fold
predictions of all folds together.

The cross-validation folder is the config's ``save_folder`` (default ``runs/<config name>``). It
holds one ordinary run folder per fold, ``fold_<k>/``, trained by :func:`train.run_training`
with ``data.fold=k`` and ``run_name=<run name>-fold<k>``, so each fold resumes as any run does
(autoresume from its newest checkpoint). Next to them:

* ``cv_config.yaml``: the resolved config the cross-validation was started with. A later command
  with a config that differs in more than the keys a resume may change (``resume.RESUME_FREE_KEYS``,
  and ``data.fold``, which is set per fold) is refused, so the folds are one experiment.
* ``cv_summary.csv``: one row per validation case (its fold, case id and every score of the
  evaluator), one row per fold (the mean over its cases) and two overall rows (the mean and the
  sample standard deviation over all cases), written atomically.

A fold is finished when its newest checkpoint's counters have reached ``max_duration``, or when
its evaluation history says the early stopper stopped it (:meth:`callbacks.EarlyStopper.stop_reason`).
Finished folds are skipped; the first unfinished one is trained (resumed), then the next.

Each fold is scored with its chosen checkpoint (:func:`folders.chosen_checkpoint`): ``best-rank0.pt`` (the
best validation mean Dice, the evaluator's metric) when the fold's run saved one, else its newest
checkpoint (a ``best-rank0.pt`` that is another run's or does not load is named in a warning);
with the same evaluator as ``unet-eval`` (:func:`loading.load_model` and :func:`evaluate.evaluate_model`) on that fold's
validation cases.
"""

from __future__ import annotations

import contextlib
import csv
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..config.config import load_yaml, resolve_from_base
from ..config.engine import ConfigError, config_differences, dump_config
from ..core.checkpoint import checkpoint_identity
from ..core.checkpoints import CheckpointManager
from ..core.distributed import DistInfo, barrier, broadcast_object, init_distributed, shutdown
from ..core.fileio import atomic_write, atomic_write_text
from ..core.runfolder import FolderLock, RunFolderError
from ..data.layouts import DataFormatError, scheme_named
from ..data.schemes import SCHEMES
from ..evaluation import postprocessing as pp
from ..evaluation.metrics import mean_scores
from ..training import callbacks as cb
from .builders import CVSettings, EvalSettings, SplitSettings, build_cv_settings, fold_config
from .datasets import check_run_outputs, requested_scheme, with_scheme
from .evaluate import evaluate_model
from .folders import CV_CONFIG, FoldState, chosen_checkpoint, fold_folder, fold_state
from .loading import load_model
from .resume import RESUME_FREE_KEYS
from .train import run_training

CV_SUMMARY = "cv_summary.csv"
CV_LOCK = "cv.lock"
# Keys that may differ between a fold's config and the cross-validation's: set per fold.
PER_FOLD_KEYS = ("data.fold", "run_name", "save_folder", "callbacks.mlflow.run_name")
# Keys that only change how the trained models are scored (allowed to differ with --aggregate-only).
EVALUATION_KEYS = ("eval", "device", "precision")
# The summary's first columns; every score key of the evaluator follows.
SUMMARY_COLUMNS = ("row", "fold", "case_id")


class CrossValidationError(RuntimeError):
    """A cross-validation folder that cannot be used as asked (one line naming the folder or file)."""


def parse_folds(text: str, num_folds: int) -> list[int]:
    """``"0,2"`` -> [0, 2].

    Raises:
        ConfigError: not a comma-separated list of folds below ``num_folds``, or a repeated fold.
    """
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        folds = []
    if not folds or len(set(folds)) != len(folds) or any(not 0 <= f < num_folds for f in folds):
        raise ConfigError(
            f"command line: --folds {text!r} must list distinct folds from 0 to {num_folds - 1} "
            f"('data.num_folds' = {num_folds}), e.g. --folds 0,2"
        )
    return folds


# --------------------------------------------------------------------------------------------
# The cross-validation folder's record
# --------------------------------------------------------------------------------------------


def _free(key: str, extra: Sequence[str]) -> bool:
    """Whether a differing dotted ``key`` is allowed to differ (a resume-free key or under ``extra``)."""
    return key.split(".")[0] in RESUME_FREE_KEYS or any(key == k or key.startswith(k + ".") for k in extra)


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")


def _stored_config(source: Path, read) -> dict:
    """A stored resolved config (``read()``), resolved again so that keys added to the schema
    since it was written take their defaults instead of counting as differences.

    Raises:
        CrossValidationError: unreadable, or not a config this version reads (one line).
    """
    try:
        stored = read()
    except ConfigError as exc:  # load_yaml's line names the file
        raise CrossValidationError(f"{exc}; move it away to start afresh") from None
    except (OSError, yaml.YAMLError) as exc:
        raise CrossValidationError(f"{source}: not readable ({exc}); move it away to start afresh") from None
    if not isinstance(stored, dict):
        raise CrossValidationError(f"{source}: holds no config; move it away to start afresh")
    try:
        return resolve_from_base(stored, [], source=f"{source} (stored config)")
    except ConfigError as exc:
        raise CrossValidationError(str(exc)) from None


def claim_cv_folder(cfg: dict, aggregate_only: bool = False) -> Path:
    """Check the cross-validation folder against the config and record the config in it.

    Returns:
        The folder (the config's ``save_folder``).

    Raises:
        CrossValidationError: the folder is a ``unet-train`` run folder, or its ``cv_config.yaml``
            differs from ``cfg`` in keys that change the experiment (one line naming them).
    """
    cv_dir = build_cv_settings(cfg).cv_dir
    if aggregate_only and not cv_dir.is_dir():
        raise CrossValidationError(f"{cv_dir}: no such cross-validation folder (train the folds first: unet-cv CONFIG)")
    if CheckpointManager.of_run(cv_dir).folder.is_dir():
        raise CrossValidationError(
            f"{cv_dir}: is the run folder of a unet-train run (it holds checkpoints/); give the "
            "cross-validation its own folder with run_name=NEW or save_folder=PATH"
        )
    record = cv_dir / CV_CONFIG
    # Folds started in parallel (one unet-cv per GPU) check and write the record one at a time.
    lock = FolderLock(cv_dir, CV_LOCK).acquire(wait=True)
    try:
        if record.is_file():
            old = _stored_config(record, lambda: load_yaml(record))
            extra = PER_FOLD_KEYS + (EVALUATION_KEYS if aggregate_only else ())
            differing = [k for k in config_differences(old, cfg) if not _free(k, extra)]
            if differing:
                raise CrossValidationError(
                    f"{record}: this cross-validation was started with another config (it differs in "
                    f"{_shown(differing)}); run it with the same config and overrides, or give this one its "
                    "own folder with run_name=NEW or save_folder=PATH"
                )
        if not aggregate_only:
            atomic_write_text(record, dump_config(cfg))
    finally:
        lock.release()
    return cv_dir


def check_fold_config(state: FoldState, cfg: dict) -> None:
    """A fold's checkpoint must come from the cross-validation's config (for its fold).

    Raises:
        CrossValidationError: it was trained on another fold, or with a config that differs in
            keys that change training (one line naming the checkpoint and the keys).
    """
    if state.config is None:
        return
    trained_fold = (state.config.get("data") or {}).get("fold")
    if trained_fold != state.fold:
        raise CrossValidationError(
            f"{state.checkpoint}: was trained on fold {trained_fold}, but lies in the folder of fold {state.fold}"
        )
    stored = _stored_config(state.checkpoint, lambda: state.config)
    data = stored.get("data") or {}
    if requested_scheme(cfg) == "auto" and data.get("scheme", "auto") != "auto":
        with contextlib.suppress(DataFormatError):  # an unknown scheme: the configs differ, said below
            scheme = scheme_named(data["scheme"], data.get("scheme_definition"))
            cfg, _ = with_scheme(cfg, scheme)  # as training resolved it from the data
    differing = [k for k in config_differences(stored, cfg) if not _free(k, PER_FOLD_KEYS + EVALUATION_KEYS)]
    if differing:
        raise CrossValidationError(
            f"{state.checkpoint}: was trained with another config than this cross-validation's (it differs in "
            f"{_shown(differing)}); train fold {state.fold} with the same config, or move {state.run_dir} away"
        )


# --------------------------------------------------------------------------------------------
# Train, then score
# --------------------------------------------------------------------------------------------


@dataclass
class FoldScore:
    """One fold's out-of-fold evaluation: the checkpoint used and why, and its per-case rows."""

    fold: int
    checkpoint: Path
    choice: str  # "best" or "latest"
    batch: int  # the checkpoint's optimizer steps
    rows: list[dict]  # {"case_id", score keys...}, by case id


@dataclass
class CVSummary:
    """The scores of every fold's validation cases together.

    Attributes:
        folds: per fold, the checkpoint scored and its per-case rows.
        rows: the rows of ``cv_summary.csv`` ({"row", "fold", "case_id", score keys...}): "case"
            rows, then one "fold_mean" row per fold, then the overall "mean" and "std" rows.
        keys: the score keys, in the evaluator's order.
        csv_path: where the rows were written.
        regions: the label scheme's evaluation regions, in reporting order (the table's columns).
    """

    folds: list[FoldScore]
    rows: list[dict]
    keys: list[str]
    csv_path: Path
    regions: tuple[str, ...] = ("WT", "TC", "ET")
    # With a postprocessing metric: the rules chosen on all folds' out-of-fold predictions
    # (a postprocessing.PostprocessingChoice) and the postprocessing.json written.
    postprocessing: Any = None
    postprocessing_path: Path | None = None

    def overall(self, kind: str) -> dict:
        """The overall "mean" or "std" row."""
        return next(row for row in self.rows if row["row"] == kind)


@dataclass
class CVOutcome:
    """What :func:`run_cross_validation` did.

    Attributes:
        cv_dir: the cross-validation folder.
        folds: the folds this command was asked to train (or score).
        trained: per fold trained by this command, what happened, in words.
        stopped: why training stopped before every asked fold was finished (a signal, a stop
            callback); None when they all are.
        pending: folds of the cross-validation not finished yet (the summary waits for them).
        summary: the scores, written to ``cv_summary.csv`` (None: stopped, folds pending, or not
            rank 0).
    """

    cv_dir: Path
    folds: list[int]
    trained: dict[int, str] = field(default_factory=dict)
    stopped: str | None = None
    pending: list[int] = field(default_factory=list)
    summary: CVSummary | None = None


def evaluation_overrides(settings: EvalSettings, lesion_wise: bool) -> list[str]:
    """Overrides that score a fold's checkpoint with the cross-validation's evaluation settings."""
    return list(settings.overrides) + (["eval.lesion_wise=true"] if lesion_wise else [])


def _stdev(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def summary_rows(folds: Sequence[FoldScore]) -> tuple[list[dict], list[str]]:
    """The rows of ``cv_summary.csv`` and the score keys.

    Means leave NaN scores out (:func:`metrics.mean_scores`, as every other mean here); the
    standard deviation is the sample one (n - 1) over the cases with a score, NaN below 2.

    Raises:
        CrossValidationError: the folds' rows do not hold the same score keys.
    """
    keys = [k for k in folds[0].rows[0] if k != "case_id"]
    for score in folds:
        if [k for k in score.rows[0] if k != "case_id"] != keys:
            raise CrossValidationError(
                f"{score.checkpoint}: its scores ({', '.join(k for k in score.rows[0] if k != 'case_id')}) "
                f"differ from fold {folds[0].fold}'s ({', '.join(keys)})"
            )
    cases = [
        {"row": "case", "fold": s.fold, "case_id": r["case_id"], **{k: r[k] for k in keys}}
        for s in folds
        for r in s.rows
    ]
    per_fold = [
        {"row": "fold_mean", "fold": s.fold, "case_id": "", **mean_scores([{k: r[k] for k in keys} for r in s.rows])}
        for s in folds
    ]
    scores = [{k: row[k] for k in keys} for row in cases]
    overall = [
        {"row": "mean", "fold": "all", "case_id": "", **mean_scores(scores)},
        {"row": "std", "fold": "all", "case_id": "", **{k: _stdev([row[k] for row in scores]) for k in keys}},
    ]
    return cases + per_fold + overall, keys


def write_summary_csv(path: Path, rows: Sequence[dict], keys: Sequence[str]) -> None:
    """The summary rows as CSV, atomically (floats written exactly, NaN as ``nan``)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*SUMMARY_COLUMNS, *keys])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(path), write)


def score_folds(
    settings: CVSettings,
    states: Sequence[FoldState],
    choice: str,
    lesion_wise: bool,
    progress: bool,
    log: TextIO,
    postprocessing_metric: str | None = None,
) -> CVSummary:
    """Score each finished fold's chosen checkpoint on its validation cases and write the summary.

    With ``postprocessing_metric`` (see :data:`postprocessing.METRICS`), also choose postprocessing
    on the out-of-fold predictions of all folds together, as nnU-Net's determine_postprocessing
    does on its cross-validation, and write ``<cv folder>/postprocessing.json``, which
    ``unet-predict <cv folder>`` applies to the fold ensemble. The predictions wait in memory, or
    beyond :data:`postprocessing.DEFAULT_MEMORY_BYTES` in a temporary folder of the CV folder.

    Raises:
        CheckpointError, ConfigError, DataFormatError: as :func:`loading.load_model` and :func:`evaluate.evaluate_model`.
        PostprocessingError: an unknown metric (before anything is scored).
        OSError: the summary cannot be written.
    """
    if postprocessing_metric is not None:
        pp.check_metric(postprocessing_metric)
    cv_dir = settings.cv_dir
    overrides = evaluation_overrides(settings.eval, lesion_wise)
    scores, regions = [], ()
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(pp.PredictionStore(cv_dir)) if postprocessing_metric else None
        for state in states:
            checkpoint, why = chosen_checkpoint(state, choice)
            batch = state.batch if why == "latest" else checkpoint_identity(checkpoint)[1]
            print(f"Fold {state.fold}: scoring {checkpoint} ({why}, batch {batch})", file=log)
            report = evaluate_model(
                load_model(checkpoint, overrides),
                progress=progress,
                overlays=False,
                case_sink=store.put if store else None,
            )
            scores.append(FoldScore(state.fold, checkpoint, why, batch, report.per_case))
            regions = SCHEMES[report.scheme].region_names
        rows, keys = summary_rows(scores)
        csv_path = cv_dir / CV_SUMMARY
        write_summary_csv(csv_path, rows, keys)
        summary = CVSummary(scores, rows, keys, csv_path, regions)
        if store is not None:
            scoring = settings.eval.metric_settings(postprocessing_metric)
            summary.postprocessing = pp.choose_postprocessing(store, scoring)
            chosen_on = f"the out-of-fold predictions of {len(scores)} folds ({len(store.case_ids)} cases)"
            summary.postprocessing_path = pp.write_postprocessing(
                cv_dir / pp.POSTPROCESSING_FILE, summary.postprocessing, cv_dir.resolve(), chosen_on, scoring
            )
    return summary


def _checked_folds(split: SplitSettings, folds: Sequence[int] | None) -> list[int]:
    """The folds to train (default all); ConfigError: a split file, or a fold outside ``data.num_folds``."""
    if split.split_file:
        raise ConfigError(
            f"'data.split_file' = {split.split_file}: a split file is one fold; unet-cv splits the "
            "cases into 'data.num_folds' folds itself, so set data.split_file=null"
        )
    num_folds = split.num_folds
    if folds is None:
        folds = list(range(num_folds))
    if not folds or any(not 0 <= f < num_folds for f in folds):
        raise ConfigError(f"folds {list(folds)}: each must be from 0 to {num_folds - 1} ('data.num_folds')")
    return list(folds)


class _FoldReader:
    """The folds' states, read by rank 0 and the same on every rank."""

    def __init__(self, cfg: dict, settings: CVSettings, dist_info: DistInfo):
        self.cfg, self.settings, self.dist_info = cfg, settings, dist_info
        self.cv_dir = settings.cv_dir
        self.duration, self.stopper = settings.finish

    def states(self, wanted: Sequence[int]) -> list[FoldState]:
        """The states of the folds ``wanted``, in order; a CrossValidationError (on every rank) when a fold's
        folder cannot be read or holds a run of another config."""
        found: list[FoldState] | str = []
        if self.dist_info.is_main:
            try:
                found = [fold_state(fold_folder(self.cv_dir, k), k, self.duration, self.stopper) for k in wanted]
                for state in found:
                    check_fold_config(state, fold_config(self.cfg, state.fold))
            except (CrossValidationError, RunFolderError) as exc:
                found = str(exc)
        found = broadcast_object(found)
        if isinstance(found, str):
            raise CrossValidationError(found)
        return found


def _claim_on_rank0(cfg: dict, aggregate_only: bool, dist_info: DistInfo) -> None:
    """:func:`claim_cv_folder` on rank 0; its refusal (a CrossValidationError) raised on every rank."""
    problem = None
    if dist_info.is_main:
        try:
            claim_cv_folder(cfg, aggregate_only)
        except CrossValidationError as exc:
            problem = str(exc)
    problem = broadcast_object(problem)
    if problem:
        raise CrossValidationError(problem)


def _train_folds(
    cfg: dict,
    reader: _FoldReader,
    outcome: CVOutcome,
    progress: bool,
    extra_callbacks: Sequence[cb.Callback],
    log: TextIO,
) -> bool:
    """Train (or resume) each of ``outcome.folds`` not finished yet, one after another, noting each in
    ``outcome.trained``; False when one stopped unfinished (``outcome.stopped`` says why)."""
    num_folds = reader.settings.split.num_folds
    for fold in outcome.folds:
        (state,) = reader.states([fold])
        if state.finished:
            print(f"Fold {fold} of {num_folds}: {state.status} in {state.run_dir}; skipped", file=log)
            continue
        action = "resuming" if state.checkpoint is not None else "training"
        print(f"Fold {fold} of {num_folds}: {action} in {state.run_dir}", file=log)
        summary = run_training(
            fold_config(cfg, fold, started=state.checkpoint is not None),
            progress=progress,
            extra_callbacks=extra_callbacks,
        )
        (after,) = reader.states([fold])
        if not after.finished:
            outcome.stopped = (
                f"fold {fold} stopped at batch {after.batch} ({summary['stop_reason'] or 'unfinished'}); "
                "run the same command again to resume it"
            )
            return False
        outcome.trained[fold] = f"{'resumed' if state.checkpoint else 'trained'}, {after.status}"
        print(f"Fold {fold} of {num_folds}: {after.status} in {after.run_dir}", file=log)
    return True


def _unfinished(every: Sequence[FoldState], pending: Sequence[int]) -> CrossValidationError:
    """The error of --aggregate-only with folds ``pending``: names the first one's folder and state."""
    state = every[pending[0]]
    return CrossValidationError(
        f"{state.run_dir}: fold {state.fold} is {state.status}; every fold must be finished to "
        f"aggregate (folds pending: {', '.join(map(str, pending))}; train them with "
        f"unet-cv CONFIG --folds {','.join(map(str, pending))})"
    )


def run_cross_validation(
    cfg: dict,
    folds: Sequence[int] | None = None,
    aggregate_only: bool = False,
    choice: str = "best",
    lesion_wise: bool = False,
    progress: bool = True,
    extra_callbacks: Sequence[cb.Callback] = (),
    log: TextIO | None = None,
    postprocessing_metric: str | None = None,
) -> CVOutcome:
    """Train the folds of a resolved config one after another, then score them all together.

    Args:
        cfg: the resolved config; ``save_folder`` is the cross-validation folder, ``data.fold``
            is ignored (every fold is trained).
        folds: the folds to train (default all ``data.num_folds``). The summary is written once
            every fold of the cross-validation is finished; with a subset still pending, the
            outcome lists them.
        aggregate_only: train nothing: score the finished folds (every fold must be).
        choice: "best" or "latest", see :func:`chosen_checkpoint`.
        lesion_wise: also the lesion-wise scores (as ``eval.lesion_wise``, for the scoring only).
        progress: progress bars.
        extra_callbacks: passed to every fold's :func:`train.run_training` (tests, benchmarks).
        log: where one line per fold is written (default stderr).
        postprocessing_metric: also choose postprocessing on the out-of-fold predictions with this
            metric (see :func:`score_folds`).

    Under torchrun every rank trains the folds together (each through run_training's DDP); then
    the process group is closed and rank 0 alone scores and writes the summary.

    Returns:
        The :class:`CVOutcome`.

    Raises:
        ConfigError: bad folds.
        CrossValidationError: the folder holds another experiment, or (scoring) a fold is missing,
            unfinished or from another config.
        OutputPathError: the folder would lie in, be or hold the raw or prepared data.
        whatever :func:`train.run_training` raises for a fold (bad data, a diverged loss...).
    """
    log = sys.stderr if log is None else log
    settings = build_cv_settings(cfg)
    folds = _checked_folds(settings.split, folds)
    cv_dir = settings.cv_dir
    # Every fold's run folder lies inside: one check, before the record or any lock is written.
    check_run_outputs(cfg, cv_dir, "the cross-validation folder (save_folder)")
    dist_info = init_distributed(settings.device_type)
    outcome = CVOutcome(cv_dir, folds)
    reader = _FoldReader(cfg, settings, dist_info)
    _claim_on_rank0(cfg, aggregate_only, dist_info)
    if not aggregate_only and not _train_folds(cfg, reader, outcome, progress, extra_callbacks, log):
        return outcome

    every = reader.states(range(settings.split.num_folds))
    outcome.pending = [s.fold for s in every if not s.finished]
    if dist_info.enabled:  # rank 0 scores alone: its evaluations must not wait for the other ranks
        barrier()
        shutdown()
    if outcome.pending:
        if aggregate_only:
            raise _unfinished(every, outcome.pending)
        return outcome
    if dist_info.is_main:
        outcome.summary = score_folds(
            settings, every, choice, lesion_wise or settings.eval.lesion_wise, progress, log, postprocessing_metric
        )
    return outcome


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def format_summary(summary: CVSummary) -> str:
    """A small table: per fold and overall (mean and standard deviation) Dice per region and its
    mean, and the lesion-wise Dice and HD95 per region when scored."""
    columns = [(r, r) for r in summary.regions] + [("mean", "mean")]
    columns += [(f"lesion_dice/{r}", f"LW {r}") for r in summary.regions if f"lesion_dice/{r}" in summary.keys]
    columns += [(f"lesion_hd95/{r}", f"LW HD {r}") for r in summary.regions if f"lesion_hd95/{r}" in summary.keys]
    width = max(10, *(len(title) + 1 for _, title in columns))  # a dataset.json's region names may be long

    def number(key: str, value) -> str:
        if value is None or math.isnan(value):
            return "nan"
        return f"{value:.2f}" if "hd95" in key else f"{value:.4f}"  # mm; Dice

    counts = {s.fold: len(s.rows) for s in summary.folds}
    header = f"{'fold':<6}{'cases':>6}  " + "".join(f"{title:>{width}}" for _, title in columns) + "  checkpoint"
    lines = [
        f"Cross-validation of {len(summary.folds)} folds: each fold's checkpoint on its own validation cases "
        f"({sum(counts.values())} cases); mean and sample standard deviation over all cases",
        "",
        header,
    ]
    for row in summary.rows:
        if row["row"] == "case":
            continue
        fold = row["fold"] if row["row"] == "fold_mean" else row["row"]
        cases = counts[row["fold"]] if row["row"] == "fold_mean" else sum(counts.values())
        scored = next((s for s in summary.folds if s.fold == row["fold"]), None)
        where = f"  {scored.checkpoint.name} ({scored.choice}, batch {scored.batch})" if scored else ""
        lines.append(f"{fold!s:<6}{cases:>6}  " + "".join(f"{number(k, row[k]):>{width}}" for k, _ in columns) + where)
    lines += ["", f"Per case, per fold and overall: {summary.csv_path}"]
    return "\n".join(lines)
