"""What a component's signature says about its settings beyond their types: :class:`Setting` (bounds,
choices, a kind such as ``duration``) and the common bounds (:data:`Probability`, :data:`NonNegative`,
:data:`PositiveInt`).

A leaf (nothing from the package): models, losses, optimizers, schedules, callbacks and algorithms annotate
their arguments with it without loading the schema that reads the annotations
(:func:`unet_trainer.core.schema.fields_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

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
