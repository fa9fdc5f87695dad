"""Dice scores per class and per region of a label scheme, computed on the device.

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

from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme

EMPTY_POLICIES = ("one_if_both_empty", "ignore")


def regions_to_labels(
    region_probs: torch.Tensor, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME], threshold: float = 0.5
) -> torch.Tensor:
    """Sigmoid region outputs (B, R, *S), one channel per trained region of ``scheme`` in its
    ``trained_regions`` order -> class indices (B, *S) uint8.

    As nnU-Net converts region outputs (``regions_class_order``): each region that is on paints its
    class, in the scheme's order, a later region over an earlier one. For the glioma schemes inside
    WT is oedema (2), inside TC necrotic core (1), inside ET enhancing (3).

    Raises:
        ValueError: R is not the number of the scheme's trained regions.
    """
    if region_probs.shape[1] != len(scheme.trained_regions):
        raise ValueError(
            f"{region_probs.shape[1]} region outputs, but scheme {scheme.name} trains "
            f"{len(scheme.trained_regions)} ({', '.join(scheme.trained_regions)})"
        )
    masks = region_probs > threshold
    labels = torch.zeros(masks.shape[:1] + masks.shape[2:], dtype=torch.uint8, device=region_probs.device)
    for channel, painted in enumerate(scheme.regions_class_order):
        labels[masks[:, channel]] = painted
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


def _structure_counts(pred_labels: torch.Tensor, true_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Joint histogram of (prediction, truth) labels: (K + 1, K + 1) int64 on the labels' device,
    for K = ``num_classes`` (background included).

    Entry [p, t] counts voxels predicted p with truth t for class indices 0..K-1; any other value
    counts in row/column K ("no class of the scheme"), so it belongs to no structure. Every Dice of
    every class and region follows from this one pass over the volume.
    """
    bins = num_classes + 1
    pred = pred_labels.reshape(-1).long().clamp(0, num_classes)
    truth = true_labels.reshape(-1).long().clamp(0, num_classes)
    return torch.bincount(pred * bins + truth, minlength=bins * bins).reshape(bins, bins)


def _dice_from_counts(pred_sum: int, truth_sum: int, intersection: int, empty_policy: str) -> float:
    if truth_sum == 0:
        if empty_policy == "ignore":
            return math.nan
        return 1.0 if pred_sum == 0 else 0.0
    return 2.0 * intersection / (pred_sum + truth_sum)


def case_dice(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    empty_policy: str = "one_if_both_empty",
    scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
) -> dict[str, float]:
    """Dice per class and per region of ``scheme`` for one case, computed on the labels' device.

    One histogram kernel over the volume and one transfer of (K + 1)² counts to the host (instead
    of a mask, a reduction and a synchronisation per structure); the values equal :func:`dice` on
    each structure's masks.

    Args:
        pred_labels, true_labels: class-index maps (*S), any integer dtype, same device.
        empty_policy: see the module docstring.
        scheme: the classes and regions scored.

    Returns:
        {each class's short name, each region's name, "mean"} in that order (glioma: NCR, ED, EN,
        WT, TC, ET, mean): "mean" averages the scheme's regions (NaNs left out under the "ignore"
        policy).

    Raises:
        ValueError: an unknown policy, or label maps of different shapes.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty_policy {empty_policy!r}; expected one of {EMPTY_POLICIES}")
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction {tuple(pred_labels.shape)} and truth {tuple(true_labels.shape)} differ in shape")
    counts = _structure_counts(pred_labels, true_labels, scheme.num_classes).tolist()
    every = range(scheme.num_classes + 1)
    structures = {name: (value,) for value, name in scheme.label_names.items()}
    structures.update(scheme.regions)
    scores: dict[str, float] = {}
    for name, members in structures.items():
        pred_sum = sum(counts[p][t] for p in members for t in every)
        truth_sum = sum(counts[p][t] for p in every for t in members)
        intersection = sum(counts[p][t] for p in members for t in members)
        scores[name] = _dice_from_counts(pred_sum, truth_sum, intersection, empty_policy)
    region_values = [scores[n] for n in scheme.regions if not math.isnan(scores[n])]
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
