"""BraTS lesion-wise Dice and HD95, and the plain HD95, per region of a label scheme (glioma: WT, TC, ET), as a
challenge's metric definition (:data:`LESION_DEFINITIONS`) computes them, with SciPy on the host or
with torch on the tensors' device.

Two definitions: ``brats2023`` (the default; below) and ``panoptica`` (the ``brats-evaluation``
package that scores the challenges from 2025 on: 26-connected instances without dilation or size
threshold, one-to-one matching on Dice, Dice and HD95 averaged over the matched instances only;
:mod:`unet_trainer.evaluation.panoptica` and :func:`_panoptica_region`).

The ``brats2023`` definition (the BraTS 2023 challenge's evaluation, ``get_LesionWiseResults``; also
the 2024 challenges' code without its extras), per region:

1. Connected components of the truth and of the prediction, 26-connectivity.
2. Truth lesions closer than the dilation are one lesion: the truth mask is dilated
   ``dilation_iterations`` times with the 18-neighbourhood structuring element
   (``generate_binary_structure(3, 2)``, what the official code uses), the dilated mask is split
   into 26-connected components, and each truth voxel takes the id of the dilated component it
   lies in.
3. Each (combined) truth lesion is dilated again the same way; every predicted component touching
   that dilated lesion is claimed by it. The lesion's Dice and HD95 compare the lesion with the
   union of the components it claims (Dice 0 and HD95 = penalty when it claims none).
4. Truth lesions of ``min_lesion_volume`` mm³ or less (voxel count times the voxel volume of
   ``spacing``, as the 2023 code multiplies by the header's voxel size) are dropped from the score
   (what they claim is still not a false positive).
5. Predicted components claimed by no truth lesion are false positives: Dice 0, HD95 = penalty.
6. Lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false positives); HD95 the
   same with each infinite HD95 replaced by the penalty. Nothing to count (no kept lesion and no
   false positive, e.g. both empty) gives Dice 1 and HD95 0.

HD95 (lesion-wise, and the plain per-region HD95 of :func:`case_region_hd95`) is the one of the
chosen definition (:data:`LESION_DEFINITIONS`); ``brats2023``'s is the 2023 code's: DeepMind's
surface distances over area-weighted surface elements, the larger of the two directed 95th
percentiles (:mod:`unet_trainer.evaluation.surface_distance`). The plain HD95 of a region empty on
one side only is the penalty, of a region empty on both sides 0.

Each sub-challenge's dilation and size threshold are its label scheme's (:mod:`unet_trainer.data.schemes`).

Speed: the whole-case passes (labelling, one dilation) run on the bounding box of the foreground
grown by the dilation, and every per-lesion operation on the lesion's own box (grown by the
dilation and by the claimed components), instead of the whole volume as the official code does.

Backends (``backend=``, chosen in :func:`resolve_backend`): the algorithm below is written once
over a handful of operations (labelling, dilation, boxes, HD95), which ``_ScipyOps`` runs with
SciPy on NumPy arrays and ``_TorchOps`` with :mod:`unet_trainer.evaluation.torch_morphology` on torch tensors
on their device (CPU or CUDA), so a GPU evaluator's predictions never leave the GPU. Both give the
same components, the same dilations and the same distances (tests/test_lesion_metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from . import panoptica, surface_distance, torch_morphology

# The default scheme's (BraTS 2021 and 2023 GLI: dilation 3, 50 mm³); each scheme holds its own.
DEFAULT_DILATION_ITERATIONS = SCHEMES[DEFAULT_SCHEME].lesion.dilation
DEFAULT_MIN_LESION_VOLUME = SCHEMES[DEFAULT_SCHEME].lesion.min_volume
DEFAULT_HD95_PENALTY = 374.0  # mm; the diagonal of the 240x240x155 SRI-24 volume, rounded up
# brats-evaluation's parser puts 373 ("diameter of the cube in SRI space") where panoptica gives inf.
PANOPTICA_HD95_PENALTY = 373.0
DEFAULT_LESION_DEFINITION = "brats2023"


_COMPONENTS_26 = ndimage.generate_binary_structure(3, 3)
_DILATION_18 = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class LesionScore:
    """Lesion-wise result of one region of one case.

    dice: lesion-wise Dice in [0, 1]; hd95: lesion-wise HD95 in mm (<= penalty);
    lesions: kept truth lesions; detected: kept lesions claiming a predicted component;
    false_positives: predicted components claimed by no truth lesion.
    """

    dice: float
    hd95: float
    lesions: int
    detected: int
    false_positives: int


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of a boolean mask (*S), or None when it is empty
    (three projections: quicker than ``find_objects`` on a whole volume)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(hits) == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _grow(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


class _ScipyOps:
    """The operations of the metric on NumPy arrays on the host, with SciPy."""

    name = "scipy"

    @staticmethod
    def labels(labels) -> np.ndarray:
        return _to_numpy(labels)

    @staticmethod
    def mask(mask) -> np.ndarray:
        return np.asarray(_to_numpy(mask), dtype=bool)

    @staticmethod
    def isin(values: np.ndarray, members: Sequence[int]) -> np.ndarray:
        return np.isin(values, list(members))

    bounding_box = staticmethod(_bounding_box)

    @staticmethod
    def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
        return ndimage.label(mask, structure=_COMPONENTS_26)

    @staticmethod
    def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
        return ndimage.binary_dilation(mask, structure=_DILATION_18, iterations=iterations)

    @staticmethod
    def boxes(labels: np.ndarray, count: int) -> list:
        return ndimage.find_objects(labels, max_label=count)

    @staticmethod
    def zeros_like(mask: np.ndarray) -> np.ndarray:
        return np.zeros(mask.shape, dtype=np.int32)

    @staticmethod
    def where(condition: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.where(condition, values, 0)

    @staticmethod
    def nonzero_ids(values: np.ndarray) -> list[int]:
        return [int(i) for i in np.unique(values) if i != 0]


class _TorchOps:
    """The same operations on torch tensors, on the tensors' device
    (:mod:`unet_trainer.evaluation.torch_morphology`)."""

    name = "torch"

    @staticmethod
    def labels(labels) -> torch.Tensor:
        return labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))

    @staticmethod
    def mask(mask) -> torch.Tensor:
        return _TorchOps.labels(mask).bool()

    @staticmethod
    def isin(values: torch.Tensor, members: Sequence[int]) -> torch.Tensor:
        return torch.isin(values, torch.tensor(list(members), dtype=values.dtype, device=values.device))

    bounding_box = staticmethod(torch_morphology.bounding_box)
    label = staticmethod(torch_morphology.label_components)
    dilate = staticmethod(torch_morphology.dilate_18)
    boxes = staticmethod(torch_morphology.component_boxes)

    @staticmethod
    def zeros_like(mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)

    @staticmethod
    def where(condition: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.where(condition, values, 0)

    @staticmethod
    def nonzero_ids(values: torch.Tensor) -> list[int]:
        return [i for i in torch.unique(values).tolist() if i != 0]


_BACKEND_OPS = {"scipy": _ScipyOps, "torch": _TorchOps}
#: The backend choices: "auto" picks one per call (see :func:`resolve_backend`).
LESION_BACKENDS: tuple[str, ...] = ("auto", *_BACKEND_OPS)
DEFAULT_LESION_BACKEND = "auto"


@dataclass(frozen=True)
class LesionSettings:
    """The settings of the lesion-wise metric (see the module docstring).

    Attributes:
        dilation_iterations: dilation that merges and matches truth lesions (0: no dilation).
        min_lesion_volume: truth lesions of this many mm³ or less are dropped.
        hd95_penalty: the HD95 of a missed lesion or a false positive, in mm (None: the definition's).
        backend: "scipy", "torch" or "auto" (:func:`resolve_backend`).
        definition: a key of :data:`LESION_DEFINITIONS`.
        region_min_volume: the regions whose threshold is not ``min_lesion_volume``, with theirs (mm³).
    """

    dilation_iterations: int = DEFAULT_DILATION_ITERATIONS
    min_lesion_volume: float = DEFAULT_MIN_LESION_VOLUME
    hd95_penalty: float | None = None
    backend: str = DEFAULT_LESION_BACKEND
    definition: str = DEFAULT_LESION_DEFINITION
    region_min_volume: Mapping[str, float] = field(default_factory=dict)


def resolve_backend(backend: str, *arrays) -> str:
    """The backend a call runs on: "scipy" or "torch".

    "auto" takes torch for tensors on a GPU (so a GPU evaluator's predictions never travel to the
    host) and SciPy for everything else: on the CPU SciPy's labelling and distance transform are
    the faster (scripts/bench_metrics.py, BENCHMARKS.md).

    Raises:
        ValueError: an unknown backend.
    """
    if backend not in LESION_BACKENDS:
        raise ValueError(f"unknown lesion-metric backend {backend!r}; expected one of {', '.join(LESION_BACKENDS)}")
    if backend != "auto":
        return backend
    on_gpu = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in arrays)
    return "torch" if on_gpu else "scipy"


def _truth_lesions(ops, truth, dilation_iterations: int, shape: tuple[int, ...]) -> tuple:
    """Truth lesions closer than the dilation merged into one (step 2 of the module docstring).

    Returns:
        (lesion id map like ``truth``, 0 outside the lesions; each lesion's box, by id - 1).
    """
    lesion_cc = ops.zeros_like(truth)
    truth_box = ops.bounding_box(truth)
    if truth_box is None:
        return lesion_cc, []
    # The merging dilation on the truth's own box (false positives far away widen the crop).
    near_truth = _grow(truth_box, dilation_iterations + 1, shape)
    truth_near = truth[near_truth]
    dilated = ops.dilate(truth_near, dilation_iterations) if dilation_iterations > 0 else truth_near
    merged_cc, _ = ops.label(dilated)
    lesion_cc[near_truth] = ops.where(truth_near, merged_cc)
    # Every dilated component holds truth voxels, so every id of merged_cc occurs.
    return lesion_cc, ops.boxes(lesion_cc, int(lesion_cc.max()))


def _claimed_components(ops, lesion_cc, pred_cc, lesion_id: int, box, dilation_iterations: int, shape) -> tuple:
    """The predicted components a truth lesion claims: those touching the dilated lesion (step 3).

    Returns:
        (the box around the dilated lesion, the claimed component ids, the lesion's voxel count).
    """
    # The dilated lesion reaches `dilation_iterations` voxels beyond the lesion's box.
    near = _grow(box, dilation_iterations, shape)
    lesion_near = lesion_cc[near] == lesion_id
    reach = ops.dilate(lesion_near, dilation_iterations) if dilation_iterations > 0 else lesion_near
    return near, ops.nonzero_ids(pred_cc[near][reach]), int(lesion_near.sum())


def _lesion_match(
    ops, lesion_cc, pred_cc, pred_boxes, lesion_id: int, near, ids: list[int], size: int, spacing, hd95
) -> tuple[float, float]:
    """Dice and HD95 (NaN when ``hd95`` is None) of a truth lesion against the union of the
    components it claims, on the box holding them all."""
    window = near
    for i in ids:
        window = _union(window, pred_boxes[i - 1])
    # One voxel of margin so that surfaces on the window's edge stay surfaces.
    window = _grow(window, 1, tuple(lesion_cc.shape))
    lesion_mask = lesion_cc[window] == lesion_id
    pred_mask = ops.isin(pred_cc[window], ids)
    intersection = int((lesion_mask & pred_mask).sum())
    dice = 2.0 * intersection / (size + int(pred_mask.sum()))
    return dice, hd95(pred_mask, lesion_mask, spacing) if hd95 is not None else math.nan


def _brats2023_region(
    ops, pred, truth, spacing, dilation_iterations: int, min_lesion_volume: float, hd95_penalty: float, hd95
) -> LesionScore:
    """The 2023 definition's lesion-wise score of one region (steps 1-6 of the module docstring);
    ``hd95`` None skips the distances."""
    distances = hd95 is not None
    voxel_volume = math.prod(spacing)
    # Everything happens within the dilation (plus one voxel, so surfaces stay surfaces) of the
    # foreground's bounding box: a tumour fills a few percent of a brain volume.
    foreground = ops.bounding_box(pred | truth)
    if foreground is None:
        return LesionScore(1.0, 0.0 if distances else math.nan, 0, 0, 0)
    crop = _grow(foreground, dilation_iterations + 1, tuple(truth.shape))
    pred, truth = pred[crop], truth[crop]
    shape = tuple(truth.shape)
    pred_cc, n_pred = ops.label(pred)
    lesion_cc, lesion_boxes = _truth_lesions(ops, truth, dilation_iterations, shape)
    pred_boxes = ops.boxes(pred_cc, n_pred)
    claimed: set[int] = set()
    dice_sum = hd_sum = 0.0
    lesions = detected = 0
    for lesion_id, box in enumerate(lesion_boxes, start=1):
        if box is None:
            continue
        near, ids, size = _claimed_components(ops, lesion_cc, pred_cc, lesion_id, box, dilation_iterations, shape)
        claimed.update(ids)
        if size * voxel_volume <= min_lesion_volume:
            continue
        lesions += 1
        if not ids:
            hd_sum += hd95_penalty
            continue
        detected += 1
        dice, distance = _lesion_match(ops, lesion_cc, pred_cc, pred_boxes, lesion_id, near, ids, size, spacing, hd95)
        dice_sum += dice
        if distances:
            hd_sum += hd95_penalty if math.isinf(distance) else distance
    false_positives = n_pred - len(claimed)
    count = lesions + false_positives
    if count == 0:
        return LesionScore(1.0, 0.0 if distances else math.nan, 0, 0, 0)
    hd_sum += false_positives * hd95_penalty
    hd_mean = hd_sum / count if distances else math.nan
    return LesionScore(dice_sum / count, hd_mean, lesions, detected, false_positives)


def _brats2023_plain_hd95(pred, truth, spacing, hd95_penalty: float, hd95) -> float:
    """The 2023 definition's whole-region HD95: the penalty where one side is empty, 0 where both are."""
    distance = hd95(pred, truth, spacing)
    return hd95_penalty if math.isinf(distance) else distance


def _panoptica_region(
    ops, pred, truth, spacing, dilation_iterations: int, min_lesion_volume: float, hd95_penalty: float, hd95
) -> LesionScore:
    """Panoptica's lesion-wise score of one region (brats-evaluation's ``lesionwise_*_mean``, its
    ``sq_dsc`` and ``sq_hd95``): the mean Dice and HD95 over the matched instances only
    (:func:`panoptica.match_instances`); no match: Dice 0 and HD95 the penalty (panoptica's
    zero-TP edge case, whose infinite HD95 becomes the penalty); no instance on either side: NaN,
    left out of the means over cases as the package's summary leaves it out. No dilation and no
    size threshold: ``dilation_iterations`` and ``min_lesion_volume`` are not used."""
    distances = hd95 is not None
    foreground = ops.bounding_box(pred | truth)
    if foreground is None:
        return LesionScore(math.nan, math.nan, 0, 0, 0)
    crop = _grow(foreground, 1, tuple(truth.shape))
    pred, truth = pred[crop], truth[crop]
    pred_cc, n_pred = ops.label(pred)
    truth_cc, n_truth = ops.label(truth)
    matches = panoptica.match_instances(truth_cc, n_truth, pred_cc, n_pred)
    if not matches:
        return LesionScore(0.0, hd95_penalty if distances else math.nan, n_truth, 0, n_pred)
    dice = sum(d for _, _, d in matches) / len(matches)
    hd_mean = math.nan
    if distances:
        truth_boxes, pred_boxes = ops.boxes(truth_cc, n_truth), ops.boxes(pred_cc, n_pred)
        hd_mean = sum(
            panoptica.matched_hd95(truth_cc, pred_cc, truth_boxes[t - 1], pred_boxes[p - 1], t, p, spacing, hd95)
            for t, p, _ in matches
        ) / len(matches)
    return LesionScore(dice, hd_mean, n_truth, len(matches), n_pred - len(matches))


def _panoptica_plain_hd95(pred, truth, spacing, hd95_penalty: float, hd95) -> float:
    """Panoptica's global HD95 (brats-evaluation's ``global_hd95``): NaN where both sides are
    empty; the penalty where they share no voxel (one side empty, or no overlap: panoptica's
    zero-TP edge case); else the HD95 in voxels, as panoptica computes its global metrics without
    the spacing (the same as mm at BraTS's 1 mm)."""
    if not bool(pred.any()) and not bool(truth.any()):
        return math.nan
    if not bool((pred & truth).any()):
        return hd95_penalty
    return hd95(pred, truth, (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class LesionDefinition:
    """A challenge's metric definition, on one region's bool (D, H, W) masks.

    Attributes:
        region_scores: ``(ops, pred, truth, spacing, dilation_iterations, min_lesion_volume,
            hd95_penalty, hd95) -> LesionScore``, the lesion-wise score (``hd95`` None: no distances).
        plain_hd95: ``(pred, truth, spacing, hd95_penalty, hd95) -> float``, the whole-region HD95.
        hd95_host, hd95_device: its HD95 of two masks in mm, on NumPy arrays and on torch tensors
            (inf when exactly one is empty, 0 when both are).
        hd95_penalty: its HD95 for a missed lesion or a false positive, in mm.
        summary: one line saying how a case is scored (the evaluation table's note).
    """

    region_scores: Callable[..., LesionScore]
    plain_hd95: Callable[..., float]
    hd95_host: Callable[[np.ndarray, np.ndarray, Sequence[float]], float]
    hd95_device: Callable[[torch.Tensor, torch.Tensor, Sequence[float]], float]
    hd95_penalty: float
    summary: str


#: The metric definitions ``eval.lesion_definition`` chooses from.
LESION_DEFINITIONS: dict[str, LesionDefinition] = {
    "brats2023": LesionDefinition(
        _brats2023_region,
        _brats2023_plain_hd95,
        surface_distance.hd95,
        surface_distance.hd95_torch,
        DEFAULT_HD95_PENALTY,
        "brats2023: per region, mean over truth lesions (merged within the dilation, above the size threshold) "
        "and false positives; HD95 over surface elements",
    ),
    "panoptica": LesionDefinition(
        _panoptica_region,
        _panoptica_plain_hd95,
        surface_distance.border_hd95,
        surface_distance.border_hd95_torch,
        PANOPTICA_HD95_PENALTY,
        "panoptica: per region, mean over one-to-one matched lesions only (NaN, left out, where neither side "
        "has one); HD95 over border voxels, the plain one in voxels",
    ),
}


def _definition(name: str) -> LesionDefinition:
    if name not in LESION_DEFINITIONS:
        raise ValueError(f"unknown lesion definition {name!r}; expected one of {', '.join(LESION_DEFINITIONS)}")
    return LESION_DEFINITIONS[name]


def _hd95_of(ops, chosen: LesionDefinition):
    """The definition's HD95 function for the backend ``ops`` runs on."""
    return chosen.hd95_device if ops is _TorchOps else chosen.hd95_host


def region_lesion_scores(
    pred,
    truth,
    spacing: Sequence[float] | None = None,
    dilation_iterations: int = DEFAULT_DILATION_ITERATIONS,
    min_lesion_volume: float = DEFAULT_MIN_LESION_VOLUME,
    hd95_penalty: float | None = None,
    backend: str = DEFAULT_LESION_BACKEND,
    distances: bool = True,
    definition: str = DEFAULT_LESION_DEFINITION,
) -> LesionScore:
    """Lesion-wise Dice and HD95 of one region, as ``definition`` scores it (see the module docstring).

    Args:
        pred, truth: boolean masks (D, H, W) of the same shape: NumPy arrays, or torch tensors on
            one device.
        spacing: voxel size in mm per axis (1 mm when None), for the HD95 and the lesions' volumes.
        dilation_iterations: dilation that merges and matches truth lesions (0: no dilation;
            brats2023 only).
        min_lesion_volume: truth lesions of this many mm³ or less are dropped (brats2023 only).
        hd95_penalty: the HD95 of a missed lesion or a false positive, in mm (None: the definition's).
        backend: "scipy" (on the host), "torch" (on the tensors' device) or "auto"
            (:func:`resolve_backend`); every backend gives the same scores.
        distances: False skips the surface distances (``hd95`` is then NaN), for callers that
            need the Dice only.
        definition: a key of :data:`LESION_DEFINITIONS`.

    Returns:
        the score; NaN Dice and HD95 only where the panoptica definition finds no instance on either side.

    Raises:
        ValueError: masks of different shapes or not 3-D, an unknown backend or definition.
    """
    if tuple(pred.shape) != tuple(truth.shape) or pred.ndim != 3:
        raise ValueError(
            f"lesion-wise metrics need two 3-D masks of one shape, got {tuple(pred.shape)} and {tuple(truth.shape)}"
        )
    chosen = _definition(definition)
    ops = _BACKEND_OPS[resolve_backend(backend, pred, truth)]
    pred, truth = ops.mask(pred), ops.mask(truth)
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    penalty = chosen.hd95_penalty if hd95_penalty is None else hd95_penalty
    hd95 = _hd95_of(ops, chosen) if distances else None
    return chosen.region_scores(ops, pred, truth, spacing, dilation_iterations, min_lesion_volume, penalty, hd95)


def case_lesion_scores(
    pred_labels,
    true_labels,
    spacing: Sequence[float] | None = None,
    dilation_iterations: int = DEFAULT_DILATION_ITERATIONS,
    min_lesion_volume: float = DEFAULT_MIN_LESION_VOLUME,
    hd95_penalty: float | None = None,
    backend: str = DEFAULT_LESION_BACKEND,
    distances: bool = True,
    definition: str = DEFAULT_LESION_DEFINITION,
    scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
    region_min_volume: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Lesion-wise Dice and HD95 of each region of ``scheme`` for one case.

    Args:
        pred_labels, true_labels: class-index maps (D, H, W) (0 background, then the scheme's
            classes), NumPy arrays or torch tensors on one device; the "torch" backend works on
            that device, the "scipy" one on a host copy.
        spacing, dilation_iterations, min_lesion_volume, hd95_penalty, backend, distances, definition: see
            :func:`region_lesion_scores`.
        scheme: whose regions are scored, in its reporting order.
        region_min_volume: regions with their own size threshold (mm³) instead of ``min_lesion_volume``.

    Returns:
        {"lesion_dice/<region>" for each region, then "lesion_hd95/<region>"} (glioma: WT, TC, ET):
        floats (Dice in [0, 1], HD95 in mm); NaN only for HD95 when ``distances`` is False, and
        where the panoptica definition finds no lesion on either side.
    """
    ops = _BACKEND_OPS[resolve_backend(backend, pred_labels, true_labels)]
    pred, truth = ops.labels(pred_labels), ops.labels(true_labels)
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    # One crop for every region (each region lies inside the foreground, any class), as in
    # region_lesion_scores.
    foreground = ops.bounding_box((pred > 0) | (truth > 0))
    if foreground is not None:
        crop = _grow(foreground, dilation_iterations + 1, tuple(truth.shape))
        pred, truth = pred[crop], truth[crop]
    dice_row, hd_row = {}, {}
    for name, members in scheme.regions.items():
        score = region_lesion_scores(
            ops.isin(pred, members),
            ops.isin(truth, members),
            spacing,
            dilation_iterations,
            (region_min_volume or {}).get(name, min_lesion_volume),
            hd95_penalty,
            ops.name,
            distances,
            definition,
        )
        dice_row[f"lesion_dice/{name}"] = score.dice
        hd_row[f"lesion_hd95/{name}"] = score.hd95
    return {**dice_row, **hd_row}


def case_region_hd95(
    pred_labels,
    true_labels,
    spacing: Sequence[float] | None = None,
    hd95_penalty: float | None = None,
    backend: str = DEFAULT_LESION_BACKEND,
    definition: str = DEFAULT_LESION_DEFINITION,
    scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
) -> dict[str, float]:
    """The plain (whole-region) HD95 of each region of ``scheme`` for one case, as the definition
    computes it.

    Args:
        pred_labels, true_labels: canonical label maps (D, H, W), NumPy arrays or torch tensors
            on one device.
        spacing: voxel size in mm per axis (1 mm when None).
        hd95_penalty: the HD95 where one side is empty (brats2023), or where the sides share no
            voxel (panoptica), in mm; None: the definition's.
        backend, definition: see :func:`region_lesion_scores`.
        scheme: whose regions are scored, in its reporting order.

    Returns:
        {"hd95/<region>"} for each region (glioma: WT, TC, ET): floats in mm. Where a region is empty
        on both sides: 0 (brats2023), NaN (panoptica, left out of the means over cases).

    Raises:
        ValueError: label maps of different shapes, an unknown backend or definition.
    """
    ops = _BACKEND_OPS[resolve_backend(backend, pred_labels, true_labels)]
    pred, truth = ops.labels(pred_labels), ops.labels(true_labels)
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    chosen = _definition(definition)
    hd95 = _hd95_of(ops, chosen)
    penalty = chosen.hd95_penalty if hd95_penalty is None else hd95_penalty
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    return {
        f"hd95/{name}": chosen.plain_hd95(ops.isin(pred, members), ops.isin(truth, members), spacing, penalty, hd95)
        for name, members in scheme.regions.items()
    }


def _to_numpy(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        return labels.detach().cpu().numpy()
    return np.asarray(labels)
