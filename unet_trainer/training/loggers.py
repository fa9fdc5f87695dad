"""Logging: one callback, :class:`Logger`, reads the state once per event and hands the metrics to
every :class:`LoggerDestination` (Composer's and torchtune's pattern). A destination only writes:
it never reads the state, and it decides alone how to drop what an interrupted run logged after
the checkpoint its resume starts from (:meth:`LoggerDestination.truncate_after`).

Destinations, all here: :class:`FileLogger` (``metrics.jsonl`` and the CSVs, always on),
:class:`TensorBoardLogger` and :class:`MLflowLogger`. A new one is a subclass plus one line in
``components.LOGGER_DESTINATIONS`` (its settings are its typed keyword arguments; the run folder,
the config and the best checkpoint's path come as ``run_dir``, ``config`` and ``best_checkpoint``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .trainer import Callback, State

# Evaluation metrics reach the destinations as ``eval/<key>`` (``eval/dice/WT``), step metrics
# under their own keys (``loss/train``, ``lr/group0``...).
EVAL_PREFIX = "eval/"


class LoggerDestination:
    """Where the :class:`Logger` sends a run's records. Only rank 0 has destinations.

    At fit start the Logger calls :meth:`load_state_dict`, then :meth:`truncate_after`, then saves
    :meth:`state_dict` into the checkpoints; then :meth:`log_metrics` after every step and every
    evaluation, :meth:`log_images` and :meth:`flush` after every evaluation, and :meth:`close` at
    fit end. :meth:`log_metrics`, :meth:`truncate_after` and :meth:`close` are required; the
    others are no-ops unless overridden.
    """

    #: (module, extra): the optional package the destination needs, checked before the run
    #: starts (``pip install 'unet-trainer[extra]'``); None for none.
    requires: tuple[str, str] | None = None

    def truncate_after(self, step: int) -> None:
        """The run starts from ``step`` (0 when fresh, a resumed checkpoint's batch otherwise):
        records past it were logged by an interrupted run after that checkpoint and are about to
        be logged again; drop them, or skip them when they come. Called once, before anything is
        logged."""
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, Any], step: int, counters: Mapping[str, int]) -> None:
        """One record: the step's metrics, or one evaluation's (keys ``eval/...``), at ``step``
        (optimizer steps taken). ``counters`` is the run's position besides the step: ``epoch``
        (finished epochs), ``batch`` (= step) and, for steps, ``sample``. Values are numbers as
        the hooks made them (NaN included: an empty region's Dice)."""
        raise NotImplementedError

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Pictures by name, each (H, W, 3) uint8, at ``step``; ignored by default."""

    def flush(self) -> None:
        """After each evaluation's records: make what was logged visible to outside readers."""

    def close(self, stop_reason: str | None) -> None:
        """At fit end (``stop_reason``: why the run stopped early, None when it ran its full length).
        Not called when training raised."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Entries saved in the checkpoints' ``extra_state``, to continue after a resume."""
        return {}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """The resumed checkpoint's ``extra_state`` (empty for a fresh run): pick the entries
        :meth:`state_dict` wrote."""


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are real numbers (not bools), NaN left out: what plots can show."""
    return {
        key: value
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    }


class Logger(Callback):
    """Reads the step metrics after every step and the evaluation's record after every
    evaluation (with the overlay summary grid when one was drawn at it) and hands them to every
    destination; handles their resume state.

    Args:
        destinations: where the records go (empty on ranks other than 0).
        overlays: the run's overlay writer (``summary`` (H, W, 3) uint8 with ``summary_batch``),
            or None for no images; it must run before this callback.
    """

    def __init__(self, destinations: Sequence[LoggerDestination], overlays=None):
        self.destinations = list(destinations)
        self.overlays = overlays

    def fit_start(self, state: State) -> None:
        for destination in self.destinations:
            destination.load_state_dict(state.extra_state)
            destination.truncate_after(state.timestamp.batch)
            state.extra_state.update(destination.state_dict())

    def batch_end(self, state: State) -> None:
        ts = state.timestamp
        counters = {"epoch": state.finished_epochs, "batch": ts.batch, "sample": ts.sample}
        for destination in self.destinations:
            destination.log_metrics(state.step_metrics, ts.batch, counters)

    def eval_end(self, state: State) -> None:
        record = state.eval_history[-1]
        counters = {"epoch": record["epoch"], "batch": record["batch"]}
        metrics = {f"{EVAL_PREFIX}{k}": v for k, v in record.items() if k not in counters}
        step = state.timestamp.batch
        images = {}
        if self.overlays is not None and self.overlays.summary_batch == step:
            images["eval/overlay_summary"] = self.overlays.summary
        for destination in self.destinations:
            destination.log_metrics(metrics, step, counters)
            if images:
                destination.log_images(images, step)
            destination.flush()

    def fit_end(self, state: State) -> None:
        for destination in self.destinations:
            destination.close(state.stop_reason)


class FileLogger(LoggerDestination):
    """Every record as JSON lines and CSV in the run folder.

    Files: ``metrics.jsonl`` (every record, ``"kind": "train" | "eval"``, the counters first),
    ``train_metrics.csv`` and ``eval_metrics.csv`` (evaluation keys without the ``eval/``
    prefix). On resume, records past the resumed batch are dropped from all three, so the logs
    match the state.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    @property
    def jsonl(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _records(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        records = []
        for line in self.jsonl.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return records

    def _rewrite_csv(self, kind: str, records: list[dict]) -> None:
        rows = [r for r in records if r.get("kind") == kind]
        path = self.run_dir / f"{kind}_metrics.csv"
        if not rows:
            path.unlink(missing_ok=True)
            return
        columns = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k, "") for k in columns})

    def truncate_after(self, step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        records = [r for r in self._records() if r.get("batch", 0) <= step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        for kind in ("train", "eval"):
            self._rewrite_csv(kind, records)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, counters: Mapping[str, int]) -> None:
        evaluation = bool(metrics) and all(key.startswith(EVAL_PREFIX) for key in metrics)
        if evaluation:
            record = {"kind": "eval", **counters, **{k.removeprefix(EVAL_PREFIX): v for k, v in metrics.items()}}
        else:
            record = {"kind": "train", **counters, **metrics}
        self._append(record)

    def _append(self, record: dict) -> None:
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        path = self.run_dir / f"{record['kind']}_metrics.csv"
        columns = [k for k in record if k != "kind"]
        new_file = not path.exists()
        if not new_file:
            with open(path) as handle:
                header = handle.readline().strip().split(",")
            if header != columns:  # a new metric appeared: rewrite with the wider header
                self._rewrite_csv(record["kind"], self._records())
                return
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            if new_file:
                writer.writeheader()
            writer.writerow({k: record[k] for k in columns})

    def close(self, stop_reason: str | None) -> None:
        """Nothing to close: every record is written as it comes."""


class TensorBoardLogger(LoggerDestination):
    """Metrics as TensorBoard scalars (evaluation ones as ``eval/<key>``) and the images (the
    overlay summary grid as ``eval/overlay_summary``), in event files under ``<run_dir>/tensorboard``.

    Needs the tensorboard package (the builder checks it is there before the run starts).
    """

    requires = ("torch.utils.tensorboard", "tensorboard")

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "tensorboard"
        self.writer = None

    def truncate_after(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events from step + 1 on that an interrupted run wrote.
        self.writer = SummaryWriter(str(self.folder), purge_step=step + 1)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, counters: Mapping[str, int]) -> None:
        for key, value in numeric_metrics(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, stop_reason: str | None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------------------------
# MLflow (a logger destination, like the two above)
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
        run_dir: the run folder (config.yaml, progress.png, overlays/).
        config: the resolved config (logged as params).
        best_checkpoint: the best checkpoint's path (the run folder's checkpoint manager names it).
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
        best_checkpoint: Path,
    ):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_name = run_name or config.get("run_name")
        self.log_checkpoints = log_checkpoints
        self.run_dir = Path(run_dir)
        self.config = config
        self.best_checkpoint = Path(best_checkpoint)
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
        """Upload the run folder's files ``names`` (those that exist), each under its folder in the run folder."""
        for name in names:
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self._log_file(self.run_dir / name, folder)

    def _log_file(self, path: Path, folder: str | None) -> None:
        if path.is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def flush(self) -> None:
        """After an evaluation: upload the pictures drawn for it."""
        self._log_artifacts("progress.png", "overlays/summary.png")

    def close(self, stop_reason: str | None) -> None:
        if self.client is None:
            return
        self._log_artifacts("config.yaml", "progress.png", "overlays/summary.png")
        if self.log_checkpoints:
            self._log_file(self.best_checkpoint, self.best_checkpoint.parent.name)
        if stop_reason:
            self.client.set_tag(self.run_id, "unet_trainer.stop_reason", stop_reason)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.client = None
