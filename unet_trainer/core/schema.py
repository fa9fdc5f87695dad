"""Settings: what a signature says about them (:class:`Setting`, the common bounds), durations of
training time (:class:`Duration`), and the schema leaves derived from a component's own signature or
dataclass (:func:`fields_of`, :class:`Field`).

A leaf (nothing from the package): models, losses, optimizers, schedules, callbacks, algorithms and
the trainer take their annotations and durations from here, and the transforms and the config check
their values with the same :meth:`Field.check`.

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

A :class:`Field` checks a value itself (:meth:`Field.check`): the config checks every layer with
it and the augmentation transforms their settings on construction, so both say the same about the
same value.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

# --------------------------------------------------------------------------------------------
# Settings: what a signature says beyond its types
# --------------------------------------------------------------------------------------------

#: The kinds of setting a config leaf can be (:class:`unet_trainer.core.schema.Field`).
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
class Setting:
    """What a type annotation cannot say about a setting: ``Annotated[float, Setting(minimum=0.0)]``.

    ``kind`` overrides the kind derived from the type (``duration``, ``int_or_auto``, ``int_or_all``);
    ``choices`` restricts a str (a ``Literal`` says it too); ``length`` fixes a list's length.
    :meth:`defaulting` gives the config's default of a parameter the signature leaves without one
    (a schedule's warmup, written ``1ep`` in the config and handed over in batches).
    """

    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None
    kind: str | None = None
    default: Any = None
    has_default: bool = False

    @classmethod
    def defaulting(cls, default: Any, **kwargs: Any) -> Setting:
        """A setting whose config default is ``default`` though its signature has none."""
        return cls(default=default, has_default=True, **kwargs)

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"Setting.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


# The common bounds, as annotations a signature can use directly.
Probability = Annotated[float, Setting(minimum=0.0, maximum=1.0)]
NonNegative = Annotated[float, Setting(minimum=0.0)]
PositiveInt = Annotated[int, Setting(minimum=1)]

# --------------------------------------------------------------------------------------------
# Durations of training time: 200ep, 1000ba, 64sp
# --------------------------------------------------------------------------------------------

DURATION_UNITS = {"ep": "epochs", "ba": "batches", "sp": "samples"}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ep|ba|sp)\s*$")


@dataclass(frozen=True)
class Duration:
    """A span of training time: ``value`` epochs (``ep``), batches (``ba``) or samples (``sp``)."""

    value: int
    unit: str

    @classmethod
    def parse(cls, raw: Any) -> Duration:
        """Parse ``"200ep"``, ``"1000ba"``, ``"64sp"`` or a plain non-negative integer (epochs).

        Raises:
            ValueError: for anything else (the message says which forms are accepted).
        """
        if isinstance(raw, Duration):
            return raw
        if isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not a duration")
        if isinstance(raw, int):
            if raw < 0:
                raise ValueError(f"{raw!r} is negative")
            return cls(raw, "ep")
        if isinstance(raw, str):
            match = _DURATION_RE.match(raw)
            if match:
                return cls(int(match.group(1)), match.group(2))
            if raw.strip().isdigit():
                return cls(int(raw), "ep")
        raise ValueError(f"{raw!r} is not a duration (use Nep, Nba or Nsp, e.g. 200ep, 1000ba, 64sp)")

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


# --------------------------------------------------------------------------------------------
# Schema leaves
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One leaf of the schema.

    ``kind`` is one of :data:`KINDS`. ``length`` fixes a list's length; ``choices`` restricts a
    str (each item of a ``str_list``); ``nullable`` admits null; ``minimum``/``maximum`` bound a
    number (each item of a list).
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
            "str_list": "a list of names",
            "float_list": "a list of numbers",
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

    def check(self, value: Any, *, numbers_from_text: bool = False) -> Any:
        """``value`` as the field's kind: a number as ``int`` or ``float``, a list as a ``list``, a
        duration as its text (``"200ep"``); null only where the field is nullable.

        Args:
            numbers_from_text: read a number written as text as that number (YAML 1.1 reads
                ``1e-3``, without a dot, as a string).

        Raises:
            FieldError: the value is not of the kind, outside the bounds or choices, or a list of
                another length; its ``expected`` says what the field takes (and which item failed).
        """
        if value is None:
            if self.nullable:
                return None
            raise FieldError(self.expected(), value)
        return _CHECKS[self.kind](self, value, numbers_from_text)

    def in_bounds(self, number: float) -> bool:
        """Whether ``number`` lies within ``minimum`` and ``maximum`` (each where set)."""
        return (self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum)


class FieldError(ValueError):
    """A value a :class:`Field` does not take.

    Attributes:
        expected: what the field takes, with what failed in parentheses where the phrase alone does
            not say it: ``a list of numbers of length 2 with every item >= 0.0 (item -0.5)``.
        value: the value judged: as given, or the number read from it (``inf`` for ``"1e999"``).
    """

    def __init__(self, expected: str, value: Any):
        super().__init__(expected)
        self.expected, self.value = expected, value


# Values shown in messages: a few items and levels at most (a list of lists shared a thousand
# times over, from YAML aliases, is short to write and long to print).
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 3, 8, 8, 60, 60


def shown(value: Any) -> str:
    """``value`` as a message shows it: a few items and levels, at most 60 characters."""
    text = _SHOWN.repr(value)
    return text[:57] + "..." if len(text) > 60 else text


def _failed(spec: Field, value: Any, detail: str = "") -> FieldError:
    return FieldError(spec.expected() + (f" ({detail})" if detail else ""), value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: Any, from_text: bool) -> float | None:
    """``value`` as a float, or None; a bool is no number (True as a probability is a typo)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if from_text and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_bool(spec: Field, value: Any, from_text: bool) -> bool:
    if not isinstance(value, bool):
        raise _failed(spec, value)
    return value


def _check_int(spec: Field, value: Any, from_text: bool) -> int:
    if not _is_integer(value) or not spec.in_bounds(value):
        raise _failed(spec, value)
    return int(value)


def _check_float(spec: Field, value: Any, from_text: bool) -> float:
    number = _number(value, from_text)
    if number is None:
        raise _failed(spec, value)
    if not math.isfinite(number):
        raise _failed(spec, number, "it must be finite")
    if not spec.in_bounds(number):
        raise _failed(spec, number)
    return number


def _check_positive_or(word: str) -> Callable[[Field, Any, bool], Any]:
    def check(spec: Field, value: Any, from_text: bool) -> Any:
        if value == word:
            return value
        if not _is_integer(value) or value < 1:
            raise _failed(spec, value)
        return int(value)

    return check


def _check_str(spec: Field, value: Any, from_text: bool) -> str:
    if not isinstance(value, str) or (spec.choices and value not in spec.choices):
        raise _failed(spec, value)
    return value


def _check_duration(spec: Field, value: Any, from_text: bool) -> str:
    try:
        return str(Duration.parse(value))
    except ValueError:
        raise _failed(spec, value) from None


def _check_names(spec: Field, value: Any, from_text: bool) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _failed(spec, value)
    for item in value:
        if not isinstance(item, str) or (spec.choices and item not in spec.choices):
            raise _failed(spec, value, f"item {_SHOWN.repr(item)}")
    return list(value)


def _check_list(spec: Field, value: Any, from_text: bool) -> list:
    if not isinstance(value, (list, tuple)):
        raise _failed(spec, value)
    out: list = []
    for item in value:
        if spec.kind == "int_list":
            if not _is_integer(item):
                raise _failed(spec, value, f"item {_SHOWN.repr(item)}")
            out.append(int(item))
        else:
            number = _number(item, from_text)
            if number is None or not math.isfinite(number):
                raise _failed(spec, value, f"item {_SHOWN.repr(item)}, each must be a finite number")
            out.append(number)
        if not spec.in_bounds(out[-1]):
            raise _failed(spec, value, f"item {_SHOWN.repr(item)}")
    if spec.length is not None and len(out) != spec.length:
        raise _failed(spec, value)
    return out


_CHECKS: dict[str, Callable[[Field, Any, bool], Any]] = {
    "bool": _check_bool,
    "int": _check_int,
    "float": _check_float,
    "str": _check_str,
    "duration": _check_duration,
    "int_list": _check_list,
    "float_list": _check_list,
    "str_list": _check_names,
    "int_or_auto": _check_positive_or("auto"),
    "int_or_all": _check_positive_or("all"),
}


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


def _declared_default(hint: Any) -> Any:
    """The ``Setting(default=...)`` of an annotation, or ``dataclasses.MISSING``."""
    if typing.get_origin(hint) is Annotated:
        for item in typing.get_args(hint)[1:]:
            if isinstance(item, Setting) and item.has_default:
                return item.default
    return dataclasses.MISSING


def fields_of(component: type | Callable[..., Any], exclude: Sequence[str] = ()) -> dict[str, Field]:
    """The settings of a dataclass (its fields) or a callable (its keyword parameters), in order.

    Parameters named in ``exclude`` and ``*args``/``**kwargs`` are left out; so are a class's
    ``self``. Every other parameter must have a default (a setting always has one): in the signature,
    or its :meth:`Setting.defaulting`.

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
            elif _declared_default(hints.get(f.name)) is not dataclasses.MISSING:
                default = _declared_default(hints.get(f.name))
            else:
                raise SchemaDerivationError(f"{name}.{f.name}: a setting needs a default")
            out[f.name] = field_from_hint(hints.get(f.name, type(default)), default, f"{name}.{f.name}")
        return out
    for param in inspect.signature(target).parameters.values():
        if param.name in exclude or param.name == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        if default is inspect.Parameter.empty:
            default = _declared_default(hints.get(param.name))
        if default is dataclasses.MISSING:
            raise SchemaDerivationError(f"{name}({param.name}): a setting needs a default")
        hint = hints.get(param.name, type(default))
        out[param.name] = field_from_hint(hint, default, f"{name}({param.name})")
    return out
