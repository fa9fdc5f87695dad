"""The ``panoptica`` metric definition (the ``brats-evaluation`` package): hand-computed cases that
separate it from the 2023 definition, the same numbers on both backends, and the package's own
numbers on random cases where it is installed (the ``oracle`` extra)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from unet_trainer.commands.builders import build_lesion_settings
from unet_trainer.config.config import resolve_config
from unet_trainer.data.schemes import SCHEMES
from unet_trainer.evaluation.lesion_metrics import (
    PANOPTICA_HD95_PENALTY,
    case_lesion_scores,
    case_region_hd95,
    region_lesion_scores,
)
from unet_trainer.evaluation.panoptica import match_instances

BACKENDS = ["scipy", "torch"]


def line(shape, *runs):
    """A bool volume holding the runs [start, stop) along the last axis of the middle row."""
    mask = np.zeros(shape, dtype=bool)
    for start, stop in runs:
        mask[1, 1, start:stop] = True
    return mask


def score(pred, truth, backend, spacing=(1.0, 1.0, 1.0), **kw):
    if backend == "torch":
        pred, truth = torch.from_numpy(pred), torch.from_numpy(truth)
    return region_lesion_scores(pred, truth, spacing, backend=backend, definition="panoptica", **kw)


def plain(pred, truth, backend, spacing=(1.0, 1.0, 1.0), definition="panoptica"):
    """The plain HD95 of one mask, as the single region of a one-class scheme."""
    pred_labels, true_labels = pred.astype(np.uint8), truth.astype(np.uint8)
    if backend == "torch":
        pred_labels, true_labels = torch.from_numpy(pred_labels), torch.from_numpy(true_labels)
    scheme = SCHEMES["brats-men-rt"]
    (value,) = case_region_hd95(
        pred_labels, true_labels, spacing, backend=backend, definition=definition, scheme=scheme
    ).values()
    return value


# Truth lesions A = [0, 20) and B = [21, 24); predicted components Y = [0, 6) and X = [7, 24).
# Dice A-X 26/37 = 0.703 is the best single pair, but A-Y (12/26) with B-X (6/20) sums higher:
# the one-to-one matching takes those two, where a greedy one would take A-X alone.
SHAPE = (3, 3, 30)
TRUTH = line(SHAPE, (0, 20), (21, 24))
PRED = line(SHAPE, (0, 6), (7, 24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matching_maximises_the_summed_dice_of_one_to_one_pairs(backend):
    truth_cc, n_truth = ndimage.label(TRUTH, structure=np.ones((3, 3, 3)))
    pred_cc, n_pred = ndimage.label(PRED, structure=np.ones((3, 3, 3)))
    if backend == "torch":
        truth_cc, pred_cc = torch.from_numpy(truth_cc), torch.from_numpy(pred_cc)
    matches = match_instances(truth_cc, n_truth, pred_cc, n_pred)
    assert [(t, p) for t, p, _ in matches] == [(1, 1), (2, 2)]  # A-Y, B-X
    assert [d for _, _, d in matches] == pytest.approx([12 / 26, 6 / 20])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lesion_wise_scores_are_means_over_the_matched_pairs(backend):
    """Dice (12/26 + 6/20) / 2; HD95 of A-Y: 26 pooled border distances (12 zeros, then 1..14), at
    0.95 * 25 = 23.75 -> 12.75; of B-X: 20 distances (6 zeros, 1..14), at 18.05 -> 13.05."""
    result = score(PRED, TRUTH, backend)
    assert result.dice == pytest.approx((12 / 26 + 6 / 20) / 2)
    assert result.hd95 == pytest.approx((12.75 + 13.05) / 2)
    assert (result.lesions, result.detected, result.false_positives) == (2, 2, 0)
    # Anisotropic: the runs lie along the 2 mm axis, so every distance doubles; Dice is unchanged.
    stretched = score(PRED, TRUTH, backend, spacing=(1.0, 1.0, 2.0))
    assert stretched.dice == pytest.approx(result.dice) and stretched.hd95 == pytest.approx(2 * result.hd95)
    # The 2023 definition merges A and B within its dilation and counts both components against them.
    brats2023 = region_lesion_scores(PRED, TRUTH, backend=backend, dilation_iterations=3, min_lesion_volume=0)
    assert brats2023.dice == pytest.approx(2 * 22 / (23 + 23)) and brats2023.lesions == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positives_and_misses_leave_the_matched_mean_alone(backend):
    truth = line(SHAPE, (2, 10))
    pred = line(SHAPE, (2, 10), (20, 25))  # exact, plus a false positive
    result = score(pred, truth, backend)
    assert (result.dice, result.hd95, result.false_positives) == (1.0, 0.0, 1)
    # The 2023 definition counts the false positive: (1 + 0) / 2 and (0 + 374) / 2.
    brats2023 = region_lesion_scores(pred, truth, backend=backend, min_lesion_volume=0)
    assert (brats2023.dice, brats2023.hd95) == (0.5, 187.0)
    missed = score(line(SHAPE, (2, 10)), line(SHAPE, (2, 10), (20, 25)), backend)
    assert (missed.dice, missed.lesions, missed.detected) == (1.0, 2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_without_a_match(backend):
    empty = np.zeros(SHAPE, dtype=bool)
    blob = line(SHAPE, (2, 10))
    elsewhere = line(SHAPE, (15, 20))
    # A false positive only, a miss only, and no overlap: Dice 0 and the penalty (373).
    for pred, truth in ((blob, empty), (empty, blob), (elsewhere, blob)):
        result = score(pred, truth, backend)
        assert (result.dice, result.hd95) == (0.0, PANOPTICA_HD95_PENALTY)
        assert plain(pred, truth, backend) == PANOPTICA_HD95_PENALTY
    # The 2023 plain HD95 of two disjoint masks is their distance, not a penalty.
    assert plain(elsewhere, blob, backend, definition="brats2023") < 20
    # Nothing on either side: NaN (left out of the means over cases); the 2023 definition says 1 and 0.
    nothing = score(empty, empty, backend)
    assert math.isnan(nothing.dice) and math.isnan(nothing.hd95)
    assert math.isnan(plain(empty, empty, backend)) and plain(empty, empty, backend, definition="brats2023") == 0.0
    assert score(blob, elsewhere, backend, hd95_penalty=100.0).hd95 == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_plain_hd95_is_in_voxels_as_panoptica_computes_it(backend):
    """Panoptica computes its global metrics without the spacing: the pooled border distances
    (16 zeros, then 1 and 2 at each end's shift: 2) give the same HD95 at 1 mm and at 2 mm."""
    truth, pred = line(SHAPE, (4, 14)), line(SHAPE, (6, 16))
    at_1mm = plain(pred, truth, backend)
    assert at_1mm == pytest.approx(float(np.percentile([0] * 8 + [1, 2] + [0] * 8 + [2, 1], 95)))
    assert plain(pred, truth, backend, spacing=(1.0, 1.0, 2.0)) == at_1mm
    # Its lesion-wise HD95 takes the spacing: the same one pair, twice the distances.
    assert score(pred, truth, backend, spacing=(1.0, 1.0, 2.0)).hd95 == pytest.approx(2 * at_1mm)


def test_the_config_takes_the_definitions_penalty_unless_it_sets_one():
    def settings(*overrides):
        return build_lesion_settings(resolve_config(None, list(overrides)))

    assert settings().definition == "brats2023" and settings().hd95_penalty is None
    chosen = settings("eval.lesion_definition=panoptica")
    assert chosen.definition == "panoptica"
    assert settings("eval.lesion_definition=panoptica", "eval.lesion_hd95_penalty=200").hd95_penalty == 200.0


def _random_case(rng, shape=(28, 32, 36)):
    """Three nested classes of smoothed noise, so each region has several lesions of odd shapes."""
    labels = np.zeros(shape, dtype=np.uint8)
    for value in (2, 1, 3):
        labels[ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.51 + 0.015 * rng.random()] = value
    return labels


def _oracle_cases():
    rng = np.random.default_rng(7)
    for index in range(8):
        truth = _random_case(rng)
        pred = np.roll(truth, tuple(rng.integers(-3, 4, 3)), axis=(0, 1, 2)) if index % 2 else _random_case(rng)
        if index == 3:
            pred[pred == 3] = 0  # ET missed
        if index == 5:
            truth[truth == 3], pred[pred == 3] = 0, 0  # ET on neither side
        yield index, pred, truth, (1.0, 1.0, 1.0) if index % 3 else (1.5, 0.8, 1.2)


ORACLE_CASES = list(_oracle_cases())


@pytest.mark.parametrize("index, pred, truth, spacing", ORACLE_CASES, ids=[f"case{c[0]}" for c in ORACLE_CASES])
def test_equals_the_official_package(index, pred, truth, spacing):
    """Lesion-wise Dice and HD95 (``sq_dsc``, ``sq_hd95``) and the plain HD95 (``global_bin_hd95``)
    of brats-evaluation's GLI config, with the parser's 373 for an infinite HD95, on both backends."""
    brats_evaluation = pytest.importorskip("brats_evaluation")
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
    official = {k: r.to_dict(True) for k, r in evaluator.evaluate(pred, truth, voxelspacing=spacing).items()}
    scheme = SCHEMES["brats2023-gli"]
    for backend in BACKENDS:
        p, t = (torch.from_numpy(pred), torch.from_numpy(truth)) if backend == "torch" else (pred, truth)
        ours = case_lesion_scores(p, t, spacing, backend=backend, definition="panoptica", scheme=scheme)
        ours.update(case_region_hd95(p, t, spacing, backend=backend, definition="panoptica", scheme=scheme))
        for region in scheme.regions:
            group = official[region.lower()]
            for key, theirs in (
                (f"lesion_dice/{region}", group["sq_dsc"]),
                (f"lesion_hd95/{region}", group["sq_hd95"]),
                (f"hd95/{region}", group["global_bin_hd95"]),
            ):
                theirs = math.nan if theirs is None else PANOPTICA_HD95_PENALTY if math.isinf(theirs) else theirs
                got = ours[key]
                assert (math.isnan(got) and math.isnan(theirs)) or got == pytest.approx(theirs, abs=1e-6), (
                    backend,
                    key,
                    got,
                    theirs,
                )
