"""The HD95 of the two metric definitions, with SciPy on the host or with torch on the masks' device:
over surface elements, as the BraTS 2023 evaluation computes it (DeepMind's ``surface_distance``:
``compute_surface_distances`` then ``compute_robust_hausdorff``; :func:`hd95`), and over border
voxels, as panoptica (brats-evaluation) computes it (medpy's; :func:`border_hd95`).

The surface of a mask is cut into surface elements ("surfels"), one per 2x2x2 cube of voxel
centres whose eight voxels are neither all inside nor all outside the mask. Each surfel sits at the
cube's position (voxel positions shifted by half a voxel; both masks share the grid, so distances
are unaffected) and carries the area of the marching-cubes surface through that cube, in mm² of the
spacing. The directed distances from one mask's surfels to the other's (Euclidean, in mm) are
sorted, and the ``percent``-th percentile is the first distance whose cumulative share of the
surfel area reaches ``percent``; HD95 is the larger of the two directed 95th percentiles.

Surfel areas (:func:`surfel_areas`): the marching-cubes surface with its vertices at the midpoints
of the cube edges that cross the mask's border. The cube's set corners (or its unset ones, whichever
are fewer; at four, the set ones) fall into edge-connected groups; each group is cut off by the
polygon through its crossing edges' midpoints, triangulated the way that gives the largest area at
1 mm; an anisotropic spacing scales each triangle's area vector (sy*sz, sx*sz, sx*sy). This
reproduces the 256-entry table of DeepMind's ``lookup_tables`` (tests/test_surface_distance.py
compares both on every code and on random shapes, when the package is installed).

Border voxels (:func:`border_hd95`): the border of a mask is its voxels with a face neighbour
outside it (``mask ^ binary_erosion(mask, generate_binary_structure(3, 1))``, the volume's edge
outside); the distances in mm from each border voxel of one mask to the nearest border voxel of
the other, both directions pooled, and their 95th percentile with linear interpolation
(``numpy.percentile``'s default): panoptica 2.1.7's ``metrics/hausdorff_distance.py``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: Pairs per distance block in :func:`nearest_distances` (float64: 128 MiB).
_DISTANCE_BLOCK = 2**24
_CORNERS = tuple(itertools.product((0, 1), repeat=3))  # corner c of a cube is bit _CORNERS.index(c)


def _triangulations(vertices: Sequence[int]) -> Iterator[list[tuple[int, int, int]]]:
    """Every triangulation of a polygon given by its vertex ids in cyclic order."""
    if len(vertices) < 3:
        yield []
        return
    first, last = vertices[0], vertices[-1]
    for k in range(1, len(vertices) - 1):
        for left in _triangulations(vertices[: k + 1]):
            for right in _triangulations(vertices[k:]):
                yield left + right + [(first, vertices[k], last)]


def _groups(corners: set[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """The edge-connected groups of a set of cube corners."""
    left, groups = set(corners), []
    while left:
        group = [left.pop()]
        for corner in group:  # grows while iterating
            near = [c for c in left if sum(abs(a - b) for a, b in zip(c, corner)) == 1]
            left.difference_update(near)
            group.extend(near)
        groups.append(group)
    return groups


def _cut_polygon(group: list[tuple[int, ...]], inside: set[tuple[int, ...]]) -> np.ndarray:
    """The midpoints (V, 3) of the edges from ``group`` to corners outside ``inside``, in cyclic
    order around the direction from the group's centre to theirs."""
    points = []
    for corner in group:
        for axis in range(3):
            other = tuple(1 - v if a == axis else v for a, v in enumerate(corner))
            if other not in inside:
                points.append([(p + q) / 2 for p, q in zip(corner, other)])
    points = np.array(points, dtype=np.float64)
    centre = points.mean(axis=0)
    normal = centre - np.array(group, dtype=np.float64).mean(axis=0)
    normal /= np.linalg.norm(normal)
    first = points[0] - centre
    first -= normal * (first @ normal)
    first /= np.linalg.norm(first)
    second = np.cross(normal, first)
    angles = np.arctan2((points - centre) @ second, (points - centre) @ first)
    return points[np.argsort(angles)]


def _area_vectors(polygon: np.ndarray) -> np.ndarray:
    """The triangles' area vectors (T, 3) of the polygon's largest-area triangulation at 1 mm."""
    best, best_area = None, -1.0
    for triangles in _triangulations(list(range(len(polygon)))):
        vectors = np.array([np.cross(polygon[b] - polygon[a], polygon[c] - polygon[a]) / 2 for a, b, c in triangles])
        area = float(np.linalg.norm(vectors, axis=1).sum())
        if area > best_area + 1e-12:
            best, best_area = vectors, area
    return best


@functools.cache
def _unit_area_vectors() -> tuple[np.ndarray, ...]:
    """Per neighbour code (0..255) the area vectors (T, 3) of its surface at 1 mm."""
    table = []
    for code in range(256):
        inside = {c for bit, c in enumerate(_CORNERS) if code >> bit & 1}
        if len(inside) > 4:
            inside = set(_CORNERS) - inside
        vectors = [_area_vectors(_cut_polygon(g, inside)) for g in _groups(inside)]
        table.append(np.concatenate(vectors) if vectors else np.zeros((0, 3)))
    return tuple(table)


@functools.cache
def surfel_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    """The surface area in mm² of each neighbour code (256,) float64 at ``spacing`` (mm per axis)."""
    sz, sy, sx = spacing
    scale = np.array([sy * sx, sz * sx, sz * sy])
    return np.array([float(np.linalg.norm(v * scale, axis=1).sum()) for v in _unit_area_vectors()])


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """The neighbour code of every 2x2x2 cube of a bool (D, H, W) mask, zero-padded by one voxel
    on every side: uint8 (D + 1, H + 1, W + 1), bit i set when corner ``_CORNERS[i]`` is inside."""
    padded = np.pad(mask.astype(np.uint8), 1)
    codes = np.zeros(tuple(n - 1 for n in padded.shape), dtype=np.uint8)
    for bit, (dz, dy, dx) in enumerate(_CORNERS):
        codes |= padded[dz : dz + codes.shape[0], dy : dy + codes.shape[1], dx : dx + codes.shape[2]] << bit
    return codes


def _percentile(distances, areas, percent: float) -> float:
    """The first sorted distance at which the cumulative share of the surfel area reaches
    ``percent``; inf without surfels."""
    if len(distances) == 0:
        return math.inf
    order = np.argsort(distances, kind="stable")
    share = np.cumsum(areas[order]) / np.sum(areas)
    index = min(int(np.searchsorted(share, percent / 100.0)), len(distances) - 1)
    return float(distances[order][index])


def robust_hausdorff(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percent: float = 95.0) -> float:
    """The larger of the two directed ``percent``-th percentiles of the surfel distances of two
    bool (D, H, W) masks, in mm of ``spacing`` (see the module docstring).

    Returns inf when exactly one mask is empty, 0 when both are.
    """
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred or not has_truth:
        return 0.0 if not has_pred and not has_truth else math.inf
    spacing = tuple(float(s) for s in spacing)
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    pred, truth = pred[box], truth[box]  # the codes are zero-padded: cropping changes nothing
    table = surfel_areas(spacing)
    pred_codes, truth_codes = neighbour_codes(pred), neighbour_codes(truth)
    pred_border = (pred_codes != 0) & (pred_codes != 255)
    truth_border = (truth_codes != 0) & (truth_codes != 255)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    to_truth = ndimage.distance_transform_edt(~truth_border, sampling=spacing)
    truth_to_pred = _percentile(to_pred[truth_border], table[truth_codes[truth_border]], percent)
    pred_to_truth = _percentile(to_truth[pred_border], table[pred_codes[pred_border]], percent)
    return max(truth_to_pred, pred_to_truth)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two bool (D, H, W) masks: :func:`robust_hausdorff` at 95 (inf when exactly
    one mask is empty, 0 when both are)."""
    return robust_hausdorff(pred, truth, spacing, 95.0)


def nearest_distances(points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each row of ``points`` (P, 3) the distance to the nearest row of ``targets`` (T, 3),
    in blocks of at most ``_DISTANCE_BLOCK`` pairs (exact differences, not the matrix-product
    expansion, whose cancellation would make zero distances ~1e-5)."""
    step = max(1, _DISTANCE_BLOCK // max(1, len(targets)))
    return torch.cat(
        [
            torch.cdist(points[i : i + step], targets, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
            for i in range(0, len(points), step)
        ]
    )


def _torch_codes(mask: torch.Tensor) -> torch.Tensor:
    """:func:`neighbour_codes` of a bool (D, H, W) tensor, int64 on its device."""
    padded = F.pad(mask.to(torch.uint8), (1, 1, 1, 1, 1, 1)).long()
    d, h, w = (n - 1 for n in padded.shape)
    codes = torch.zeros((d, h, w), dtype=torch.int64, device=mask.device)
    for bit, (dz, dy, dx) in enumerate(_CORNERS):
        codes |= padded[dz : dz + d, dy : dy + h, dx : dx + w] << bit
    return codes


def _torch_percentile(distances: torch.Tensor, areas: torch.Tensor, percent: float) -> float:
    order = torch.argsort(distances, stable=True)
    share = torch.cumsum(areas[order], 0) / areas.sum()
    target = torch.tensor([percent / 100.0], dtype=share.dtype, device=share.device)
    index = min(int(torch.searchsorted(share, target)), len(distances) - 1)
    return float(distances[order][index])


def hd95_torch(pred: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float]) -> float:
    """:func:`hd95` on bool (D, H, W) tensors, on their device (exact nearest-surfel distances)."""
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred or not has_truth:
        return 0.0 if not has_pred and not has_truth else math.inf
    spacing = tuple(float(s) for s in spacing)
    table = torch.from_numpy(surfel_areas(spacing)).to(pred.device)
    scale = torch.tensor(spacing, dtype=torch.float64, device=pred.device)
    directed = []
    codes = [_torch_codes(pred), _torch_codes(truth)]
    borders = [(c != 0) & (c != 255) for c in codes]
    points = [b.nonzero().to(torch.float64) * scale for b in borders]
    for source, target in ((0, 1), (1, 0)):
        distances = nearest_distances(points[source], points[target])
        directed.append(_torch_percentile(distances, table[codes[source][borders[source]]], 95.0))
    return max(directed)


# ------------------------------------------------------------------------------------------
# Border voxels: panoptica's (medpy's) HD95
# ------------------------------------------------------------------------------------------

_FACES = ndimage.generate_binary_structure(3, 1)


def torch_border(mask: torch.Tensor) -> torch.Tensor:
    """Voxels of a bool (D, H, W) mask with a face neighbour outside it (the volume's border counts
    as outside): ``mask & ~binary_erosion(mask, generate_binary_structure(3, 1), border_value=0)``."""
    p = F.pad(mask.to(torch.uint8), (1, 1, 1, 1, 1, 1)).bool()
    centre = (slice(1, -1),) * 3
    interior = mask.clone()
    for axis in range(3):
        for shifted in (slice(None, -2), slice(2, None)):
            index = list(centre)
            index[axis] = shifted
            interior &= p[tuple(index)]
    return mask & ~interior


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES, border_value=0)


def _percentile_95(distances: np.ndarray) -> float:
    return float(np.percentile(distances, 95))


def border_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Panoptica's (medpy's) HD95 in mm of two bool (D, H, W) masks: the 95th percentile of both
    directions' border-to-border distances pooled (see the module docstring); inf when exactly one
    mask is empty, 0 when both are (panoptica never asks: its edge cases decide those).

    Works on the box around both masks grown by one voxel: every border voxel lies inside it, so the
    distances are the whole volume's."""
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred or not has_truth:
        return 0.0 if not has_pred and not has_truth else math.inf
    both = pred | truth
    box = tuple(
        slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, n))
        for hits, n in (
            (np.flatnonzero(both.any(axis=tuple(a for a in range(3) if a != axis))), both.shape[axis])
            for axis in range(3)
        )
    )
    pred_border, truth_border = _border(pred[box]), _border(truth[box])
    sampling = tuple(float(s) for s in spacing)
    to_truth = ndimage.distance_transform_edt(~truth_border, sampling=sampling)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sampling)[truth_border]
    return _percentile_95(np.concatenate([to_truth, to_pred]))


def _torch_percentile_95(distances: torch.Tensor) -> float:
    """``numpy.percentile(distances, 95)`` (linear interpolation) of a 1-D float64 tensor; sorted
    by hand, as ``torch.quantile`` refuses more than 2**24 values."""
    ordered = torch.sort(distances).values
    position = 0.95 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    low, high = float(ordered[below]), float(ordered[above])
    return low + (high - low) * (position - below)


def border_hd95_torch(pred: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float]) -> float:
    """:func:`border_hd95` on bool (D, H, W) tensors, on their device (exact nearest-border distances)."""
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred or not has_truth:
        return 0.0 if not has_pred and not has_truth else math.inf
    scale = torch.tensor([float(s) for s in spacing], dtype=torch.float64, device=pred.device)
    pred_points = torch_border(pred).nonzero().to(torch.float64) * scale
    truth_points = torch_border(truth).nonzero().to(torch.float64) * scale
    pooled = torch.cat(
        [
            nearest_distances(pred_points, truth_points),
            nearest_distances(truth_points, pred_points),
        ]
    )
    return _torch_percentile_95(pooled)
