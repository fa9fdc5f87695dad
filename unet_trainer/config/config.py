"""Configuration: YAML run configs, reusable recipes and command-line overrides.

A run's config is resolved from four layers, later ones winning:

    defaults (this module)  <  recipe (recipes/*.yaml)  <  config (configs/*.yaml)  <  command line

Every layer is checked against one schema before it is merged, so an unknown key or a value of
the wrong type is reported with the file (or "command line") it came from, the dotted key, and
what was expected. YAML is only ever read with ``yaml.safe_load``; components (optimizers,
schedulers, losses, callbacks, algorithms) are chosen from known names, never import paths.

The schema speaks Composer's vocabulary::

    model:      {unet: {filters: [32, 64, 128, 256, 320, 320]}}     # or resenc_unet
    optimizer:  {radam: {lr: 1.0e-3, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 1.0e-4}}
    schedulers: [{constant: {}}]
    max_duration: 200ep          # or 1000ba, 64000sp; a plain integer means epochs

The components' settings (model, optimizer, loss, callbacks, algorithms) are derived from their
own signatures (:mod:`unet_trainer.config.components` names them); a ``model`` section without a model
name, the shape before there was a choice, is read as the unet's, with a one-line note. Only
values live in YAML; the objects are built by :mod:`unet_trainer.commands.builders`.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import reprlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..core.documents import DocumentError, check_nesting, load_yaml_text, read_utf8
from ..core.duration import DURATION_UNITS, Duration  # noqa: F401  (re-exported: config.Duration is public)
from ..core.fileio import os_error_line
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
from ..models.base import SegmentationModel
from ..models.checks import ModelArgumentError
from ..training.transforms import AUGMENTATIONS, SettingError
from . import components


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the source, the key and what was expected."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


PROB = dict(minimum=0.0, maximum=1.0)
POSITIVE = dict(minimum=0.0)
# Every seed: NumPy's global seeding and scikit-learn's random_state take at most 2**32 - 1
# (torch takes more), and the split, the phantom and the training streams are seeded by them.
SEED = dict(minimum=0, maximum=2**32 - 1)

# Each component's settings are derived from its own signature (unet_trainer.config.components names
# them); the builder passes the parameters, folders and evaluator the exclusions name.
OPTIMIZERS: dict[str, dict[str, Field]] = {
    name: fields_of(make, exclude=("params",)) for name, make in components.OPTIMIZERS.items()
}

SCHEDULERS: dict[str, dict[str, Field]] = {
    # Each factor multiplies the optimizer's base lr; a list of schedulers multiplies them all,
    # as Composer composes its schedulers.
    "constant": {"factor": F("float", 1.0, **POSITIVE)},
    "cosine": {"min_factor": F("float", 0.0, **POSITIVE), "t_max": F("duration", None, nullable=True)},
    "poly": {"power": F("float", 0.9, **POSITIVE), "t_max": F("duration", None, nullable=True)},
    "linear_warmup": {"duration": F("duration", "1ep"), "start_factor": F("float", 0.0, **POSITIVE)},
}

LOSSES: dict[str, dict[str, Field]] = {name: fields_of(loss) for name, loss in components.LOSSES.items()}

CALLBACKS: dict[str, dict[str, Field]] = {
    name: fields_of(callback, exclude=components.BUILDER_SUPPLIED) for name, callback in components.CALLBACKS.items()
}

ALGORITHMS: dict[str, dict[str, Field]] = {
    name: fields_of(algorithm) for name, algorithm in components.ALGORITHMS.items()
}

MODELS: dict[str, dict[str, Field]] = {name: fields_of(model) for name, model in components.MODELS.items()}


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


# --------------------------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------------------------


def _all_key_paths(node: Any, prefix: str = "") -> list[str]:
    """Every valid dotted key path in the schema, components included (for 'did you mean')."""
    paths: list[str] = []
    if isinstance(node, dict):
        for key, child in node.items():
            path = f"{prefix}{key}"
            paths.append(path)
            paths.extend(_all_key_paths(child, path + "."))
    elif isinstance(node, (OneOf, ListOf, SetOf)):
        for name, fields in node.components.items():
            path = f"{prefix}{name}"
            paths.append(path)
            paths.extend(_all_key_paths(dict(fields), path + "."))
    return paths


_ALL_PATHS = _all_key_paths(SCHEMA)


def _unknown_key_error(source: str, parent: str, key: Any, siblings: Iterable[str]) -> ConfigError:
    """Unknown ``key`` under the dotted ``parent`` ("" at the top), with the closest valid key.

    The key is taken whole: a key that itself holds dots (``{os.system: {}}``) is one wrong name,
    not a path to split.
    """
    key = str(key)
    siblings = list(siblings)
    prefix = f"{parent}." if parent else ""
    path = prefix + key
    close = [] if "." in key else difflib.get_close_matches(path, [prefix + s for s in siblings], n=1, cutoff=0.5)
    if not close:
        close = [prefix + c for c in difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)]
    if not close and "." not in key:
        close = difflib.get_close_matches(path, _ALL_PATHS, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(siblings))}"
    where = f"'{key}' in '{parent}'" if "." in key and parent else f"'{path}'"
    return ConfigError(f"{source}: unknown key {where}{hint}")


# Values shown in messages: a few items and levels at most (a list of lists shared a thousand
# times over, from YAML aliases, is short to write and long to print).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 8, 8, 60, 60


def _type_error(source: str, path: str, value: Any, spec: Field, detail: str = "") -> ConfigError:
    shown = _SHOWN.repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    extra = f" ({detail})" if detail else ""
    return ConfigError(f"{source}: '{path}' = {shown} is not {spec.expected()}{extra}")


def _as_float(value: Any) -> float | None:
    # YAML 1.1 reads "1e-3" (no dot) as a string, so numbers written that way are accepted here.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_range(source: str, path: str, value: float, spec: Field) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _type_error(source, path, value, spec, "it must be finite")
    if spec.minimum is not None and value < spec.minimum:
        raise _type_error(source, path, value, spec)
    if spec.maximum is not None and value > spec.maximum:
        raise _type_error(source, path, value, spec)


def _check_field(source: str, path: str, value: Any, spec: Field) -> Any:
    """Return ``value`` converted to the field's kind, or raise a one-line ConfigError."""
    if value is None:
        if spec.nullable:
            return None
        raise _type_error(source, path, value, spec)
    kind = spec.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _type_error(source, path, value, spec)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(source, path, value, spec)
        _check_range(source, path, value, spec)
        return value
    if kind == "int_or_auto":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _type_error(source, path, value, spec)
        return value
    if kind == "int_or_all":
        if value == "all":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _type_error(source, path, value, spec)
        return value
    if kind == "float":
        number = _as_float(value)
        if number is None:
            raise _type_error(source, path, value, spec)
        _check_range(source, path, number, spec)
        return number
    if kind == "str":
        if not isinstance(value, str):
            raise _type_error(source, path, value, spec)
        if spec.choices and value not in spec.choices:
            raise _type_error(source, path, value, spec)
        return value
    if kind == "duration":
        try:
            return str(Duration.parse(value))
        except ValueError:
            raise _type_error(source, path, value, spec) from None
    if kind == "str_list":
        if not isinstance(value, (list, tuple)):
            raise _type_error(source, path, value, spec)
        for item in value:
            if not isinstance(item, str) or (spec.choices and item not in spec.choices):
                raise _type_error(source, path, value, spec, f"item {_SHOWN.repr(item)}")
        return list(value)
    if kind in ("int_list", "float_list"):
        if not isinstance(value, (list, tuple)):
            raise _type_error(source, path, value, spec)
        out = []
        for item in value:
            if kind == "int_list":
                if isinstance(item, bool) or not isinstance(item, int):
                    raise _type_error(source, path, value, spec, f"item {_SHOWN.repr(item)}")
                out.append(item)
            else:
                number = _as_float(item)
                if number is None or not math.isfinite(number):
                    raise _type_error(
                        source, path, value, spec, f"item {_SHOWN.repr(item)}, each must be a finite number"
                    )
                out.append(number)
            if (spec.minimum is not None and out[-1] < spec.minimum) or (
                spec.maximum is not None and out[-1] > spec.maximum
            ):
                raise _type_error(source, path, value, spec, f"item {_SHOWN.repr(item)}")
        if spec.length is not None and len(out) != spec.length:
            raise _type_error(source, path, value, spec)
        return out
    raise AssertionError(f"schema kind {kind!r} has no checker")


def _check_component_settings(source: str, path: str, settings: Any, fields: Mapping[str, Field]) -> dict:
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: '{path}' must be a mapping of settings, got {settings!r}")
    checked = {}
    for key, value in settings.items():
        sub = f"{path}.{key}"
        if key not in fields:
            raise _unknown_key_error(source, path, key, fields.keys())
        checked[key] = _check_field(source, sub, value, fields[key])
    return checked


def _check_component_entry(source: str, path: str, entry: Any, spec: OneOf | ListOf | SetOf) -> tuple[str, dict]:
    names = ", ".join(spec.components)
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(
            f"{source}: '{path}' must name exactly one of {names}, like {{{next(iter(spec.components))}: {{}}}}; got {entry!r}"
        )
    ((name, settings),) = entry.items()
    if name not in spec.components:
        raise _unknown_key_error(source, path, name, spec.components.keys())
    return name, _check_component_settings(source, f"{path}.{name}", settings, spec.components[name])


class _BareChoice(dict):
    """A one-of section given in the shape before it had a choice (no component named), read as
    ``{spec.bare: settings}``. It remembers where it came from, so that a merge onto a layer that
    chose another component can say so instead of switching the choice."""

    def __init__(self, name: str, settings: dict, source: str, path: str) -> None:
        super().__init__({name: settings})
        self.source, self.path = source, path


def _has_loose_keys(value: Any, spec: OneOf) -> bool:
    """Whether a one-of section is (partly) in the shape before the choice: keys naming no component."""
    if spec.bare is None:
        return False
    return value is None or (isinstance(value, dict) and (not value or any(k not in spec.components for k in value)))


# (source, path) of the old-shape sections noted so far: one note per file (or command line).
_NOTED_BARE: set[tuple[str, str]] = set()


def _note_bare(source: str, path: str, name: str, key: str) -> None:
    if (source, path) in _NOTED_BARE:
        return
    _NOTED_BARE.add((source, path))
    print(
        f"note: {source}: '{path}' without a {path} name (the old shape) is read as '{path}: {{{name}: ...}}' "
        f"('{path}.{key}' is '{path}.{name}.{key}'); write it so to silence this note",
        file=sys.stderr,
    )


def _check_bare_choice(source: str, path: str, value: dict | None, spec: OneOf) -> dict:
    """Check a section with old-shape keys (settings of ``spec.bare`` given without its name).

    The keys are checked and named as written (``model.filters``). Keys of the old shape next to
    ``spec.bare``'s own entry (``model.filters`` and ``model.unet.norm`` on one command line) join
    it; next to another component's they are an error, as is one setting given both ways.
    """
    assert spec.bare is not None
    value = value or {}
    loose = {k: v for k, v in value.items() if k not in spec.components}
    named = {k: v for k, v in value.items() if k in spec.components}
    fields = spec.components[spec.bare]
    checked: dict[str, Any] = {}
    for key, item in loose.items():
        if not isinstance(key, str) or key not in fields:
            # A component's name is a candidate too: 'model.unte' is more likely 'model.unet'.
            raise _unknown_key_error(source, path, key, [*fields, *spec.components])
        checked[key] = _check_field(source, f"{path}.{key}", item, fields[key])
    other = [name for name in named if name != spec.bare]
    if other and checked:
        first = next(iter(checked))
        raise ConfigError(
            f"{source}: '{path}.{first}' is the old path of '{path}.{spec.bare}.{first}', but '{path}.{other[0]}' "
            f"is chosen here; write '{path}.{other[0]}.{first}'"
        )
    if checked:
        _note_bare(source, path, spec.bare, next(iter(checked)))
    if spec.bare not in named:
        return _BareChoice(spec.bare, checked, source, path)
    name, settings = _check_component_entry(source, path, {spec.bare: named[spec.bare]}, spec)
    twice = [key for key in checked if key in settings]
    if twice:
        raise ConfigError(
            f"{source}: both '{path}.{twice[0]}' and '{path}.{name}.{twice[0]}' are given; keep '{path}.{name}.{twice[0]}'"
        )
    return {name: {**settings, **checked}}


def check_layer(layer: Any, source: str, schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> dict:
    """Check one layer (a recipe, a config file or the command line) against the schema.

    Args:
        layer: the parsed YAML mapping (partial: missing keys are fine).
        source: where it came from, used in messages ("configs/demo.yaml", "command line").

    Returns:
        A copy with values converted to their kinds (numbers written as "1e-3" become floats).

    Raises:
        ConfigError: unknown key (with the closest valid key) or wrong type (key, value, expected).
    """
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        where = f"'{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping of keys, got {layer!r}")
    checked: dict[str, Any] = {}
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key_error(source, prefix[:-1], key, schema.keys())
        spec = schema[key]
        if isinstance(spec, Field):
            checked[key] = _check_field(source, path, value, spec)
        elif isinstance(spec, dict):
            checked[key] = check_layer(value, source, spec, path + ".")
        elif isinstance(spec, OneOf) and _has_loose_keys(value, spec):
            checked[key] = _check_bare_choice(source, path, value, spec)
        elif isinstance(spec, OneOf):
            name, settings = _check_component_entry(source, path, value, spec)
            checked[key] = {name: settings}
        elif isinstance(spec, ListOf):
            if not isinstance(value, list):
                raise ConfigError(
                    f"{source}: '{path}' must be a list like [{{{next(iter(spec.components))}: {{}}}}], got {value!r}"
                )
            checked[key] = [
                dict([_check_component_entry(source, f"{path}[{i}]", item, spec)]) for i, item in enumerate(value)
            ]
        elif isinstance(spec, SetOf):
            if value is None:
                checked[key] = {}
                continue
            if isinstance(value, list):  # [a, b] is shorthand for {a: {}, b: {}}
                value = {name: {} for name in value}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' must be a mapping of names to settings, got {value!r}")
            entries: dict[str, Any] = {}
            for name, settings in value.items():
                if name not in spec.components:
                    raise _unknown_key_error(source, path, name, spec.components.keys())
                # null switches a component off in a later layer.
                entries[name] = (
                    None
                    if settings is None
                    else _check_component_settings(source, f"{path}.{name}", settings, spec.components[name])
                )
            checked[key] = entries
    return checked


# --------------------------------------------------------------------------------------------
# Merging and defaults
# --------------------------------------------------------------------------------------------


def merge_layers(base: dict, over: dict, schema: Mapping[str, Any] = SCHEMA) -> dict:
    """Merge checked layer ``over`` onto ``base`` (both partial); returns a new dict."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        spec = schema[key]
        if isinstance(spec, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_layers(merged[key], value, spec)
        elif isinstance(spec, OneOf) and isinstance(merged.get(key), dict):
            ((name, settings),) = value.items()
            if name in merged[key]:
                merged[key] = {name: {**merged[key][name], **settings}}
            elif isinstance(value, _BareChoice):
                # An old-shape section means spec.bare: never let it switch a layer's other choice.
                if settings:
                    ((chosen, _),) = merged[key].items()
                    first = next(iter(settings))
                    raise ConfigError(
                        f"{value.source}: '{value.path}.{first}' is the old path of '{value.path}.{name}.{first}', "
                        f"but the {value.path} chosen is '{chosen}'; write '{value.path}.{chosen}.{first}' "
                        f"(or '{value.path}.{name}.{first}' to choose {name})"
                    )
            else:
                merged[key] = copy.deepcopy(value)
        elif isinstance(spec, SetOf) and isinstance(merged.get(key), dict):
            for name, settings in value.items():
                if settings is None:
                    merged[key].pop(name, None)
                else:
                    merged[key][name] = {**(merged[key].get(name) or {}), **settings}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _fill_defaults(layer: dict, schema: Mapping[str, Any]) -> dict:
    full: dict[str, Any] = {}
    for key, spec in schema.items():
        value = layer.get(key)
        if isinstance(spec, Field):
            full[key] = copy.deepcopy(spec.default) if key not in layer else value
            if key not in layer and spec.kind == "duration" and spec.default is not None:
                full[key] = str(Duration.parse(spec.default))
        elif isinstance(spec, dict):
            full[key] = _fill_defaults(value or {}, spec)
        elif isinstance(spec, OneOf):
            chosen = value if key in layer else spec.default
            ((name, settings),) = chosen.items()
            full[key] = {name: _fill_defaults(settings, spec.components[name])}
        elif isinstance(spec, ListOf):
            chosen = value if key in layer else spec.default
            full[key] = [
                {name: _fill_defaults(settings, spec.components[name])}
                for item in chosen
                for name, settings in item.items()
            ]
        elif isinstance(spec, SetOf):
            # Defaults are the base of a set: layers add components to them or switch them off (null).
            chosen = {**spec.default, **(value or {})}
            full[key] = {
                name: _fill_defaults(settings or {}, spec.components[name])
                for name, settings in chosen.items()
                if settings is not None
            }
    return full


def defaults() -> dict:
    """The fully populated default config."""
    return _fill_defaults({}, SCHEMA)


# --------------------------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------------------------


def _parse_value(key: str, text: str) -> Any:
    """Parse the override value of ``key`` as a YAML scalar or flow list/mapping (never as code).

    Raises:
        ConfigError: the value nests deeper than any config does.
    """
    try:
        return load_yaml_text(text) if text != "" else None
    except DocumentError as exc:
        raise ConfigError(f"command line: the value of '{key}' is {exc}") from None
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn ``key.sub=value``, ``--key.sub value`` and ``--key.sub=value`` into (key, value) pairs.

    Raises:
        ConfigError: a token that is none of those forms, or a ``--key`` with no value.
    """
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"command line: '{token}' needs a value (use --key value or --key=value)")
                key, text = body, args[i + 1]
                i += 1
        elif "=" in token:
            key, text = token.split("=", 1)
        else:
            raise ConfigError(f"command line: '{token}' is not an override (use key=value, --key value or --key=value)")
        if not key or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ConfigError(f"command line: '{token}' has an empty key")
        pairs.append((key, _parse_value(key, text)))
        i += 1
    return pairs


def overrides_to_layer(pairs: list[tuple[str, Any]]) -> dict:
    """Nest dotted pairs into one mapping: ``[("a.b", 1)]`` -> ``{"a": {"b": 1}}``.

    A list-valued key such as ``schedulers`` takes an index: ``schedulers.0.cosine.t_max=10ep``
    is not supported; give the whole list, e.g. ``schedulers='[{cosine: {}}]'``.
    """
    layer: dict[str, Any] = {}
    for key, value in pairs:
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return layer


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
        config_layer = check_layer(load_yaml(path), str(path))
        config_dir = path.resolve().parent
    cli_layer = check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line")

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
        recipe_layer = check_layer(raw_recipe, str(recipe_path))

    merged = merge_layers(merge_layers(recipe_layer, config_layer), cli_layer)
    resolved = _fill_defaults(merged, SCHEMA)
    if resolved["run_name"] is None:
        resolved["run_name"] = Path(config_path).stem if config_path is not None else "run"
    _check_run_name(resolved["run_name"])
    resolved["save_folder"] = resolved["save_folder"].replace("{run_name}", resolved["run_name"])
    _check_consistency(resolved)
    return resolved


def _check_run_name(name: str) -> None:
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


def _check_consistency(cfg: dict) -> None:
    """Cross-key rules that a single field cannot express."""
    data = cfg["data"]
    if data["fold"] >= data["num_folds"]:
        raise ConfigError(f"'data.fold' = {data['fold']} must be below 'data.num_folds' = {data['num_folds']}")
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


def upgrade_config(cfg: Mapping[str, Any], source: str) -> dict:
    """A resolved config an earlier version saved (a checkpoint's), in today's shape, for comparing
    with a new one: a ``model`` section without a model name becomes ``{unet: ...}`` (with the
    one-line note naming ``source``). Values are not checked."""
    upgraded = copy.deepcopy(dict(cfg))
    spec = SCHEMA["model"]
    section = upgraded.get("model")
    if isinstance(section, dict) and section and not any(key in spec.components for key in section):
        _note_bare(source, "model", spec.bare, next(iter(section)))
        upgraded["model"] = {spec.bare: section}
    return upgraded


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
    base_layer = check_layer(copy.deepcopy(base), source)
    cli_layer = check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line")
    resolved = _fill_defaults(merge_layers(base_layer, cli_layer), SCHEMA)
    _check_consistency(resolved)
    return resolved


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML text (key order kept)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (for resume warnings)."""
    keys = sorted(set(old) | set(new))
    diffs: list[str] = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, path + "."))
        elif a != b:
            diffs.append(path)
    return diffs
