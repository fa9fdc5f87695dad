"""The Dice evaluator used during training: sliding-window prediction over whole prepared
validation volumes, Dice per label and per BraTS region, reduced across ranks, and a per-case CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.loader import PreparedCase
from .distributed import all_gather_objects
from .inference import predict_volume
from .metrics import case_dice, mean_scores, regions_to_labels


def logits_to_labels(logits: torch.Tensor, region_mode: bool) -> torch.Tensor:
    """(K, *S) logits -> canonical labels (*S): argmax over classes, or thresholded sigmoid regions."""
    if region_mode:
        return regions_to_labels(torch.sigmoid(logits)[None])[0]
    return logits.argmax(0).to(torch.uint8)


class DiceEvaluator:
    """Scores a model on prepared validation cases.

    Args:
        folder: the prepared dataset folder.
        case_ids: validation cases; each rank scores its share ``case_ids[rank::world_size]``.
        patch_size: the sliding window (the training patch).
        spatial_dims: 2 (slice by slice) or 3.
        num_outputs: the model's output channels.
        region_mode: outputs are sigmoid WT/TC/ET regions rather than softmax labels.
        overlap, sw_batch_size, gaussian, mirror: sliding-window settings.
        empty_policy: see :mod:`unet_trainer.metrics`.
        amp_dtype: autocast dtype or None.
        cases_csv: where rank 0 writes the per-case scores of the latest evaluation (or None).
    """

    def __init__(self, folder: Path, case_ids: Sequence[str], patch_size: Sequence[int], spatial_dims: int,
                 num_outputs: int, region_mode: bool, overlap: float, sw_batch_size: int, gaussian: bool,
                 mirror: bool, empty_policy: str, amp_dtype: torch.dtype | None, device: torch.device,
                 rank: int = 0, world_size: int = 1, cases_csv: Path | None = None):
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.patch_size, self.spatial_dims = tuple(patch_size), spatial_dims
        self.num_outputs, self.region_mode = num_outputs, region_mode
        self.overlap, self.sw_batch_size, self.gaussian, self.mirror = overlap, sw_batch_size, gaussian, mirror
        self.empty_policy, self.amp_dtype, self.device = empty_policy, amp_dtype, device
        self.rank, self.world_size = rank, world_size
        self.cases_csv = cases_csv
        self.last_per_case: list[dict] = []

    def score_model(self, model: torch.nn.Module) -> tuple[dict[str, float], list[dict]]:
        """Mean scores over all validation cases and the per-case rows (all ranks gathered)."""
        mine = []
        for case_id in self.case_ids[self.rank::self.world_size]:
            case = PreparedCase(self.folder, case_id)
            image = torch.from_numpy(np.array(case.image)).to(self.device)  # copy: the memmap is read-only
            label = torch.from_numpy(np.array(case.label)).to(self.device)
            logits = predict_volume(model, image, self.patch_size, self.spatial_dims, self.num_outputs,
                                    self.overlap, self.sw_batch_size, self.gaussian, self.amp_dtype, self.mirror)
            scores = case_dice(logits_to_labels(logits, self.region_mode), label, self.empty_policy)
            mine.append({"case_id": case_id, **scores})
        per_case = sorted((row for rows in all_gather_objects(mine) for row in rows), key=lambda r: r["case_id"])
        means = mean_scores([{k: v for k, v in r.items() if k != "case_id"} for r in per_case])
        return means, per_case

    def __call__(self, state) -> dict[str, float]:
        means, per_case = self.score_model(state.unwrapped_model)
        self.last_per_case = per_case
        if self.cases_csv is not None and self.rank == 0 and per_case:
            self.cases_csv.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cases_csv, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(per_case[0]))
                writer.writeheader()
                writer.writerows(per_case)
        return {f"dice/{k}": v for k, v in means.items()}
