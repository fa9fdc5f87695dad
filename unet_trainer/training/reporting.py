"""What shows a run to people and tools: the segmentation overlays after evaluations (a callback),
and the MLflow logger destination (fed by :class:`unet_trainer.training.loggers.Logger`, like the
always-on log files and TensorBoard in :mod:`unet_trainer.training.loggers`; the progress plot is in
:mod:`unet_trainer.training.callbacks`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np

from ..core.checkpoints import CHECKPOINTS_FOLDER, best_name
from ..core.schema import PositiveInt, Setting
from ..evaluation.visualize import evaluator_case_view, write_overlays
from .loggers import LoggerDestination, numeric_metrics
from .trainer import Callback, State


class OverlayWriter(Callback):
    """``<run>/overlays/``: after every ``every``-th evaluation (and the last one), one PNG per
    validation case (the first ``cases`` by id, or ``"all"``) and ``summary.png`` (the worst and
    best 4 of all cases). Overwritten each time, so the folder stays small.

    Every rank runs it: it switches the evaluator's ``case_view`` hook on for the evaluations
    that are due (each rank cuts the slices of the cases it scored; the evaluator gathers them),
    and rank 0 (``is_writer``) draws; ``seconds`` is the last drawing's wall time. Keeps the latest
    summary picture in ``summary`` (with ``summary_batch``) for loggers that run after it.
    Built only when the run evaluates.
    """

    needs_evaluator = True

    def __init__(
        self,
        run_dir: Path,
        evaluator,
        cases: Annotated[int | Literal["all"], Setting(kind="int_or_all")] = 16,
        every: PositiveInt = 1,
        is_writer: bool = True,
    ):
        self.folder = Path(run_dir) / "overlays"
        self.evaluator = evaluator
        self.cases = None if cases == "all" else cases  # None: every case
        self.every, self.is_writer = every, is_writer
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
        summary = write_overlays(self.folder, views, rows, self.cases, state.timestamp.epoch, state.timestamp.batch)
        if summary is not None:
            self.summary, self.summary_batch = summary, state.timestamp.batch
            # Not in the evaluation record: that must stay the same on every rank.
            self.seconds = time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A resolved config as ``{"optimizer.radam.lr": "0.003", ...}``: nested mappings joined with dots,
    every other value (lists, null, an empty component's ``{}``) as its text."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


class MLflowLogger(LoggerDestination):
    """Logs the run to MLflow: the flattened resolved config as params, the metrics at their step
    numbers, and as artifacts ``config.yaml``, ``progress.png``, ``overlays/summary.png`` (after
    every evaluation and at the end) and, with ``log_checkpoints``, ``checkpoints/best-rank0.pt`` at
    the end. Rank 0 only.

    The run's id goes into the checkpoint (``extra_state["mlflow_run_id"]``), so a resumed run
    continues the same MLflow run. MLflow cannot delete logged values, so the interrupted run's
    records past the checkpoint are kept and the resumed run skips every (metric, step) the run
    already holds: each step is logged once (a resumed run replays the same steps). Params already
    on the run keep their first value (MLflow params are immutable); ``config.yaml`` is replaced.

    Args:
        tracking_uri: where MLflow stores runs (``file:./mlruns`` is relative to the working
            directory, as in MLflow). For a file store ``MLFLOW_ALLOW_FILE_STORE`` is set, which
            MLflow 3 requires for that (maintained, no longer developed) backend.
        experiment: created when missing.
        run_name: the MLflow run's name (None: the config's ``run_name``).
        log_checkpoints: also upload the best checkpoint at the end.
        run_dir: the run folder (config.yaml, progress.png, overlays/, checkpoints/).
        config: the resolved config (logged as params).
    """

    requires = ("mlflow", "mlflow")

    def __init__(
        self,
        tracking_uri: str = "file:./mlruns",
        experiment: str = "unet-trainer",
        run_name: str | None = None,
        log_checkpoints: bool = False,
        *,
        run_dir: Path,
        config: Mapping[str, Any],
    ):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name = run_name or config.get("run_name")
        self.log_checkpoints = log_checkpoints
        self.run_dir = Path(run_dir)
        self.config = config
        self.client = None
        self.run_id: str | None = None
        self.previous_run_id: str | None = None  # the resumed checkpoint's MLflow run
        self.logged_up_to: dict[str, int] = {}  # metric key -> last step the run already holds

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.previous_run_id = saved.get("mlflow_run_id")

    def state_dict(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    def truncate_after(self, step: int) -> None:
        """Open the MLflow run: the checkpoint's when the store has it, else a new one. Nothing is
        deleted (MLflow cannot): the steps it holds are skipped when they are logged again."""
        if _is_file_store(self.tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        run = None
        previous = self.previous_run_id
        if previous:
            try:
                run = self.client.get_run(previous)
            except MlflowException:
                print(
                    f"note: MLflow run {previous} of the checkpoint is not in {self.tracking_uri}; "
                    "starting a new MLflow run",
                    file=sys.stderr,
                )
        if run is not None:
            self.client.update_run(previous, status="RUNNING")
            self.logged_up_to = {
                key: max(m.step for m in self.client.get_metric_history(previous, key)) for key in run.data.metrics
            }
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
            run = self.client.create_run(
                experiment_id, run_name=self.run_name, tags={"unet_trainer.run_dir": str(self.run_dir.resolve())}
            )
            self.logged_up_to = {}
        self.run_id = run.info.run_id
        params = [
            Param(key, value[:6000]) for key, value in flatten_config(self.config).items() if key not in run.data.params
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self._log_artifacts("config.yaml")

    def log_metrics(self, metrics: Mapping[str, Any], step: int, counters: Mapping[str, int]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in numeric_metrics(metrics).items()
            if step > self.logged_up_to.get(key, -1)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def _log_artifacts(self, *names: str) -> None:
        for name in names:
            path = self.run_dir / name
            if path.is_file():
                folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
                self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self) -> None:
        """After an evaluation: upload the pictures drawn for it."""
        self._log_artifacts("progress.png", "overlays/summary.png")

    def close(self, stop_reason: str | None) -> None:
        if self.client is None:
            return
        self._log_artifacts("config.yaml", "progress.png", "overlays/summary.png")
        if self.log_checkpoints:
            self._log_artifacts(f"{CHECKPOINTS_FOLDER}/{best_name()}")
        if stop_reason:
            self.client.set_tag(self.run_id, "unet_trainer.stop_reason", stop_reason)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.client = None
