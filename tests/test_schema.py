"""Settings derived from a component's signature or dataclass (unet_trainer.core.schema)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from unet_trainer.config.engine import ConfigError, check_layer
from unet_trainer.core.schema import (
    Field,
    NonNegative,
    PositiveInt,
    Probability,
    SchemaDerivationError,
    Setting,
    fields_of,
)


class Component:
    def __init__(
        self,
        device: str,
        *,
        depth: PositiveInt = 3,
        p: Probability = 0.5,
        scale: Annotated[tuple[float, float], Setting(minimum=0.0)] = (0.7, 1.3),
        filters: Sequence[int] = (32, 64),
        norm: Literal["instance", "batch"] = "instance",
        patience: int | None = None,
        every: Annotated[int | str, Setting(kind="int_or_all")] = 16,
        t_max: Annotated[str | None, Setting(kind="duration")] = None,
        flag: bool = False,
        **kwargs: object,
    ) -> None:
        pass


def test_fields_of_a_signature_maps_types_bounds_and_defaults() -> None:
    got = fields_of(Component, exclude=("device",))
    assert list(got) == ["depth", "p", "scale", "filters", "norm", "patience", "every", "t_max", "flag"]
    assert got["depth"] == Field("int", 3, minimum=1)
    assert got["p"] == Field("float", 0.5, minimum=0.0, maximum=1.0)
    # Tuples become lists, as YAML writes them; a fixed-size tuple fixes the length.
    assert got["scale"] == Field("float_list", [0.7, 1.3], length=2, minimum=0.0)
    assert got["filters"] == Field("int_list", [32, 64])
    assert got["norm"] == Field("str", "instance", choices=("instance", "batch"))
    assert got["patience"] == Field("int", None, nullable=True)
    assert got["every"] == Field("int_or_all", 16)
    assert got["t_max"] == Field("duration", None, nullable=True)
    assert got["flag"] == Field("bool", False)


def test_fields_of_a_dataclass_reads_fields_and_factories() -> None:
    @dataclass(frozen=True)
    class Noise:
        p: Probability = 0.15
        std: Annotated[tuple[float, float], Setting(minimum=0.0)] = (0.0, 0.33)
        sizes: list[int] = field(default_factory=lambda: [1, 2])
        decay: NonNegative = 0.9

    got = fields_of(Noise)
    assert got == {
        "p": Field("float", 0.15, minimum=0.0, maximum=1.0),
        "std": Field("float_list", [0.0, 0.33], length=2, minimum=0.0),
        "sizes": Field("int_list", [1, 2]),
        "decay": Field("float", 0.9, minimum=0.0),
    }


def test_a_setting_without_a_default_or_kind_is_a_developer_error() -> None:
    def no_default(depth: int) -> None: ...

    def no_kind(mapping: dict = {}) -> None: ...  # noqa: B006  (never called)

    with pytest.raises(SchemaDerivationError, match=r"no_default\(depth\): a setting needs a default"):
        fields_of(no_default)
    with pytest.raises(SchemaDerivationError, match=r"no_kind\(mapping\): no setting kind"):
        fields_of(no_kind)
    with pytest.raises(ValueError, match="Setting.kind must be one of"):
        Setting(kind="dict")


def test_derived_fields_check_a_layer_with_the_usual_one_line_errors() -> None:
    schema = {"thing": fields_of(Component, exclude=("device",))}
    assert check_layer({"thing": {"scale": [0.5, 2], "every": "all"}}, "x.yaml", schema) == {
        "thing": {"scale": [0.5, 2.0], "every": "all"}
    }
    with pytest.raises(ConfigError) as err:
        check_layer({"thing": {"scale": [-0.5, 2]}}, "x.yaml", schema)
    assert str(err.value) == (
        "x.yaml: 'thing.scale' = [-0.5, 2] is not a list of numbers of length 2 with every item >= 0.0 (item -0.5)"
    )
    with pytest.raises(ConfigError, match=r"x.yaml: 'thing.norm' = 'group' is not one of instance, batch"):
        check_layer({"thing": {"norm": "group"}}, "x.yaml", schema)
    with pytest.raises(ConfigError, match=r"unknown key 'thing.depht'; did you mean 'thing.depth'\?"):
        check_layer({"thing": {"depht": 2}}, "x.yaml", schema)
