"""What shows a run to people: the segmentation overlays after evaluations (a callback). The
progress plot is in :mod:`unet_trainer.training.callbacks`; the logger destinations (log files,
TensorBoard, MLflow) are in :mod:`unet_trainer.training.loggers`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from ..core.schema import PositiveInt, Setting
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from ..evaluation.case_views import evaluator_case_view
from ..evaluation.visualize import write_overlays
from .trainer import Callback, State


class OverlayWriter(Callback):
    """``<run>/overlays/``: after every ``every``-th evaluation (and the last one), one PNG per
    validation case (the first ``cases`` by id, or ``"all"``) and ``summary.png`` (the worst and
    best 4 of all cases). Overwritten each time, so the folder stays small.

    Every rank runs it: it switches the evaluator's ``case_view`` hook on for the evaluations
    that are due (each rank cuts the slices of the cases it scored; the evaluator gathers them),
    and rank 0 (``is_writer``) draws; ``seconds`` is the last drawing's wall time. Keeps the latest
    summary picture in ``summary`` (with ``summary_batch``) for loggers that run after it.
    Built only when the run evaluates. ``scheme``: the data's label scheme (the classes drawn,
    the regions in the titles; the builder supplies it).
    """

    needs_evaluator = True

    def __init__(
        self,
        run_dir: Path,
        evaluator,
        cases: Annotated[int | Literal["all"], Setting(kind="int_or_all")] = 16,
        every: PositiveInt = 1,
        is_writer: bool = True,
        scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
    ):
        self.folder = Path(run_dir) / "overlays"
        self.evaluator = evaluator
        self.cases = None if cases == "all" else cases  # None: every case
        self.every, self.is_writer = every, is_writer
        self.scheme = scheme
        self.summary: np.ndarray | None = None
        self.summary_batch: int | None = None
        self.seconds: float | None = None

    def eval_start(self, state: State) -> None:
        # The same decision on every rank: the evaluation count and the timestamp agree across ranks.
        due = len(state.eval_history) % self.every == 0 or state.done()
        self.evaluator.case_view = evaluator_case_view if due else None

    def eval_end(self, state: State) -> None:
        due = self.evaluator.case_view is not None
        self.evaluator.case_view = None
        views, self.evaluator.last_views = self.evaluator.last_views, {}  # no slices kept between evaluations
        if not due or not self.is_writer:
            return
        started = time.perf_counter()
        rows = {row["case_id"]: row for row in self.evaluator.last_per_case}
        when = state.timestamp
        summary = write_overlays(self.folder, views, rows, self.cases, when.epoch, when.batch, self.scheme)
        if summary is not None:
            self.summary, self.summary_batch = summary, state.timestamp.batch
            # Not in the evaluation record: that must stay the same on every rank.
            self.seconds = time.perf_counter() - started
