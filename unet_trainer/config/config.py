"""The project's config: its tree of sections, keys, defaults, choices and bounds (:data:`SCHEMA`), the
keys a recipe may set (:data:`RECIPE_KEYS`), the cross-key rules a single field cannot say, and the
resolution of a run's config from four layers, later ones winning:

    defaults (SCHEMA)  <  recipe (recipes/*.yaml)  <  config (configs/*.yaml)  <  command line

Every layer is checked against :data:`SCHEMA` by the engine (:mod:`unet_trainer.config.engine`) before it
is merged, so an unknown key or a value of the wrong type is reported with the file (or "command line") it
came from, the dotted key, and what was expected; then the cross-key rules (:func:`check_consistency`) run
on the whole. YAML is only ever read with ``yaml.safe_load``; components (models, optimizers, schedulers,
losses, callbacks, algorithms) are chosen from known names (:mod:`unet_trainer.config.components`), never
import paths. Their settings are derived from their own signatures; a ``model`` section without a model
name, the shape before there was a choice, is read as the unet's.

The schema speaks Composer's vocabulary::

    model:      {unet: {filters: [32, 64, 128, 256, 320, 320]}}     # or resenc_unet
    optimizer:  {radam: {lr: 1.0e-3, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 1.0e-4}}
    schedulers: [{constant: {}}]
    max_duration: 200ep          # or 1000ba, 64000sp; a plain integer means epochs

Only values live in YAML; the objects are built by :mod:`unet_trainer.commands.builders`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..core.documents import DocumentError, check_nesting, load_yaml_text, read_utf8
from ..core.fileio import os_error_line
from ..core.schema import F, Field, ListOf, OneOf, SetOf, fields_of
from ..data.layouts import DLE_LABEL_CONVENTIONS, FORMAT_CHOICES
from ..data.phantom import DEFAULT_STYLE, PHANTOM_STYLES
from ..data.schemes import SCHEMES, SchemeDefinitionError, scheme_from_definition
from ..evaluation.case_metrics import DEFAULT_METRICS, METRICS
from ..evaluation.lesion_metrics import (
    DEFAULT_LESION_BACKEND,
    LESION_BACKENDS,
    LESION_DEFINITIONS,
)
from ..models.base import SegmentationModel
from ..models.checks import ModelArgumentError
from ..training.augment import AUGMENTATIONS
from ..training.batch_transform import SUPPLIED_SETTINGS, SettingError
from . import components
from .engine import (
    ConfigError,
    check_layer,
    fill_defaults,
    merge_layers,
    overrides_to_layer,
    parse_overrides,
    rename_keys,
)

# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------

PROB = dict(minimum=0.0, maximum=1.0)
POSITIVE = dict(minimum=0.0)
# Every seed: NumPy's global seeding and scikit-learn's random_state take at most 2**32 - 1
# (torch takes more), and the split, the phantom and the training streams are seeded by them.
SEED = dict(minimum=0, maximum=2**32 - 1)


class RegisteredSettings(Mapping[str, Mapping[str, Field]]):
    """Each registered component's settings by name, read from the registries whenever asked: a
    component's registry line is all its config section needs (a line added later included)."""

    def __init__(self, *registries: Mapping[str, Any]) -> None:
        self.registries = registries

    def _merged(self) -> dict[str, Any]:
        return {name: component for registry in self.registries for name, component in registry.items()}

    def __getitem__(self, name: str) -> dict[str, Field]:
        return components.settings_of(self._merged()[name])

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
    return {
        "enabled": F("bool", True),
        **{name: fields_of(transform, exclude=SUPPLIED_SETTINGS) for name, transform in transforms.items()},
    }


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
    "model": OneOf(MODELS, {components.BARE_MODEL: {}}, bare=components.BARE_MODEL),
    "data": {
        "path": F("str", None, nullable=True),
        "format": F("str", FORMAT_CHOICES[0], choices=FORMAT_CHOICES),  # "auto", then every registered layout
        # Label numbering of DLE .npy arrays: msd (DLE on MSD Task01, as Composer read) or
        # brats2023 (DLE on BraTS 2021, which renumbers enhancing 4 -> 3).
        "dle_labels": F("str", DLE_LABEL_CONVENTIONS[0], choices=DLE_LABEL_CONVENTIONS),
        # The label scheme (channels, classes, regions, lesion scoring): auto detects it from the case
        # names and labels when the data is prepared; the model's inputs and outputs follow it. One of
        # auto and data/schemes.py's, or the one an nnU-Net v2 dataset.json defines (nnunetv2-<hash>).
        "scheme": F("str", "auto"),
        # Set by training from the prepared data for a scheme a dataset.json defines: that definition
        # (JSON text), so the run rebuilds the scheme without the data.
        "scheme_definition": F("str", None, nullable=True),
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
        # An epoch of this many batches, each case drawn at random with replacement (nnU-Net: 250);
        # null: an epoch is one pass over the training cases, a patch each.
        "batches_per_epoch": F("int", None, nullable=True, minimum=1),
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
        # 95th-percentile Hausdorff distance per region, as eval.lesion_definition computes it
        # (slower; off by default).
        "hd95": F("bool", False),
        # Lesion-wise Dice and HD95 per region of the label scheme (lesion_dice/WT ..., lesion_hd95/WT ...).
        "lesion_wise": F("bool", False),
        # The challenge's metric definition (lesion-wise and plain HD95), its dilation and its size
        # threshold: null takes the data's label scheme's (each BraTS sub-challenge has its own,
        # data/schemes.py); a value overrides it.
        "lesion_definition": F("str", None, nullable=True, choices=tuple(LESION_DEFINITIONS)),
        "lesion_dilation": F("int", None, nullable=True, minimum=0),
        # Truth lesions of this volume in mm³ or less are dropped (eval.lesion_min_voxels before).
        "lesion_min_volume": F("float", None, nullable=True, minimum=0.0),
        # The HD95 of a missed lesion, a false positive or an empty side, mm: null takes the definition's
        # (brats2023: 374; panoptica: 373, what brats-evaluation puts for its infinite HD95).
        "lesion_hd95_penalty": F("float", None, nullable=True, minimum=0.0),
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


# --------------------------------------------------------------------------------------------
# Cross-key rules
# --------------------------------------------------------------------------------------------


def check_run_name(name: str) -> None:
    """``run_name`` names one folder (in ``save_folder``'s default ``runs/{run_name}``), so it must
    be a plain name: a separator or ``..`` would put the run's files elsewhere.

    Raises:
        ConfigError: no name, ``.`` or ``..``, or a path separator in it.
    """
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ConfigError(
            f"'run_name' = {name!r} must be a plain folder name (not empty, '.' or '..', no '/' or '\\'); "
            "to put the run elsewhere set save_folder=PATH"
        )


def _model_to_check(section: dict) -> SegmentationModel:
    """The model the section names, built on the meta device, so the checks can ask it.

    Raises:
        ConfigError: the model rejects its settings (the setting's path named).
    """
    ((name, _),) = section.items()
    try:
        return components.describe_model(section)
    except ModelArgumentError as exc:
        raise ConfigError(exc.at(f"model.{name}.{exc.argument}")) from None
    except ValueError as exc:
        raise ConfigError(f"'model.{name}': {exc}") from None


def _check_scheme(data: dict) -> None:
    """``data.scheme`` is auto or a known scheme, or the one ``data.scheme_definition`` defines."""
    name, definition = data["scheme"], data["scheme_definition"]
    if definition is None:
        if name != "auto" and name not in SCHEMES:
            raise ConfigError(f"'data.scheme' = {name!r} must be one of auto, {', '.join(SCHEMES)}")
        return
    try:
        defined = scheme_from_definition(definition).name
    except SchemeDefinitionError as error:
        raise ConfigError(f"'data.scheme_definition': {error}") from None
    if name != defined:
        raise ConfigError(f"'data.scheme' = {name!r} must be {defined}, the scheme data.scheme_definition defines")


def check_consistency(cfg: dict) -> None:
    """Cross-key rules that a single field cannot express."""
    data = cfg["data"]
    _check_scheme(data)
    if data["fold"] >= data["num_folds"]:
        raise ConfigError(f"'data.fold' = {data['fold']} must be below 'data.num_folds' = {data['num_folds']}")
    if "dice" not in cfg["eval"]["metrics"]:
        # The best checkpoint, early stopping, the progress plot and unet-cv's summary follow the mean Dice.
        raise ConfigError(
            f"'eval.metrics' = {cfg['eval']['metrics']} must name dice: the best checkpoint, early stopping "
            "and the curves follow the mean Dice; add other metrics beside it"
        )
    model = _model_to_check(cfg["model"])
    spacing = data["target_spacing"]
    if spacing is not None and min(spacing) <= 0:
        raise ConfigError(f"'data.target_spacing' = {spacing} must be three positive spacings (z, y, x) in mm")
    # The transforms check what a single field cannot (a range's low <= high) on construction.
    for name, section in cfg["augmentation"].items():
        if name not in AUGMENTATIONS:  # "enabled"
            continue
        try:
            AUGMENTATIONS[name](**section)
        except SettingError as error:
            raise ConfigError(
                f"'augmentation.{name}.{error.setting}' = {error.value} must be {error.expected}"
            ) from None
    if model.spatial_dims == 2 and data["patch_size"][0] != 1:
        raise ConfigError(
            f"'data.patch_size' = {data['patch_size']} must start with 1 for a 2D model (slices), e.g. [1, 192, 160]"
        )
    ((model_name, _),) = cfg["model"].items()
    _check_patch_size(data["patch_size"], model, model_name)
    sgd = cfg["optimizer"].get("sgd")
    if sgd is not None and sgd["nesterov"] and sgd["momentum"] <= 0:
        raise ConfigError(
            "'optimizer.sgd.nesterov' = true needs 'optimizer.sgd.momentum' > 0; "
            "set optimizer.sgd.nesterov=false for plain SGD"
        )
    micro = cfg["device_train_microbatch_size"]
    if isinstance(micro, int) and micro > cfg["train_batch_size"]:
        raise ConfigError(
            f"'device_train_microbatch_size' = {micro} exceeds 'train_batch_size' = {cfg['train_batch_size']}"
        )


def _fits(model: SegmentationModel, patch: list[int]) -> bool:
    try:
        model.check_input_size(patch[3 - model.spatial_dims :])
    except ValueError:
        return False
    return True


def _check_patch_size(patch: list[int], model: SegmentationModel, model_name: str) -> None:
    """Every patch entry >= 1, and the patch passes through the model (its spatial axes: the last
    ``model.spatial_dims``). When the sizes that fit are the multiples of the model's total stride
    ("same" padding), the message names the nearest ones; otherwise it is the model's own."""
    if min(patch) < 1:
        raise ConfigError(f"'data.patch_size' = {patch}: every entry must be at least 1 voxel")
    try:
        model.check_input_size(patch[3 - model.spatial_dims :])
        return
    except ValueError as exc:
        reason = str(exc)
    stride = dict(zip(range(3 - model.spatial_dims, 3), model.total_stride()))
    below = [max(stride[a], patch[a] // stride[a] * stride[a]) if a in stride else patch[a] for a in range(3)]
    above = [-(-patch[a] // stride[a]) * stride[a] if a in stride else patch[a] for a in range(3)]
    if not (_fits(model, below) and _fits(model, above)):
        raise ConfigError(f"'data.patch_size' = {patch} does not fit the model: {reason}")
    nearest = str(below) if below == above else f"{below} or {above}"
    per_axis = ", ".join(
        f"{patch[a]} -> {' or '.join(map(str, dict.fromkeys((below[a], above[a]))))}"
        for a in stride
        if patch[a] % stride[a]
    )
    totals = sorted(set(stride.values()))
    multiple = (
        f"a multiple of {totals[0]}, the model's total stride"
        if len(totals) == 1
        else f"a multiple of the model's total stride on its axis, {list(stride.values())}"
    )
    raise ConfigError(
        f"'data.patch_size' = {patch}: each entry must be {multiple} (the product of model.{model_name}.strides); "
        f"nearest valid: {per_axis}, e.g. {nearest}"
    )


# --------------------------------------------------------------------------------------------
# Loading files and resolving the four layers
# --------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping with PyYAML's safe loader (:func:`unet_trainer.core.documents.load_yaml_text`).

    Raises:
        ConfigError: missing or unreadable file, not UTF-8 text, YAML syntax error (with line),
            nesting deeper than any config, or a top level that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file; give a YAML file such as configs/demo.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = load_yaml_text(read_utf8(path))
    except DocumentError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(os_error_line(exc, path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        # A reader error (a control character) has no problem_mark, and its str() spans two lines.
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split()).replace(' in "<unicode string>",', " at")
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def repo_root() -> Path:
    """The folder holding ``configs/`` and ``recipes/`` in a source checkout."""
    return Path(__file__).resolve().parents[2]  # unet_trainer/config/config.py


def find_recipe(name: str, config_dir: Path | None) -> Path:
    """Locate a recipe given by name (``composer-unet``) or path (``recipes/fast.yaml``).

    Looks, in order: the path as given, next to the config, ``../recipes`` from the config, and the
    checkout's ``recipes/``.

    Raises:
        ConfigError: when none exists (lists the recipes that do).
    """
    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    candidates = [Path(name), Path(filename)]
    if config_dir is not None:
        candidates += [config_dir / filename, config_dir.parent / "recipes" / filename]
    candidates.append(repo_root() / "recipes" / Path(filename).name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in (repo_root() / "recipes").glob("*.yaml"))
    raise ConfigError(f"recipe '{name}' not found; known recipes: {', '.join(known) or 'none'}")


def _check_layer(layer: Any, source: str) -> dict:
    """:func:`check_layer` against :data:`SCHEMA`, after the renamed keys of an earlier version
    (:data:`components.RENAMED_KEYS`) take their new names."""
    return check_layer(rename_keys(layer, components.RENAMED_KEYS, source), source, SCHEMA)


def resolve_config(config_path: str | os.PathLike | None, override_args: list[str] | None = None) -> dict:
    """Resolve defaults < recipe < config < command line into one fully populated, checked config.

    Args:
        config_path: the YAML run config, or None for defaults only.
        override_args: the command-line tokens after the config path.

    Returns:
        The resolved config as plain dicts/lists/scalars (durations as strings like "200ep"),
        with ``run_name`` and ``save_folder`` filled in.

    Raises:
        ConfigError: any problem, as one line naming the file or key.
    """
    config_layer: dict = {}
    config_dir = None
    if config_path is not None:
        path = Path(config_path)
        config_layer = _check_layer(load_yaml(path), str(path))
        config_dir = path.resolve().parent
    cli_layer = _check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line")

    recipe_name = cli_layer.get("recipe", config_layer.get("recipe"))
    recipe_layer: dict = {}
    if recipe_name:
        recipe_path = find_recipe(recipe_name, config_dir)
        raw_recipe = load_yaml(recipe_path)
        for key in raw_recipe:
            if key not in RECIPE_KEYS and key in SCHEMA:
                raise ConfigError(
                    f"{recipe_path}: '{key}' does not belong in a recipe (recipes hold {', '.join(RECIPE_KEYS)}); "
                    "put it in the config"
                )
        recipe_layer = check_layer(raw_recipe, str(recipe_path), SCHEMA)

    merged = merge_layers(merge_layers(recipe_layer, config_layer, SCHEMA), cli_layer, SCHEMA)
    resolved = fill_defaults(merged, SCHEMA)
    if resolved["run_name"] is None:
        resolved["run_name"] = Path(config_path).stem if config_path is not None else "run"
    check_run_name(resolved["run_name"])
    resolved["save_folder"] = resolved["save_folder"].replace("{run_name}", resolved["run_name"])
    check_consistency(resolved)
    return resolved


def resolve_from_base(base: dict, override_args: list[str] | None = None, source: str = "checkpoint") -> dict:
    """Apply command-line overrides on top of an already resolved config (e.g. a checkpoint's).

    The base is checked against the schema again (a checkpoint from another version fails with a
    clear line naming ``source``), then overrides are merged as usual.

    Raises:
        ConfigError: any problem, as one line.
    """
    try:
        check_nesting(base)  # before anything walks it recursively
    except DocumentError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    base_layer = _check_layer(copy.deepcopy(base), source)
    cli_layer = _check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line")
    resolved = fill_defaults(merge_layers(base_layer, cli_layer, SCHEMA), SCHEMA)
    check_consistency(resolved)
    return resolved
