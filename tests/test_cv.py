"""unet-cv: folds trained one after another, resumed after an interruption, scored together into
cv_summary.csv whose fold and overall rows are exactly the means of its case rows; and a unet-cv
folder as an ensemble for unet-predict."""

import contextlib
import csv
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.cv import main as cv_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.commands.builders import fold_config
from unet_trainer.commands.cv import (
    CrossValidationError,
    CVSummary,
    FoldScore,
    claim_cv_folder,
    format_summary,
    parse_folds,
    run_cross_validation,
    summary_rows,
)
from unet_trainer.commands.datasets import ensure_prepared, raw_data_dir
from unet_trainer.commands.folders import fold_state
from unet_trainer.commands.loading import EnsembleError, expand_checkpoints
from unet_trainer.commands.predict import predict_dataset
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.checkpoint import atomic_torch_save, load_checkpoint
from unet_trainer.core.distributed import DistInfo
from unet_trainer.core.schema import Duration
from unet_trainer.training.callbacks import EarlyStopper
from unet_trainer.training.trainer import Callback

CONFIG = ROOT / "configs" / "demo.yaml"
# 6 phantom cases in 2 folds of 3; 3 training cases in batches of 2 are 2 steps per epoch.
CV_EXTRA = ("data.num_folds=2", "max_duration=2ep", "eval_interval=1ep", "save_num_checkpoints_to_keep=-1")


class TerminateFoldAt(Callback):
    """Sends this process SIGTERM (as a scheduler's preemption would) after a given step of a given fold."""

    def __init__(self, fold: int, batch: int):
        self.fold, self.batch = fold, batch

    def batch_end(self, state):
        if state.config["data"]["fold"] == self.fold and state.timestamp.batch == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def cv_args(cache: Path, cv_dir: Path, *extra: str) -> list[str]:
    return [str(CONFIG), *tiny_overrides(cache, cv_dir, *CV_EXTRA, *extra)]


def run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def file_stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cv_run(cache_root, tmp_path_factory):
    """A 2-fold cross-validation stopped by SIGTERM at step 2 of fold 1, looked at while
    interrupted, then run again with the same config to the end."""
    cv_dir = tmp_path_factory.mktemp("cv") / "demo-cv"
    argv = cv_args(cache_root, cv_dir)
    cfg = resolve_config(argv[0], argv[1:])
    log = io.StringIO()
    first = run_cross_validation(cfg, progress=False, extra_callbacks=[TerminateFoldAt(1, 2)], log=log)
    interrupted = {
        "fold0_files": file_stamps(cv_dir / "fold_0"),
        "fold1_checkpoint": load_checkpoint(cv_dir / "fold_1" / "checkpoints" / "latest-rank0.pt"),
        "aggregate": run_cli(cv_main, [*argv, "--aggregate-only", "--no-progress"]),
    }
    with pytest.raises(EnsembleError) as refused:
        expand_checkpoints([cv_dir])
    interrupted["predict_refusal"] = str(refused.value)
    second_log = io.StringIO()
    with contextlib.redirect_stderr(second_log):
        second = run_cross_validation(cfg, progress=False, log=second_log)
    return {
        "cfg": cfg,
        "argv": argv,
        "cv_dir": cv_dir,
        "first": first,
        "first_log": log.getvalue(),
        "interrupted": interrupted,
        "second": second,
        "second_log": second_log.getvalue(),
    }


def test_an_interrupted_cross_validation_resumes_the_interrupted_fold_only(cv_run):
    first, second, cv_dir = cv_run["first"], cv_run["second"], cv_run["cv_dir"]
    assert first.summary is None and first.stopped.startswith("fold 1 stopped at batch 2 (received SIGTERM)")
    assert list(first.trained) == [0] and "max_duration 2ep reached" in first.trained[0]
    # The second command skips fold 0 and touches none of its files.
    assert "Fold 0 of 2: finished (max_duration 2ep reached)" in cv_run["second_log"]
    assert "skipped" in cv_run["second_log"]
    before, now = cv_run["interrupted"]["fold0_files"], file_stamps(cv_dir / "fold_0")
    assert {name: now[name] for name in before} == before
    assert set(now) - set(before) == {"eval_best-rank0_val-fold0.csv"}  # the scoring's, as unet-eval writes it
    assert list(second.trained) == [1] and second.trained[1].startswith("resumed")
    # Fold 1 went on from its step-2 checkpoint: same run, every step logged once, 4 in all.
    assert "Resuming from" in cv_run["second_log"] and "ep1-ba2-rank0.pt" in cv_run["second_log"]
    before = cv_run["interrupted"]["fold1_checkpoint"]
    after = load_checkpoint(cv_dir / "fold_1" / "checkpoints" / "latest-rank0.pt")
    assert before["timestamp"]["batch"] == 2 and after["timestamp"]["batch"] == 4
    assert after["run_id"] == before["run_id"]
    records = [json.loads(line) for line in (cv_dir / "fold_1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    # Each fold is an ordinary run of its own fold, with its own name; the CV folder records the config.
    for fold in (0, 1):
        stored = load_checkpoint(cv_dir / f"fold_{fold}" / "checkpoints" / "latest-rank0.pt")["config"]
        assert stored["data"]["fold"] == fold and stored["run_name"] == f"demo-fold{fold}"
        assert stored["save_folder"] == str(cv_dir / f"fold_{fold}")
    assert (cv_dir / "cv_config.yaml").is_file()


def test_while_a_fold_is_unfinished_aggregation_and_prediction_are_refused(cv_run):
    status, _, err = cv_run["interrupted"]["aggregate"]
    assert status == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert "fold 1 is stopped at batch 2 of 2ep" in err and "--folds 1" in err
    assert "fold 1 is stopped at batch 2 of 2ep" in cv_run["interrupted"]["predict_refusal"]


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cv_summary_rows_are_exactly_the_means_of_the_case_rows(cv_run):
    summary = cv_run["second"].summary
    rows = read_summary(cv_run["cv_dir"] / "cv_summary.csv")
    assert summary is not None and [r["row"] for r in rows] == [r["row"] for r in summary.rows]
    keys = [k for k in rows[0] if k not in ("row", "fold", "case_id")]
    assert {"NCR", "ED", "EN", "WT", "TC", "ET", "mean"} <= set(keys)
    cases = [r for r in rows if r["row"] == "case"]
    # Out of fold: each fold scores its own 3 validation cases, all 6 cases once in all.
    split = {fold: json.loads((cv_run["cv_dir"] / f"fold_{fold}" / "split.json").read_text())["val"] for fold in (0, 1)}
    assert {f: [r["case_id"] for r in cases if r["fold"] == str(f)] for f in (0, 1)} == split
    assert len({r["case_id"] for r in cases}) == 6
    for key in keys:
        values = [float(r[key]) for r in cases]
        assert not any(math.isnan(v) for v in values)
        (mean_row,) = [r for r in rows if r["row"] == "mean"]
        assert float(mean_row[key]) == sum(values) / len(values)
        (std_row,) = [r for r in rows if r["row"] == "std"]
        assert float(std_row[key]) == statistics.stdev(values)
        for fold in ("0", "1"):
            fold_values = [float(r[key]) for r in cases if r["fold"] == fold]
            (fold_row,) = [r for r in rows if r["row"] == "fold_mean" and r["fold"] == fold]
            assert float(fold_row[key]) == sum(fold_values) / len(fold_values)
    # Scored with each fold's best checkpoint (evaluated every epoch, so saved).
    assert [(s.choice, s.checkpoint.name) for s in summary.folds] == [("best", "best-rank0.pt")] * 2


def test_the_summary_matches_unet_eval_of_each_folds_checkpoint(cv_run):
    """The case rows are the evaluator's scores of each fold's checkpoint on its validation fold."""
    summary = cv_run["second"].summary
    for score in summary.folds:
        scored = read_summary(score.checkpoint.parent.parent / f"eval_best-rank0_val-fold{score.fold}.csv")
        mine = [r for r in summary.rows if r["row"] == "case" and r["fold"] == score.fold]
        assert [r["case_id"] for r in scored] == [r["case_id"] for r in mine]
        assert all(float(a[k]) == b[k] for a, b in zip(scored, mine) for k in summary.keys)


def test_aggregate_only_with_lesion_wise_scores_and_the_latest_checkpoints(cv_run):
    argv = [*cv_run["argv"], "--aggregate-only", "--lesion-wise", "--checkpoint", "latest", "--no-progress"]
    status, out, err = run_cli(cv_main, argv)
    assert status == 0, err
    assert "LW WT" in out and "ep2-ba4-rank0.pt (latest, batch 4)" in out and "cv_summary.csv" in out
    rows = read_summary(cv_run["cv_dir"] / "cv_summary.csv")
    assert {"lesion_dice/WT", "lesion_hd95/ET"} <= set(rows[0])
    assert [r["row"] for r in rows].count("case") == 6


def test_a_different_config_for_the_same_cv_folder_is_refused(cv_run, tmp_path):
    status, _, err = run_cli(cv_main, [*cv_run["argv"], "model.unet.filters=[4, 16]", "--no-progress"])
    assert status == 1 and err.count("\n") == 1
    assert "cv_config.yaml: this cross-validation was started with another config" in err
    assert "model.unet.filters" in err
    # On a copy of the record: keys a resume may change are no new experiment (the record takes
    # them), nor are evaluation settings when only scoring.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "cv_config.yaml").write_text((cv_run["cv_dir"] / "cv_config.yaml").read_text())
    base = [a for a in cv_run["argv"][1:] if not a.startswith("save_folder=")] + [f"save_folder={copy}"]
    claim_cv_folder(resolve_config(CONFIG, [*base, "max_duration=3ep"]))
    assert "max_duration: 3ep" in (copy / "cv_config.yaml").read_text()
    claim_cv_folder(resolve_config(CONFIG, [*base, "eval.hd95=true"]), aggregate_only=True)
    # A record from before a key existed: the key takes its default, no difference.
    record = yaml.safe_load((copy / "cv_config.yaml").read_text())
    del record["data"]["prefetch_to_device"]
    (copy / "cv_config.yaml").write_text(yaml.safe_dump(record))
    claim_cv_folder(resolve_config(CONFIG, base))
    assert "prefetch_to_device: true" in (copy / "cv_config.yaml").read_text()
    with pytest.raises(CrossValidationError, match=r"differs in eval\.hd95\)"):
        claim_cv_folder(resolve_config(CONFIG, [*base, "eval.hd95=true"]))
    status, _, err = run_cli(cv_main, [*cv_run["argv"], "--folds", "0,5"])
    assert status == 2 and "--folds '0,5' must list distinct folds from 0 to 1" in err


def test_parse_folds_and_fold_configs(tiny_config):
    assert parse_folds("0,2", 5) == [0, 2] and parse_folds("3", 5) == [3]
    for bad in ("", "0,0", "5", "a"):
        with pytest.raises(ConfigError, match="--folds"):
            parse_folds(bad, 5)
    cfg = tiny_config("callbacks.mlflow.run_name=exp", run_dir=Path("/x/cv"))
    fold = fold_config(cfg, 2)
    assert fold["data"]["fold"] == 2 and fold["save_folder"] == "/x/cv/fold_2"
    assert fold["run_name"] == f"{cfg['run_name']}-fold2" and fold["callbacks"]["mlflow"]["run_name"] == "exp-fold2"
    assert cfg["data"]["fold"] == 0 and cfg["save_folder"] == "/x/cv"  # the config itself is left alone
    # A starting point for every fold (pretrained weights) is for a fold's start only: a started
    # fold resumes its own checkpoints.
    pretrained = tiny_config("load_path=/x/pre.pt", "load_weights_only=true", run_dir=Path("/x/cv"))
    assert fold_config(pretrained, 1)["load_path"] == "/x/pre.pt"
    resumed = fold_config(pretrained, 1, started=True)
    assert resumed["load_path"] is None and resumed["load_weights_only"] is False


def test_a_unet_train_run_folder_is_not_taken_for_a_cv_folder(tiny_config, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CrossValidationError, match="is the run folder of a unet-train run"):
        run_cross_validation(tiny_config(run_dir=tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="split file is one fold"):
        run_cross_validation(tiny_config(f"data.split_file={tmp_path / 's.json'}"), progress=False)


def test_a_cv_folder_expands_to_its_folds_for_unet_predict(cv_run, tmp_path):
    cv_dir = cv_run["cv_dir"]
    expanded = expand_checkpoints([cv_dir])
    assert expanded == [
        (cv_dir / "fold_0" / "checkpoints" / "best-rank0.pt", "fold 0, best"),
        (cv_dir / "fold_1" / "checkpoints" / "best-rank0.pt", "fold 1, best"),
    ]
    phantom = raw_data_dir(cv_run["cfg"], progress=False)
    out = tmp_path / "from-folder"
    status, stdout, err = run_cli(
        predict_main, [str(cv_dir), str(phantom), str(out), "--probabilities", "--no-progress"]
    )
    assert status == 0, err
    assert "Ensemble of 2 models" in err and "fold 1, best" in err and "Wrote 6 segmentation(s)" in stdout
    # The same as naming the two checkpoints.
    named = tmp_path / "named"
    predict_dataset(
        [path for path, _ in expanded], phantom, named, probabilities=True, progress=False, log=io.StringIO()
    )
    for path in sorted(out.iterdir()):
        np.testing.assert_array_equal(
            np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(named / path.name)).dataobj)
        )


def fake_checkpoint(folder: Path, name: str, timestamp: dict, history: list[float]) -> None:
    history = [{"epoch": i + 1, "batch": 2 * (i + 1), "dice/mean": d} for i, d in enumerate(history)]
    payload = {"model": {}, "timestamp": timestamp, "eval_history": history, "run_id": "r", "config": {}}
    atomic_torch_save(payload, folder / "checkpoints" / name)


def test_a_fold_is_finished_at_max_duration_or_when_the_early_stopper_stopped_it(tmp_path):
    run = tmp_path / "fold_0"
    (run / "checkpoints").mkdir(parents=True)
    assert not fold_state(run, 0, Duration.parse("3ep")).finished  # no checkpoint: not started
    # Saved at the last step of epoch 3, before the loop counted the epoch: the name has it.
    counters = {"epoch": 2, "batch": 6, "sample": 12, "batch_in_epoch": 2, "sample_in_epoch": 4}
    fake_checkpoint(run, "ep3-ba6-rank0.pt", counters, [0.5, 0.6, 0.7])
    state = fold_state(run, 0, Duration.parse("3ep"))
    assert state.finished and state.status == "finished (max_duration 3ep reached)" and state.batch == 6
    for duration, finished in (("6ba", True), ("7ba", False), ("12sp", True), ("4ep", False)):
        assert fold_state(run, 0, Duration.parse(duration)).finished is finished
    stopper = EarlyStopper(patience=2, min_delta=0.0)
    state = fold_state(run, 0, Duration.parse("10ep"), stopper)
    assert not state.finished and state.status == "stopped at batch 6 of 10ep"
    # No improvement in the last 2 evaluations: the early stopper ended this run.
    fake_checkpoint(
        run, "ep4-ba8-rank0.pt", {**counters, "epoch": 4, "batch": 8, "batch_in_epoch": 0}, [0.5, 0.7, 0.6, 0.6]
    )
    state = fold_state(run, 0, Duration.parse("10ep"), stopper)
    assert state.finished and state.status.startswith("finished (early stop: validation Dice has not improved")
    assert state.checkpoint.name == "ep4-ba8-rank0.pt"


def test_unet_cv_under_torchrun_trains_every_fold_on_both_ranks_and_summarises_once(cache_root, tmp_path):
    cv_dir = tmp_path / "ddp-cv"
    argv = cv_args(cache_root, cv_dir, "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba")
    ensure_prepared(resolve_config(argv[0], argv[1:]), DistInfo(), progress=False)  # the ranks only read it
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(port), "-m", "unet_trainer.cli", "cv", *argv, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Per case, per fold and overall:") == 1  # rank 0's table only
    for fold in (0, 1):
        saved = load_checkpoint(cv_dir / f"fold_{fold}" / "checkpoints" / "latest-rank0.pt")
        assert saved["timestamp"]["batch"] == 2 and len(saved["rng_per_rank"]) == 2  # both ranks trained it
    rows = read_summary(cv_dir / "cv_summary.csv")
    assert [r["row"] for r in rows] == ["case"] * 6 + ["fold_mean"] * 2 + ["mean", "std"]


def test_postprocessing_chosen_on_the_out_of_fold_predictions_applies_to_the_fold_ensemble(cv_run, tmp_path):
    cv_dir = cv_run["cv_dir"]
    chosen = cv_dir / "postprocessing.json"
    argv = [*cv_run["argv"], "--aggregate-only", "--choose-postprocessing", "--postprocessing-metric", "dice"]
    try:
        status, out, err = run_cli(cv_main, [*argv, "--no-progress"])
        assert status == 0, err
        document = json.loads(chosen.read_text())
        # Chosen on all 6 out-of-fold cases of both folds, and the score before any rule is the
        # plain mean Dice over WT, TC, ET of the summary's overall row.
        assert document["cases"] == 6 and document["metric"] == "dice"
        assert document["chosen_on"] == "the out-of-fold predictions of 2 folds (6 cases)"
        overall = next(r for r in read_summary(cv_dir / "cv_summary.csv") if r["row"] == "mean")
        assert document["score_before"] == pytest.approx(float(overall["mean"]), abs=1e-6)
        assert "postprocessing.json" in out
        assert not [p for p in cv_dir.iterdir() if p.is_dir() and not p.name.startswith("fold_")]  # no spill left
        # unet-predict on the CV folder applies it by default, and not with --no-postprocessing.
        phantom = raw_data_dir(cv_run["cfg"], progress=False)
        status, stdout, err = run_cli(predict_main, [str(cv_dir), str(phantom), str(tmp_path / "a"), "--no-progress"])
        assert status == 0, err
        assert f"Postprocessing from {chosen}" in stdout
        status, stdout, err = run_cli(
            predict_main, [str(cv_dir), str(phantom), str(tmp_path / "b"), "--no-postprocessing", "--no-progress"]
        )
        assert status == 0, err
        assert "Postprocessing from" not in stdout
        # The metric flag alone is refused in one line.
        status, _, err = run_cli(cv_main, [*cv_run["argv"], "--aggregate-only", "--postprocessing-metric", "dice"])
        assert status == 2 and err.count("\n") == 1 and "goes with --choose-postprocessing" in err
    finally:
        chosen.unlink(missing_ok=True)  # the other tests predict from this folder without rules


def test_the_summary_table_has_a_column_per_region_of_the_scheme(tmp_path):
    """MEN-RT's one region, GTV (the columns were once WT, TC and ET whatever the scheme)."""
    rows = [{"case_id": f"c{i}", "GTV": 0.5 + i / 10, "mean": 0.5 + i / 10, "lesion_dice/GTV": 0.25} for i in range(2)]
    scores = [FoldScore(0, tmp_path / "best-rank0.pt", "best", 4, rows)]
    table_rows, keys = summary_rows(scores)
    table = format_summary(CVSummary(scores, table_rows, keys, tmp_path / "cv.csv", ("GTV",)))
    header = next(line for line in table.splitlines() if line.startswith("fold"))
    assert header.split()[2:6] == ["GTV", "mean", "LW", "GTV"] and "WT" not in table
    assert "0.5500" in table  # the GTV mean over the two cases
