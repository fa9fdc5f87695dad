"""The slices an overlay shows: three orthogonal slices through a case's tumour
(:func:`extract_case_view`), cut on the device and kept small (a :class:`CaseView`) so that every
rank's views can be gathered; :mod:`unet_trainer.evaluation.visualize` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CaseView:
    """Three orthogonal slices of one case through its tumour.

    Attributes:
        case_id: the case.
        centre: (z, y, x) voxel the three slices pass through.
        image: the first channel's slices in [0, 1] (windowed), float16: axial (Y, X), coronal
            (Z, X), sagittal (Z, Y).
        truth: the ground-truth label slices (uint8, same shapes), or None (prediction only).
        prediction: the predicted label slices (uint8).
        spacing: voxel size (z, y, x) in mm, for the slices' aspect ratio.
    """

    case_id: str
    centre: tuple[int, int, int]
    image: tuple[np.ndarray, np.ndarray, np.ndarray]
    truth: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    prediction: tuple[np.ndarray, np.ndarray, np.ndarray]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def tumour_centre(mask: torch.Tensor) -> tuple[int, int, int] | None:
    """The (z, y, x) voxel whose three slices go through ``mask``'s centre of mass.

    Per axis the slice is the one nearest the centre of mass that holds any of the mask, so a
    ring-shaped or multi-focal tumour still shows in every view.

    Args:
        mask: bool (Z, Y, X), on any device.

    Returns:
        The voxel, or None when the mask is empty.
    """
    if not bool(mask.any()):
        return None
    centre = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(dim=others, dtype=torch.float64)
        positions = torch.arange(profile.numel(), dtype=torch.float64, device=profile.device)
        mean = (profile * positions).sum() / profile.sum()
        distance = torch.where(profile > 0, (positions - mean).abs(), torch.full_like(positions, math.inf))
        centre.append(int(distance.argmin()))
    return tuple(centre)


def _slices(volume: torch.Tensor, centre: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z, y, x = centre
    return volume[z], volume[:, y], volume[:, :, x]


def _window(slices: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Scale to [0, 1] between the 0.5th and 99.5th percentile of the nonzero pixels, background
    (exactly 0, in prepared and raw BraTS images alike) black. MR intensities have no fixed scale,
    and a prepared image is z-scored, so its background 0 would otherwise be mid-grey."""
    values = np.concatenate([s[s != 0].ravel() for s in slices])
    if values.size == 0:
        return tuple(np.zeros_like(s, dtype=np.float16) for s in slices)
    low, high = np.percentile(values, [0.5, 99.5])
    scale = high - low if high > low else 1.0
    return tuple(np.where(s != 0, np.clip((s - low) / scale, 0.0, 1.0), 0.0).astype(np.float16) for s in slices)


def extract_case_view(case_id: str, image, truth, prediction, spacing: Sequence[float] | None = None) -> CaseView:
    """Cut the three slices of a case through its tumour's centre of mass.

    The tumour is the ground truth's (labels > 0), else the prediction's when there is no truth or
    it is empty; with neither, the volume's centre.

    Args:
        case_id: the case.
        image: (C, Z, Y, X) float tensor or array (on any device); channel 0 is shown.
        truth: (Z, Y, X) canonical labels or None.
        prediction: (Z, Y, X) canonical labels.
        spacing: (z, y, x) mm (default 1 mm isotropic).

    Returns:
        The :class:`CaseView` (numpy, on the host).
    """
    image, prediction = torch.as_tensor(image), torch.as_tensor(prediction)
    truth = torch.as_tensor(truth) if truth is not None else None
    centre = tumour_centre(truth > 0) if truth is not None else None
    if centre is None:
        centre = tumour_centre(prediction > 0)
    if centre is None:
        centre = tuple(n // 2 for n in prediction.shape)
    grey = _window([s.float().cpu().numpy() for s in _slices(image[0], centre)])
    labels = lambda volume: tuple(s.to(torch.uint8).cpu().numpy() for s in _slices(volume, centre))  # noqa: E731
    return CaseView(
        case_id=case_id,
        centre=tuple(int(c) for c in centre),
        image=grey,
        truth=labels(truth) if truth is not None else None,
        prediction=labels(prediction),
        spacing=tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0))),
    )


def evaluator_case_view(case_id: str, image, label, prediction, meta: Mapping):
    """The evaluator's ``case_view`` hook: the three slices through the tumour (see
    :func:`unet_trainer.evaluation.visualize.extract_case_view`)."""
    return extract_case_view(case_id, image, label, prediction, meta.get("spacing"))
