"""The Dice evaluator used during training (every ``eval_interval``) and by ``unet-eval``:
sliding-window prediction over whole prepared validation volumes, the chosen per-case metrics
(:mod:`unet_trainer.evaluation.case_metrics`: Dice per label and region, optionally HD95 and the
lesion-wise scores), gathered across ranks, and a per-case CSV.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.distributed import all_gather_objects
from ..data.loader import PreparedCase
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from .case_metrics import CaseMetric
from .cases import write_cases_csv
from .inference import SlidingWindow
from .metrics import mean_scores, regions_to_labels


def logits_to_labels(
    logits: torch.Tensor, region_mode: bool, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]
) -> torch.Tensor:
    """(K, *S) logits -> class indices (*S) uint8: argmax over classes, or the scheme's thresholded
    sigmoid trained regions (glioma WT, TC, ET) painted as nnU-Net does (:func:`regions_to_labels`)."""
    if region_mode:
        return regions_to_labels(torch.sigmoid(logits)[None], scheme)[0]
    return logits.argmax(0).to(torch.uint8)


def logits_to_probabilities(logits: torch.Tensor, region_mode: bool) -> torch.Tensor:
    """(K, *S) logits -> float32 probabilities (K, *S): softmax over classes, or per-region sigmoid."""
    return torch.sigmoid(logits) if region_mode else torch.softmax(logits, dim=0)


def probabilities_to_labels(
    probs: torch.Tensor, region_mode: bool, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]
) -> torch.Tensor:
    """(K, *S) probabilities -> class indices (*S) uint8; the same labels
    :func:`logits_to_labels` gives for the logits they came from."""
    if region_mode:
        return regions_to_labels(probs[None], scheme)[0]
    return probs.argmax(0).to(torch.uint8)


class DiceEvaluator:
    """Scores a model on prepared validation cases.

    Args:
        folder: the prepared dataset folder.
        case_ids: validation cases; each rank scores its share ``case_ids[rank::world_size]``.
        window: the sliding-window inference (patch, model outputs, overlap, mirroring, autocast).
        metrics: the per-case metrics (:data:`~unet_trainer.evaluation.case_metrics.METRICS`), in
            the order of their columns.
        region_mode: outputs are the scheme's sigmoid trained regions rather than softmax classes.
        device: where the cases are scored.
        rank, world_size: this process among the ranks scoring together.
        cases_csv: where rank 0 writes the per-case scores of the latest evaluation (or None).
        progress: a progress bar over this rank's cases (for ``unet-eval``).
        scheme: the data's label scheme: how region outputs turn into classes (the metrics carry
            their own, the same one).

    Scores per case: the keys the metrics return (Dice: the classes, the regions and mean, glioma
    NCR, ED, EN, WT, TC, ET, mean; HD95: hd95/<region>; lesion-wise: lesion_dice/<region> and
    lesion_hd95/<region>);
    :meth:`__call__` reports their means with a plain key as ``dice/<key>``, the others as they are.

    ``case_view`` (None by default) is a hook for pictures: when set, it is called per scored case
    as ``case_view(case_id, image (C, *S), label (*S), prediction (*S), meta)`` on the device, and
    what it returns (small, picklable) lands in ``last_views`` by case id, gathered from all ranks;
    every rank must set it alike, since the gather is collective.

    ``case_sink`` (None by default), when set, is called per scored case as
    ``case_sink(case_id, label (*S), prediction (*S), spacing (z, y, x) mm)`` on the device, on this rank only (unet-eval
    keeps the predictions this way to choose postprocessing on them).
    """

    def __init__(
        self,
        folder: Path,
        case_ids: Sequence[str],
        window: SlidingWindow,
        metrics: Sequence[CaseMetric],
        region_mode: bool,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        cases_csv: Path | None = None,
        progress: bool = False,
        scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
    ):
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.window, self.metrics = window, list(metrics)
        self.region_mode, self.device = region_mode, device
        self.rank, self.world_size = rank, world_size
        self.cases_csv, self.progress = cases_csv, progress
        self.scheme = scheme
        self.last_per_case: list[dict] = []
        self.case_view = None
        self.case_sink = None
        self.last_views: dict = {}
        self._views: list = []

    def score_case(self, model: torch.nn.Module, case_id: str) -> dict:
        """The score row of one prepared case: {"case_id", then each metric's keys}."""
        case = PreparedCase(self.folder, case_id)
        image = torch.from_numpy(np.array(case.image)).to(self.device)  # copy: the memmap is read-only
        label = torch.from_numpy(np.array(case.label)).to(self.device)
        logits = self.window(model, image)
        pred = logits_to_labels(logits, self.region_mode, self.scheme)
        del logits  # K float32 volumes; free them before the (CPU-heavy) HD95
        if self.case_view is not None:
            self._views.append((case_id, self.case_view(case_id, image, label, pred, case.meta)))
        if self.case_sink is not None:
            self.case_sink(case_id, label, pred, case.meta.get("spacing"))
        row = {"case_id": case_id}
        for metric in self.metrics:
            row.update(metric(pred, label, case.meta.get("spacing")))
        return row

    def score_model(self, model: torch.nn.Module) -> tuple[dict[str, float], list[dict]]:
        """Mean scores over all validation cases and the per-case rows (all ranks gathered)."""
        mine_ids = self.case_ids[self.rank :: self.world_size]
        self._views = []
        mine = [
            self.score_case(model, case_id)
            for case_id in tqdm(mine_ids, desc="evaluate", unit="case", disable=None if self.progress else True)
        ]
        per_case = sorted((row for rows in all_gather_objects(mine) for row in rows), key=lambda r: r["case_id"])
        self.last_views = {}
        if self.case_view is not None:
            self.last_views = dict(pair for pairs in all_gather_objects(self._views) for pair in pairs)
        self._views = []
        means = mean_scores([{k: v for k, v in r.items() if k != "case_id"} for r in per_case])
        return means, per_case

    def __call__(self, state) -> dict[str, float]:
        means, per_case = self.score_model(state.unwrapped_model)
        self.last_per_case = per_case
        if self.cases_csv is not None and self.rank == 0 and per_case:
            write_cases_csv(self.cases_csv, per_case)
        return {(k if "/" in k else f"dice/{k}"): v for k, v in means.items()}
