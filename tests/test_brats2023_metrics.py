"""The ``brats2023`` definition against hand-computed values, on cases that separate it from a
count of voxels and from NaN for empty regions: the size threshold in mm³ on 1x1x3 mm voxels,
lesions merged within the dilation, a false positive, empty on one side and on both, and the
HD95 on anisotropic spacing. Each case runs on both backends (torch on the CPU here)."""

import numpy as np
import pytest
import torch

from unet_trainer.evaluation.lesion_metrics import (
    DEFAULT_DILATION_ITERATIONS,
    DEFAULT_MIN_LESION_VOLUME,
    case_region_hd95,
    region_lesion_scores,
)

PENALTY = 374.0
SHAPE = (24, 24, 24)


@pytest.fixture(params=["scipy", "torch"])
def backend(request):
    return request.param


def mask(*boxes):
    out = np.zeros(SHAPE, dtype=bool)
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        out[z0:z1, y0:y1, x0:x1] = True
    return out


def labels(*boxes, value=3):
    return np.where(mask(*boxes), value, 0).astype(np.uint8)


@pytest.mark.parametrize("voxels, counted", [(16, False), (17, True)])
def test_the_size_threshold_is_a_volume_in_mm3(voxels, counted, backend):
    """On 1x1x3 mm voxels a missed lesion of 16 voxels is 48 mm³ (dropped: nothing to count, Dice 1,
    HD95 0), one of 17 voxels is 51 mm³ (counted: Dice 0, HD95 374); a count of voxels would
    drop both (at or below 50)."""
    truth = mask(((5, 6), (5, 6), (5, 5 + voxels)))
    score = region_lesion_scores(np.zeros(SHAPE, bool), truth, spacing=(1.0, 1.0, 3.0), backend=backend)
    assert (score.dice, score.hd95, score.lesions) == ((0.0, PENALTY, 1) if counted else (1.0, 0.0, 0))


def test_lesions_within_the_dilation_are_one_lesion(backend):
    """Two 1000-voxel cubes 6 voxels apart merge (each grows 3); a prediction of one of them scores
    2 * 1000 / (2000 + 1000) against the merged lesion, no false positive."""
    a, b = ((2, 8), (2, 12), (2, 12)), ((14, 20), (2, 12), (2, 12))  # 600 voxels each, gap 6
    score = region_lesion_scores(mask(a), mask(a, b), backend=backend)
    assert (score.lesions, score.false_positives) == (1, 0)
    assert score.dice == pytest.approx(2 * 600 / 1800)


def test_a_false_positive_scores_dice_0_and_hd95_374(backend):
    """A perfect lesion (Dice 1, HD95 0) and a far false positive: (1 + 0) / 2 and (0 + 374) / 2."""
    lesion = ((2, 8), (2, 8), (2, 8))
    score = region_lesion_scores(mask(lesion, ((20, 22), (20, 22), (20, 22))), mask(lesion), backend=backend)
    assert (score.dice, score.hd95, score.false_positives) == (0.5, PENALTY / 2, 1)


def test_empty_on_one_side_and_on_both(backend):
    """Plain HD95: 374 when a region is empty on one side only, 0 when empty on both; lesion-wise:
    the missed lesion scores Dice 0 and HD95 374, nothing to count Dice 1 and HD95 0."""
    tumour = labels(((4, 10), (4, 10), (4, 10)), value=2)  # oedema only: WT present, TC and ET empty
    empty = np.zeros(SHAPE, np.uint8)
    plain = case_region_hd95(empty, tumour, (1.0, 1.0, 1.0), backend=backend)
    assert plain == {"hd95/WT": PENALTY, "hd95/TC": 0.0, "hd95/ET": 0.0}
    assert case_region_hd95(tumour, tumour, (1.0, 1.0, 1.0), backend=backend)["hd95/WT"] == 0.0
    missed = region_lesion_scores(np.zeros(SHAPE, bool), tumour > 0, backend=backend)
    assert (missed.dice, missed.hd95) == (0.0, PENALTY)
    nothing = region_lesion_scores(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), backend=backend)
    assert (nothing.dice, nothing.hd95) == (1.0, 0.0)


def test_hd95_on_anisotropic_spacing(backend):
    """One voxel, and the same voxel one step along x (3 mm): of the 8 equal-area surface elements
    around each voxel, 4 are shared (distance 0) and 4 lie one x step from the other's (3 mm), so
    the 95th percentile is 3.0 mm. A box shifted one voxel along z (1 mm, the finest axis): every
    surface element is 0 or 1 mm from the other's, more than 5 % of the area at 1 mm: 1.0 mm."""
    one = labels(((10, 11), (10, 11), (10, 11)))
    beside = labels(((10, 11), (10, 11), (11, 12)))
    spacing = (1.0, 2.0, 3.0)
    if backend == "torch":
        one, beside = torch.from_numpy(one), torch.from_numpy(beside)
    assert case_region_hd95(beside, one, spacing, backend=backend)["hd95/ET"] == pytest.approx(3.0)
    box = ((4, 10), (5, 12), (6, 14))
    shifted = ((5, 11), (5, 12), (6, 14))
    plain = case_region_hd95(labels(shifted), labels(box), spacing, backend=backend)
    assert plain["hd95/ET"] == pytest.approx(1.0)
    lesion = region_lesion_scores(mask(shifted), mask(box), spacing=spacing, backend=backend)
    assert lesion.hd95 == pytest.approx(1.0) and lesion.dice == pytest.approx(2 * 5 / 12)


def test_the_sub_challenge_parameters():
    from unet_trainer.data.schemes import SCHEMES

    table = {
        name: (
            SCHEMES[f"brats2023-{name.lower()}"].lesion.dilation,
            SCHEMES[f"brats2023-{name.lower()}"].lesion.min_volume,
        )
        for name in ("GLI", "SSA", "PED", "MEN", "MET")
    }
    assert table == {"GLI": (3, 50.0), "SSA": (3, 50.0), "PED": (3, 50.0), "MEN": (1, 50.0), "MET": (1, 2.0)}
    assert (DEFAULT_DILATION_ITERATIONS, DEFAULT_MIN_LESION_VOLUME) == (3, 50.0)


def test_the_old_voxel_key_reads_as_the_volume_with_one_note(capsys):
    from unet_trainer.config.components import upgrade_config
    from unet_trainer.config.config import ConfigError, defaults, resolve_config, resolve_from_base

    cfg = resolve_config(None, ["eval.lesion_min_voxels=10"])
    assert cfg["eval"]["lesion_min_volume"] == 10.0 and "lesion_min_voxels" not in cfg["eval"]
    err = capsys.readouterr().err
    assert err.count("'eval.lesion_min_voxels' is read as 'eval.lesion_min_volume'") == 1
    old = defaults()
    old["eval"].pop("lesion_min_volume")
    old["eval"]["lesion_min_voxels"] = 50  # as an old checkpoint wrote its resolved default
    assert resolve_from_base(old, [], source="old.pt")["eval"]["lesion_min_volume"] == 50.0
    assert upgrade_config(old, "old.pt")["eval"]["lesion_min_volume"] == 50.0
    with pytest.raises(ConfigError, match="'eval.lesion_min_voxels' and 'eval.lesion_min_volume' are both set"):
        resolve_config(None, ["eval.lesion_min_voxels=10", "eval.lesion_min_volume=5"])
