"""The project's config tree: its sections, their keys, defaults, choices and bounds (:data:`SCHEMA`),
the keys a recipe may set (:data:`RECIPE_KEYS`), and an earlier version's config in today's
shape (:func:`upgrade_config`).

The components' settings (model, optimizer, schedulers, loss, callbacks, algorithms) are derived
from their own signatures (:mod:`unet_trainer.config.components` names them); a ``model`` section
without a model name, the shape before there was a choice, is read as the unet's. The engine that
checks and merges layers against this tree is :mod:`unet_trainer.config.engine`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from ..core.schema import F, Field, ListOf, OneOf, SetOf, fields_of
from ..data.layouts import DLE_LABEL_CONVENTIONS, FORMAT_CHOICES
from ..data.phantom import DEFAULT_STYLE, PHANTOM_STYLES
from ..evaluation.case_metrics import DEFAULT_METRICS, METRICS
from ..evaluation.lesion_metrics import (
    DEFAULT_DILATION_ITERATIONS,
    DEFAULT_HD95_PENALTY,
    DEFAULT_LESION_BACKEND,
    DEFAULT_MIN_LESION_VOXELS,
    LESION_BACKENDS,
)
from ..training.augment import AUGMENTATIONS
from . import components
from .engine import fill_defaults, note_bare

PROB = dict(minimum=0.0, maximum=1.0)
POSITIVE = dict(minimum=0.0)
# Every seed: NumPy's global seeding and scikit-learn's random_state take at most 2**32 - 1
# (torch takes more), and the split, the phantom and the training streams are seeded by them.
SEED = dict(minimum=0, maximum=2**32 - 1)


@functools.cache
def _settings_of(component: Any) -> dict[str, Field]:
    """A component's settings, derived from its own signature, less the arguments the builder
    supplies (:data:`components.BUILDER_SUPPLIED`: the parameters, the run folder...)."""
    return fields_of(component, exclude=components.BUILDER_SUPPLIED)


class RegisteredSettings(Mapping[str, Mapping[str, Field]]):
    """Each registered component's settings by name, read from the registries whenever asked: a
    component's registry line is all its config section needs (a line added later included)."""

    def __init__(self, *registries: Mapping[str, Any]) -> None:
        self.registries = registries

    def _merged(self) -> dict[str, Any]:
        return {name: component for registry in self.registries for name, component in registry.items()}

    def __getitem__(self, name: str) -> dict[str, Field]:
        return _settings_of(self._merged()[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged())

    def __len__(self) -> int:
        return len(self._merged())


OPTIMIZERS = RegisteredSettings(components.OPTIMIZERS)
# Each factor multiplies the optimizer's base lr; a list of schedulers multiplies them all, as
# Composer composes its schedulers. Their durations (200ep, 1000ba, 64sp) reach them in batches.
SCHEDULERS = RegisteredSettings(components.SCHEDULERS)
LOSSES = RegisteredSettings(components.LOSSES)
# Callbacks and logger destinations are switched on in the same ``callbacks`` section.
CALLBACKS = RegisteredSettings(components.CALLBACKS, components.LOGGER_DESTINATIONS)
ALGORITHMS = RegisteredSettings(components.ALGORITHMS)
MODELS = RegisteredSettings(components.MODELS)


def augmentation_schema(transforms: Mapping[str, type] = AUGMENTATIONS) -> dict[str, Any]:
    """The ``augmentation`` section: ``enabled``, then one section per transform, derived from its settings."""
    return {"enabled": F("bool", True), **{name: fields_of(transform) for name, transform in transforms.items()}}


SCHEMA: dict[str, Any] = {
    "recipe": F("str", None, nullable=True),
    "run_name": F("str", None, nullable=True),
    "save_folder": F("str", "runs/{run_name}"),
    "seed": F("int", 42, **SEED),
    "device": F("str", "auto", choices=("auto", "cpu", "cuda")),
    "precision": F("str", "fp32", choices=("fp32", "amp_fp16", "amp_bf16")),
    "train_batch_size": F("int", 64, minimum=1),
    "eval_batch_size": F("int", 8, minimum=1),
    "device_train_microbatch_size": F("int_or_auto", None, nullable=True),
    # Drop each epoch's last partial batch, so every step has the same shape (what CUDA graphs
    # need); false trains it, so every case is drawn once per epoch.
    "drop_last": F("bool", False),
    "max_duration": F("duration", "200ep"),
    "eval_interval": F("duration", "1ep"),
    "save_interval": F("duration", "1ep"),
    "save_num_checkpoints_to_keep": F("int", 3, minimum=-1),
    "autoresume": F("bool", True),
    # A fresh run in a folder holding another run's checkpoints stops, unless this is true: then
    # the old run's files are moved into <save_folder>/previous/ (never deleted).
    "save_overwrite": F("bool", False),
    "load_path": F("str", None, nullable=True),
    "load_weights_only": F("bool", False),
    "grad_clip_norm": F("float", None, nullable=True, minimum=0.0),
    "optimizer": OneOf(OPTIMIZERS, {"radam": {}}),
    "schedulers": ListOf(SCHEDULERS, [{"constant": {}}]),
    "loss": OneOf(LOSSES, {"dice_ce": {}}),
    "callbacks": SetOf(
        CALLBACKS, {"lr_monitor": {}, "speed_monitor": {}, "memory_monitor": {}, "progress_plot": {}, "overlays": {}}
    ),
    "algorithms": SetOf(ALGORITHMS, {}),
    # One model by name; a section without a name (the shape before there was a choice) is a unet's.
    "model": OneOf(MODELS, {"unet": {}}, bare="unet"),
    "data": {
        "path": F("str", None, nullable=True),
        "format": F("str", FORMAT_CHOICES[0], choices=FORMAT_CHOICES),  # "auto", then every registered layout
        # Label numbering of DLE .npy arrays: msd (DLE on MSD Task01, as Composer read) or
        # brats2023 (DLE on BraTS 2021, which renumbers enhancing 4 -> 3).
        "dle_labels": F("str", DLE_LABEL_CONVENTIONS[0], choices=DLE_LABEL_CONVENTIONS),
        "cache_dir": F("str", None, nullable=True),
        "prepared_path": F("str", None, nullable=True),
        "phantom": {
            "cases": F("int", 20, minimum=2),
            "shape": F("int_list", [64, 64, 64], length=3),
            "seed": F("int", 0, **SEED),
            "style": F("str", DEFAULT_STYLE, choices=PHANTOM_STYLES),
        },
        # Resample every case to this spacing (z, y, x) in mm when its own differs; null keeps each
        # case's spacing (BraTS releases are already 1 mm isotropic).
        "target_spacing": F("float_list", None, nullable=True, length=3),
        "num_folds": F("int", 5, minimum=2),
        "fold": F("int", 0, minimum=0),
        "split_seed": F("int", 0, **SEED),
        "split_file": F("str", None, nullable=True),
        "patch_size": F("int_list", [128, 128, 128], length=3),
        "oversampling": F("float", 0.4, **PROB),
        "num_workers": F("int", 2, minimum=0),
        # On CUDA, copy the next batch to the GPU on a side stream while the current step runs.
        "prefetch_to_device": F("bool", True),
        "prepare_workers": F("int", 2, minimum=1),
    },
    "augmentation": augmentation_schema(),
    "eval": {
        "overlap": F("float", 0.5, minimum=0.0, maximum=0.95),
        "sw_batch_size": F("int", 4, minimum=1),
        "gaussian": F("bool", True),
        "mirror_tta": F("bool", False),
        # Composer/DLE score an empty ground truth 1 when the prediction is empty too, else 0;
        # MONAI's ignore_empty leaves such a case out of the mean instead.
        "empty_policy": F("str", "one_if_both_empty", choices=("one_if_both_empty", "ignore")),
        # 95th-percentile Hausdorff distance per region through MONAI (slower; off by default).
        "hd95": F("bool", False),
        # BraTS 2023 lesion-wise Dice and HD95 per region (lesion_dice/WT ..., lesion_hd95/WT ...);
        # the dilation, size threshold and penalty differ for meningioma (1) and metastases (1, 2).
        "lesion_wise": F("bool", False),
        "lesion_dilation": F("int", DEFAULT_DILATION_ITERATIONS, minimum=0),
        "lesion_min_voxels": F("int", DEFAULT_MIN_LESION_VOXELS, minimum=0),
        "lesion_hd95_penalty": F("float", DEFAULT_HD95_PENALTY, minimum=0.0),
        # Where components and distances are computed: auto = torch on a GPU (no copy to the host),
        # SciPy on the CPU (faster there); every backend gives the same scores.
        "lesion_backend": F("str", DEFAULT_LESION_BACKEND, choices=LESION_BACKENDS),
        # The evaluator's per-case metrics, by name (evaluation.case_metrics.METRICS); eval.hd95 and
        # eval.lesion_wise add theirs to the list.
        "metrics": F("str_list", list(DEFAULT_METRICS), choices=tuple(METRICS)),
    },
}

# Keys a recipe may set: the training hyperparameters, never the data or the model.
RECIPE_KEYS = (
    "optimizer",
    "schedulers",
    "max_duration",
    "train_batch_size",
    "eval_batch_size",
    "precision",
    "device_train_microbatch_size",
    "drop_last",
    "algorithms",
    "callbacks",
    "loss",
    "grad_clip_norm",
    "eval_interval",
    "save_interval",
    "seed",
)


def defaults() -> dict:
    """The fully populated default config."""
    return fill_defaults({}, SCHEMA)


def upgrade_config(cfg: Mapping[str, Any], source: str) -> dict:
    """A resolved config an earlier version saved (a checkpoint's), in today's shape, for comparing
    with a new one: a ``model`` section without a model name becomes ``{unet: ...}`` (with the
    one-line note naming ``source``). Values are not checked."""
    upgraded = copy.deepcopy(dict(cfg))
    spec = SCHEMA["model"]
    section = upgraded.get("model")
    if isinstance(section, dict) and section and not any(key in spec.components for key in section):
        note_bare(source, "model", spec.bare, next(iter(section)))
        upgraded["model"] = {spec.bare: section}
    return upgraded
