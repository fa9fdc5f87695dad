"""Builders: the only code that reads the resolved config. Each turns one section into objects
built from plain typed arguments; :func:`run_training` wires them into a run.
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
from pathlib import Path

import numpy as np
import torch

from . import callbacks as cb
from . import components, reporting
from .checkpoint import (
    LEGACY_RUN_ID,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    new_run_id,
    newest_loadable_checkpoint,
    one_line,
    restore_rng_state,
)
from .components import build_model, describe_model
from .config import ConfigError, Duration, config_differences, dump_config, upgrade_config
from .data.formats import DataFormatError
from .data.loader import PatchDataset, build_train_loader
from .data.phantom import write_phantom_dataset
from .data.prepare import PrepareSettings, load_prepared_index, prepare_dataset, prepared_is_current
from .data.split import kfold_split, load_split_file
from .distributed import DistInfo, barrier, init_distributed
from .evaluation import DiceEvaluator
from .fileio import atomic_write_text, remove_orphan_temporaries
from .losses import DeepSupervisionLoss
from .model import SegmentationModel
from .runfolder import (
    FolderLock,
    RunFolderError,
    describe_others,
    move_run_aside,
    other_runs_checkpoints,
    run_file_name,
)
from .schedules import BatchScheduler, ComposedSchedule, Constant, Cosine, LinearWarmup, Poly
from .trainer import Algorithm, Engine, Event, State, duration_in_batches, fit, rank_entry
from .transforms import AugmentationSettings, BatchAugmenter

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


def raw_data_dir(cfg: dict, progress: bool = True) -> Path:
    """The raw dataset folder; for ``data.path: null`` the phantom, generated into the cache if absent.

    Raises:
        DataFormatError: ``data.path`` does not exist.
    """
    data = cfg["data"]
    if data["path"] is None:
        phantom = data["phantom"]
        shape = "x".join(str(s) for s in phantom["shape"])
        folder = cache_dir(cfg) / f"phantom-{phantom['style']}-{phantom['cases']}cases-{shape}-seed{phantom['seed']}"
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
    path = Path(data["path"]).expanduser()
    if not path.is_dir():
        raise DataFormatError(f"data.path: folder {path} does not exist (set data.path=/path/to/your/BraTS)")
    return path


def prepared_data_dir(cfg: dict, source: Path) -> Path:
    """``data.prepared_path``, else a cache folder named after the source and its absolute path."""
    if cfg["data"]["prepared_path"]:
        return Path(cfg["data"]["prepared_path"]).expanduser()
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return cache_dir(cfg) / "prepared" / f"{source.name}-{digest}"


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
    return components.OPTIMIZERS[name](params, **settings)


def build_scheduler(cfg: dict, optimizer, batches_per_epoch: int, total_batches: int) -> BatchScheduler:
    def to_batches(raw) -> int | None:
        if raw is None:
            return None
        return duration_in_batches(Duration.parse(raw), batches_per_epoch, cfg["train_batch_size"])

    parts = []
    for entry in cfg["schedulers"]:
        ((name, s),) = entry.items()
        if name == "constant":
            parts.append(Constant(s["factor"]))
        elif name == "cosine":
            parts.append(Cosine(s["min_factor"], to_batches(s["t_max"])))
        elif name == "poly":
            parts.append(Poly(s["power"], to_batches(s["t_max"])))
        elif name == "linear_warmup":
            parts.append(LinearWarmup(to_batches(s["duration"]), s["start_factor"]))
    return BatchScheduler(optimizer, ComposedSchedule(parts, total_batches))


def build_loss(cfg: dict, model: SegmentationModel) -> DeepSupervisionLoss:
    """The ``loss`` section's loss, over the model's deep-supervision outputs when it has them.

    Raises:
        ConfigError: ``region_dice_bce`` for a model without exactly 3 outputs.
    """
    ((name, settings),) = cfg["loss"].items()
    if name == "region_dice_bce" and model.num_classes != 3:
        ((model_name, _),) = cfg["model"].items()
        raise ConfigError(f"loss region_dice_bce predicts WT, TC and ET: set model.{model_name}.num_classes=3")
    weights = model.deep_supervision_weights() if model.deep_supervision_heads else None
    return DeepSupervisionLoss(components.LOSSES[name](**settings), weights)


def build_augmenter(cfg: dict, device: torch.device, seed: int) -> BatchAugmenter | None:
    aug = cfg["augmentation"]
    if not aug["enabled"]:
        return None
    settings = AugmentationSettings(
        flip_p=aug["flip"]["p"],
        noise_p=aug["noise"]["p"],
        noise_std=tuple(aug["noise"]["std"]),
        blur_p=aug["blur"]["p"],
        blur_sigma=tuple(aug["blur"]["sigma"]),
        brightness_p=aug["brightness"]["p"],
        brightness_scale=tuple(aug["brightness"]["scale"]),
        contrast_p=aug["contrast"]["p"],
        contrast_scale=tuple(aug["contrast"]["scale"]),
    )
    return BatchAugmenter(settings, describe_model(cfg["model"]).spatial_dims, device, seed)


def build_algorithms(cfg: dict) -> list[Algorithm]:
    return [components.ALGORITHMS[name](**settings) for name, settings in cfg["algorithms"].items()]


def build_callbacks(
    cfg: dict, run_dir: Path, is_main: bool, progress: bool, evaluator: DiceEvaluator | None = None
) -> list[cb.Callback]:
    """The configured callbacks, then the always-on ones. The overlay writer (with an evaluator)
    comes first, so that the loggers find its pictures at the same evaluation; the MLflow logger
    last, so that it finds the finished plots and checkpoints.

    Raises:
        ConfigError: a callback whose optional package is missing (names the install command).
    """
    if "tensorboard" in cfg["callbacks"]:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "callbacks.tensorboard needs the tensorboard package: pip install 'unet-trainer[tensorboard]'"
            ) from None
    if "mlflow" in cfg["callbacks"]:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("callbacks.mlflow needs the mlflow package: pip install 'unet-trainer[mlflow]'") from None
    callbacks: list[cb.Callback] = []
    overlays = None
    if "overlays" in cfg["callbacks"] and evaluator is not None:
        overlays = reporting.OverlayWriter(
            run_dir / "overlays", evaluator, **cfg["callbacks"]["overlays"], is_writer=is_main
        )
        callbacks.append(overlays)
    for name, s in cfg["callbacks"].items():  # monitors first, so the logger sees their values
        if name == "lr_monitor":
            callbacks.append(cb.LRMonitor())
        elif name == "speed_monitor":
            callbacks.append(cb.SpeedMonitor(**s))
        elif name == "memory_monitor":
            callbacks.append(cb.MemoryMonitor())
        elif name == "early_stopper":
            callbacks.append(cb.EarlyStopper(**s))
        elif name == "progress_plot" and is_main:
            callbacks.append(cb.ProgressPlot(run_dir / "progress.png"))
        elif name == "tensorboard" and is_main:
            callbacks.append(cb.TensorBoardLogger(run_dir / "tensorboard", overlays))
    callbacks += [
        cb.SignalHandler(),
        cb.ProgressBar(enabled=is_main and progress),
        cb.MetricsLogger(run_dir, enabled=is_main),
        cb.CheckpointSaver(
            run_dir / "checkpoints",
            Duration.parse(cfg["save_interval"]),
            cfg["save_num_checkpoints_to_keep"],
            is_writer=is_main,
        ),
    ]
    if "mlflow" in cfg["callbacks"] and is_main:
        s = cfg["callbacks"]["mlflow"]
        callbacks.append(
            reporting.MLflowLogger(**{**s, "run_name": s["run_name"] or cfg["run_name"]}, run_dir=run_dir, config=cfg)
        )
    return callbacks


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _resume_checkpoint(cfg: dict, run_dir: Path, is_main: bool) -> tuple[Path, dict] | None:
    """The checkpoint to start from and its contents: ``load_path``, else with ``autoresume`` the
    newest in the run folder that loads (damaged ones skipped with a warning), else None.

    Raises:
        CheckpointError: ``load_path`` cannot be read.
    """
    if cfg["load_path"]:
        path = Path(cfg["load_path"]).expanduser()
        return path, load_checkpoint(path)
    if cfg["autoresume"]:
        return newest_loadable_checkpoint(run_dir / "checkpoints", warn=_warn if is_main else lambda _: None)
    return None


def _lock_run_folder(run_dir: Path) -> FolderLock:
    """Lock the run folder for this process, then clear what a killed run left half-written.

    Raises:
        RunFolderError: another live process holds the folder (names it).
    """
    lock = FolderLock(run_dir).acquire()
    # Under the lock no other run can be writing here, so every temporary is an orphan.
    removed = remove_orphan_temporaries(run_dir / "checkpoints") + remove_orphan_temporaries(run_dir, run_file_name)
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
    fresh start); never deleted.

    Raises:
        RunFolderError: other files are there and ``save_overwrite`` is false (one line saying
            what is there and how to go on).
    """
    folder = run_dir / "checkpoints"
    others = other_runs_checkpoints(folder, run_id, resumed_batch)
    if not others:
        return
    fresh = resumed_batch is None
    if cfg["save_overwrite"]:
        moved = move_run_aside(run_dir, others, whole_run=fresh)
        print(
            f"save_overwrite: moved {describe_others(others)}{' and its logs' if fresh else ''} to {moved}",
            file=sys.stderr,
        )
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
    """:func:`run_training`; locks it takes go into ``held``, for the caller to release."""
    started = time.perf_counter()
    device_name = cfg["device"]
    dist_info = init_distributed(
        "cuda" if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()) else "cpu"
    )
    device = build_device(device_name, dist_info.local_rank)
    if cfg["train_batch_size"] % dist_info.world_size:
        raise ConfigError(
            f"'train_batch_size' = {cfg['train_batch_size']} is not divisible by the {dist_info.world_size} processes"
        )
    run_dir = Path(cfg["save_folder"])
    seed = cfg["seed"]
    if dist_info.is_main:  # under torchrun only rank 0 locks: the others are part of the same run
        held.append(_lock_run_folder(run_dir))

    # Which run this is, decided before anything is written into the folder.
    resume = _resume_checkpoint(cfg, run_dir, dist_info.is_main)
    resuming = resume is not None and not cfg["load_weights_only"]
    run_id = str(resume[1].get("run_id", LEGACY_RUN_ID)) if resuming else new_run_id()
    barrier()  # every rank has read its checkpoint before rank 0 may move files aside
    if dist_info.is_main:
        _claim_run_folder(
            cfg,
            run_dir,
            run_id,
            int((resume[1].get("timestamp") or {}).get("batch", 0)) if resuming else None,
            resume[0] if resume else None,
        )

    prepared, index = ensure_prepared(cfg, dist_info, progress=progress and dist_info.is_main)
    split = build_split(cfg, index["cases"])
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "split.json", json.dumps(split, indent=1))

    spatial_dims = describe_model(cfg["model"]).spatial_dims
    if dist_info.is_main:
        _warn_patch_padding(cfg["data"]["patch_size"], prepared, split["train"])
    dataset = PatchDataset(
        prepared,
        split["train"],
        cfg["data"]["patch_size"],
        cfg["data"]["oversampling"],
        squeeze_slice_axis=spatial_dims == 2,
    )
    per_rank_batch = cfg["train_batch_size"] // dist_info.world_size
    try:
        loader = build_train_loader(
            dataset,
            per_rank_batch,
            seed,
            cfg["data"]["num_workers"],
            pin_memory=device.type == "cuda",
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            drop_last=cfg["drop_last"],
        )
    except ValueError as exc:
        raise ConfigError(f"'drop_last' = true: {str(exc).removeprefix('drop_last: ')}") from None
    batches_per_epoch = loader.batch_sampler.batches_per_epoch

    seed_everything(seed)
    model = build_model(cfg["model"]).to(device)
    try:
        model.check_input_size(cfg["data"]["patch_size"][3 - spatial_dims :])
    except ValueError as exc:
        raise ConfigError(f"'data.patch_size' = {cfg['data']['patch_size']} does not fit the model: {exc}") from None
    loss_fn = build_loss(cfg, model)
    optimizer = build_optimizer(cfg, model.parameters())
    max_duration = Duration.parse(cfg["max_duration"])
    total_batches = duration_in_batches(max_duration, batches_per_epoch, cfg["train_batch_size"])
    scheduler = build_scheduler(cfg, optimizer, batches_per_epoch, total_batches)
    amp_dtype = AMP_DTYPES[cfg["precision"]]
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "amp_fp16" else None
    evaluator = (
        DiceEvaluator(
            prepared,
            split["val"],
            cfg["data"]["patch_size"],
            spatial_dims,
            model.num_classes,
            region_mode="region_dice_bce" in cfg["loss"],
            overlap=cfg["eval"]["overlap"],
            sw_batch_size=cfg["eval"]["sw_batch_size"],
            gaussian=cfg["eval"]["gaussian"],
            mirror=cfg["eval"]["mirror_tta"],
            empty_policy=cfg["eval"]["empty_policy"],
            amp_dtype=amp_dtype,
            device=device,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            cases_csv=run_dir / "eval_cases.csv",
            hd95=cfg["eval"]["hd95"],
            lesion_wise=cfg["eval"]["lesion_wise"],
            lesion_dilation=cfg["eval"]["lesion_dilation"],
            lesion_min_voxels=cfg["eval"]["lesion_min_voxels"],
            lesion_hd95_penalty=cfg["eval"]["lesion_hd95_penalty"],
        )
        if split["val"]
        else None
    )

    state = State(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        train_loader=loader,
        device=device,
        max_duration=max_duration,
        train_batch_size=cfg["train_batch_size"],
        batches_per_epoch=batches_per_epoch,
        samples_per_epoch=len(dataset),
        amp_dtype=amp_dtype,
        scaler=scaler,
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

    resumed_from = None
    if resume is not None:
        checkpoint_path, checkpoint = resume
        differing = [
            k
            for k in config_differences(upgrade_config(checkpoint.get("config", {}), str(checkpoint_path)), cfg)
            if k.split(".")[0] not in RESUME_FREE_KEYS
        ]
        if differing and dist_info.is_main:
            shown = ", ".join(differing[:8]) + (" ..." if len(differing) > 8 else "")
            print(f"warning: the config differs from the checkpoint's in: {shown}", file=sys.stderr)
        try:
            state.load_state_dict(checkpoint, weights_only=cfg["load_weights_only"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{checkpoint_path}: does not fit this model/config ({one_line(str(exc))})") from None
        if not cfg["load_weights_only"]:
            restore_rng_state(rank_entry(checkpoint, "rng", dist_info.rank, dist_info.world_size))
        resumed_from = checkpoint_path
        if dist_info.is_main:
            ts = state.timestamp
            print(f"Resuming from {checkpoint_path} (epoch {state.finished_epochs}, batch {ts.batch})", file=sys.stderr)

    if dist_info.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    # Extra callbacks (benchmarks, tests) run before the built-in ones, so the logger sees their values.
    engine = Engine(
        state,
        build_algorithms(cfg),
        list(extra_callbacks) + build_callbacks(cfg, run_dir, dist_info.is_main, progress, evaluator),
    )
    engine.run(Event.INIT)
    if dist_info.enabled:
        # Only now: DDP lays its gradient buckets out after the parameters' strides, so the
        # algorithms that change the layout at INIT (channels-last) must have run, or every step
        # copies each gradient in and out of its bucket.
        state.model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    fit(state, engine)

    final = state.eval_history[-1] if state.eval_history else {}
    return {
        "run_dir": str(run_dir),
        "prepared": str(prepared),
        "checkpoint": str(latest_checkpoint(run_dir / "checkpoints")) if dist_info.is_main else None,
        "best_checkpoint": str(run_dir / "checkpoints" / "best-rank0.pt")
        if state.extra_state.get("best_dice") is not None
        else None,
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
