"""Pins of the augmenter's outputs for fixed seeds, recorded from the code before the transform list.

A refactor of unet_trainer/training/augment.py or its transforms must leave what a seed means unchanged:
the same flips, firing samples and parameter values, and the same augmented image and label, batch after
batch and across a state_dict round trip (so old checkpoints resume exactly). The values below were recorded
once from the code as it stood (commit f511fd8) and are compared here:

- the parameters (drawn from a CPU Mersenne Twister in float64, then rounded to float32) and the
  labels (only flipped) exactly;
- the augmented image's sums and a handful of voxels to 1e-6: the noise (``torch.randn``) and the
  blur weights (``exp``) may differ by an ulp between CPU vector units.

The augmenter is built through ``builders.build_augmenter`` from a config's augmentation section,
the surface a run uses; ``drawn_parameters`` is the one place that reads the parameter objects.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from unet_trainer.commands.builders import build_augmenter
from unet_trainer.config.config import defaults

SEED = 20261208  # a seed under which, with the default settings, every transform fires in the pinned batches
BATCHES = 2

DEFAULT_SECTIONS = {
    "enabled": True,
    "flip": {"p": 0.5},
    "noise": {"p": 0.15, "std": [0.0, 0.33]},
    "blur": {"p": 0.15, "sigma": [0.5, 1.5]},
    "brightness": {"p": 0.15, "scale": [0.7, 1.3]},
    "contrast": {"p": 0.15, "scale": [0.65, 1.5]},
}
ALWAYS_SECTIONS = {
    name: ({**section, "p": 1.0} if isinstance(section, dict) else section)
    for name, section in DEFAULT_SECTIONS.items()
}
SETTINGS = {"default": DEFAULT_SECTIONS, "always": ALWAYS_SECTIONS}
SPATIAL = {3: (16, 16, 16), 2: (32, 32)}
# How many voxels of the augmented image are pinned, evenly spaced over its flat (B, C, *S) index.
PINNED_VOXELS = 13


def make_augmenter(settings: str, spatial_dims: int, seed: int = SEED):
    # The appended transforms at their defaults (off): the pins are the recipe's five.
    sections = {**defaults()["augmentation"], **copy.deepcopy(SETTINGS[settings])}
    cfg = {
        "augmentation": sections,
        "model": {"unet": {"spatial_dims": spatial_dims}},
        "data": {"patch_size": list(SPATIAL[spatial_dims])},
    }
    return build_augmenter(cfg, torch.device("cpu"), seed)


def make_batch(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (4, 4, *S) image and (4, 1, *S) int64 label; torch.rand and randint are bitwise the same on any CPU."""
    generator = torch.Generator().manual_seed(5)
    image = torch.rand((4, 4, *SPATIAL[spatial_dims]), generator=generator) * 4.0 - 2.0
    label = torch.randint(0, 4, (4, 1, *SPATIAL[spatial_dims]), generator=generator)
    return image, label


def drawn_parameters(augmenter) -> dict:
    """The latest batch's parameters as plain lists: flip axes per sample, then (fires, value) per transform."""
    p = augmenter.last_params
    return {
        "flip": p["flip"].axes.tolist(),
        **{
            name: [p[name].fires.tolist(), p[name].value.tolist()]
            for name in ("noise", "blur", "brightness", "contrast")
        },
    }


def summarise(augmenter, image: torch.Tensor, label: torch.Tensor) -> dict:
    """Augment one batch and summarise it: the parameters, image statistics and voxels, the label's digest."""
    out_image, out_label = augmenter(image, label)
    flat = out_image.double().flatten()
    return {
        "parameters": drawn_parameters(augmenter),
        "image_sum": flat.sum().item(),
        "image_square_sum": flat.square().sum().item(),
        "sample_sums": out_image.double().flatten(1).sum(dim=1).tolist(),
        "voxels": flat[torch.linspace(0, flat.numel() - 1, PINNED_VOXELS).long()].tolist(),
        "label_sha256": hashlib.sha256(out_label.numpy().tobytes()).hexdigest(),
    }


def record(settings: str, spatial_dims: int) -> list[dict]:
    """Summaries of BATCHES consecutive batches (the same input each time)."""
    augmenter = make_augmenter(settings, spatial_dims)
    image, label = make_batch(spatial_dims)
    return [summarise(augmenter, image, label) for _ in range(BATCHES)]


def assert_matches(got: dict, pinned: dict) -> None:
    assert got["parameters"] == pinned["parameters"]
    assert got["label_sha256"] == pinned["label_sha256"]
    for key in ("image_sum", "image_square_sum", "sample_sums", "voxels"):
        assert got[key] == pytest.approx(pinned[key], rel=1e-6, abs=1e-6), key


# Recorded from commit f511fd8 (before the transform list) with record(settings, spatial_dims).
PINNED: dict[tuple[str, int], list[dict]] = {
    ("default", 3): [
        {
            "parameters": {
                "flip": [[True, True, True], [True, False, True], [True, True, False], [True, True, True]],
                "noise": [
                    [True, False, False, True],
                    [0.09208612889051437, 0.1746632158756256, 0.17956173419952393, 0.3169861137866974],
                ],
                "blur": [
                    [False, False, False, False],
                    [1.0944552421569824, 0.7208651900291443, 1.4053444862365723, 0.9604421257972717],
                ],
                "brightness": [
                    [True, False, True, False],
                    [0.7023087739944458, 0.9294651746749878, 1.0335509777069092, 0.9754775762557983],
                ],
                "contrast": [
                    [False, False, False, True],
                    [0.6502237915992737, 0.9007797837257385, 0.7968243360519409, 1.0644726753234863],
                ],
            },
            "image_sum": 267.91210767746816,
            "image_square_sum": 82573.45223315342,
            "sample_sums": [-150.811603635113, 111.7563362121582, 84.08357650075777, 222.88379859966517],
            "voxels": [
                1.0341042280197144,
                -1.0054428577423096,
                0.9506812691688538,
                -0.6175311207771301,
                -1.407463788986206,
                -1.1507036685943604,
                -0.1335315704345703,
                1.2971982955932617,
                0.31900060176849365,
                1.3908207416534424,
                1.9361934661865234,
                1.6698611974716187,
                -0.5943536162376404,
            ],
            "label_sha256": "2508571ac6cf85e80a6c2d041f9c8e19f9dda4e6d56d51535c43d5876fda7f71",
        },
        {
            "parameters": {
                "flip": [[True, False, True], [False, True, False], [False, True, False], [True, True, False]],
                "noise": [
                    [False, False, False, False],
                    [0.20709441602230072, 0.007105532102286816, 0.007983668707311153, 0.3047814965248108],
                ],
                "blur": [
                    [True, False, False, False],
                    [0.8854686617851257, 1.4779613018035889, 1.2458680868148804, 0.7740268707275391],
                ],
                "brightness": [
                    [True, False, True, False],
                    [1.199934959411621, 1.2907662391662598, 1.2669315338134766, 1.025400996208191],
                ],
                "contrast": [
                    [False, False, True, True],
                    [1.2386620044708252, 0.730654239654541, 1.0981231927871704, 0.7283109426498413],
                ],
            },
            "image_sum": 70.62013382430132,
            "image_square_sum": 76511.08836046021,
            "sample_sums": [-326.2366632831054, 111.7563362121582, 110.28302525252002, 174.81743564272847],
            "voxels": [
                0.46650752425193787,
                -0.10509312152862549,
                -0.18323391675949097,
                0.20049603283405304,
                0.3747856616973877,
                0.2677140235900879,
                0.11521434783935547,
                0.17982237040996552,
                -2.5330910682678223,
                1.579902172088623,
                -0.08815934509038925,
                0.9974778890609741,
                -0.9184879064559937,
            ],
            "label_sha256": "da561a4840a698c6dec9e9874c6804dfbfb4a034cd3144eabfd4011b26f670a6",
        },
    ],
    ("default", 2): [
        {
            "parameters": {
                "flip": [[True, True], [True, True], [False, True], [False, False]],
                "noise": [
                    [False, False, True, False],
                    [0.03132904693484306, 0.047211747616529465, 0.028424223884940147, 0.08634848147630692],
                ],
                "blur": [
                    [False, False, False, False],
                    [1.1301183700561523, 1.0292824506759644, 1.0750679969787598, 0.9024475812911987],
                ],
                "brightness": [
                    [False, False, False, True],
                    [0.7336623072624207, 0.8325191140174866, 1.1497818231582642, 1.2763383388519287],
                ],
                "contrast": [
                    [True, False, False, False],
                    [1.44945228099823, 0.9750756621360779, 0.7081576585769653, 1.0413758754730225],
                ],
            },
            "image_sum": -289.80865328524305,
            "image_square_sum": 28688.130328033243,
            "sample_sums": [-281.10417941061314, 49.167503118515015, -96.94213356263936, 39.07015656949443],
            "voxels": [
                -0.9573363661766052,
                -1.999913215637207,
                1.1168644428253174,
                1.9999239444732666,
                1.7626149654388428,
                -1.6009459495544434,
                1.5370230674743652,
                1.9814863204956055,
                1.9831489324569702,
                -0.01724216155707836,
                -1.5403492450714111,
                -2.239236831665039,
                0.8378541469573975,
            ],
            "label_sha256": "bac6e13abfcb2c18a525a0331ae8eb825aa1a664485552a1b42930a15de62a43",
        },
        {
            "parameters": {
                "flip": [[True, True], [True, True], [True, False], [True, True]],
                "noise": [
                    [True, False, False, False],
                    [0.1609129160642624, 0.12025470286607742, 0.3249214291572571, 0.012618989683687687],
                ],
                "blur": [
                    [False, False, False, False],
                    [1.0485050678253174, 1.3179926872253418, 0.594887375831604, 0.5195465683937073],
                ],
                "brightness": [
                    [False, True, False, False],
                    [1.0106765031814575, 1.056409239768982, 0.9178637862205505, 0.8571537733078003],
                ],
                "contrast": [
                    [False, False, False, True],
                    [0.7297202348709106, 0.6683021187782288, 1.165013313293457, 1.3615936040878296],
                ],
            },
            "image_sum": -196.97610483994868,
            "image_square_sum": 25483.356970733665,
            "sample_sums": [-202.63245429098606, 51.941005900967866, -97.11437916755676, 50.82972271762628],
            "voxels": [
                -0.8572708368301392,
                -1.4499409198760986,
                0.7413359880447388,
                1.2923444509506226,
                1.862042784690857,
                -1.6912541389465332,
                1.623725414276123,
                0.7209267616271973,
                -0.643787145614624,
                1.550158977508545,
                -1.8889436721801758,
                1.0997344255447388,
                0.6873432993888855,
            ],
            "label_sha256": "17b330ce4d32022f45ba2bddb2189cda2bac2b32c24de48261a8e84919a646d3",
        },
    ],
    ("always", 3): [
        {
            "parameters": {
                "flip": [[True, True, True], [True, True, True], [True, True, True], [True, True, True]],
                "noise": [
                    [True, True, True, True],
                    [0.09208612889051437, 0.1746632158756256, 0.17956173419952393, 0.3169861137866974],
                ],
                "blur": [
                    [True, True, True, True],
                    [1.0944552421569824, 0.7208651900291443, 1.4053444862365723, 0.9604421257972717],
                ],
                "brightness": [
                    [True, True, True, True],
                    [0.7023087739944458, 0.9294651746749878, 1.0335509777069092, 0.9754775762557983],
                ],
                "contrast": [
                    [True, True, True, True],
                    [0.6502237915992737, 0.9007797837257385, 0.7968243360519409, 1.0644726753234863],
                ],
            },
            "image_sum": 333.7128402233129,
            "image_square_sum": 3542.1968117320876,
            "sample_sums": [-120.73671360880144, 112.84088332632018, 34.78075547388471, 306.82791503190947],
            "voxels": [
                0.0638570785522461,
                0.048668645322322845,
                -0.0004984469269402325,
                -0.218908429145813,
                -0.1920294314622879,
                -0.10785935074090958,
                -0.12284038960933685,
                -0.346415638923645,
                -0.07167479395866394,
                0.19535823166370392,
                -0.0020636997651308775,
                0.39490997791290283,
                0.0982200875878334,
            ],
            "label_sha256": "c3731dd899afc37476b65ccc8263029f974dd7b796759b43c3cfd51f38830cf7",
        },
        {
            "parameters": {
                "flip": [[True, True, True], [True, True, True], [True, True, True], [True, True, True]],
                "noise": [
                    [True, True, True, True],
                    [0.20709441602230072, 0.007105532102286816, 0.007983668707311153, 0.3047814965248108],
                ],
                "blur": [
                    [True, True, True, True],
                    [0.8854686617851257, 1.4779613018035889, 1.2458680868148804, 0.7740268707275391],
                ],
                "brightness": [
                    [True, True, True, True],
                    [1.199934959411621, 1.2907662391662598, 1.2669315338134766, 1.025400996208191],
                ],
                "contrast": [
                    [True, True, True, True],
                    [1.2386620044708252, 0.730654239654541, 1.0981231927871704, 0.7283109426498413],
                ],
            },
            "image_sum": 12.770776946530304,
            "image_square_sum": 6693.392697877497,
            "sample_sums": [-412.21156149544186, 151.89916088921086, 75.61596105174613, 197.46721650101517],
            "voxels": [
                0.6385524272918701,
                0.20715965330600739,
                -0.03833378851413727,
                -0.6935855150222778,
                -0.0642482116818428,
                -0.02682124823331833,
                -0.007790791802108288,
                -0.5584802031517029,
                0.03902212157845497,
                0.19108228385448456,
                0.10638359189033508,
                0.19799675047397614,
                -0.08841671794652939,
            ],
            "label_sha256": "c3731dd899afc37476b65ccc8263029f974dd7b796759b43c3cfd51f38830cf7",
        },
    ],
    ("always", 2): [
        {
            "parameters": {
                "flip": [[True, True], [True, True], [True, True], [True, True]],
                "noise": [
                    [True, True, True, True],
                    [0.03132904693484306, 0.047211747616529465, 0.028424223884940147, 0.08634848147630692],
                ],
                "blur": [
                    [True, True, True, True],
                    [1.1301183700561523, 1.0292824506759644, 1.0750679969787598, 0.9024475812911987],
                ],
                "brightness": [
                    [True, True, True, True],
                    [0.7336623072624207, 0.8325191140174866, 1.1497818231582642, 1.2763383388519287],
                ],
                "contrast": [
                    [True, True, True, True],
                    [1.44945228099823, 0.9750756621360779, 0.7081576585769653, 1.0413758754730225],
                ],
            },
            "image_sum": -229.80032308057434,
            "image_square_sum": 3121.2865163339216,
            "sample_sums": [-227.04313890202866, 30.07057654507753, -86.83207278238842, 54.00431205876521],
            "voxels": [
                0.6535587310791016,
                -0.7076690793037415,
                -0.186415895819664,
                0.6127480864524841,
                0.4561212956905365,
                0.020595768466591835,
                0.7740640044212341,
                0.11990778893232346,
                -0.2343229353427887,
                0.21680256724357605,
                -0.20759201049804688,
                -0.9286291599273682,
                1.3345270156860352,
            ],
            "label_sha256": "f087c75e7eb937fb928aa146c523060474540b53caf9cef9b9699567589561e2",
        },
        {
            "parameters": {
                "flip": [[True, True], [True, True], [True, True], [True, True]],
                "noise": [
                    [True, True, True, True],
                    [0.1609129160642624, 0.12025470286607742, 0.3249214291572571, 0.012618989683687687],
                ],
                "blur": [
                    [True, True, True, True],
                    [1.0485050678253174, 1.3179926872253418, 0.594887375831604, 0.5195465683937073],
                ],
                "brightness": [
                    [True, True, True, True],
                    [1.0106765031814575, 1.056409239768982, 0.9178637862205505, 0.8571537733078003],
                ],
                "contrast": [
                    [True, True, True, True],
                    [0.7297202348709106, 0.6683021187782288, 1.165013313293457, 1.3615936040878296],
                ],
            },
            "image_sum": -214.75203026777126,
            "image_square_sum": 5283.949361924008,
            "sample_sums": [-166.17003371799728, 22.67814891029957, -107.54715293319168, 36.28700747311814],
            "voxels": [
                0.34681299328804016,
                -0.5149287581443787,
                -0.12927597761154175,
                0.36006975173950195,
                0.3146122694015503,
                0.0652659609913826,
                0.6969972848892212,
                0.7508664727210999,
                -0.8894826769828796,
                0.6043393611907959,
                -0.8706730008125305,
                -0.102602519094944,
                0.7671001553535461,
            ],
            "label_sha256": "f087c75e7eb937fb928aa146c523060474540b53caf9cef9b9699567589561e2",
        },
    ],
}


@pytest.mark.parametrize("settings, spatial_dims", sorted(PINNED))
def test_consecutive_batches_match_the_pins(settings, spatial_dims):
    got = record(settings, spatial_dims)
    assert len(got) == len(PINNED[settings, spatial_dims])
    for summary, pinned in zip(got, PINNED[settings, spatial_dims]):
        assert_matches(summary, pinned)


@pytest.mark.parametrize("settings, spatial_dims", sorted(PINNED))
def test_state_dict_round_trip_continues_at_the_pinned_second_batch(settings, spatial_dims):
    image, label = make_batch(spatial_dims)
    first = make_augmenter(settings, spatial_dims)
    first(image, label)
    state = first.state_dict()
    # Another seed, so that only the loaded state can make it match.
    resumed = make_augmenter(settings, spatial_dims, seed=SEED + 1)
    resumed.load_state_dict(state)
    assert_matches(summarise(resumed, image, label), PINNED[settings, spatial_dims][1])


def test_every_case_is_pinned_and_the_always_settings_fire_everything():
    assert sorted(PINNED) == sorted((s, d) for s in SETTINGS for d in SPATIAL)
    for (settings, _), batches in PINNED.items():
        for summary in batches:
            parameters = summary["parameters"]
            if settings == "always":
                assert all(all(axes) for axes in parameters["flip"])
                assert all(all(parameters[name][0]) for name in ("noise", "blur", "brightness", "contrast"))
    # With the default settings every transform fires in the pinned batches, on some samples only, and at least
    # once on samples that are not one contiguous run (the gather/scatter path, not the view).
    for name in ("noise", "blur", "brightness", "contrast"):
        fired = [
            summary["parameters"][name][0]
            for (settings, _), batches in PINNED.items()
            if settings == "default"
            for summary in batches
        ]
        assert any(any(f) for f in fired) and not all(all(f) for f in fired), name

    def is_scattered(fires: list[bool]) -> bool:
        firing = [index for index, fired in enumerate(fires) if fired]
        return bool(firing) and firing[-1] - firing[0] + 1 != len(firing)

    assert any(
        is_scattered(summary["parameters"][name][0])
        for (settings, _), batches in PINNED.items()
        if settings == "default"
        for summary in batches
        for name in ("noise", "blur", "brightness", "contrast")
    )
