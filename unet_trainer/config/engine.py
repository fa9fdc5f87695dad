"""The config engine: check a layer against a schema, merge layers, fill defaults, read dotted
command-line overrides. It knows no section of the project's config: the schema is handed in (the
project's is :data:`unet_trainer.config.config.SCHEMA`), built from :mod:`unet_trainer.core.schema`'s
leaves (:class:`Field`, whose :meth:`Field.check` checks every value) and component choices
(:class:`OneOf`, :class:`ListOf`, :class:`SetOf`).

Every problem is one :class:`ConfigError` line naming the source ("configs/demo.yaml",
"command line"), the dotted key and what was expected; an unknown key names the closest valid one.
"""

from __future__ import annotations

import copy
import difflib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ..core.documents import DocumentError, load_yaml_text
from ..core.schema import Duration, Field, FieldError, ListOf, OneOf, SetOf, shown


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the source, the key and what was expected."""


# --------------------------------------------------------------------------------------------
# Checking a layer
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


def check_field(source: str, path: str, value: Any, spec: Field) -> Any:
    """``value`` as the field's kind (:meth:`Field.check`; numbers written as text read as numbers).

    Raises:
        ConfigError: ``{source}: '{path}' = {value} is not {what the field takes}``.
    """
    try:
        return spec.check(value, numbers_from_text=True)
    except FieldError as error:
        raise ConfigError(f"{source}: '{path}' = {shown(error.value)} is not {error.expected}") from None


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


def note_bare(source: str, path: str, name: str, key: str) -> None:
    """Print, once per source and section, that an old-shape section is read as ``{name: ...}``."""
    if (source, path) in _NOTED_BARE:
        return
    _NOTED_BARE.add((source, path))
    print(
        f"note: {source}: '{path}' without a {path} name (the old shape) is read as '{path}: {{{name}: ...}}' "
        f"('{path}.{key}' is '{path}.{name}.{key}'); write it so to silence this note",
        file=sys.stderr,
    )


def rename_keys(layer: Any, renamed: Mapping[str, tuple[str, str]], source: str) -> Any:
    """A layer with each old dotted key of ``renamed`` moved to its new key (same value), and one
    note per key and source saying so; ``renamed`` maps the old key to (new key, what changed).
    Anything that is not a mapping is returned as it is (:func:`check_layer` reports it).

    Raises:
        ConfigError: a layer that sets both the old and the new key.
    """
    if not isinstance(layer, dict):
        return layer
    layer = copy.deepcopy(layer)
    for old, (new, change) in renamed.items():
        *old_parents, old_key = old.split(".")
        *new_parents, new_key = new.split(".")
        section = layer
        for part in old_parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or old_key not in section:
            continue
        target = layer
        for part in new_parents:
            target = target.setdefault(part, {}) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue  # a section that is not a mapping: check_layer says so
        if new_key in target:
            raise ConfigError(f"{source}: '{old}' and '{new}' are both set; '{old}' is the old name of '{new}'")
        target[new_key] = section.pop(old_key)
        if (source, old) not in _NOTED_BARE:
            _NOTED_BARE.add((source, old))
            print(
                f"note: {source}: '{old}' is read as '{new}' ({change}); write it so to silence this note",
                file=sys.stderr,
            )
    return layer


@dataclass(frozen=True)
class _LayerChecker:
    """Checks one layer from ``source``; ``root`` is the whole schema, for 'did you mean' across sections."""

    source: str
    root: Mapping[str, Any]

    def unknown_key(self, parent: str, key: Any, siblings: Iterable[str]) -> ConfigError:
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
            close = difflib.get_close_matches(path, _all_key_paths(self.root), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(siblings))}"
        where = f"'{key}' in '{parent}'" if "." in key and parent else f"'{path}'"
        return ConfigError(f"{self.source}: unknown key {where}{hint}")

    def settings(self, path: str, settings: Any, fields: Mapping[str, Field]) -> dict:
        """One component's settings (null: none given), each checked by its field."""
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{self.source}: '{path}' must be a mapping of settings, got {settings!r}")
        checked = {}
        for key, value in settings.items():
            if key not in fields:
                raise self.unknown_key(path, key, fields.keys())
            checked[key] = check_field(self.source, f"{path}.{key}", value, fields[key])
        return checked

    def entry(self, path: str, entry: Any, spec: OneOf | ListOf | SetOf) -> tuple[str, dict]:
        """One named component, ``{name: settings}`` (or its bare name): (name, checked settings)."""
        names = ", ".join(spec.components)
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            first = next(iter(spec.components))
            raise ConfigError(
                f"{self.source}: '{path}' must name exactly one of {names}, like {{{first}: {{}}}}; got {entry!r}"
            )
        ((name, settings),) = entry.items()
        if name not in spec.components:
            raise self.unknown_key(path, name, spec.components.keys())
        return name, self.settings(f"{path}.{name}", settings, spec.components[name])

    def bare_choice(self, path: str, value: dict | None, spec: OneOf) -> dict:
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
                raise self.unknown_key(path, key, [*fields, *spec.components])
            checked[key] = check_field(self.source, f"{path}.{key}", item, fields[key])
        other = [name for name in named if name != spec.bare]
        if other and checked:
            first = next(iter(checked))
            raise ConfigError(
                f"{self.source}: '{path}.{first}' is the old path of '{path}.{spec.bare}.{first}', but "
                f"'{path}.{other[0]}' is chosen here; write '{path}.{other[0]}.{first}'"
            )
        if checked:
            note_bare(self.source, path, spec.bare, next(iter(checked)))
        if spec.bare not in named:
            return _BareChoice(spec.bare, checked, self.source, path)
        name, settings = self.entry(path, {spec.bare: named[spec.bare]}, spec)
        twice = [key for key in checked if key in settings]
        if twice:
            raise ConfigError(
                f"{self.source}: both '{path}.{twice[0]}' and '{path}.{name}.{twice[0]}' are given; "
                f"keep '{path}.{name}.{twice[0]}'"
            )
        return {name: {**settings, **checked}}

    def listed(self, path: str, value: Any, spec: ListOf) -> list[dict]:
        """An ordered list of named components."""
        if not isinstance(value, list):
            first = next(iter(spec.components))
            raise ConfigError(f"{self.source}: '{path}' must be a list like [{{{first}: {{}}}}], got {value!r}")
        return [dict([self.entry(f"{path}[{i}]", item, spec)]) for i, item in enumerate(value)]

    def chosen_set(self, path: str, value: Any, spec: SetOf) -> dict:
        """Components switched on by name (a list of names is shorthand); null switches one off."""
        if value is None:
            return {}
        if isinstance(value, list):  # [a, b] is shorthand for {a: {}, b: {}}
            value = {name: {} for name in value}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: '{path}' must be a mapping of names to settings, got {value!r}")
        entries: dict[str, Any] = {}
        for name, settings in value.items():
            if name not in spec.components:
                raise self.unknown_key(path, name, spec.components.keys())
            # null switches a component off in a later layer.
            entries[name] = (
                None if settings is None else self.settings(f"{path}.{name}", settings, spec.components[name])
            )
        return entries

    def mapping(self, layer: Any, schema: Mapping[str, Any], prefix: str) -> dict:
        """A (partial) section: each key checked by its entry in ``schema``."""
        if layer is None:
            return {}
        if not isinstance(layer, dict):
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"{self.source}: {where} must be a mapping of keys, got {layer!r}")
        checked: dict[str, Any] = {}
        for key, value in layer.items():
            path = f"{prefix}{key}"
            if not isinstance(key, str) or key not in schema:
                raise self.unknown_key(prefix[:-1], key, schema.keys())
            spec = schema[key]
            if isinstance(spec, Field):
                checked[key] = check_field(self.source, path, value, spec)
            elif isinstance(spec, dict):
                checked[key] = self.mapping(value, spec, path + ".")
            elif isinstance(spec, OneOf) and _has_loose_keys(value, spec):
                checked[key] = self.bare_choice(path, value, spec)
            elif isinstance(spec, OneOf):
                checked[key] = dict([self.entry(path, value, spec)])
            elif isinstance(spec, ListOf):
                checked[key] = self.listed(path, value, spec)
            elif isinstance(spec, SetOf):
                checked[key] = self.chosen_set(path, value, spec)
        return checked


def check_layer(layer: Any, source: str, schema: Mapping[str, Any]) -> dict:
    """Check one layer (a recipe, a config file or the command line) against ``schema``.

    Args:
        layer: the parsed YAML mapping (partial: missing keys are fine).
        source: where it came from, used in messages ("configs/demo.yaml", "command line").
        schema: the whole schema (the project's: :data:`unet_trainer.config.config.SCHEMA`).

    Returns:
        A copy with values converted to their kinds (numbers written as "1e-3" become floats).

    Raises:
        ConfigError: unknown key (with the closest valid key) or wrong type (key, value, expected).
    """
    return _LayerChecker(source, schema).mapping(layer, schema, "")


# --------------------------------------------------------------------------------------------
# Merging and defaults
# --------------------------------------------------------------------------------------------


def _merge_choice(current: dict, value: dict) -> dict:
    """A one-of section ``value`` over the ``current`` choice: the same component merges, another replaces it.

    Raises:
        ConfigError: an old-shape section over a layer that chose another component.
    """
    ((name, settings),) = value.items()
    if name in current:
        return {name: {**current[name], **settings}}
    if not isinstance(value, _BareChoice):
        return copy.deepcopy(value)
    # An old-shape section means spec.bare: never let it switch a layer's other choice.
    if settings:
        ((chosen, _),) = current.items()
        first = next(iter(settings))
        raise ConfigError(
            f"{value.source}: '{value.path}.{first}' is the old path of '{value.path}.{name}.{first}', "
            f"but the {value.path} chosen is '{chosen}'; write '{value.path}.{chosen}.{first}' "
            f"(or '{value.path}.{name}.{first}' to choose {name})"
        )
    return current


def merge_layers(base: dict, over: dict, schema: Mapping[str, Any]) -> dict:
    """Merge checked layer ``over`` onto ``base`` (both partial); returns a new dict."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        spec = schema[key]
        if isinstance(spec, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_layers(merged[key], value, spec)
        elif isinstance(spec, OneOf) and isinstance(merged.get(key), dict):
            merged[key] = _merge_choice(merged[key], value)
        elif isinstance(spec, SetOf) and isinstance(merged.get(key), dict):
            for name, settings in value.items():
                if settings is None:
                    merged[key].pop(name, None)
                else:
                    merged[key][name] = {**(merged[key].get(name) or {}), **settings}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def fill_defaults(layer: dict, schema: Mapping[str, Any]) -> dict:
    """The merged ``layer`` with every key ``schema`` holds, missing ones at their defaults."""
    full: dict[str, Any] = {}
    for key, spec in schema.items():
        value = layer.get(key)
        if isinstance(spec, Field):
            full[key] = copy.deepcopy(spec.default) if key not in layer else value
            if key not in layer and spec.kind == "duration" and spec.default is not None:
                full[key] = str(Duration.parse(spec.default))
        elif isinstance(spec, dict):
            full[key] = fill_defaults(value or {}, spec)
        elif isinstance(spec, OneOf):
            chosen = value if key in layer else spec.default
            ((name, settings),) = chosen.items()
            full[key] = {name: fill_defaults(settings, spec.components[name])}
        elif isinstance(spec, ListOf):
            chosen = value if key in layer else spec.default
            full[key] = [
                {name: fill_defaults(settings, spec.components[name])}
                for item in chosen
                for name, settings in item.items()
            ]
        elif isinstance(spec, SetOf):
            # Defaults are the base of a set: layers add components to them or switch them off (null).
            chosen = {**spec.default, **(value or {})}
            full[key] = {
                name: fill_defaults(settings or {}, spec.components[name])
                for name, settings in chosen.items()
                if settings is not None
            }
    return full


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


def dump_config(cfg: dict) -> str:
    """The resolved config as YAML text (key order kept)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


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
