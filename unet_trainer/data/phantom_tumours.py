"""The phantom's drawing helpers and the tumours of the label schemes other than adult glioma.

Each drawing is a bool mask (Z, Y, X) on the head's voxel grid (3, Z, Y, X), a pure function of
the random generator's state:

* :func:`resection_cavity`: a fluid-filled hole on the tumour's edge, where the resected part was
  (BraTS 2024 post-treatment glioma);
* :func:`cyst`: a fluid-filled cyst inside the tumour core (pediatric tumours);
* :func:`metastases`: several small ring-enhancing lesions, each in its own oedema (BraTS MET);
* :func:`meningioma`: an extra-axial mass on the brain's surface under the skull, enhancing
  throughout, pressing oedema into the brain next to it (BraTS MEN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: coarse Gaussian noise, trilinearly upsampled."""
    noise = rng.standard_normal((1, 1, coarse, coarse, coarse)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(noise), size=shape, mode="trilinear", align_corners=True)
    field = field[0, 0].numpy()
    return field / max(float(np.abs(field).max()), 1e-6)


def random_voxel(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """The (Z, Y, X) float coordinates of a voxel drawn uniformly from ``mask`` (which is not empty)."""
    candidates = np.flatnonzero(mask)
    return np.array(np.unravel_index(candidates[rng.integers(len(candidates))], mask.shape), np.float32)


def _wavy_ball(grid: np.ndarray, centre: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    shape = grid.shape[1:]
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) * (1.0 + 0.2 * smooth_field(rng, shape, 5))
    return dist < radius


def resection_cavity(grid: np.ndarray, tissue: np.ndarray, tumour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A resection cavity: a wavy ball centred on the tumour's edge, within brain ``tissue``."""
    shape = tissue.shape
    edge = tumour & ~ndimage.binary_erosion(tumour)
    centre = random_voxel(rng, edge if edge.any() else tissue)
    radius = max(rng.uniform(0.04, 0.09) * float(min(shape)), 2.0)
    return _wavy_ball(grid, centre, radius, rng) & tissue


def cyst(grid: np.ndarray, core: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A cyst inside the tumour ``core``: a wavy ball around one of its voxels, at most half as wide as
    the core is deep there."""
    depth = ndimage.distance_transform_edt(core)
    centre = random_voxel(rng, depth >= max(float(depth.max()) * 0.5, 1.0) if core.any() else np.ones_like(core))
    radius = max(float(depth[tuple(centre.astype(int))]) * rng.uniform(0.5, 0.9), 1.5)
    return _wavy_ball(grid, centre, radius, rng) & core


def metastases(
    grid: np.ndarray, white: np.ndarray, brain: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three to seven small lesions in white matter, each ring-enhancing around a necrotic centre
    once it is big enough, inside an oedema halo: (necrotic, enhancing, oedema)."""
    shape = brain.shape
    size = float(min(shape))
    depth = ndimage.distance_transform_edt(brain)
    necrotic, enhancing, edema = (np.zeros(shape, bool) for _ in range(3))
    where = white & (depth > 3.0)
    for _ in range(int(rng.integers(3, 8))):
        if not where.any():
            break
        centre = random_voxel(rng, where)
        dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        radius = max(float(np.exp(rng.uniform(np.log(0.015), np.log(0.06)))) * size, 1.0)
        lesion = (dist < radius) & brain
        centre_part = lesion & (dist < radius - 1.5)  # a rim of 1.5 voxels; small lesions are all rim
        enhancing |= lesion & ~centre_part
        necrotic |= centre_part
        edema |= (dist < radius * rng.uniform(1.8, 3.0) + 1.0) & brain
        where &= dist > radius * 3.0  # lesions apart
    edema &= ~(necrotic | enhancing)
    return necrotic, enhancing, edema


def meningioma(
    grid: np.ndarray, head: np.ndarray, brain: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An extra-axial mass: a ball centred on the brain's outer surface under the skull, enhancing
    throughout (a small non-enhancing centre in some), pressing oedema into the brain next to it:
    (non-enhancing core, enhancing, oedema). The mass takes the place of brain and of the fluid
    around it, not of the skull."""
    shape = brain.shape
    size = float(min(shape))
    surface = brain & ~ndimage.binary_erosion(brain, iterations=2)
    centre = random_voxel(rng, surface)
    radius = max(rng.uniform(0.06, 0.14) * size, 2.5)
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) * (1.0 + 0.1 * smooth_field(rng, shape, 4))
    inside_skull = ndimage.binary_dilation(brain, iterations=2) & head
    mass = (dist < radius) & inside_skull
    core = mass & (dist < radius * 0.35) if rng.random() < 0.3 else np.zeros(shape, bool)
    edema = brain & ~mass & (dist < radius + rng.uniform(1.0, 0.5 * radius + 1.0))
    return core, mass & ~core, edema
