"""Lesion-wise (BraTS 2023) Dice and HD95: hand-computable cases (on every backend), the torch
backend against the SciPy one on random and adversarial shapes, and the official package."""

import math

import numpy as np
import pytest
import torch

from unet_trainer.evaluation.lesion_metrics import case_lesion_scores, region_lesion_scores
from unet_trainer.evaluation.surface_distance import hd95

PENALTY = 374.0


@pytest.fixture(params=["scipy", "torch"])
def backend(request):
    """Each hand-computed case runs on both backends (torch on the CPU here)."""
    return request.param


def box(shape=(48, 48, 48), *boxes):
    """Boolean mask with the given boxes ((z0, z1), (y0, y1), (x0, x1)) set."""
    mask = np.zeros(shape, dtype=bool)
    for (z0, z1), (y0, y1), (x0, x1) in boxes:
        mask[z0:z1, y0:y1, x0:x1] = True
    return mask


CUBE = ((5, 15), (5, 15), (5, 15))  # 1000 voxels


def test_both_empty_scores_one_and_zero(backend):
    empty = box()
    score = region_lesion_scores(empty, empty, backend=backend)
    assert (score.dice, score.hd95, score.lesions, score.false_positives) == (1.0, 0.0, 0, 0)


def test_empty_truth_every_component_is_a_false_positive(backend):
    pred = box((48, 48, 48), CUBE, ((30, 32), (30, 32), (30, 32)))
    score = region_lesion_scores(pred, box(), backend=backend)
    assert (score.dice, score.hd95, score.false_positives) == (0.0, PENALTY, 2)


def test_empty_prediction_misses_the_lesion(backend):
    score = region_lesion_scores(box(), box((48, 48, 48), CUBE), backend=backend)
    assert (score.dice, score.hd95, score.lesions, score.detected) == (0.0, PENALTY, 1, 0)


def test_perfect_prediction(backend):
    truth = box((48, 48, 48), CUBE)
    score = region_lesion_scores(truth.copy(), truth, backend=backend)
    assert (score.dice, score.hd95) == (1.0, 0.0)


def test_one_lesion_split_into_two_components_is_one_match(backend):
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), ((5, 9), (5, 15), (5, 15)), ((11, 15), (5, 15), (5, 15)))
    score = region_lesion_scores(pred, truth, backend=backend)
    assert score.false_positives == 0 and score.lesions == 1
    assert score.dice == pytest.approx(2 * 800 / 1800)


@pytest.mark.parametrize("gap, lesions", [(6, 1), (7, 2)])
def test_lesions_closer_than_the_dilation_merge(gap, lesions, backend):
    """Each lesion grows 3 voxels: a gap of 6 closes, a gap of 7 leaves them apart."""
    a = ((5, 15), (5, 15), (5, 15))
    b = ((15 + gap, 25 + gap), (5, 15), (5, 15))
    truth, pred = box((48, 48, 48), a, b), box((48, 48, 48), a)
    score = region_lesion_scores(pred, truth, backend=backend)
    assert score.lesions == lesions and score.false_positives == 0
    if lesions == 1:
        assert score.dice == pytest.approx(2 * 1000 / 3000)
    else:
        assert score.dice == pytest.approx(0.5) and score.hd95 == pytest.approx(PENALTY / 2)


def test_many_small_false_positives_dilute_both_scores(backend):
    truth = box((48, 48, 48), CUBE)
    specks = [((30, 31), (5 + 4 * i, 6 + 4 * i), (40, 41)) for i in range(5)]
    pred = box((48, 48, 48), CUBE, *specks)
    score = region_lesion_scores(pred, truth, backend=backend)
    assert score.false_positives == 5
    assert score.dice == pytest.approx(1 / 6) and score.hd95 == pytest.approx(5 * PENALTY / 6)


def test_a_component_inside_the_dilation_but_outside_the_lesion_is_claimed(backend):
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), CUBE, ((17, 18), (8, 9), (8, 9)))  # 2 voxels beyond the cube
    score = region_lesion_scores(pred, truth, backend=backend)
    assert score.false_positives == 0 and score.dice == pytest.approx(2000 / 2001)


@pytest.mark.parametrize("extra, counted", [(0, False), (1, True)])
def test_the_50_voxel_boundary(extra, counted, backend):
    """A missed lesion of 50 voxels is dropped; one of 51 counts (Dice 0, HD95 penalty)."""
    truth = box((48, 48, 48), ((5, 7), (5, 10), (5, 10)))  # 2 x 5 x 5 = 50
    if extra:
        truth[7, 5, 5] = True
    score = region_lesion_scores(box(), truth, backend=backend)
    assert score.lesions == int(counted)
    assert (score.dice, score.hd95) == ((0.0, PENALTY) if counted else (1.0, 0.0))


def test_what_a_dropped_lesion_claims_is_no_false_positive(backend):
    truth = box((48, 48, 48), CUBE, ((30, 32), (30, 35), (30, 35)))  # 1000 and 50 voxels
    score = region_lesion_scores(truth.copy(), truth, backend=backend)
    assert (score.lesions, score.false_positives, score.dice) == (1, 0, 1.0)


def test_settings_change_the_result(backend):
    truth = box((48, 48, 48), ((5, 7), (5, 10), (5, 10)))
    assert region_lesion_scores(box(), truth, min_lesion_volume=10, hd95_penalty=100.0, backend=backend).hd95 == 100.0
    a, b = ((5, 15), (5, 15), (5, 15)), ((21, 31), (5, 15), (5, 15))  # gap 6
    merged = region_lesion_scores(box((48, 48, 48), a), box((48, 48, 48), a, b), dilation_iterations=1, backend=backend)
    assert merged.lesions == 2


def test_hd95_scales_with_spacing_and_handles_empties():
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), ((7, 17), (5, 15), (5, 15)))
    one = hd95(pred, truth, (1.0, 1.0, 1.0))
    assert one > 0 and hd95(pred, truth, (2.0, 2.0, 2.0)) == pytest.approx(2 * one)
    assert hd95(box(), truth, (1.0, 1.0, 1.0)) == math.inf and hd95(box(), box(), (1, 1, 1)) == 0.0


@pytest.mark.parametrize("corner", [(0, 0, 0), (20, 20, 20), (38, 38, 38)])
def test_cropping_leaves_the_hd95_of_a_single_match_unchanged(corner, backend):
    """One lesion, one overlapping component (also at the volume's edges): the lesion-wise HD95 is
    the plain HD95 of the two whole masks, and a false positive far away changes nothing but the
    count."""
    z, y, x = corner
    truth = box((48, 48, 48), ((z, z + 10), (y, y + 10), (x, x + 10)))
    pred = box((48, 48, 48), ((z, z + 9), (y + 1, y + 10), (x, x + 10)))
    pred[z : z + 3, y : y + 2, x : x + 2] = True  # a bump, so the distances are not all equal
    score = region_lesion_scores(pred, truth, spacing=(1.0, 2.0, 0.5), backend=backend)
    assert score.hd95 == pytest.approx(hd95(pred, truth, (1.0, 2.0, 0.5)), abs=1e-9) and score.hd95 > 0
    far = pred.copy()
    far[(z + 30) % 48, (y + 30) % 48, (x + 30) % 48] = True
    with_fp = region_lesion_scores(far, truth, spacing=(1.0, 2.0, 0.5), backend=backend)
    assert with_fp.false_positives == 1
    assert with_fp.hd95 == pytest.approx((score.hd95 + PENALTY) / 2) and with_fp.dice == pytest.approx(score.dice / 2)


def test_case_scores_use_the_brats_regions_and_accept_tensors(backend):
    truth = np.zeros((48, 48, 48), dtype=np.uint8)
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 3  # 64 voxels of ET inside oedema
    pred = truth.copy()
    pred[8:12, 8:12, 8:12] = 2  # ET missed, WT perfect
    scores = case_lesion_scores(torch.from_numpy(pred), torch.from_numpy(truth), backend=backend)
    assert scores["lesion_dice/WT"] == 1.0 and scores["lesion_hd95/WT"] == 0.0
    assert scores["lesion_dice/ET"] == 0.0 and scores["lesion_hd95/ET"] == PENALTY
    assert scores["lesion_dice/TC"] == 0.0
    assert set(scores) == {f"lesion_{m}/{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")}


# ----------------------------------------------------------------------------------------------
# The torch backend equals the SciPy one: each operation, and the scores
# ----------------------------------------------------------------------------------------------


def spiral(shape, width: int = 1, gap: int = 1, axis_offset: int = 1) -> np.ndarray:
    """One square spiral of ``width``-voxel lines, ``gap`` voxels between turns, in the plane
    z = axis_offset: a single component whose path is ~Y*X/(width+gap) voxels long, where
    plain min-label propagation would take as many rounds."""
    mask = np.zeros(shape, dtype=bool)
    plane = mask[axis_offset]
    top, left, bottom, right = 0, 0, shape[1] - 1, shape[2] - 1
    step = width + gap
    while bottom - top >= width and right - left >= width:
        plane[top : top + width, left : right + 1] = True
        plane[top : bottom + 1, right - width + 1 : right + 1] = True
        plane[bottom - width + 1 : bottom + 1, left : right + 1] = True
        plane[top + step : bottom + 1, left : left + width] = True
        top, left, bottom, right = top + step, left + step, bottom - step, right - step
        if bottom - top >= width:
            plane[top : top + width, left - step : left] = True  # the bridge into the next turn
    return mask


def random_walk(shape, steps: int, rng) -> np.ndarray:
    """A 26-connected random walk (a thin snake folding through 3-D), clipped to the volume."""
    mask = np.zeros(shape, dtype=bool)
    point = np.array(shape) // 2
    for _ in range(steps):
        mask[tuple(point)] = True
        point = np.clip(point + rng.integers(-1, 2, 3), 0, np.array(shape) - 1)
    return mask


def adversarial_masks():
    """Masks that defeat naive labelling or cropping: spirals, snakes, diagonal chains (26- but
    not 6-connected), shapes on every face of the volume, noise, empty and full volumes."""
    rng = np.random.default_rng(7)
    yield "spiral", spiral((3, 31, 29))
    yield "spiral, wide", spiral((5, 30, 30), width=2, gap=1, axis_offset=2)
    yield "random walk", random_walk((20, 22, 24), 3000, rng)
    diagonal = np.zeros((16, 16, 16), dtype=bool)
    diagonal[np.arange(16), np.arange(16), np.arange(16)] = True
    diagonal[np.arange(16), np.arange(16)[::-1], np.arange(16)] = True
    yield "diagonals", diagonal
    faces = np.zeros((12, 13, 14), dtype=bool)
    faces[0, :, :3] = faces[-1, 4:9, :] = faces[:, 0, -1] = faces[5:, -1, 5:7] = True
    yield "on the faces", faces
    yield "noise", rng.random((18, 17, 16)) < 0.3
    yield "empty", np.zeros((8, 9, 10), dtype=bool)
    yield "full", np.ones((8, 9, 10), dtype=bool)


ADVERSARIAL = list(adversarial_masks())


@pytest.mark.parametrize("name, mask", ADVERSARIAL, ids=[name for name, _ in ADVERSARIAL])
def test_torch_components_dilation_and_surfaces_equal_scipys(name, mask):
    from scipy import ndimage

    from unet_trainer.evaluation import surface_distance, torch_morphology

    tensor = torch.from_numpy(mask)
    expected, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    labels, n = torch_morphology.label_components(tensor)
    assert n == count
    np.testing.assert_array_equal(labels.numpy(), expected)  # the same numbering too
    assert torch_morphology.component_boxes(labels, n) == ndimage.find_objects(expected)
    for iterations in (1, 2, 3):
        dilated = ndimage.binary_dilation(
            mask, structure=ndimage.generate_binary_structure(3, 2), iterations=iterations
        )
        np.testing.assert_array_equal(torch_morphology.dilate_18(tensor, iterations).numpy(), dilated)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    np.testing.assert_array_equal(surface_distance.torch_border(tensor).numpy(), mask & ~eroded)
    if name.startswith("spiral"):
        assert count == 1  # really one long component


def test_torch_labelling_converges_in_a_few_rounds_on_a_spiral(monkeypatch):
    """Min-label propagation alone needs a round per voxel of the spiral's path (~470 here);
    hooking roots and pointer jumping take a handful."""
    from unet_trainer.evaluation import torch_morphology

    rounds = []
    real = torch_morphology._min_filter_3x3x3
    monkeypatch.setattr(torch_morphology, "_min_filter_3x3x3", lambda *a: rounds.append(1) or real(*a))
    mask = spiral((3, 31, 29))
    labels, count = torch_morphology.label_components(torch.from_numpy(mask))
    assert count == 1 and mask.sum() > 450 and len(rounds) <= 8


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 2.0, 0.5), (2.5, 1.2, 0.8)])
def test_torch_hd95_equals_the_distance_transforms(spacing):
    from unet_trainer.evaluation import surface_distance as torch_morphology  # hd95_torch as hd95

    rng = np.random.default_rng(3)
    for _ in range(4):
        a = ndimage_blobs((20, 22, 18), rng)
        b = ndimage_blobs((20, 22, 18), rng)
        expected = hd95(a, b, spacing)
        assert torch_morphology.hd95_torch(torch.from_numpy(a), torch.from_numpy(b), spacing) == pytest.approx(
            expected, abs=1e-6
        )
    cube = box((20, 20, 20), ((2, 9), (3, 8), (0, 20)))
    assert torch_morphology.hd95_torch(torch.from_numpy(cube), torch.from_numpy(cube), spacing) == 0.0
    empty = torch.zeros((20, 20, 20), dtype=torch.bool)
    assert torch_morphology.hd95_torch(empty, torch.from_numpy(cube), spacing) == math.inf
    assert torch_morphology.hd95_torch(empty, empty, spacing) == 0.0


def ndimage_blobs(shape, rng, count: int = 3) -> np.ndarray:
    """A few random balls and boxes (some cut by the volume's faces), a boolean mask."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        centre = [int(rng.integers(0, n)) for n in shape]
        if rng.random() < 0.5:
            mask |= ball(shape, centre, int(rng.integers(1, 6)))
        else:
            half = [int(rng.integers(0, 5)) for _ in shape]
            mask[tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(centre, half))] = True
    return mask


def phantom_like_cases():
    """Label maps (truth, prediction) of the kinds the evaluator meets: phantom tumours with a
    shifted, speckled, partly relabelled prediction; snakes and spirals as tumours; lesions on the
    volume's faces; empty truth, empty prediction, both empty."""
    from unet_trainer.data.phantom import make_phantom_case

    rng = np.random.default_rng(11)
    for index in range(3):
        _, truth = make_phantom_case((32, 32, 32), rng, style="brats" if index else "simple")
        pred = np.roll(truth, shift=(1, -1, 0), axis=(0, 1, 2)).copy()
        for _ in range(4):
            z, y, x = (int(rng.integers(0, 30)) for _ in range(3))
            pred[z : z + 2, y : y + 2, x : x + 3] = rng.integers(1, 4)
        et = np.argwhere(pred == 3)
        if len(et):
            cut = int(np.median(et[:, 0]))
            pred[cut:][pred[cut:] == 3] = 1
        yield f"phantom {index}", truth, pred
    snake_truth = np.where(spiral((6, 32, 32), width=2, gap=2, axis_offset=2), 2, 0).astype(np.uint8)
    snake_truth[1:4, 10:20, 10:20] = 3  # an enhancing block through the spiral's turns
    snake_pred = np.where(random_walk((6, 32, 32), 1500, rng), 3, snake_truth).astype(np.uint8)
    yield "spiral and snake", snake_truth, snake_pred
    edges = np.zeros((24, 26, 28), dtype=np.uint8)
    edges[:6, :7, :8] = 2
    edges[:3, :4, :5] = 3
    edges[-7:, -6:, -9:] = 1
    edges[10:14, 0:3, -4:] = 3
    edge_pred = np.roll(edges, 1, axis=2)
    edge_pred[0, 12, 12] = 2
    yield "on the edges", edges, edge_pred
    yield "empty truth", np.zeros_like(edges), edge_pred
    yield "empty prediction", edges, np.zeros_like(edges)
    yield "both empty", np.zeros_like(edges), np.zeros_like(edges)


PHANTOM_LIKE = list(phantom_like_cases())


@pytest.mark.parametrize("name, truth, pred", PHANTOM_LIKE, ids=[name for name, *_ in PHANTOM_LIKE])
@pytest.mark.parametrize("dilation, min_voxels", [(3, 50), (1, 2), (0, 0)])
def test_torch_backend_scores_equal_the_scipy_backend(name, truth, pred, dilation, min_voxels):
    spacing = (1.0, 1.2, 0.8)
    settings = dict(spacing=spacing, dilation_iterations=dilation, min_lesion_volume=min_voxels)
    expected = case_lesion_scores(pred, truth, backend="scipy", **settings)
    got = case_lesion_scores(torch.from_numpy(pred), torch.from_numpy(truth), backend="torch", **settings)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    from unet_trainer.data.layouts import REGIONS

    for region, members in REGIONS.items():  # the counts behind the scores too
        a, b = np.isin(pred, members), np.isin(truth, members)
        counts = region_lesion_scores(a, b, spacing, dilation, min_voxels, backend="scipy")
        torch_counts = region_lesion_scores(
            torch.from_numpy(a), torch.from_numpy(b), spacing, dilation, min_voxels, backend="torch"
        )
        assert (torch_counts.lesions, torch_counts.detected, torch_counts.false_positives) == (
            counts.lesions,
            counts.detected,
            counts.false_positives,
        ), region


def test_auto_backend_keeps_cpu_inputs_on_scipy_and_unknown_backends_fail():
    from unet_trainer.evaluation.lesion_metrics import LESION_BACKENDS, resolve_backend

    assert LESION_BACKENDS == ("auto", "scipy", "torch")
    assert resolve_backend("auto", np.zeros(3), torch.zeros(3)) == "scipy"
    assert resolve_backend("torch", np.zeros(3)) == "torch"
    with pytest.raises(ValueError, match="unknown lesion-metric backend 'cupy'"):
        resolve_backend("cupy")


def test_dice_only_skips_the_distances(backend):
    truth = box((48, 48, 48), CUBE)
    pred = box((48, 48, 48), ((6, 16), (5, 15), (5, 15)), ((30, 32), (30, 32), (30, 32)))
    full = region_lesion_scores(pred, truth, backend=backend)
    dice_only = region_lesion_scores(pred, truth, backend=backend, distances=False)
    assert dice_only.dice == full.dice and math.isnan(dice_only.hd95)
    assert math.isnan(
        case_lesion_scores(pred.astype(np.uint8), truth.astype(np.uint8), distances=False)["lesion_hd95/WT"]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_equals_the_scipy_backend_and_auto_picks_it():
    from unet_trainer.evaluation.lesion_metrics import resolve_backend

    for name, truth, pred in PHANTOM_LIKE:
        expected = case_lesion_scores(pred, truth, spacing=(1.0, 1.2, 0.8))
        on_gpu = torch.from_numpy(pred).cuda(), torch.from_numpy(truth).cuda()
        assert resolve_backend("auto", *on_gpu) == "torch"
        got = case_lesion_scores(*on_gpu, spacing=(1.0, 1.2, 0.8))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (name, key)


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
    """The lesion-wise Dice only: the package's HD95 pools surface-voxel distances, where the 2023
    definition's weighs surface elements by area (tests/test_surface_distance.py checks that one)."""
    brats_evaluation = pytest.importorskip("brats_evaluation")
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
    official = {k: r.to_dict(True) for k, r in evaluator.evaluate(pred, truth).items()}
    ours = case_lesion_scores(pred, truth)
    for region in ("WT", "TC", "ET"):
        group = official[region.lower()]
        assert group["fp"] == 0 and group["fn"] == 0
        assert ours[f"lesion_dice/{region}"] == pytest.approx(group["sq_dsc"], abs=1e-6)
