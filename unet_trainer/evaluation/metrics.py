"""Dice scores per label and per BraTS region, computed on the device.

Empty ground truth policy (``empty_policy``):
    "one_if_both_empty"  Composer/DLE: a structure absent from the ground truth scores 1 when the
                         prediction is empty too, else 0. Every case counts.
    "ignore"             MONAI's ``ignore_empty=True``: such a case scores NaN and is left out of
                         the mean for that structure.

HD95 per region: :func:`unet_trainer.evaluation.lesion_metrics.case_region_hd95` (the chosen
metric definition's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..data.schemes import LABEL_NAMES, REGION_NAMES, REGIONS

EMPTY_POLICIES = ("one_if_both_empty", "ignore")


def regions_to_labels(region_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Sigmoid region outputs (B, 3, *S) in (WT, TC, ET) order -> canonical labels (B, *S) uint8.

    As nnU-Net converts its BraTS regions: inside WT is oedema (2), inside TC necrotic core (1),
    inside ET enhancing (3); nested regions win.
    """
    masks = region_probs > threshold
    labels = torch.zeros(masks.shape[:1] + masks.shape[2:], dtype=torch.uint8, device=region_probs.device)
    labels[masks[:, 0]] = 2
    labels[masks[:, 1]] = 1
    labels[masks[:, 2]] = 3
    return labels


def dice(pred: torch.Tensor, truth: torch.Tensor, empty_policy: str = "one_if_both_empty") -> float:
    """Dice of two boolean masks of the same shape, with the empty-truth policy.

    Raises:
        ValueError: an unknown policy.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; expected one of {EMPTY_POLICIES}")
    truth_sum = int(truth.sum())
    pred_sum = int(pred.sum())
    if truth_sum == 0:
        if empty_policy == "ignore":
            return math.nan
        return 1.0 if pred_sum == 0 else 0.0
    intersection = int((pred & truth).sum())
    return 2.0 * intersection / (pred_sum + truth_sum)


def _structure_counts(pred_labels: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """Joint histogram of (prediction, truth) labels: (5, 5) int64 on the labels' device.

    Entry [p, t] counts voxels predicted p with truth t for canonical labels 0..3; any other value
    counts in row/column 4 ("no tumour label"), so it belongs to no structure. Every Dice of every
    label and region follows from this one pass over the volume.
    """
    pred = pred_labels.reshape(-1).long().clamp(0, 4)
    truth = true_labels.reshape(-1).long().clamp(0, 4)
    return torch.bincount(pred * 5 + truth, minlength=25).reshape(5, 5)


def _dice_from_counts(pred_sum: int, truth_sum: int, intersection: int, empty_policy: str) -> float:
    if truth_sum == 0:
        if empty_policy == "ignore":
            return math.nan
        return 1.0 if pred_sum == 0 else 0.0
    return 2.0 * intersection / (pred_sum + truth_sum)


def case_dice(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, empty_policy: str = "one_if_both_empty"
) -> dict[str, float]:
    """Dice per tumour label and per region for one case, computed on the labels' device.

    One histogram kernel over the volume and one transfer of 25 counts to the host (instead of a
    mask, a reduction and a synchronisation per structure); the values equal :func:`dice` on
    each structure's masks.

    Args:
        pred_labels, true_labels: canonical label maps (*S), any integer dtype, same device.
        empty_policy: see the module docstring.

    Returns:
        {"NCR", "ED", "EN", "WT", "TC", "ET", "mean"}: "mean" averages WT, TC and ET
        (NaNs left out under the "ignore" policy).

    Raises:
        ValueError: an unknown policy, or label maps of different shapes.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; expected one of {EMPTY_POLICIES}")
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction {tuple(pred_labels.shape)} and truth {tuple(true_labels.shape)} differ in shape")
    counts = _structure_counts(pred_labels, true_labels).tolist()
    structures = {name: (value,) for value, name in LABEL_NAMES.items()}
    structures.update({name: REGIONS[name] for name in REGION_NAMES})
    scores: dict[str, float] = {}
    for name, members in structures.items():
        pred_sum = sum(counts[p][t] for p in members for t in range(5))
        truth_sum = sum(counts[p][t] for p in range(5) for t in members)
        intersection = sum(counts[p][t] for p in members for t in members)
        scores[name] = _dice_from_counts(pred_sum, truth_sum, intersection, empty_policy)
    region_values = [scores[n] for n in REGION_NAMES if not math.isnan(scores[n])]
    scores["mean"] = sum(region_values) / len(region_values) if region_values else math.nan
    return scores


def mean_scores(per_case: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average each key over cases, leaving NaNs (ignored empties) out; NaN if all are NaN."""
    per_case = list(per_case)
    if not per_case:
        return {}
    out = {}
    for key in per_case[0]:
        values = [c[key] for c in per_case if not math.isnan(c[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out
