"""Callbacks: the run's side effects, each hung on events. Only rank 0 writes files.

Always on: the progress bar, the checkpoint saver and the signal handler (and the logger, in
:mod:`unet_trainer.training.loggers`). Switched on by name under ``callbacks:`` in YAML (``null``
switches one off): lr_monitor, speed_monitor, memory_monitor and progress_plot (on by default),
early_stopper. The overlays live in :mod:`unet_trainer.training.reporting`; tensorboard and mlflow are
logger destinations (:mod:`unet_trainer.training.loggers`).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..core.checkpoint import capture_rng_state
from ..core.distributed import all_gather_objects, all_ranks_agree, barrier
from ..core.fileio import atomic_write
from ..core.schema import Duration, NonNegative, PositiveInt
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from ..evaluation.cases import write_cases_csv
from ..evaluation.visualize import Series, draw_progress
from .trainer import Callback, State, interval_due

# Per-case scores of the evaluation best-rank0.pt was saved at, next to eval_cases.csv (the latest).
BEST_CASES_CSV = "eval_cases_best.csv"


class ProgressBar(Callback):
    """A tqdm bar over the whole run's batches: epochs done (``ep``, as a fraction: its whole part
    is the ``epoch`` of the logs and checkpoint names), step, loss, samples/s and ETA."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self._last_time = None
        self._eval_started = None

    def fit_start(self, state: State) -> None:
        if not self.enabled:
            return
        self.bar = tqdm(
            total=state.total_batches,
            initial=state.timestamp.batch,
            desc="train",
            unit="ba",
            dynamic_ncols=True,
            leave=True,
        )
        self._last_time = time.perf_counter()

    def batch_end(self, state: State) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        elapsed, self._last_time = now - self._last_time, now
        rate = state.train_batch_size / elapsed if elapsed > 0 else float("nan")
        postfix = {
            "ep": f"{state.timestamp.batch / state.batches_per_epoch:.2f}",
            "loss": f"{state.step_metrics.get('loss/train', float('nan')):.4f}",
            "sp/s": f"{rate:.1f}",
        }
        if state.eval_history:
            postfix["dice"] = f"{state.eval_history[-1].get('dice/mean', float('nan')):.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def eval_start(self, state: State) -> None:
        if self.bar is not None:
            self.bar.set_description("eval")
            self._eval_started = time.perf_counter()

    def eval_end(self, state: State) -> None:
        if self.bar is not None:
            self.bar.set_description("train")
            # Keep eval time out of the samples/s: shift the step's start by the evaluation's
            # length. (Not a reset: with a batch-unit interval the evaluation runs between a
            # step and its batch_end, and a reset would leave that step almost no time.)
            self._last_time += time.perf_counter() - self._eval_started

    def fit_end(self, state: State) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CheckpointStore(Protocol):
    """What the checkpoint saver needs of a run folder's checkpoints: their names and their writing.
    :class:`unet_trainer.core.checkpoints.CheckpointManager` is the one the builder gives it; a
    protocol rather than that class, so that the callbacks import nothing of the checkpoint folder's
    rules (structural typing: the manager does not name this protocol)."""

    @property
    def run_dir(self) -> Path:
        """The run folder holding the checkpoints' folder."""
        ...

    @property
    def best_path(self) -> Path:
        """Where the best checkpoint goes."""
        ...

    def path_for(self, epoch: int, batch: int) -> Path:
        """Where the periodic checkpoint after ``epoch`` finished epochs and ``batch`` batches goes."""
        ...

    def save(self, payload: Any, path: Path, run_id: str, batch: int) -> None:
        """Save ``payload`` (run ``run_id``'s, at ``batch``) as ``path``, atomically, never over
        another run's file."""
        ...

    def save_periodic(self, payload: Any, epoch: int, run_id: str, batch: int) -> Path:
        """Save the periodic checkpoint at :meth:`path_for` and point the ``latest`` link at it."""
        ...

    def rotate(self, run_id: str, keep: int) -> None:
        """Remove all but the newest ``keep`` (at least 1) periodic checkpoints of run ``run_id``."""
        ...


class CheckpointSaver(Callback):
    """Writes ``ep{E}-ba{B}-rank0.pt`` every ``save_interval``, at the end, and on a stop signal.

    Keeps the newest ``keep`` of the run's own checkpoints (all when -1, none but latest/best when
    0), points ``latest-rank0.pt`` at the newest and writes ``best-rank0.pt`` whenever the
    validation mean Dice improves, with that evaluation's per-case scores in
    ``<run>/eval_cases_best.csv``. Rotation only removes files carrying this run's identity
    (``state.run_id``): another run's, or a stray or unreadable file, is never touched, and one
    found under the name about to be written is moved into ``<run>/previous/`` (one-line note)
    rather than overwritten. Writes are atomic. The names and these rules are the checkpoint
    manager's (:class:`unet_trainer.core.checkpoints.CheckpointManager`); ``E`` in the names is
    :attr:`State.finished_epochs`.

    Args:
        checkpoints: the run folder's checkpoints (the builder's ``CheckpointManager``): every name
            and every write goes through it.
        interval: how often to save (``ep``, ``ba`` or ``sp``).
        keep: how many periodic checkpoints of this run to keep (-1: all).
        is_writer: whether this rank writes (rank 0).
    """

    def __init__(self, checkpoints: CheckpointStore, interval: Duration, keep: int = 3, is_writer: bool = True):
        self.checkpoints = checkpoints
        self.interval = interval
        self.keep = keep
        # Every rank runs this callback (the payload gathers each rank's random streams, a collective
        # step); only the writer (rank 0) touches the disk.
        self.is_writer = is_writer
        self.last_saved_batch = None
        self.saved: list[Path] = []

    def _payload(self, state: State) -> dict:
        payload = state.state_dict()
        rng = capture_rng_state()
        augmenter = state.augmenter.state_dict() if state.augmenter is not None else None
        payload["rng"] = rng
        # Each rank's streams, so that every rank of a resumed run continues its own.
        payload["rng_per_rank"] = all_gather_objects(rng)
        payload["augmenter_per_rank"] = all_gather_objects(augmenter)
        return payload

    def save(self, state: State) -> Path | None:
        if self.last_saved_batch == state.timestamp.batch:
            return None
        payload = self._payload(state)
        path = self.checkpoints.path_for(state.finished_epochs, state.timestamp.batch)
        self.last_saved_batch = state.timestamp.batch
        if self.is_writer:
            self.checkpoints.save_periodic(payload, state.finished_epochs, state.run_id, state.timestamp.batch)
            self.saved.append(path)
            if self.keep >= 0:
                self.checkpoints.rotate(state.run_id, self.keep)
        barrier()
        return path

    def fit_start(self, state: State) -> None:
        self.last_saved_batch = state.timestamp.batch if state.timestamp.batch else None

    def batch_end(self, state: State) -> None:
        if interval_due(self.interval, state, at_epoch_end=False) or state.stop_reason is not None:
            self.save(state)

    def epoch_end(self, state: State) -> None:
        if interval_due(self.interval, state, at_epoch_end=True):
            self.save(state)

    def eval_end(self, state: State) -> None:
        # Scores are gathered across ranks, so every rank takes the same decision here.
        current = state.eval_history[-1].get("dice/mean", float("nan"))
        best = state.extra_state.get("best_dice")
        if math.isnan(current) or (best is not None and current <= best):
            return
        state.extra_state["best_dice"] = current
        state.extra_state["best_batch"] = state.timestamp.batch
        payload = self._payload(state)
        if self.is_writer:
            self.checkpoints.save(payload, self.checkpoints.best_path, state.run_id, state.timestamp.batch)
            # eval_cases.csv is the latest evaluation's; this one stays with best-rank0.pt.
            rows = getattr(state.evaluator, "last_per_case", None)
            if rows:
                atomic_write(
                    (state.run_dir or self.checkpoints.run_dir) / BEST_CASES_CSV,
                    lambda temporary: write_cases_csv(temporary, rows),
                )
        barrier()

    def fit_end(self, state: State) -> None:
        self.save(state)


class SignalHandler(Callback):
    """SIGINT/SIGTERM ask the run to stop at the next batch boundary; a checkpoint is then saved.

    A second signal restores the default handler, so pressing Ctrl-C twice stops at once.
    """

    def __init__(self):
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.state.stop_reason = f"received {signal.Signals(signum).name}"
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def batch_end(self, state: State) -> None:
        # A signal may reach one rank only; all ranks must stop at the same batch.
        if state.world_size > 1:
            others_stop = not all_ranks_agree(state.stop_reason is None, state.device)
            if others_stop and state.stop_reason is None:
                state.stop_reason = "another rank received a stop signal"

    def fit_start(self, state: State) -> None:
        self.state = state
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}

    def fit_end(self, state: State) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class LRMonitor(Callback):
    """Logs each parameter group's learning rate per step (``lr/group0``...)."""

    def batch_end(self, state: State) -> None:
        for i, group in enumerate(state.optimizer.param_groups):
            state.step_metrics[f"lr/group{i}"] = group["lr"]


class SpeedMonitor(Callback):
    """Logs training throughput (samples/s over the last ``window`` batches) and the data-wait share."""

    def __init__(self, window: PositiveInt = 10):
        self.times: deque = deque(maxlen=window + 1)
        self.waits: deque = deque(maxlen=window)

    def batch_end(self, state: State) -> None:
        # Epoch boundaries stay in the window: restarting the loader is real training time.
        self.times.append((time.perf_counter(), state.timestamp.sample))
        if len(self.times) >= 2:
            (t0, s0), (t1, s1) = self.times[0], self.times[-1]
            if t1 > t0:
                state.step_metrics["throughput/samples_per_sec"] = (s1 - s0) / (t1 - t0)
                # The share of wall time the loop sat waiting for the loader over the window.
                self.waits.append(state.step_metrics.get("time/data_wait_s", 0.0))
                state.step_metrics["throughput/data_wait_fraction"] = min(sum(self.waits) / (t1 - t0), 1.0)

    def eval_end(self, state: State) -> None:
        self.times.clear()  # evaluation time is not training throughput
        self.waits.clear()


class EarlyStopper(Callback):
    """Stops when the validation mean Dice has not improved by ``min_delta`` for ``patience`` evals."""

    def __init__(self, patience: PositiveInt = 10, min_delta: NonNegative = 0.0):
        self.patience, self.min_delta = patience, min_delta

    def stop_reason(self, eval_history: list[dict]) -> str | None:
        """Why a run with this evaluation history stops, or None while it goes on; a function of
        the history alone, so a finished run's checkpoint tells whether it stopped early."""
        scores = [r.get("dice/mean", float("nan")) for r in eval_history]
        scores = [s for s in scores if not math.isnan(s)]
        if len(scores) <= self.patience:
            return None
        best_before = max(scores[: -self.patience])
        if max(scores[-self.patience :]) < best_before + self.min_delta:
            return (
                f"early stop: validation Dice has not improved by {self.min_delta} "
                f"in {self.patience} evaluations (best {max(scores):.4f})"
            )
        return None

    def eval_end(self, state: State) -> None:
        reason = self.stop_reason(state.eval_history)
        if reason is not None:
            state.stop_reason = reason


class MemoryMonitor(Callback):
    """Logs peak memory per step: on a GPU the CUDA memory allocated at the step's peak and reserved
    at its end (GiB), else the process's peak RSS since it started (the OS keeps no per-step peak)."""

    def batch_end(self, state: State) -> None:
        if state.device.type == "cuda":
            state.step_metrics["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(state.device) / 2**30
            state.step_metrics["memory/reserved_gib"] = torch.cuda.memory_reserved(state.device) / 2**30
            # The peak counter runs from the program's start unless reset: reset it so the next
            # value is the next step's own, not the largest step or evaluation so far.
            torch.cuda.reset_peak_memory_stats(state.device)
        else:
            # ru_maxrss is in KiB on Linux.
            state.step_metrics["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ProgressPlot(Callback):
    """``progress.png``: training loss, validation Dice per region (and every other group of
    evaluation metrics), learning rate and samples/s against steps, the best evaluation marked;
    redrawn after each evaluation and at the end (see :func:`unet_trainer.evaluation.visualize.draw_progress`).

    The history is read back from ``metrics.jsonl`` at fit start, so a resumed run's plot is whole.
    Rank 0 only.

    Args:
        run_dir: the run folder (``progress.png`` goes there, ``metrics.jsonl`` is read from there).
        scheme: the data's label scheme (which Dice curves are regions, in its order; the builder supplies it).
    """

    writer_only = True

    def __init__(self, run_dir: Path, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]):
        self.path = Path(run_dir) / "progress.png"
        self.scheme = scheme
        self.train: dict[str, Series] = {}

    def fit_start(self, state: State) -> None:
        self.train = {}
        metrics = self.path.parent / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("kind") == "train" and record.get("batch", 0) <= state.timestamp.batch:
                    self._add(record["batch"], record)

    def _add(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key in ("loss/train", "throughput/samples_per_sec") or key.startswith("lr/"):
                series = self.train.setdefault(key, Series([], []))
                series.steps.append(step)
                series.values.append(value)

    def batch_end(self, state: State) -> None:
        lrs = {f"lr/group{i}": group["lr"] for i, group in enumerate(state.optimizer.param_groups)}
        self._add(state.timestamp.batch, {**state.step_metrics, **lrs})

    def draw(self, state: State) -> None:
        if self.train:
            draw_progress(self.path, self.train, state.eval_history, state.batches_per_epoch, self.scheme)

    def eval_end(self, state: State) -> None:
        self.draw(state)

    def fit_end(self, state: State) -> None:
        self.draw(state)
