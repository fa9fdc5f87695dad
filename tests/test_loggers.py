"""The logger: one callback reads the state once per event and fans the records out to every
LoggerDestination, each of which handles a resume its own way (CSV rewrite, TensorBoard purge)."""

import csv
import json

import pytest
from conftest import ROOT

from unet_trainer.commands.builders import build_logger_destinations
from unet_trainer.commands.train import run_training
from unet_trainer.config.components import LOGGER_DESTINATIONS
from unet_trainer.config.config import resolve_config
from unet_trainer.core.checkpoint import load_checkpoint
from unet_trainer.training.loggers import FileLogger, Logger, LoggerDestination, TensorBoardLogger


class Recorder(LoggerDestination):
    """Records every call; keeps a count of the fits it took part in across resumes."""

    def __init__(self):
        self.calls = []
        self.fits = 0

    def load_state_dict(self, saved):
        self.calls.append(("load_state_dict", saved.get("recorder_fits")))
        self.fits = saved.get("recorder_fits", 0)

    def truncate_after(self, step):
        self.calls.append(("truncate_after", step))
        self.fits += 1

    def state_dict(self):
        return {"recorder_fits": self.fits}

    def log_metrics(self, metrics, step, counters):
        self.calls.append(("log_metrics", step, dict(counters), dict(metrics)))

    def log_images(self, images, step):
        self.calls.append(("log_images", step, sorted(images)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self, stop_reason):
        self.calls.append(("close", stop_reason))


def test_the_logger_fans_each_record_out_and_keeps_the_destinations_resume_state(tiny_config, tmp_path):
    settings = ("eval_interval=2ba", "save_interval=2ba", "save_num_checkpoints_to_keep=-1")
    first = Recorder()
    summary = run_training(
        tiny_config("max_duration=4ba", *settings), progress=False, extra_callbacks=[Logger([first])]
    )
    calls = first.calls
    assert calls[:2] == [("load_state_dict", None), ("truncate_after", 0)] and calls[-1] == ("close", None)
    train = [c for c in calls if c[0] == "log_metrics" and "loss/train" in c[3]]
    assert [c[1] for c in train] == [1, 2, 3, 4]
    state = summary["state"]
    assert [c[2] for c in train] == [
        {"epoch": e, "batch": b, "sample": 2 * b} for e, b in ((0, 1), (1, 2), (1, 3), (2, 4))
    ]
    assert train[-1][3]["loss/train"] == state.step_metrics["loss/train"]
    evals = [i for i, c in enumerate(calls) if c[0] == "log_metrics" and "loss/train" not in c[3]]
    assert [calls[i][1] for i in evals] == [2, 4]
    for i, record in zip(evals, state.eval_history):
        step, counters, metrics = calls[i][1:]
        assert counters == {"epoch": record["epoch"], "batch": record["batch"]} and step == record["batch"]
        assert metrics == {f"eval/{k}": v for k, v in record.items() if k not in ("epoch", "batch")}
        assert calls[i + 1] == ("flush",)  # no images: this logger was given no overlay writer
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "ep1-ba2-rank0.pt")["extra_state"]["recorder_fits"] == 1

    # A resume hands the checkpoint's entries back and truncates after its step (as after a crash
    # before step 4's checkpoint was written).
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "ep2-ba4-rank0.pt").unlink()
    (checkpoints / "latest-rank0.pt").unlink()
    resumed = Recorder()
    run_training(tiny_config("max_duration=6ba", *settings), progress=False, extra_callbacks=[Logger([resumed])])
    assert resumed.calls[:2] == [("load_state_dict", 1), ("truncate_after", 2)]
    assert [c[1] for c in resumed.calls if c[0] == "log_metrics" and "loss/train" in c[3]] == [3, 4, 5, 6]
    latest = load_checkpoint(checkpoints / "latest-rank0.pt")
    assert latest["extra_state"]["recorder_fits"] == 2


def test_the_logger_hands_the_overlay_summary_to_the_destinations_at_the_evaluation_that_drew_it():
    drawn = type("Overlays", (), {"summary": object(), "summary_batch": 4})()
    recorder = Recorder()
    logger = Logger([recorder], drawn)
    for batch in (2, 4):
        state = type("State", (), {})()
        state.timestamp = type("Timestamp", (), {"batch": batch})()
        state.eval_history = [{"epoch": batch // 2, "batch": batch, "dice/mean": 0.5}]
        logger.eval_end(state)
    assert [c for c in recorder.calls if c[0] in ("log_images", "flush")] == [
        ("flush",),
        ("log_images", 4, ["eval/overlay_summary"]),
        ("flush",),
    ]


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_file_logger_truncates_after_the_resumed_step_and_files_records_by_kind(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = [
        {"kind": "train", "epoch": 0, "batch": 1, "sample": 2, "loss/train": 0.9},
        {"kind": "train", "epoch": 1, "batch": 2, "sample": 4, "loss/train": 0.8},
        {"kind": "eval", "epoch": 1, "batch": 2, "dice/mean": 0.1},
        {"kind": "train", "epoch": 1, "batch": 3, "sample": 6, "loss/train": 0.7},
        {"kind": "eval", "epoch": 1, "batch": 3, "dice/mean": 0.2},
    ]
    # The interrupted run's last line was cut by the crash.
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old) + '{"kind": "tra')
    logger = FileLogger(run)
    logger.truncate_after(2)
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == old[:3]
    assert [r["batch"] for r in read_csv(run / "train_metrics.csv")] == ["1", "2"]
    assert [r["batch"] for r in read_csv(run / "eval_metrics.csv")] == ["2"]

    logger.log_metrics({"loss/train": 0.6, "lr/group0": 0.1}, 3, {"epoch": 1, "batch": 3, "sample": 6})
    logger.log_metrics({"eval/dice/mean": float("nan"), "eval/dice/WT": 0.3}, 3, {"epoch": 1, "batch": 3})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[3] == {"kind": "train", "epoch": 1, "batch": 3, "sample": 6, "loss/train": 0.6, "lr/group0": 0.1}
    assert records[4]["kind"] == "eval" and records[4]["dice/WT"] == 0.3 and records[4]["batch"] == 3
    # A new metric widens the CSV: the earlier rows get empty cells.
    train = read_csv(run / "train_metrics.csv")
    assert list(train[0]) == ["epoch", "batch", "sample", "loss/train", "lr/group0"]
    assert [r["lr/group0"] for r in train] == ["", "", "0.1"]
    assert read_csv(run / "eval_metrics.csv")[-1] == {"epoch": "1", "batch": "3", "dice/mean": "nan", "dice/WT": "0.3"}


def test_tensorboard_drops_the_events_an_interrupted_run_wrote_after_the_checkpoint(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = ("callbacks.tensorboard={}", "eval_interval=0ep", "save_interval=2ba", "save_num_checkpoints_to_keep=-1")
    run_training(tiny_config("max_duration=4ba", *settings), progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    # As after a crash right after step 4's events, before its checkpoint.
    (checkpoints / "ep2-ba4-rank0.pt").unlink()
    (checkpoints / "latest-rank0.pt").unlink()
    summary = run_training(tiny_config("max_duration=5ba", *settings), progress=False)
    assert summary["resumed_from"] == str(checkpoints / "ep1-ba2-rank0.pt")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("loss/train")}
    assert sorted(losses) == [1, 2, 3, 4, 5] and len(events.Scalars("loss/train")) == 5
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx({r["batch"]: r["loss/train"] for r in logged if r["kind"] == "train"})


def test_every_registered_destination_is_a_callback_setting_and_builds(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from unet_trainer.training.loggers import MLflowLogger

    cfg = resolve_config(ROOT / "configs" / "demo.yaml", [f"callbacks.{name}={{}}" for name in LOGGER_DESTINATIONS])
    destinations = build_logger_destinations(cfg, tmp_path)
    assert [type(d) for d in destinations] == [FileLogger, TensorBoardLogger, MLflowLogger]
    assert destinations[1].folder == tmp_path / "tensorboard" and destinations[2].run_name == cfg["run_name"]
