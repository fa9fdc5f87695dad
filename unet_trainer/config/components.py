"""The components a config chooses by name: one registry line each.

A config section names one component (``model: {unet: {...}}``, ``optimizer: {radam: {...}}``,
``loss: {dice_ce: {}}``), a list of them (``schedulers``) or a set (``callbacks``, which switches
on callbacks and logger destinations, ``algorithms``). A component's settings are its own typed
keyword arguments: :mod:`unet_trainer.config.config` derives the schema from them
(:func:`unet_trainer.core.schema.fields_of`: types, choices, bounds and defaults), and
:mod:`unet_trainer.commands.builders` builds every entry the same way, :func:`build`: the checked
settings, plus the arguments the builder supplies (:data:`BUILDER_SUPPLIED`) that its signature
names. So adding a model, an optimizer, a schedule, a loss, a callback, a logger destination or an
algorithm is its own code plus one line here.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ..core.schema import Field, fields_of
from ..models.base import SegmentationModel
from ..models.resenc import ResidualEncoderUNet
from ..models.unet import UNet
from ..training import callbacks as cb
from ..training import loggers, optimizers, reporting
from ..training.algorithms import EMA, ChannelsLast, Compile, CudnnBenchmark
from ..training.losses import DiceCELoss, OutputMode, RegionDiceBCELoss
from ..training.schedules import Constant, Cosine, LinearWarmup, Poly
from ..training.trainer import Algorithm, Callback
from .engine import note_bare, rename_keys

T = TypeVar("T")

MODELS: dict[str, Callable[..., SegmentationModel]] = {
    "unet": UNet,
    "resenc_unet": ResidualEncoderUNet,
}
# The default model, and the one a ``model`` section without a model name (the shape before there was a
# choice) stands for.
BARE_MODEL = "unet"

# Each takes the parameters (``params``) first, then its settings.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "radam": optimizers.radam,
    "adam": optimizers.adam,
    "adamw": optimizers.adamw,
    "sgd": optimizers.sgd,
}

LOSSES: dict[str, Callable[..., torch.nn.Module]] = {
    # Dice over the tumour labels (background left out, as Composer and DLE do) + cross-entropy.
    "dice_ce": DiceCELoss,
    # nnU-Net's BraTS mode: sigmoid outputs for WT, TC, ET with Dice + binary cross-entropy.
    "region_dice_bce": RegionDiceBCELoss,
}

# Each maps (batch, total batches) to a factor of the base learning rate; durations in batches.
SCHEDULERS: dict[str, Callable[..., Callable[[int, int], float]]] = {
    "constant": Constant,
    "cosine": Cosine,
    "poly": Poly,
    "linear_warmup": LinearWarmup,
}

# Switched on under ``callbacks:``. A callback declares where it is built (Callback.writer_only,
# Callback.needs_evaluator); they run in the config's order, before the built-in ones.
CALLBACKS: dict[str, Callable[..., Callback]] = {
    "lr_monitor": cb.LRMonitor,
    "speed_monitor": cb.SpeedMonitor,
    "memory_monitor": cb.MemoryMonitor,
    "early_stopper": cb.EarlyStopper,
    # progress.png in the run folder, redrawn after each evaluation (needs matplotlib).
    "progress_plot": cb.ProgressPlot,
    # <save_folder>/overlays/: contours of truth and prediction on three slices per validation case
    # (the first `cases` by id, or all) and summary.png (worst and best 4 of all cases), redrawn
    # at every `every`-th evaluation.
    "overlays": reporting.OverlayWriter,
}

# Also switched on under ``callbacks:``: where the logger sends the records, besides the log files.
LOGGER_DESTINATIONS: dict[str, Callable[..., loggers.LoggerDestination]] = {
    # TensorBoard event files in <save_folder>/tensorboard (needs the tensorboard package).
    "tensorboard": loggers.TensorBoardLogger,
    # An MLflow run (needs mlflow: pip install 'unet-trainer[mlflow]'); run_name null = the config's.
    "mlflow": loggers.MLflowLogger,
}

# Arguments the builder supplies by name to a component whose signature names them: not settings.
# params: the model's parameters (optimizers); run_dir: the run folder; evaluator: the run's
# evaluator; is_writer: whether this rank writes files (rank 0); config: the resolved config;
# best_checkpoint: the best checkpoint's path (the run folder's checkpoint manager names it);
# scheme: the data's label scheme (the region loss's regions, the pictures' classes).
BUILDER_SUPPLIED = ("params", "run_dir", "evaluator", "is_writer", "config", "best_checkpoint", "scheme")

ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "channels_last": ChannelsLast,
    # Exponential moving average of the weights, used for evaluation and saved in checkpoints.
    "ema": EMA,
    # torch.compile of the model's forward, in place (checkpoints keep their plain keys).
    "compile": Compile,
    # Let cuDNN time its convolution algorithms once per input shape and keep the fastest.
    "cudnn_benchmark": CudnnBenchmark,
}


def build_model(section: Mapping[str, Mapping[str, Any]]) -> SegmentationModel:
    """The model a checked ``model`` section names: ``{unet: {...}}`` -> ``UNet(**settings)``.

    Raises:
        ModelArgumentError (a ValueError): settings the model rejects (the argument named).
    """
    ((name, settings),) = section.items()
    return build(MODELS[name], settings)


def describe_model(section: Mapping[str, Mapping[str, Any]]) -> SegmentationModel:
    """The same model built on the meta device: its geometry and checks (``spatial_dims``,
    ``total_stride()``, ``check_input_size``...) with no memory allocated and no weights drawn.

    Raises:
        ModelArgumentError (a ValueError): as :func:`build_model`.
    """
    with torch.device("meta"):
        return build_model(section)


def build(component: Callable[..., T], settings: Mapping[str, Any], supplied: Mapping[str, Any] | None = None) -> T:
    """``component(**settings)``, plus each of the ``supplied`` arguments its signature names.

    Args:
        component: a registry entry (a class or a function).
        settings: its checked settings (the config's section for it).
        supplied: what the builder has for components that ask (keys of :data:`BUILDER_SUPPLIED`).
    """
    wanted = inspect.signature(component).parameters
    return component(**settings, **{name: value for name, value in (supplied or {}).items() if name in wanted})


def output_mode(loss_section: Mapping[str, Any]) -> OutputMode:
    """What the model's outputs mean, as the loss a ``loss`` section names declares it."""
    ((name, _),) = loss_section.items()
    return LOSSES[name].output_mode


@functools.cache
def settings_of(component: Any) -> dict[str, Field]:
    """A component's settings, derived from its own signature, less the arguments the builder
    supplies (:data:`BUILDER_SUPPLIED`: the parameters, the run folder...)."""
    return fields_of(component, exclude=BUILDER_SUPPLIED)


#: Keys an earlier version wrote under another name: old dotted key -> (new key, what changed).
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    "eval.lesion_min_voxels": (
        "eval.lesion_min_volume",
        "the size threshold is a volume in mm³ now, the same number: equal on 1 mm data",
    ),
}


def upgrade_config(cfg: Mapping[str, Any], source: str) -> dict:
    """A resolved config an earlier version saved (a checkpoint's), in today's shape, for comparing
    with a new one: a ``model`` section without a model name becomes ``{unet: ...}`` and renamed
    keys (:data:`RENAMED_KEYS`) take their new names (each with a one-line note naming ``source``).
    Values are not checked."""
    upgraded = rename_keys(copy.deepcopy(dict(cfg)), RENAMED_KEYS, source)
    section = upgraded.get("model")
    if isinstance(section, dict) and section and not any(key in MODELS for key in section):
        note_bare(source, "model", BARE_MODEL, next(iter(section)))
        upgraded["model"] = {BARE_MODEL: section}
    return upgraded
