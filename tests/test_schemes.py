"""The label schemes: each is consistent, the glioma ones keep today's classes, lookups fail in one line."""

from __future__ import annotations

import pytest

from unet_trainer.data.schemes import (
    DEFAULT_SCHEME,
    LABEL_NAMES,
    REGION_NAMES,
    REGIONS,
    SCHEMES,
    LabelScheme,
    LesionSettings,
    UnknownScheme,
    get_scheme,
)

GLIOMA = ("brats2021", "brats2023-gli", "brats2023-ssa", "brats2023-ped", "brats2023-men", "brats2023-met", "msd")


def test_default_scheme_is_the_canonical_glioma_classes():
    assert LABEL_NAMES == {1: "NCR", 2: "ED", 3: "EN"}
    assert REGIONS == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    assert REGION_NAMES == ("WT", "TC", "ET")
    assert SCHEMES[DEFAULT_SCHEME].num_classes == 4


@pytest.mark.parametrize("name", GLIOMA)
def test_glioma_schemes_are_compatible(name):
    assert SCHEMES[name].compatible_with(SCHEMES[DEFAULT_SCHEME])
    assert SCHEMES[name].regions_class_order == (2, 1, 3)


def test_lesion_parameters_follow_each_2023_sub_challenge():
    # The 2023 evaluation code's get_LesionWiseResults: GLI/SSA/PED 3 and 50 mm3, MEN 1 and 50, MET 1 and 2.
    expected = {"gli": (3, 50.0), "ssa": (3, 50.0), "ped": (3, 50.0), "men": (1, 50.0), "met": (1, 2.0)}
    for suffix, (dilation, volume) in expected.items():
        lesion = SCHEMES[f"brats2023-{suffix}"].lesion
        assert (lesion.definition, lesion.dilation, lesion.min_volume) == ("brats2023", dilation, volume)


def test_post_treatment_scheme_adds_the_resection_cavity_outside_the_tumour_regions():
    scheme = SCHEMES["brats2024-gli"]
    assert scheme.num_classes == 5 and scheme.label_names[4] == "RC"
    assert scheme.regions["WT"] == (1, 2, 3) and scheme.regions["TC"] == (1, 3) and scheme.regions["RC"] == (4,)
    assert scheme.num_outputs(region_mode=True) == 4 and scheme.num_outputs(region_mode=False) == 5
    assert not scheme.compatible_with(SCHEMES[DEFAULT_SCHEME])


def test_every_scheme_cites_its_source():
    for scheme in SCHEMES.values():
        assert len(scheme.source) > 40, scheme.name


def test_unknown_scheme_names_the_choices():
    with pytest.raises(UnknownScheme, match="unknown label scheme 'brats2099'.*brats2024-gli"):
        get_scheme("brats2099")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"regions": {"WT": (1, 5)}}, "region WT"),
        ({"class_descriptions": ("one",)}, "descriptions"),
        ({"trained_regions": ("XX",)}, "trained regions"),
    ],
)
def test_a_malformed_scheme_is_refused(change, message):
    fields = dict(
        name="x",
        title="x",
        channels=("t1",),
        classes=("A", "B"),
        class_descriptions=("a", "b"),
        regions={"WT": (1, 2)},
        trained_regions=("WT",),
        regions_class_order=(1,),
        lesion=LesionSettings("brats2023", 3, 50.0),
        source="x",
    )
    with pytest.raises(ValueError, match=message):
        LabelScheme(**{**fields, **change})


def test_each_shipped_config_of_a_scheme_gives_the_model_its_channels_and_classes():
    from pathlib import Path

    from unet_trainer.commands.datasets import with_scheme
    from unet_trainer.config.config import resolve_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    named = {}
    for path in configs:
        cfg = resolve_config(path, [])
        if cfg["data"]["scheme"] != "auto":
            named[cfg["data"]["scheme"]] = cfg
            assert with_scheme(cfg, SCHEMES[cfg["data"]["scheme"]])[1] == [], path.name  # nothing to change
    assert {"brats2024-gli", "brats2024-ped", "brats-men-rt"} <= set(named)
