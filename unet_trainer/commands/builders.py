"""Builders: the only code that reads the resolved config. Each turns one section into objects
built from plain typed arguments; :func:`run_training` wires them into a run in setup steps
(torchtune-style: device, resume, data, model and optimizer, evaluator, state), then fits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import components
from ..config.components import build_model, describe_model
from ..config.engine import ConfigError, config_differences, dump_config
from ..config.tree import SCHEDULERS, upgrade_config
from ..core.checkpoint import (
    LEGACY_RUN_ID,
    CheckpointError,
    load_checkpoint,
    new_run_id,
    one_line,
    restore_rng_state,
)
from ..core.checkpoints import CheckpointManager, describe_others, run_file_name
from ..core.distributed import DistInfo, barrier, broadcast_object, init_distributed
from ..core.duration import Duration
from ..core.fileio import atomic_write_text, remove_orphan_temporaries
from ..core.guard import check_outputs
from ..core.runfolder import FolderLock, RunFolderError
from ..core.schema import Field
from ..data.layouts import DataFormatError
from ..data.loader import BatchTooLarge, PatchDataset, build_train_loader
from ..data.phantom import write_phantom_dataset
from ..data.prepare import PrepareSettings, load_prepared_index, prepare_dataset, prepared_is_current
from ..data.split import kfold_split, load_split_file
from ..evaluation.case_metrics import CaseMetric, UnknownMetric, make_metrics, metric_names
from ..evaluation.evaluation import DiceEvaluator
from ..evaluation.inference import SlidingWindow
from ..evaluation.lesion_metrics import LesionSettings
from ..models.base import SegmentationModel
from ..training import callbacks as cb
from ..training import reporting
from ..training.augment import AUGMENTATIONS, BatchAugmenter
from ..training.loggers import FileLogger, Logger, LoggerDestination
from ..training.losses import DeepSupervisionLoss, OutputMode
from ..training.schedules import BatchScheduler, ComposedSchedule
from ..training.trainer import Algorithm, Engine, Event, State, duration_in_batches, fit, rank_entry

AMP_DTYPES = {"fp32": None, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}
# Config keys that may change between a checkpoint and its resume without a warning.
RESUME_FREE_KEYS = {"load_path", "autoresume", "max_duration", "load_weights_only", "save_overwrite"}


# --------------------------------------------------------------------------------------------
# Device, seeds
# --------------------------------------------------------------------------------------------


def build_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available. Raises ConfigError for ``cuda`` without a GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("'device' = cuda but no CUDA GPU is available; use device=cpu or device=auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def cache_dir(cfg: dict) -> Path:
    """``data.cache_dir``, else ``$UNET_TRAINER_CACHE``, else ``~/.cache/unet-trainer``."""
    if cfg["data"]["cache_dir"]:
        return Path(cfg["data"]["cache_dir"]).expanduser()
    env = os.environ.get("UNET_TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unet-trainer"


def raw_data_path(cfg: dict) -> Path:
    """The raw dataset folder ``data.path`` names (for ``data.path: null`` the phantom's folder in
    the cache), without checking or creating it."""
    data = cfg["data"]
    if data["path"] is not None:
        return Path(data["path"]).expanduser()
    phantom = data["phantom"]
    shape = "x".join(str(s) for s in phantom["shape"])
    return cache_dir(cfg) / f"phantom-{phantom['style']}-{phantom['cases']}cases-{shape}-seed{phantom['seed']}"


def raw_data_dir(cfg: dict, progress: bool = True) -> Path:
    """The raw dataset folder; for ``data.path: null`` the phantom, generated into the cache if absent.

    Raises:
        DataFormatError: ``data.path`` does not exist.
    """
    data = cfg["data"]
    folder = raw_data_path(cfg)
    if data["path"] is None:
        phantom = data["phantom"]
        if not (folder / "phantom.json").is_file():
            print(f"Generating the synthetic BraTS phantom into {folder}", file=sys.stderr)
            write_phantom_dataset(
                folder,
                phantom["cases"],
                tuple(phantom["shape"]),
                phantom["seed"],
                progress,
                workers=data["prepare_workers"],
                style=phantom["style"],
            )
        return folder
    if not folder.is_dir():
        raise DataFormatError(f"data.path: folder {folder} does not exist (set data.path=/path/to/your/BraTS)")
    return folder


def prepared_data_dir(cfg: dict, source: Path) -> Path:
    """``data.prepared_path``, else a cache folder named after the source and its absolute path."""
    if cfg["data"]["prepared_path"]:
        return Path(cfg["data"]["prepared_path"]).expanduser()
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return cache_dir(cfg) / "prepared" / f"{source.name}-{digest}"


def data_input_folders(cfg: dict) -> list[tuple[str, Path]]:
    """The dataset folders a run reads, as :func:`guard.check_outputs` takes them: the raw dataset
    and its prepared folder (neither checked nor created)."""
    raw = raw_data_path(cfg)
    return [("the raw dataset", raw), ("the prepared data folder", prepared_data_dir(cfg, raw))]


def check_run_outputs(cfg: dict, run_dir: Path, what: str = "the run folder (save_folder)") -> None:
    """Refuse a run (or cross-validation) folder that would lie in, be or hold the raw dataset or
    its prepared folder, and a prepared folder inside the raw dataset; before anything is written.

    Raises:
        OutputPathError: one line naming both paths.
    """
    raw, prepared = data_input_folders(cfg)
    check_outputs([(what, run_dir)], folders=[raw, prepared])
    check_outputs([(prepared[0], prepared[1])], folders=[raw])


def ensure_prepared(cfg: dict, dist_info: DistInfo, progress: bool = True) -> tuple[Path, dict]:
    """Prepare the dataset when the prepared copy is missing or stale (rank 0; others wait)."""
    source = raw_data_dir(cfg, progress) if dist_info.is_main else None
    barrier()
    if source is None:
        source = raw_data_dir(cfg, progress=False)
    out = prepared_data_dir(cfg, source)
    settings = PrepareSettings.from_config(cfg["data"])
    if dist_info.is_main and not prepared_is_current(out, source, settings, cfg["data"]["format"]):
        print(f"Preparing {source} -> {out}", file=sys.stderr)
        prepare_dataset(
            source, out, cfg["data"]["format"], settings, workers=cfg["data"]["prepare_workers"], progress=progress
        )
    barrier()
    return out, load_prepared_index(out)


def build_split(cfg: dict, case_ids: list[str]) -> dict[str, list[str]]:
    data = cfg["data"]
    if data["split_file"]:
        return load_split_file(Path(data["split_file"]), case_ids)
    try:
        return kfold_split(case_ids, data["num_folds"], data["fold"], data["split_seed"])
    except ValueError as exc:
        raise DataFormatError(f"data: {exc}") from None


# --------------------------------------------------------------------------------------------
# Model, optimisation
# --------------------------------------------------------------------------------------------


def build_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    """The optimizer the ``optimizer`` section names, over ``params``."""
    ((name, settings),) = cfg["optimizer"].items()
    return components.build(components.OPTIMIZERS[name], settings, {"params": params})


def build_scheduler(cfg: dict, optimizer, batches_per_epoch: int, total_batches: int) -> BatchScheduler:
    """The product of the ``schedulers`` list, stepped per batch; every setting the schema holds as a
    duration (200ep, 1000ba, 64sp) reaches its schedule in batches."""

    def in_batches(raw, field: Field):
        if field.kind != "duration" or raw is None:
            return raw
        return duration_in_batches(Duration.parse(raw), batches_per_epoch, cfg["train_batch_size"])

    parts = []
    for entry in cfg["schedulers"]:
        ((name, settings),) = entry.items()
        fields = SCHEDULERS[name]
        converted = {key: in_batches(value, fields[key]) for key, value in settings.items()}
        parts.append(components.build(components.SCHEDULERS[name], converted))
    return BatchScheduler(optimizer, ComposedSchedule(parts, total_batches))


def build_loss(cfg: dict, model: SegmentationModel) -> DeepSupervisionLoss:
    """The ``loss`` section's loss, over the model's deep-supervision outputs when it has them.

    Raises:
        ConfigError: a loss over regions (:attr:`OutputMode.REGIONS`) for a model without one
            output per region.
    """
    ((name, settings),) = cfg["loss"].items()
    loss = components.LOSSES[name]
    if components.output_mode(cfg["loss"]) is OutputMode.REGIONS and model.num_classes != len(loss.regions):
        ((model_name, _),) = cfg["model"].items()
        *first, last = loss.regions
        raise ConfigError(
            f"loss {name} predicts {', '.join(first)} and {last}: set model.{model_name}.num_classes={len(loss.regions)}"
        )
    weights = model.deep_supervision_weights() if model.deep_supervision_heads else None
    return DeepSupervisionLoss(components.build(loss, settings), weights)


def build_augmenter(cfg: dict, device: torch.device, seed: int) -> BatchAugmenter | None:
    aug = cfg["augmentation"]
    if not aug["enabled"]:
        return None
    transforms = {name: transform(**aug[name]) for name, transform in AUGMENTATIONS.items()}
    return BatchAugmenter(transforms, describe_model(cfg["model"]).spatial_dims, device, seed)


def build_algorithms(cfg: dict) -> list[Algorithm]:
    return [components.build(components.ALGORITHMS[name], settings) for name, settings in cfg["algorithms"].items()]


def build_logger_destinations(cfg: dict, run_dir: Path) -> list[LoggerDestination]:
    """The always-on log files (:class:`FileLogger`), then the destinations switched on under
    ``callbacks:`` (:data:`components.LOGGER_DESTINATIONS`), in their order.

    Raises:
        ConfigError: a destination whose optional package is missing (names the install command).
    """
    destinations: list[LoggerDestination] = [FileLogger(run_dir)]
    supplied = {"run_dir": run_dir, "config": cfg}
    for name, settings in cfg["callbacks"].items():
        if name not in components.LOGGER_DESTINATIONS:
            continue
        destination = components.build(components.LOGGER_DESTINATIONS[name], settings, supplied)
        if destination.requires is not None:
            module, extra = destination.requires
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(
                    f"callbacks.{name} needs the {extra} package: pip install 'unet-trainer[{extra}]'"
                ) from None
        destinations.append(destination)
    return destinations


def build_callbacks(
    cfg: dict, run_dir: Path, is_main: bool, progress: bool, evaluator: DiceEvaluator | None = None
) -> list[cb.Callback]:
    """The configured callbacks (:data:`components.CALLBACKS`, in the config's order), then the
    always-on ones. A callback is left out on the other ranks when it declares ``writer_only``, and
    without an evaluator when it ``needs_evaluator``. The configured ones come before the logger,
    so that its destinations find their values and the overlay pictures of the same evaluation;
    the logger comes before the checkpoint saver, so that the logs hold every step a checkpoint holds.

    Raises:
        ConfigError: a logger destination whose optional package is missing (names the install
            command); checked on every rank, so that all of them stop.
    """
    destinations = build_logger_destinations(cfg, run_dir)
    supplied = {"run_dir": run_dir, "evaluator": evaluator, "is_writer": is_main, "config": cfg}
    callbacks: list[cb.Callback] = []
    for name, settings in cfg["callbacks"].items():
        callback = components.CALLBACKS.get(name)
        if callback is None or (callback.writer_only and not is_main):
            continue
        if callback.needs_evaluator and evaluator is None:
            continue
        callbacks.append(components.build(callback, settings, supplied))
    overlays = next((c for c in callbacks if isinstance(c, reporting.OverlayWriter)), None)
    callbacks += [
        cb.SignalHandler(),
        cb.ProgressBar(enabled=is_main and progress),
        Logger(destinations if is_main else [], overlays),
        cb.CheckpointSaver(
            CheckpointManager.of_run(run_dir).folder,
            Duration.parse(cfg["save_interval"]),
            cfg["save_num_checkpoints_to_keep"],
            is_writer=is_main,
        ),
    ]
    return callbacks


def build_sliding_window(cfg: dict) -> SlidingWindow:
    """The sliding-window inference of a run's config: its patch, its model's dimensions and
    outputs, the ``eval`` window settings and the precision's autocast dtype."""
    ev = cfg["eval"]
    model = describe_model(cfg["model"])
    return SlidingWindow(
        patch_size=tuple(cfg["data"]["patch_size"]),
        spatial_dims=model.spatial_dims,
        num_outputs=model.num_classes,
        overlap=ev["overlap"],
        batch_size=ev["sw_batch_size"],
        gaussian=ev["gaussian"],
        mirror=ev["mirror_tta"],
        amp_dtype=AMP_DTYPES[cfg["precision"]],
    )


def build_metrics(cfg: dict) -> list[CaseMetric]:
    """The evaluator's metrics: ``eval.metrics``, plus ``hd95`` and ``lesion_wise`` when
    ``eval.hd95`` / ``eval.lesion_wise`` ask for them, built from the ``eval`` settings and the
    grouped lesion settings.

    Raises:
        ConfigError: a name that is not a metric (naming ``eval.metrics`` and the metrics).
    """
    ev = cfg["eval"]
    lesion = LesionSettings(
        ev["lesion_dilation"], ev["lesion_min_voxels"], ev["lesion_hd95_penalty"], ev["lesion_backend"]
    )
    names = metric_names(ev["metrics"], hd95=ev["hd95"], lesion_wise=ev["lesion_wise"])
    try:
        return make_metrics(names, {**ev, "lesion": lesion})
    except UnknownMetric as exc:
        raise ConfigError(f"eval.metrics: {exc}") from None


def build_evaluator(
    cfg: dict,
    prepared: Path,
    case_ids: Sequence[str],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    cases_csv: Path | None = None,
    progress: bool = False,
) -> DiceEvaluator:
    """The Dice evaluator of a run's config (sliding window, metrics, loss's region mode) on
    prepared cases: the one training evaluates with and ``unet-eval`` scores with.

    Args:
        prepared: the prepared dataset folder.
        case_ids: the cases to score (each rank scores its share).
        cases_csv: where rank 0 writes each evaluation's per-case scores (None: nowhere).
        progress: a progress bar over the cases.

    Raises:
        ConfigError: an unknown metric (:func:`build_metrics`).
    """
    return DiceEvaluator(
        prepared,
        case_ids,
        build_sliding_window(cfg),
        build_metrics(cfg),
        region_mode=components.output_mode(cfg["loss"]) is OutputMode.REGIONS,
        device=device,
        rank=rank,
        world_size=world_size,
        cases_csv=cases_csv,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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


def _warn_patch_padding(patch: Sequence[int], prepared: Path, case_ids: Sequence[str]) -> None:
    """Warn once when the patch is larger than the prepared (cropped) volumes: the excess is padding."""
    shapes = []
    for case_id in case_ids:
        try:
            shapes.append(json.loads((prepared / f"{case_id}_meta.json").read_text())["prepared_shape"])
        except (OSError, ValueError, KeyError):
            continue
    shares = [1 - math.prod(min(p, s) for p, s in zip(patch, shape)) / math.prod(patch) for shape in shapes]
    smaller = [(share, shape) for share, shape in zip(shares, shapes) if share > 0]
    if not smaller:
        return
    smallest = min(shapes, key=math.prod)
    _warn(
        f"'data.patch_size' = {list(patch)} is larger than {len(smaller)} of {len(shapes)} training volumes "
        f"(smallest {'x'.join(map(str, smallest))} after cropping to the head): on average "
        f"{100 * sum(shares) / len(shares):.0f}% of each patch is padding (up to {100 * max(shares):.0f}%); "
        "a patch no larger than the volumes trains on the same voxels for less compute"
    )


def run_training(cfg: dict, progress: bool = True, extra_callbacks: Sequence[cb.Callback] = ()) -> dict:
    """Train (or resume) the run described by a resolved config; returns a summary.

    Writes into ``cfg["save_folder"]``: config.yaml, split.json, checkpoints/, metrics.jsonl,
    train/eval_metrics.csv, eval_cases.csv (the latest evaluation), eval_cases_best.csv (the
    evaluation best-rank0.pt was saved at). Rank 0 holds the folder's lock (``run.lock``) from
    start to end, so a second run on the same folder stops at once.

    Raises:
        ConfigError, DataFormatError, CheckpointError: bad input, as one line.
        RunFolderError: the folder is in use, or holds another run's checkpoints.
        OutputPathError: the folder would lie in, be or hold the raw or prepared data.
        DiskFullError (an OSError): no space left; names the file.
        TrainingDiverged: NaN/Inf loss.
    """
    held: list[FolderLock] = []
    try:
        return _run_training(cfg, progress, extra_callbacks, held)
    finally:
        for lock in held:
            lock.release()


def _run_training(cfg: dict, progress: bool, extra_callbacks: Sequence[cb.Callback], held: list) -> dict:
    """:func:`run_training` as setup steps; locks it takes go into ``held``, for the caller to release."""
    started = time.perf_counter()
    run_dir = Path(cfg["save_folder"])
    check_run_outputs(cfg, run_dir)  # before the lock file or anything else is written
    dist_info, device = setup_device(cfg)
    resume = setup_resume(cfg, run_dir, dist_info, held)  # before anything is written into the folder
    data = setup_data(cfg, run_dir, dist_info, device, progress)
    training = setup_model_and_optimizer(cfg, device, data.batches_per_epoch)
    evaluator = setup_evaluator(cfg, data, device, dist_info, run_dir)
    state = build_state(cfg, data, training, evaluator, device, dist_info, run_dir, resume.run_id)
    resumed_from = restore_checkpoint(state, cfg, resume, dist_info)
    if dist_info.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    # Extra callbacks (benchmarks, tests) run before the built-in ones, so the logger sees their values.
    callbacks = list(extra_callbacks) + build_callbacks(cfg, run_dir, dist_info.is_main, progress, evaluator)
    engine = Engine(state, training.algorithms, callbacks)
    engine.run(Event.INIT)
    if dist_info.enabled:
        wrap_distributed(state)
    fit(state, engine)
    return training_summary(state, data, resumed_from, dist_info, started)


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


@dataclass
class DataSetup:
    """The prepared data, the split and the training loader."""

    prepared: Path  # the prepared dataset folder
    split: dict[str, list[str]]  # {"train": case ids, "val": case ids}
    dataset: PatchDataset
    loader: torch.utils.data.DataLoader  # with an EpochSampler

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batch_sampler.batches_per_epoch


@dataclass
class TrainingSetup:
    """What optimises: the model, its loss, the optimizer and schedule, precision, algorithms."""

    model: torch.nn.Module  # on the device, not DDP-wrapped
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: BatchScheduler
    max_duration: Duration
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    scaler: torch.amp.GradScaler | None  # for fp16 only
    algorithms: list[Algorithm]


def setup_device(cfg: dict) -> tuple[DistInfo, torch.device]:
    """Join the process group under torchrun (a no-op otherwise) and pick this rank's device.

    Raises:
        ConfigError: ``train_batch_size`` does not divide by the number of processes, or
            ``device`` = cuda without a GPU.
    """
    device_name = cfg["device"]
    dist_info = init_distributed(
        "cuda" if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()) else "cpu"
    )
    device = build_device(device_name, dist_info.local_rank)
    if cfg["train_batch_size"] % dist_info.world_size:
        raise ConfigError(
            f"'train_batch_size' = {cfg['train_batch_size']} is not divisible by the {dist_info.world_size} processes"
        )
    return dist_info, device


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


def setup_data(cfg: dict, run_dir: Path, dist_info: DistInfo, device: torch.device, progress: bool) -> DataSetup:
    """Prepare the dataset if needed, split it (rank 0 writes ``split.json``) and build this
    rank's training loader.

    Raises:
        DataFormatError: missing or bad data, or a bad split.
        ConfigError: ``drop_last`` leaves no batch, or a batch needs more memory or shared memory
            than this machine has.
    """
    prepared, index = ensure_prepared(cfg, dist_info, progress=progress and dist_info.is_main)
    split = build_split(cfg, index["cases"])
    dataset = PatchDataset(
        prepared,
        split["train"],
        cfg["data"]["patch_size"],
        cfg["data"]["oversampling"],
        squeeze_slice_axis=describe_model(cfg["model"]).spatial_dims == 2,
    )
    try:
        loader = build_train_loader(
            dataset,
            cfg["train_batch_size"] // dist_info.world_size,
            cfg["seed"],
            cfg["data"]["num_workers"],
            pin_memory=device.type == "cuda",
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            drop_last=cfg["drop_last"],
            processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),  # torchrun's ranks on this machine
        )
    except BatchTooLarge as exc:
        raise ConfigError(
            f"'data.patch_size' = {cfg['data']['patch_size']} with 'train_batch_size' = {cfg['train_batch_size']}: "
            f"{exc}; choose a smaller data.patch_size or train_batch_size"
            + (" (or fewer data.num_workers)" if cfg["data"]["num_workers"] > 0 else "")
        ) from None
    except ValueError as exc:
        raise ConfigError(f"'drop_last' = true: {str(exc).removeprefix('drop_last: ')}") from None
    # Only once the loader is known to work: a run refused here leaves no split behind.
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "split.json", json.dumps(split, indent=1))
        _warn_patch_padding(cfg["data"]["patch_size"], prepared, split["train"])
    return DataSetup(prepared, split, dataset, loader)


def setup_model_and_optimizer(cfg: dict, device: torch.device, batches_per_epoch: int) -> TrainingSetup:
    """Seed, then build the model (on ``device``), loss, optimizer, learning-rate schedule,
    gradient scaler and algorithms.

    Raises:
        ConfigError: the patch does not fit the model, or the loss does not fit its outputs
            (a region loss needs one output per region).
    """
    seed_everything(cfg["seed"])
    model = build_model(cfg["model"]).to(device)
    patch = cfg["data"]["patch_size"]
    try:
        model.check_input_size(patch[3 - model.spatial_dims :])
    except ValueError as exc:
        raise ConfigError(f"'data.patch_size' = {patch} does not fit the model: {exc}") from None
    loss_fn = build_loss(cfg, model)
    optimizer = build_optimizer(cfg, model.parameters())
    max_duration = Duration.parse(cfg["max_duration"])
    total_batches = duration_in_batches(max_duration, batches_per_epoch, cfg["train_batch_size"])
    return TrainingSetup(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, batches_per_epoch, total_batches),
        max_duration=max_duration,
        amp_dtype=AMP_DTYPES[cfg["precision"]],
        scaler=torch.amp.GradScaler(device.type) if cfg["precision"] == "amp_fp16" else None,
        algorithms=build_algorithms(cfg),
    )


def setup_evaluator(
    cfg: dict, data: DataSetup, device: torch.device, dist_info: DistInfo, run_dir: Path
) -> DiceEvaluator | None:
    """The evaluator over the validation cases (None when the split has none); rank 0 writes
    each evaluation's per-case scores to ``eval_cases.csv``."""
    if not data.split["val"]:
        return None
    return build_evaluator(
        cfg, data.prepared, data.split["val"], device, dist_info.rank, dist_info.world_size, run_dir / "eval_cases.csv"
    )


def build_state(
    cfg: dict,
    data: DataSetup,
    training: TrainingSetup,
    evaluator: DiceEvaluator | None,
    device: torch.device,
    dist_info: DistInfo,
    run_dir: Path,
    run_id: str,
) -> State:
    """The loop's :class:`State` at step 0, with this rank's augmenter (seeded ``seed + rank``)."""
    seed = cfg["seed"]
    return State(
        model=training.model,
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        loss_fn=training.loss_fn,
        train_loader=data.loader,
        device=device,
        max_duration=training.max_duration,
        train_batch_size=cfg["train_batch_size"],
        batches_per_epoch=data.batches_per_epoch,
        samples_per_epoch=len(data.dataset),
        amp_dtype=training.amp_dtype,
        scaler=training.scaler,
        augmenter=build_augmenter(cfg, device, seed + dist_info.rank),
        microbatch_size=cfg["device_train_microbatch_size"],
        grad_clip_norm=cfg["grad_clip_norm"],
        prefetch_to_device=cfg["data"]["prefetch_to_device"],
        evaluator=evaluator,
        eval_interval=Duration.parse(cfg["eval_interval"]),
        run_dir=run_dir,
        config=cfg,
        seed=seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        run_id=run_id,
    )


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


def wrap_distributed(state: State) -> None:
    """Wrap ``state.model`` in DistributedDataParallel.

    Only after INIT: DDP lays its gradient buckets out after the parameters' strides, so the
    algorithms that change the layout at INIT (channels-last) must have run, or every step copies
    each gradient in and out of its bucket.
    """
    device = state.device
    state.model = torch.nn.parallel.DistributedDataParallel(
        state.model, device_ids=[device.index] if device.type == "cuda" else None
    )


def training_summary(
    state: State, data: DataSetup, resumed_from: Path | None, dist_info: DistInfo, started: float
) -> dict:
    """What :func:`run_training` returns: where things are, how far it got, the scores, the state."""
    run_dir = state.run_dir
    checkpoints = CheckpointManager.of_run(run_dir)
    final = state.eval_history[-1] if state.eval_history else {}
    return {
        "run_dir": str(run_dir),
        "prepared": str(data.prepared),
        "checkpoint": str(checkpoints.latest()) if dist_info.is_main else None,
        "best_checkpoint": str(checkpoints.best_path) if state.extra_state.get("best_dice") is not None else None,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "epoch": state.timestamp.epoch,
        "batch": state.timestamp.batch,
        "stop_reason": state.stop_reason,
        "final_eval": final,
        "best_dice": state.extra_state.get("best_dice"),
        "best_batch": state.extra_state.get("best_batch"),
        "seconds": time.perf_counter() - started,
        "is_main": dist_info.is_main,
        "state": state,
    }
