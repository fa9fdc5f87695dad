"""The predicted and true label maps of an evaluation, by case id, as ``unet-eval`` keeps them to
choose postprocessing on (:mod:`unet_trainer.evaluation.postprocessing`): in memory while they fit,
beyond that as .npy files in a temporary folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Predicted label maps kept in memory up to this many bytes; the rest go to a temporary folder.
DEFAULT_MEMORY_BYTES = 2 * 2**30


class PredictionStore:
    """Predicted and true label maps by case id, as unet-eval scores them: in memory while they
    fit ``memory_bytes``, beyond that as .npy files in a temporary folder inside ``folder`` (the
    run folder), which :meth:`close` removes (also on leaving a ``with`` block).

    Args:
        folder: where the temporary folder goes (created when the first case spills).
        memory_bytes: how many bytes of label maps to keep in memory.
    """

    def __init__(self, folder: Path, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.folder, self.memory_bytes = Path(folder), memory_bytes
        self.spill_dir: Path | None = None
        self._memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._files: dict[str, tuple[Path, Path]] = {}
        self._order: dict[str, None] = {}
        self._spacing: dict[str, tuple[float, ...] | None] = {}
        self._held = 0

    @property
    def case_ids(self) -> list[str]:
        """Every case, in the order they were put."""
        return list(self._order)

    def put(self, case_id: str, truth, prediction, spacing: Sequence[float] | None = None) -> None:
        """Keep (or replace) a case's label maps (Z, Y, X), NumPy arrays or tensors on any device, and
        its voxel spacing (z, y, x) mm (None: 1 mm), which lesion sizes in mm³ are measured with."""
        truth, prediction = _host_uint8(truth), _host_uint8(prediction)
        self._order[case_id] = None
        self._spacing[case_id] = tuple(float(v) for v in spacing) if spacing is not None else None
        size = truth.nbytes + prediction.nbytes
        previous = self._memory.pop(case_id, None)
        if previous is not None:
            self._held -= previous[0].nbytes + previous[1].nbytes
        if case_id not in self._files and self._held + size <= self.memory_bytes:
            self._memory[case_id] = (truth, prediction)
            self._held += size
            return
        if self.spill_dir is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.spill_dir = Path(tempfile.mkdtemp(prefix=".postprocessing-predictions-", dir=self.folder))
        # Files by number: case ids come from users' file names.
        number = list(self._files).index(case_id) if case_id in self._files else len(self._files)
        paths = (self.spill_dir / f"{number}-truth.npy", self.spill_dir / f"{number}-pred.npy")
        np.save(paths[0], truth, allow_pickle=False)
        np.save(paths[1], prediction, allow_pickle=False)
        self._files[case_id] = paths

    def spacing(self, case_id: str) -> tuple[float, ...] | None:
        """The voxel spacing (z, y, x) mm a case was put with (None: not given, 1 mm). Raises KeyError."""
        return self._spacing[case_id]

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(truth, prediction) uint8 (Z, Y, X) of a case. Raises KeyError for an unknown case."""
        if case_id in self._memory:
            return self._memory[case_id]
        truth_path, pred_path = self._files[case_id]
        return np.load(truth_path, allow_pickle=False), np.load(pred_path, allow_pickle=False)

    def set_prediction(self, case_id: str, prediction: np.ndarray) -> None:
        """Replace a case's prediction (its truth stays)."""
        self.put(case_id, self.get(case_id)[0], prediction)

    def close(self) -> None:
        """Forget every case and remove the temporary folder."""
        self._memory.clear()
        self._files.clear()
        self._order.clear()
        self._held = 0
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_uint8(labels) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    return np.ascontiguousarray(labels, dtype=np.uint8)
