"""Lesion-wise (BraTS 2023) Dice and HD95: hand-computable cases, and the official package."""

import math

import numpy as np
import pytest
import torch

from unet_trainer.lesion_metrics import case_lesion_scores, hd95, region_lesion_scores

PENALTY = 374.0


def box(shape=(48, 48, 48), *boxes):
    """Boolean mask with the given boxes ((z0, z1), (y0, y1), (x0, x1)) set."""
    mask = np.zeros(shape, dtype=bool)
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        mask[z0:z1, y0:y1, x0:x1] = True
    return mask


CUBE = ((5, 15), (5, 15), (5, 15))  # 1000 voxels


def test_both_empty_scores_one_and_zero():
    empty = box()
    score = region_lesion_scores(empty, empty)
    assert (score.dice, score.hd95, score.lesions, score.false_positives) == (1.0, 0.0, 0, 0)


def test_empty_truth_every_component_is_a_false_positive():
    pred = box((48, 48, 48), CUBE, ((30, 32), (30, 32), (30, 32)))
    score = region_lesion_scores(pred, box())
    assert (score.dice, score.hd95, score.false_positives) == (0.0, PENALTY, 2)


def test_empty_prediction_misses_the_lesion():
    score = region_lesion_scores(box(), box((48, 48, 48), CUBE))
    assert (score.dice, score.hd95, score.lesions, score.detected) == (0.0, PENALTY, 1, 0)


def test_perfect_prediction():
    truth = box((48, 48, 48), CUBE)
    score = region_lesion_scores(truth.copy(), truth)
    assert (score.dice, score.hd95) == (1.0, 0.0)


def test_one_lesion_split_into_two_components_is_one_match():
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), ((5, 9), (5, 15), (5, 15)), ((11, 15), (5, 15), (5, 15)))
    score = region_lesion_scores(pred, truth)
    assert score.false_positives == 0 and score.lesions == 1
    assert score.dice == pytest.approx(2 * 800 / 1800)


@pytest.mark.parametrize("gap, lesions", [(6, 1), (7, 2)])
def test_lesions_closer_than_the_dilation_merge(gap, lesions):
    """Each lesion grows 3 voxels: a gap of 6 closes, a gap of 7 leaves them apart."""
    a = ((5, 15), (5, 15), (5, 15))
    b = ((15 + gap, 25 + gap), (5, 15), (5, 15))
    truth, pred = box((48, 48, 48), a, b), box((48, 48, 48), a)
    score = region_lesion_scores(pred, truth)
    assert score.lesions == lesions and score.false_positives == 0
    if lesions == 1:
        assert score.dice == pytest.approx(2 * 1000 / 3000)
    else:
        assert score.dice == pytest.approx(0.5) and score.hd95 == pytest.approx(PENALTY / 2)


def test_many_small_false_positives_dilute_both_scores():
    truth = box((48, 48, 48), CUBE)
    specks = [((30, 31), (5 + 4 * i, 6 + 4 * i), (40, 41)) for i in range(5)]
    pred = box((48, 48, 48), CUBE, *specks)
    score = region_lesion_scores(pred, truth)
    assert score.false_positives == 5
    assert score.dice == pytest.approx(1 / 6) and score.hd95 == pytest.approx(5 * PENALTY / 6)


def test_a_component_inside_the_dilation_but_outside_the_lesion_is_claimed():
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), CUBE, ((17, 18), (8, 9), (8, 9)))  # 2 voxels beyond the cube
    score = region_lesion_scores(pred, truth)
    assert score.false_positives == 0 and score.dice == pytest.approx(2000 / 2001)


@pytest.mark.parametrize("extra, counted", [(0, False), (1, True)])
def test_the_50_voxel_boundary(extra, counted):
    """A missed lesion of 50 voxels is dropped; one of 51 counts (Dice 0, HD95 penalty)."""
    truth = box((48, 48, 48), ((5, 7), (5, 10), (5, 10)))  # 2 x 5 x 5 = 50
    if extra:
        truth[7, 5, 5] = True
    score = region_lesion_scores(box(), truth)
    assert score.lesions == int(counted)
    assert (score.dice, score.hd95) == ((0.0, PENALTY) if counted else (1.0, 0.0))


def test_what_a_dropped_lesion_claims_is_no_false_positive():
    truth = box((48, 48, 48), CUBE, ((30, 32), (30, 35), (30, 35)))  # 1000 and 50 voxels
    score = region_lesion_scores(truth.copy(), truth)
    assert (score.lesions, score.false_positives, score.dice) == (1, 0, 1.0)


def test_settings_change_the_result():
    truth = box((48, 48, 48), ((5, 7), (5, 10), (5, 10)))
    assert region_lesion_scores(box(), truth, min_lesion_voxels=10, hd95_penalty=100.0).hd95 == 100.0
    a, b = ((5, 15), (5, 15), (5, 15)), ((21, 31), (5, 15), (5, 15))  # gap 6
    merged = region_lesion_scores(box((48, 48, 48), a), box((48, 48, 48), a, b), dilation_iterations=1)
    assert merged.lesions == 2


def test_hd95_scales_with_spacing_and_handles_empties():
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), ((7, 17), (5, 15), (5, 15)))
    one = hd95(pred, truth, (1.0, 1.0, 1.0))
    assert one > 0 and hd95(pred, truth, (2.0, 2.0, 2.0)) == pytest.approx(2 * one)
    assert hd95(box(), truth, (1.0, 1.0, 1.0)) == math.inf and hd95(box(), box(), (1, 1, 1)) == 0.0


@pytest.mark.parametrize("corner", [(0, 0, 0), (20, 20, 20), (38, 38, 38)])
def test_cropping_leaves_the_hd95_of_a_single_match_unchanged(corner):
    """One lesion, one overlapping component (also at the volume's edges): the lesion-wise HD95 is
    the plain HD95 of the two whole masks, and a false positive far away changes nothing but the
    count."""
    z, y, x = corner
    truth = box((48, 48, 48), ((z, z + 10), (y, y + 10), (x, x + 10)))
    pred = box((48, 48, 48), ((z, z + 9), (y + 1, y + 10), (x, x + 10)))
    pred[z : z + 3, y : y + 2, x : x + 2] = True  # a bump, so the distances are not all equal
    score = region_lesion_scores(pred, truth, spacing=(1.0, 2.0, 0.5))
    assert score.hd95 == pytest.approx(hd95(pred, truth, (1.0, 2.0, 0.5)), abs=1e-9) and score.hd95 > 0
    far = pred.copy()
    far[(z + 30) % 48, (y + 30) % 48, (x + 30) % 48] = True
    with_fp = region_lesion_scores(far, truth, spacing=(1.0, 2.0, 0.5))
    assert with_fp.false_positives == 1
    assert with_fp.hd95 == pytest.approx((score.hd95 + PENALTY) / 2) and with_fp.dice == pytest.approx(score.dice / 2)


def test_case_scores_use_the_brats_regions_and_accept_tensors():
    truth = np.zeros((48, 48, 48), dtype=np.uint8)
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 3  # 64 voxels of ET inside oedema
    pred = truth.copy()
    pred[8:12, 8:12, 8:12] = 2  # ET missed, WT perfect
    scores = case_lesion_scores(torch.from_numpy(pred), torch.from_numpy(truth))
    assert scores["lesion_dice/WT"] == 1.0 and scores["lesion_hd95/WT"] == 0.0
    assert scores["lesion_dice/ET"] == 0.0 and scores["lesion_hd95/ET"] == PENALTY
    assert scores["lesion_dice/TC"] == 0.0
    assert set(scores) == {f"lesion_{m}/{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")}


def ball(shape, center, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def _oracle_cases():
    """Label volumes on which the official package and the 2023 definition agree: every truth
    lesion above the size threshold, each overlapped by exactly one predicted component, no
    component within the dilation of another lesion, no false positives."""
    shape = (40, 44, 48)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[ball(shape, (12, 12, 12), 7)] = 2
    truth[ball(shape, (12, 12, 12), 4)] = 3
    truth[ball(shape, (28, 30, 34), 6)] = 2
    truth[ball(shape, (28, 30, 34), 3)] = 1
    pred = np.zeros(shape, dtype=np.uint8)
    pred[ball(shape, (13, 11, 12), 6)] = 2
    pred[ball(shape, (13, 12, 13), 4)] = 3
    pred[ball(shape, (27, 31, 33), 7)] = 2
    pred[ball(shape, (28, 30, 35), 2)] = 1
    yield "two lesions, shifted", pred, truth
    single_truth = np.where(ball(shape, (20, 22, 24), 8), 3, 0).astype(np.uint8)
    single_pred = np.where(ball(shape, (22, 22, 21), 6) | ball(shape, (16, 22, 24), 5), 3, 0).astype(np.uint8)
    yield "one lesion, lumpy prediction", single_pred, single_truth


@pytest.mark.parametrize("name, pred, truth", list(_oracle_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_equals_the_official_package_where_the_definitions_agree(name, pred, truth):
    brats_evaluation = pytest.importorskip("brats_evaluation")
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
    official = {k: r.to_dict(True) for k, r in evaluator.evaluate(pred, truth).items()}
    ours = case_lesion_scores(pred, truth)
    for region in ("WT", "TC", "ET"):
        group = official[region.lower()]
        assert group["fp"] == 0 and group["fn"] == 0
        assert ours[f"lesion_dice/{region}"] == pytest.approx(group["sq_dsc"], abs=1e-6)
        assert ours[f"lesion_hd95/{region}"] == pytest.approx(group["sq_hd95"], abs=1e-6)
