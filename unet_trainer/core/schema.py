"""Schema leaves, and settings derived from a component's own signature or dataclass.

A component (a model, an optimizer, an augmentation, a callback) declares its settings once, as
typed keyword arguments with defaults (or dataclass fields); :func:`fields_of` turns them into
the config schema's :class:`Field` leaves, so a default or a list of choices lives in one place::

    class Noise:
        def __init__(self, p: Probability = 0.15, std: Annotated[tuple[float, float], Setting(minimum=0.0)] = (0.0, 0.33)): ...

    fields_of(Noise)  # {"p": Field("float", 0.15, minimum=0.0, maximum=1.0), "std": Field("float_list", [0.0, 0.33], length=2, minimum=0.0)}

Types map to kinds: ``bool``, ``int``, ``float``, ``str``; ``Literal["a", "b"]`` is a ``str``
with those choices; ``tuple[int, ...]``, ``list[int]`` or ``Sequence[int]`` is an ``int_list``
(``float`` likewise), and ``tuple[float, float]`` one of length 2; ``X | None`` is nullable. An
``Annotated[..., Setting(...)]`` adds bounds, or names a kind the type cannot say (``duration``,
``int_or_auto``, ``int_or_all``). Defaults that are tuples become lists, as YAML writes them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

KINDS = (
    "int",
    "float",
    "bool",
    "str",
    "duration",
    "int_list",
    "float_list",
    "str_list",
    "int_or_auto",
    "int_or_all",
)


@dataclass(frozen=True)
class Field:
    """One leaf of the schema.

    ``kind`` is one of :data:`KINDS`. ``length`` fixes a list's length; ``choices`` restricts a
    str (each item of a ``str_list``); ``nullable`` admits null; ``minimum``/``maximum`` bound a number (each item of a list).
    """

    kind: str
    default: Any
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    length: int | None = None
    minimum: float | None = None
    maximum: float | None = None

    def expected(self) -> str:
        """Human phrase for the expected type, used in error messages."""
        phrase = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "duration": "a duration like 200ep, 1000ba or 64sp",
            "int_list": "a list of integers",
            "float_list": "a list of numbers",
            "str_list": "a list of names",
            "int_or_auto": "an integer or 'auto'",
            "int_or_all": "a positive integer or 'all'",
        }[self.kind]
        if self.choices:
            phrase = ("a list of names, each " if self.kind == "str_list" else "") + "one of " + ", ".join(self.choices)
        if self.length is not None:
            phrase += f" of length {self.length}"
        each = " with every item" if self.kind in ("int_list", "float_list") else ""
        if self.minimum is not None and self.maximum is not None:
            phrase += f"{each} in [{self.minimum}, {self.maximum}]"
        elif self.minimum is not None:
            phrase += f"{each} >= {self.minimum}"
        elif self.maximum is not None:
            phrase += f"{each} <= {self.maximum}"
        if self.nullable:
            phrase += " (or null)"
        return phrase


@dataclass(frozen=True)
class OneOf:
    """Exactly one named component with its settings, e.g. ``optimizer: {radam: {lr: 1e-3}}``.

    A later layer naming a different component replaces the choice; naming the same one merges.
    ``bare`` names the component that a section without a component name means (the shape the
    section had before it had a choice, e.g. ``model: {filters: [...]}`` for ``model: {unet: ...}``).
    """

    components: Mapping[str, Mapping[str, Field]]
    default: Mapping[str, Any]
    bare: str | None = None


@dataclass(frozen=True)
class ListOf:
    """An ordered list of named components, e.g. ``schedulers: [{constant: {}}]``; replaced whole."""

    components: Mapping[str, Mapping[str, Field]]
    default: list


@dataclass(frozen=True)
class SetOf:
    """Any subset of named components, switched on by name: ``callbacks: {lr_monitor: {}}``.

    Layers merge per component; giving a component the value null switches it off.
    """

    components: Mapping[str, Mapping[str, Field]]
    default: Mapping[str, Any]


def F(kind: str, default: Any, **kwargs: Any) -> Field:
    """Shorthand for a hand-written leaf: ``F("int", 3, minimum=1)``."""
    return Field(kind, default, **kwargs)


@dataclass(frozen=True)
class Setting:
    """What a type annotation cannot say about a setting: ``Annotated[float, Setting(minimum=0.0)]``.

    ``kind`` overrides the kind derived from the type (``duration``, ``int_or_auto``, ``int_or_all``);
    ``choices`` restricts a str (a ``Literal`` says it too); ``length`` fixes a list's length.
    """

    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"Setting.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


# The common bounds, as annotations a signature can use directly.
Probability = Annotated[float, Setting(minimum=0.0, maximum=1.0)]
NonNegative = Annotated[float, Setting(minimum=0.0)]
PositiveInt = Annotated[int, Setting(minimum=1)]

_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}
_LISTS = {int: "int_list", float: "float_list"}


class SchemaDerivationError(TypeError):
    """A component's signature cannot be turned into settings (a developer's error, not a user's)."""


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        if len(args) == 1:
            return args[0], nullable
        return Union[tuple(args)], nullable  # noqa: UP007  (rebuilding a union from a tuple of types)
    return hint, False


def _kind_of(hint: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(kind, extra Field arguments) for a type hint without Annotated or None."""
    if hint in _SCALARS:
        return _SCALARS[hint], {}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if not all(isinstance(a, str) for a in args):
            raise SchemaDerivationError(f"{where}: only Literal strings are settings, got {hint!r}")
        return "str", {"choices": tuple(args)}
    if origin in (tuple, list, Sequence, typing.Sequence) or (
        isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
    ):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = set(args)
            length = len(args)
        else:
            items = {args[0]} if args else set()
            length = None
        if len(items) == 1 and next(iter(items)) in _LISTS:
            extra = {"length": length} if length is not None else {}
            return _LISTS[next(iter(items))], extra
    raise SchemaDerivationError(f"{where}: no setting kind for type {hint!r}; annotate it with Setting(kind=...)")


def field_from_hint(hint: Any, default: Any, where: str) -> Field:
    """The :class:`Field` of one annotated setting with its default.

    Raises:
        SchemaDerivationError: the type has no kind and no ``Setting(kind=...)`` names one.
    """
    setting = Setting()
    if typing.get_origin(hint) is Annotated:
        base, *metadata = typing.get_args(hint)
        for item in metadata:
            if isinstance(item, Setting):
                setting = item
        hint = base
    hint, nullable = _strip_optional(hint)
    if typing.get_origin(hint) is Annotated:  # Optional[Annotated[...]]
        return dataclasses.replace(field_from_hint(hint, default, where), nullable=True)
    if setting.kind is not None:
        kind, extra = setting.kind, {}
        if kind in ("int_list", "float_list"):
            try:
                kind, extra = _kind_of(hint, where)
            except SchemaDerivationError:
                kind, extra = setting.kind, {}
    else:
        kind, extra = _kind_of(hint, where)
    if setting.choices is not None:
        extra["choices"] = tuple(setting.choices)
    if setting.length is not None:
        extra["length"] = setting.length
    if isinstance(default, tuple):
        default = list(default)
    return Field(
        kind, default, nullable=nullable or default is None, minimum=setting.minimum, maximum=setting.maximum, **extra
    )


def fields_of(component: type | Callable[..., Any], exclude: Sequence[str] = ()) -> dict[str, Field]:
    """The settings of a dataclass (its fields) or a callable (its keyword parameters), in order.

    Parameters named in ``exclude`` and ``*args``/``**kwargs`` are left out; so are a class's
    ``self``. Every other parameter must have a default (a setting always has one).

    Raises:
        SchemaDerivationError: a parameter without a default, or with a type that has no kind.
    """
    name = getattr(component, "__qualname__", repr(component))
    target = component.__init__ if inspect.isclass(component) and not dataclasses.is_dataclass(component) else component
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception as exc:  # a NameError or TypeError resolving a string annotation
        raise SchemaDerivationError(f"{name}: cannot resolve its annotations ({exc})") from exc
    out: dict[str, Field] = {}
    if dataclasses.is_dataclass(component):
        for f in dataclasses.fields(component):
            if f.name in exclude or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise SchemaDerivationError(f"{name}.{f.name}: a setting needs a default")
            out[f.name] = field_from_hint(hints.get(f.name, type(default)), default, f"{name}.{f.name}")
        return out
    for param in inspect.signature(target).parameters.values():
        if param.name in exclude or param.name == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise SchemaDerivationError(f"{name}({param.name}): a setting needs a default")
        hint = hints.get(param.name, type(param.default))
        out[param.name] = field_from_hint(hint, param.default, f"{name}({param.name})")
    return out
