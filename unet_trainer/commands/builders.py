"""Builders: the composition root's component functions, the only code that reads the resolved
config (with :mod:`datasets`, :mod:`resume` and :mod:`train`). Each turns one section into an object
built from plain typed arguments: the device, the model's loss, optimizer and schedule, the
augmentation, the callbacks, the sliding window, the metrics and the evaluator, and the typed
settings the other commands receive.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import components
from ..config.components import build_model as build_model  # the model of a config, for the commands
from ..config.components import describe_model
from ..config.engine import ConfigError
from ..core.checkpoints import CheckpointManager
from ..core.schema import Duration, Field
from ..data.layouts import scheme_named
from ..data.schemes import DEFAULT_SCHEME, LabelScheme
from ..evaluation import postprocessing as pp
from ..evaluation.case_metrics import CaseMetric, UnknownMetric, make_metrics, metric_names
from ..evaluation.evaluation import DiceEvaluator
from ..evaluation.inference import SlidingWindow
from ..evaluation.lesion_metrics import LesionSettings
from ..models.base import SegmentationModel
from ..training import callbacks as cb
from ..training import reporting
from ..training.augment import AUGMENTATIONS, BatchAugmenter, sampled_patch
from ..training.batch_transform import BatchTransform
from ..training.loggers import FileLogger, Logger, LoggerDestination
from ..training.losses import DeepSupervisionLoss, OutputMode
from ..training.schedules import BatchScheduler, ComposedSchedule
from ..training.trainer import Algorithm, duration_in_batches
from .folders import fold_folder

AMP_DTYPES = {"fp32": None, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}


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
# The run folder and when a run is finished (its data: datasets.py)
# --------------------------------------------------------------------------------------------


def save_folder(cfg: dict) -> Path:
    """The run (or ``unet-cv``) folder: ``save_folder``."""
    return Path(cfg["save_folder"])


def finish_rule(cfg: dict) -> tuple[Duration, cb.EarlyStopper | None]:
    """The config's ``max_duration`` and its early stopper (None when off): what makes a run finished."""
    settings = cfg["callbacks"].get("early_stopper")
    stopper = cb.EarlyStopper(settings["patience"], settings["min_delta"]) if settings is not None else None
    return Duration.parse(cfg["max_duration"]), stopper


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
        fields = components.settings_of(components.SCHEDULERS[name])
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
    scheme = build_scheme(cfg)
    regions = scheme.trained_regions
    if components.output_mode(cfg["loss"]) is OutputMode.REGIONS and model.num_classes != len(regions):
        ((model_name, _),) = cfg["model"].items()
        *first, last = regions
        raise ConfigError(
            f"loss {name} predicts {', '.join(first)} and {last}: set model.{model_name}.num_classes={len(regions)}"
        )
    weights = model.deep_supervision_weights() if model.deep_supervision_heads else None
    return DeepSupervisionLoss(components.build(components.LOSSES[name], settings, {"scheme": scheme}), weights)


def build_scheme(cfg: dict) -> LabelScheme:
    """The label scheme a resolved config names (``data.scheme``; one a dataset.json defined is rebuilt
    from ``data.scheme_definition``). "auto" (a config never given data, or an old checkpoint's) is
    the default scheme, the BraTS glioma classes."""
    name = cfg["data"]["scheme"]
    return scheme_named(DEFAULT_SCHEME if name == "auto" else name, cfg["data"].get("scheme_definition"))


def build_lesion_settings(cfg: dict) -> LesionSettings:
    """The lesion-wise scoring of a config: the ``eval.lesion_*`` values it sets, the rest its label
    scheme's (each BraTS sub-challenge's own dilation, size thresholds and definition)."""
    ev, lesion = cfg["eval"], build_scheme(cfg).lesion
    own_threshold = ev["lesion_min_volume"] is not None
    return LesionSettings(
        lesion.dilation if ev["lesion_dilation"] is None else ev["lesion_dilation"],
        ev["lesion_min_volume"] if own_threshold else lesion.min_volume,
        ev["lesion_hd95_penalty"],
        ev["lesion_backend"],
        ev["lesion_definition"] or lesion.definition,
        {} if own_threshold else dict(lesion.region_min_volume),
    )


def build_transforms(cfg: dict) -> dict[str, BatchTransform]:
    """The ``augmentation`` section's transforms in order (none when off), given the patch in the model's axes."""
    aug = cfg["augmentation"]
    spatial_dims = describe_model(cfg["model"]).spatial_dims
    supplied = {"patch_size": tuple(cfg["data"]["patch_size"][-spatial_dims:])}
    return {name: components.build(cls, aug[name], supplied) for name, cls in AUGMENTATIONS.items() if aug["enabled"]}


def build_sampled_size(cfg: dict) -> list[int]:
    """The (Z, Y, X) region the loader cuts around each patch: the patch, grown for a transform that resamples."""
    patch, spatial_dims = cfg["data"]["patch_size"], describe_model(cfg["model"]).spatial_dims
    return [*patch[: 3 - spatial_dims], *sampled_patch(build_transforms(cfg), tuple(patch[3 - spatial_dims :]))]


def build_augmenter(cfg: dict, device: torch.device, seed: int) -> BatchAugmenter | None:
    transforms = build_transforms(cfg)
    return BatchAugmenter(transforms, describe_model(cfg["model"]).spatial_dims, device, seed) if transforms else None


def build_algorithms(cfg: dict) -> list[Algorithm]:
    return [components.build(components.ALGORITHMS[name], settings) for name, settings in cfg["algorithms"].items()]


def build_logger_destinations(cfg: dict, run_dir: Path) -> list[LoggerDestination]:
    """The always-on log files (:class:`FileLogger`), then the destinations switched on under
    ``callbacks:`` (:data:`components.LOGGER_DESTINATIONS`), in their order.

    Raises:
        ConfigError: a destination whose optional package is missing (names the install command).
    """
    destinations: list[LoggerDestination] = [FileLogger(run_dir)]
    supplied = {"run_dir": run_dir, "config": cfg, "best_checkpoint": CheckpointManager.of_run(run_dir).best_path}
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
    supplied = {
        "run_dir": run_dir,
        "evaluator": evaluator,
        "is_writer": is_main,
        "config": cfg,
        "scheme": build_scheme(cfg),
    }
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
            CheckpointManager.of_run(run_dir),
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
    names = metric_names(ev["metrics"], hd95=ev["hd95"], lesion_wise=ev["lesion_wise"])
    try:
        return make_metrics(names, {**ev, "lesion": build_lesion_settings(cfg), "scheme": build_scheme(cfg)})
    except UnknownMetric as exc:
        raise ConfigError(f"eval.metrics: {exc}") from None


def build_scoring(cfg: dict) -> tuple[torch.device, list[CaseMetric]]:
    """Where and with which metrics a config scores label maps (``unet-eval --predictions``)."""
    return build_device(cfg["device"]), build_metrics(cfg)


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
        scheme=build_scheme(cfg),
        device=device,
        rank=rank,
        world_size=world_size,
        cases_csv=cases_csv,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# The typed settings the commands receive
# --------------------------------------------------------------------------------------------


def process_group_device(name: str) -> str:
    """The process group's device type for a config's ``device`` name: "cuda" for ``cuda``, and
    for ``auto`` with a GPU; else "cpu"."""
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def build_inference_model(cfg: dict) -> tuple[torch.device, SegmentationModel]:
    """The device (``device``; ``auto``: CUDA when available) and the untrained model of a
    checkpoint's config, for inference.

    Raises:
        ConfigError: ``device`` = cuda without a GPU, or a model the config cannot build.
    """
    device = build_device(cfg["device"])
    try:
        return device, build_model(cfg["model"])
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


# What must agree between the models of an ensemble: (name, the value in a resolved config), in
# the order of :class:`ModelConventions`' fields.
CONVENTION_KEYS = (
    ("region mode (loss)", lambda cfg: components.output_mode(cfg["loss"]).value),
    ("model.num_classes", lambda cfg: describe_model(cfg["model"]).num_classes),
    ("data.dle_labels", lambda cfg: cfg["data"]["dle_labels"]),
    ("model.in_channels", lambda cfg: describe_model(cfg["model"]).in_channels),
    ("data.target_spacing", lambda cfg: cfg["data"]["target_spacing"]),
    ("label scheme classes", lambda cfg: ", ".join(build_scheme(cfg).classes)),
)


@dataclass(frozen=True)
class ModelConventions:
    """What a model's outputs and inputs mean: the values of :data:`CONVENTION_KEYS`.

    Attributes:
        output_mode: "softmax classes" or "sigmoid regions" (the loss's :class:`OutputMode`).
        num_classes: the model's outputs.
        dle_labels: the label numbering of DLE arrays.
        in_channels: the model's input channels.
        target_spacing: the preparation's spacing in mm (Z, Y, X order as configured), None: as recorded.
        classes: the label scheme's classes, by short name (compatible schemes share them).
    """

    output_mode: str
    num_classes: int
    dle_labels: str
    in_channels: int
    target_spacing: list[float] | None
    classes: str

    @property
    def region_mode(self) -> bool:
        """Outputs are sigmoid regions (the label scheme's trained regions)."""
        return self.output_mode == OutputMode.REGIONS.value

    def named(self) -> list[tuple[str, object]]:
        """[(name of :data:`CONVENTION_KEYS`, value)], in their order."""
        return [(name, value) for (name, _), value in zip(CONVENTION_KEYS, astuple(self))]


def build_conventions(cfg: dict) -> ModelConventions:
    return ModelConventions(*(value(cfg) for _, value in CONVENTION_KEYS))


def _override(key: str, value) -> str:
    # JSON is YAML for scalars, lists and null, which is how overrides are read.
    return f"{key}={json.dumps(value)}"


@dataclass(frozen=True)
class EvalSettings:
    """How a config scores: what ``unet-eval``, ``unet-cv`` and the choice of postprocessing read.

    Attributes:
        empty_policy: the plain Dice's empty-ground-truth policy (``eval.empty_policy``).
        lesion: the lesion-wise settings (``eval.lesion_*``, else the label scheme's; mm³).
        lesion_wise: ``eval.lesion_wise``.
        overrides: the overrides that score a checkpoint with these settings: every ``eval`` key,
            ``device`` and ``precision``, as ``key=value``.
        scheme: the label scheme scored.
    """

    empty_policy: str
    lesion: LesionSettings
    lesion_wise: bool
    overrides: tuple[str, ...]
    scheme: LabelScheme

    def metric_settings(self, metric: str) -> pp.MetricSettings:
        """How postprocessing scores a case with ``metric`` under these settings."""
        lesion = self.lesion
        return pp.MetricSettings(
            metric,
            lesion.dilation_iterations,
            lesion.min_lesion_volume,
            self.empty_policy,
            self.scheme,
            lesion.region_min_volume,
            lesion.definition,
        )


def build_eval_settings(cfg: dict) -> EvalSettings:
    ev = cfg["eval"]
    overrides = [_override(f"eval.{k}", v) for k, v in ev.items()]
    overrides += [_override("device", cfg["device"]), _override("precision", cfg["precision"])]
    return EvalSettings(
        ev["empty_policy"], build_lesion_settings(cfg), ev["lesion_wise"], tuple(overrides), build_scheme(cfg)
    )


@dataclass(frozen=True)
class SplitSettings:
    """Which cases a config validates on: fold ``fold`` of ``num_folds``, or a split file.

    Attributes:
        data_path: the raw dataset (``data.path``; None: the phantom).
    """

    fold: int
    num_folds: int
    split_file: str | None
    data_path: str | None

    @property
    def tag(self) -> str:
        """ "val-fold<k>", or "val" for a split file (the default CSV name of ``unet-eval``)."""
        return f"val-fold{self.fold}" if not self.split_file else "val"

    @property
    def where(self) -> str:
        """The split file, or "fold <k> of <n>"."""
        return self.split_file or f"fold {self.fold} of {self.num_folds}"


def build_split_settings(cfg: dict) -> SplitSettings:
    data = cfg["data"]
    return SplitSettings(data["fold"], data["num_folds"], data["split_file"], data["path"])


@dataclass(frozen=True)
class CVSettings:
    """What ``unet-cv`` reads of its config.

    Attributes:
        cv_dir: the cross-validation folder (``save_folder``).
        split: its folds (``data.num_folds``, and a split file it refuses).
        device_type: the process group's device type (:func:`process_group_device`).
        finish: what makes a fold finished (:func:`finish_rule`).
        eval: how the folds are scored.
    """

    cv_dir: Path
    split: SplitSettings
    device_type: str
    finish: tuple[Duration, cb.EarlyStopper | None]
    eval: EvalSettings


def build_cv_settings(cfg: dict) -> CVSettings:
    return CVSettings(
        save_folder(cfg),
        build_split_settings(cfg),
        process_group_device(cfg["device"]),
        finish_rule(cfg),
        build_eval_settings(cfg),
    )


def fold_config(cfg: dict, fold: int, started: bool = False) -> dict:
    """The resolved config of one fold's run: ``data.fold``, ``save_folder`` and ``run_name`` set.

    Args:
        started: the fold's folder holds its checkpoints already; then ``load_path`` (a starting
            point for every fold, e.g. pretrained weights) is dropped, so the fold resumes its own.
    """
    fold_cfg = copy.deepcopy(cfg)
    if started:
        fold_cfg["load_path"], fold_cfg["load_weights_only"] = None, False
    fold_cfg["data"]["fold"] = fold
    fold_cfg["save_folder"] = str(fold_folder(Path(cfg["save_folder"]), fold))
    fold_cfg["run_name"] = f"{cfg['run_name']}-fold{fold}"
    mlflow = fold_cfg["callbacks"].get("mlflow")
    if mlflow and mlflow.get("run_name"):
        mlflow["run_name"] = f"{mlflow['run_name']}-fold{fold}"
    return fold_cfg
