"""Evaluation bookkeeping that does not mislead: the best evaluation's per-case file, the progress
bar's samples/s around evaluations, and one meaning of "epoch" in logs, checkpoints and console."""

import copy
import csv
import math
from types import SimpleNamespace

from unet_trainer.cli.train import format_summary
from unet_trainer.commands.train import run_training
from unet_trainer.core.checkpoints import list_checkpoints
from unet_trainer.training import callbacks
from unet_trainer.training.trainer import Callback, Timestamp


def read_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def as_text(rows: list[dict]) -> list[dict]:
    """Evaluator rows as csv writes them (floats by str, NaN as "nan")."""
    return [
        {k: (v if isinstance(v, str) else ("nan" if math.isnan(v) else str(v))) for k, v in r.items()} for r in rows
    ]


class RecordEvaluations(Callback):
    """Keeps each evaluation's mean Dice, step and per-case rows."""

    def __init__(self):
        self.seen = []

    def eval_end(self, state):
        self.seen.append(
            (state.eval_history[-1]["dice/mean"], state.timestamp.batch, copy.deepcopy(state.evaluator.last_per_case))
        )


def test_best_evaluations_per_case_file_sits_next_to_the_latest(tiny_config, tmp_path):
    recorder = RecordEvaluations()
    summary = run_training(
        tiny_config("max_duration=6ba", "eval_interval=1ba", "optimizer.radam.lr=0.03"),
        progress=False,
        extra_callbacks=[recorder],
    )
    run = tmp_path / "run"
    assert len(recorder.seen) == 6
    best_dice, best_step, best_rows = max(recorder.seen, key=lambda s: s[0])  # the first of equal maxima
    assert best_dice == summary["best_dice"] and best_step == summary["best_batch"]
    assert read_rows(run / "eval_cases_best.csv") == as_text(best_rows)
    assert read_rows(run / "eval_cases.csv") == as_text(recorder.seen[-1][2])
    text = format_summary(summary)
    assert f"{run / 'eval_cases.csv'} (the latest evaluation, step 6)" in text
    assert f"{run / 'eval_cases_best.csv'} (the evaluation best-rank0.pt was saved at)" in text
    assert f"step {best_step})" in text


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_samples_per_second_right_after_an_evaluation_leaves_the_evaluation_out(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    state = SimpleNamespace(
        total_batches=10,
        timestamp=Timestamp(),
        train_batch_size=4,
        batches_per_epoch=2,
        step_metrics={"loss/train": 0.5},
        eval_history=[],
    )
    bar = callbacks.ProgressBar()
    bar.fit_start(state)

    def rate() -> float:
        return float(dict(item.split("=") for item in bar.bar.postfix.split(", "))["sp/s"])

    def step(seconds: float, evaluate_first: float | None = None) -> float:
        clock.now += seconds
        state.timestamp.batch += 1
        if evaluate_first is not None:  # a batch-unit eval_interval: evaluation runs before batch_end
            bar.eval_start(state)
            clock.now += evaluate_first
            bar.eval_end(state)
        bar.batch_end(state)
        return rate()

    assert step(1.0) == 4.0
    assert step(1.0, evaluate_first=10.0) == 4.0  # the step's own second, not the ~0 s after eval_end
    # An epoch-unit interval: evaluation between one batch_end and the next step.
    bar.eval_start(state)
    clock.now += 10.0
    bar.eval_end(state)
    assert step(2.0) == 2.0
    bar.fit_end(state)


def test_epoch_means_finished_epochs_in_logs_checkpoints_and_console(tiny_config, tmp_path):
    # 4 training cases, batch 2: 2 batches per epoch. A checkpoint and an evaluation at every
    # epoch's last batch, once with batch units and once with epoch units: the same epochs.
    runs = {}
    for units, interval in (("ba", "2ba"), ("ep", "1ep")):
        run = tmp_path / units
        summary = run_training(
            tiny_config("max_duration=4ba", f"eval_interval={interval}", f"save_interval={interval}", run_dir=run),
            progress=False,
        )
        runs[units] = run
        assert summary["state"].batches_per_epoch == 2
        evals = read_rows(run / "eval_metrics.csv")
        assert [(r["epoch"], r["batch"]) for r in evals] == [("1", "2"), ("2", "4")], units
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ep1-ba2-rank0.pt", "ep2-ba4-rank0.pt"]
        train = read_rows(run / "train_metrics.csv")
        assert [(r["epoch"], r["batch"]) for r in train] == [("0", "1"), ("1", "2"), ("1", "3"), ("2", "4")]
    # The console's "ep" is the same count, as a fraction of epochs done.
    state = SimpleNamespace(
        total_batches=4,
        timestamp=Timestamp(batch=3, epoch=1, batch_in_epoch=1),
        train_batch_size=2,
        batches_per_epoch=2,
        step_metrics={},
        eval_history=[],
    )
    bar = callbacks.ProgressBar()
    bar.fit_start(state)
    bar.batch_end(state)
    assert "ep=1.50" in bar.bar.postfix
    bar.fit_end(state)
