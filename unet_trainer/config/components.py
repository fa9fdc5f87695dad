"""The components a config chooses by name: one registry line each.

A config section names one component (``model: {unet: {...}}``, ``optimizer: {radam: {...}}``,
``loss: {dice_ce: {}}``) or a set of them (``callbacks``, ``algorithms``). A component's settings
are its own typed keyword arguments: :mod:`unet_trainer.config.config` derives the schema from them
(:func:`unet_trainer.core.schema.fields_of`: types, choices, bounds and defaults), and
:mod:`unet_trainer.commands.builders` calls the component with the checked settings. So adding a model, an
optimizer, a loss, a callback or an algorithm is its own code plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..models.base import SegmentationModel
from ..models.resenc import ResidualEncoderUNet
from ..models.unet import UNet
from ..training import callbacks as cb
from ..training import loggers, optimizers, reporting
from ..training.algorithms import EMA, ChannelsLast, Compile, CudnnBenchmark
from ..training.losses import DiceCELoss, RegionDiceBCELoss
from ..training.trainer import Algorithm, Callback

MODELS: dict[str, Callable[..., SegmentationModel]] = {
    "unet": UNet,
    "resenc_unet": ResidualEncoderUNet,
}

# Each takes the parameters first, then its settings.
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

CALLBACKS: dict[str, Callable[..., Callback]] = {
    "lr_monitor": cb.LRMonitor,
    "speed_monitor": cb.SpeedMonitor,
    "memory_monitor": cb.MemoryMonitor,
    "early_stopper": cb.EarlyStopper,
    # progress.png in the run folder, redrawn after each evaluation (needs matplotlib).
    "progress_plot": cb.ProgressPlot,
    # TensorBoard event files in <save_folder>/tensorboard (needs the tensorboard package).
    "tensorboard": loggers.TensorBoardLogger,
    # <save_folder>/overlays/: contours of truth and prediction on three slices per validation case
    # (the first `cases` by id, or all) and summary.png (worst and best 4 of all cases), redrawn
    # at every `every`-th evaluation.
    "overlays": reporting.OverlayWriter,
    # An MLflow run (needs mlflow: pip install 'unet-trainer[mlflow]'); run_name null = the config's.
    "mlflow": reporting.MLflowLogger,
}
# Callback arguments that the builder supplies (where to write, the evaluator, the rank's role,
# the resolved config): not settings.
BUILDER_SUPPLIED = ("path", "folder", "evaluator", "overlays", "is_writer", "run_dir", "config")

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
    return MODELS[name](**settings)


def describe_model(section: Mapping[str, Mapping[str, Any]]) -> SegmentationModel:
    """The same model built on the meta device: its geometry and checks (``spatial_dims``,
    ``total_stride()``, ``check_input_size``...) with no memory allocated and no weights drawn.

    Raises:
        ModelArgumentError (a ValueError): as :func:`build_model`.
    """
    with torch.device("meta"):
        return build_model(section)
