"""Training a run: :func:`run_training` wires the builders' objects into a run in setup steps
(torchtune-style: device, resume, data, model and optimizer, evaluator, state), reading top to
bottom, then fits.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.components import build_model, describe_model
from ..config.engine import ConfigError, dump_config
from ..core.checkpoints import CheckpointManager
from ..core.distributed import DistInfo, init_distributed
from ..core.fileio import atomic_write_text
from ..core.runfolder import FolderLock
from ..core.schema import Duration
from ..data.loader import BatchTooLarge, PatchDataset, build_train_loader
from ..data.schemes import LabelScheme
from ..evaluation.evaluation import DiceEvaluator
from ..training import callbacks as cb
from ..training.schedules import BatchScheduler
from ..training.trainer import Algorithm, Engine, Event, State, duration_in_batches, fit
from .builders import (
    AMP_DTYPES,
    build_algorithms,
    build_augmenter,
    build_callbacks,
    build_device,
    build_evaluator,
    build_loss,
    build_optimizer,
    build_sampled_size,
    build_scheduler,
    process_group_device,
    seed_everything,
)
from .datasets import build_split, check_run_outputs, ensure_prepared, prepared_scheme, with_scheme
from .resume import restore_checkpoint, setup_resume


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
    cfg, notes = with_scheme(cfg, data.scheme)  # the model's inputs and outputs follow the data
    if dist_info.is_main:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
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
class DataSetup:
    """The prepared data, the split and the training loader."""

    prepared: Path  # the prepared dataset folder
    split: dict[str, list[str]]  # {"train": case ids, "val": case ids}
    dataset: PatchDataset
    loader: torch.utils.data.DataLoader  # with an EpochSampler
    scheme: LabelScheme  # the prepared data's label scheme

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
    dist_info = init_distributed(process_group_device(device_name))
    device = build_device(device_name, dist_info.local_rank)
    if cfg["train_batch_size"] % dist_info.world_size:
        raise ConfigError(
            f"'train_batch_size' = {cfg['train_batch_size']} is not divisible by the {dist_info.world_size} processes"
        )
    return dist_info, device


def _samples_per_epoch(cfg: dict) -> int | None:
    """The samples an epoch draws (``data.batches_per_epoch`` global batches), or None: one pass over the cases."""
    batches = cfg["data"]["batches_per_epoch"]
    return None if batches is None else batches * cfg["train_batch_size"]


def setup_data(cfg: dict, run_dir: Path, dist_info: DistInfo, device: torch.device, progress: bool) -> DataSetup:
    """Prepare the dataset if needed, split it (rank 0 writes ``split.json``) and build this
    rank's training loader.

    Raises:
        DataFormatError: missing or bad data, or a bad split.
        ConfigError: ``drop_last`` leaves no batch, or a batch needs more memory or shared memory
            than this machine has.
    """
    prepared, index = ensure_prepared(cfg, dist_info, progress=progress and dist_info.is_main)
    scheme = prepared_scheme(cfg, index)
    split = build_split(cfg, index["cases"])
    dataset = PatchDataset(
        prepared,
        split["train"],
        cfg["data"]["patch_size"],
        cfg["data"]["oversampling"],
        squeeze_slice_axis=describe_model(cfg["model"]).spatial_dims == 2,
        sampled_size=build_sampled_size(cfg),
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
            samples_per_epoch=_samples_per_epoch(cfg),
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
    return DataSetup(prepared, split, dataset, loader, scheme)


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
        "scheme": data.scheme.name,
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
    print(
        "warning: "
        f"'data.patch_size' = {list(patch)} is larger than {len(smaller)} of {len(shapes)} training volumes "
        f"(smallest {'x'.join(map(str, smallest))} after cropping to the head): on average "
        f"{100 * sum(shares) / len(shares):.0f}% of each patch is padding (up to {100 * max(shares):.0f}%); "
        "a patch no larger than the volumes trains on the same voxels for less compute",
        file=sys.stderr,
    )
