"""The pieces of the ``panoptica`` metric definition: what the ``brats-evaluation`` package (the
BraTS scorer from 2025 on; PyPI ``BraTS-evaluation`` 0.0.10 on ``panoptica`` 2.1.7, its bundled
``config_*.yaml``) computes, on NumPy arrays with SciPy or on torch tensors on their device.

* Instances: the 26-connected components of a region's mask, in the truth and in the prediction;
  nearby lesions are not merged (no dilation) and no lesion is too small to count.
* Matching (:func:`match_instances`, panoptica's ``MaxBipartiteMatching`` on DSC with threshold
  1e-6): one-to-one, maximising the summed Dice of the matched pairs; a pair can match only when
  its Dice is at least 1e-6 (they overlap). Panoptica solves it with SciPy's
  ``linear_sum_assignment`` on the cost 1 - Dice (1 + 1e-6 for a pair that cannot match); the same
  solver here, on the components that overlap anything (the others cannot match, and leaving them
  out changes no optimum).
* HD95: :func:`unet_trainer.evaluation.surface_distance.border_hd95` (panoptica's
  ``metrics/hausdorff_distance.py``, medpy's definition), of each matched pair
  (:func:`matched_hd95`).

How a case is scored from these (the lesion-wise means, the edge cases of no match, the
whole-region HD95 without spacing) is :mod:`unet_trainer.evaluation.lesion_metrics`' ``panoptica``
definition.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

#: The least Dice at which a truth and a predicted instance can match (the package's configs).
MATCHING_THRESHOLD = 1e-6


def _sizes_and_overlaps(truth_cc, n_truth: int, pred_cc, n_pred: int):
    """Voxel counts of every component (index 0 the background) and the overlapping pairs.

    Returns:
        (truth sizes (n_truth + 1,), prediction sizes (n_pred + 1,), pairs (K, 2) of
        (truth id, prediction id), their overlaps (K,)), NumPy int64 on the host.
    """
    if isinstance(truth_cc, torch.Tensor):
        truth_sizes = torch.bincount(truth_cc.flatten(), minlength=n_truth + 1).cpu().numpy()
        pred_sizes = torch.bincount(pred_cc.flatten(), minlength=n_pred + 1).cpu().numpy()
        both = (truth_cc > 0) & (pred_cc > 0)
        joint = truth_cc[both].long() * (n_pred + 1) + pred_cc[both].long()
        codes, overlaps = (t.cpu().numpy() for t in torch.unique(joint, return_counts=True))
    else:
        truth_sizes = np.bincount(truth_cc.ravel(), minlength=n_truth + 1)
        pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
        both = (truth_cc > 0) & (pred_cc > 0)
        joint = truth_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
        codes, overlaps = np.unique(joint, return_counts=True)
    pairs = np.stack([codes // (n_pred + 1), codes % (n_pred + 1)], axis=1)
    return truth_sizes, pred_sizes, pairs, overlaps


def match_instances(truth_cc, n_truth: int, pred_cc, n_pred: int) -> list[tuple[int, int, float]]:
    """Panoptica's one-to-one matching of truth and predicted instances on Dice.

    Args:
        truth_cc, pred_cc: component maps (D, H, W) of one shape, 0 the background and 1..n the
            components; NumPy arrays or torch tensors on one device.
        n_truth, n_pred: their component counts.

    Returns:
        [(truth id, prediction id, Dice)] of the matched pairs, by truth id.
    """
    truth_sizes, pred_sizes, pairs, overlaps = _sizes_and_overlaps(truth_cc, n_truth, pred_cc, n_pred)
    dice = 2.0 * overlaps / (truth_sizes[pairs[:, 0]] + pred_sizes[pairs[:, 1]])
    keep = dice >= MATCHING_THRESHOLD
    pairs, dice = pairs[keep], dice[keep]
    if len(pairs) == 0:
        return []
    rows, row_of = np.unique(pairs[:, 0], return_inverse=True)
    columns, column_of = np.unique(pairs[:, 1], return_inverse=True)
    cost = np.full((len(rows), len(columns)), 1.0 + MATCHING_THRESHOLD)
    cost[row_of, column_of] = 1.0 - dice
    chosen_rows, chosen_columns = linear_sum_assignment(cost)
    matches = [
        (int(rows[r]), int(columns[c]), float(1.0 - cost[r, c]))
        for r, c in zip(chosen_rows, chosen_columns)
        if cost[r, c] < 1.0
    ]
    return sorted(matches)


def matched_hd95(
    truth_cc, pred_cc, truth_box, pred_box, truth_id: int, pred_id: int, spacing, hd95_of: Callable
) -> float:
    """The HD95 of one matched pair, on the box around both instances grown by one voxel
    (``truth_box``, ``pred_box``: the instances' bounding boxes, as ``find_objects`` gives them)."""
    shape = tuple(truth_cc.shape)
    window = tuple(
        slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, n))
        for a, b, n in zip(truth_box, pred_box, shape)
    )
    return hd95_of(pred_cc[window] == pred_id, truth_cc[window] == truth_id, spacing)
