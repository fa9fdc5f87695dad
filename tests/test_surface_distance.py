"""Surface distances over area-weighted surface elements: our SciPy and torch versions against
DeepMind's ``surface_distance`` package (the code the BraTS 2023 evaluation calls; in the dev
extra), on every neighbour code, random shapes, anisotropic spacings, a one-voxel shift and
identical surfaces."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from unet_trainer.evaluation.surface_distance import _CORNERS, hd95, hd95_torch, surfel_areas

SPACINGS = [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (2.5, 0.7, 1.3), (0.5, 2.0, 1.0)]


def official():
    return pytest.importorskip("surface_distance")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_neighbour_codes_area_equals_the_packages_table(spacing):
    lookup = pytest.importorskip("surface_distance.lookup_tables")
    theirs = lookup.create_table_neighbour_code_to_surface_area(spacing)
    kernel = lookup.ENCODE_NEIGHBOURHOOD_3D_KERNEL  # their bit of each corner
    ours = surfel_areas(spacing)
    for code in range(256):
        their_code = sum(int(kernel[c]) for bit, c in enumerate(_CORNERS) if code >> bit & 1)
        assert ours[code] == pytest.approx(theirs[their_code], abs=1e-12), code


def random_pair(rng):
    shape = tuple(int(n) for n in rng.integers(6, 20, 3))
    a = ndimage.binary_opening(rng.random(shape) < 0.55)
    b = ndimage.binary_dilation(a) if rng.random() < 0.3 else rng.random(shape) < 0.25
    return a, b


@pytest.mark.parametrize("spacing", SPACINGS)
def test_random_shapes_equal_the_package_on_both_backends(spacing):
    package = official()
    rng = np.random.default_rng(5)
    for _ in range(12):
        pred, truth = random_pair(rng)
        if not pred.any() or not truth.any():
            continue
        distances = package.compute_surface_distances(truth, pred, spacing)
        expected = package.compute_robust_hausdorff(distances, 95)
        assert hd95(pred, truth, spacing) == pytest.approx(expected, abs=1e-9)
        assert hd95_torch(torch.from_numpy(pred), torch.from_numpy(truth), spacing) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("spacing, axis", list(itertools.product(SPACINGS, range(3))))
def test_a_one_voxel_shift_and_identical_surfaces(spacing, axis):
    truth = np.zeros((12, 12, 12), dtype=bool)
    truth[3:8, 2:9, 4:10] = True
    shifted = np.roll(truth, 1, axis=axis)
    assert hd95(truth, truth.copy(), spacing) == 0.0
    assert hd95_torch(torch.from_numpy(truth), torch.from_numpy(truth), spacing) == 0.0
    ours = hd95(shifted, truth, spacing)
    assert ours == pytest.approx(hd95_torch(torch.from_numpy(shifted), torch.from_numpy(truth), spacing), abs=1e-9)
    package = pytest.importorskip("surface_distance")
    expected = package.compute_robust_hausdorff(package.compute_surface_distances(truth, shifted, spacing), 95)
    assert ours == pytest.approx(expected, abs=1e-9) and ours > 0


def test_empty_masks():
    cube = np.zeros((6, 6, 6), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    empty = np.zeros_like(cube)
    assert hd95(empty, cube, (1, 1, 1)) == math.inf and hd95(cube, empty, (1, 1, 1)) == math.inf
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert hd95_torch(torch.from_numpy(empty), torch.from_numpy(cube), (1, 1, 1)) == math.inf
