"""Configuration: YAML run configs, reusable recipes and command-line overrides.

A run's config is resolved from four layers, later ones winning:

    defaults (tree.py)  <  recipe (recipes/*.yaml)  <  config (configs/*.yaml)  <  command line

Every layer is checked against one schema (:data:`unet_trainer.config.tree.SCHEMA`) by the engine
(:mod:`unet_trainer.config.engine`) before it is merged, so an unknown key or a value of the wrong
type is reported with the file (or "command line") it came from, the dotted key, and what was
expected; then the cross-key rules (:mod:`unet_trainer.config.rules`) run on the whole. YAML is only
ever read with ``yaml.safe_load``; components (optimizers, schedulers, losses, callbacks,
algorithms) are chosen from known names, never import paths.

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
from pathlib import Path

import yaml

from ..core.documents import DocumentError, check_nesting, load_yaml_text, read_utf8
from ..core.fileio import os_error_line
from .engine import (
    ConfigError,
    check_layer,
    fill_defaults,
    merge_layers,
    overrides_to_layer,
    parse_overrides,
)
from .rules import check_consistency, check_run_name
from .tree import RECIPE_KEYS, SCHEMA

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
        config_layer = check_layer(load_yaml(path), str(path), SCHEMA)
        config_dir = path.resolve().parent
    cli_layer = check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line", SCHEMA)

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
    base_layer = check_layer(copy.deepcopy(base), source, SCHEMA)
    cli_layer = check_layer(overrides_to_layer(parse_overrides(override_args or [])), "command line", SCHEMA)
    resolved = fill_defaults(merge_layers(base_layer, cli_layer, SCHEMA), SCHEMA)
    check_consistency(resolved)
    return resolved
