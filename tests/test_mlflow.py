"""The MLflow logger against a real local MLflow file store, read back through MlflowClient:
params, metrics with their steps, artifacts, and a resume that continues the same MLflow run
without logging any step twice."""

import json

import pytest
from conftest import hide_package

from unet_trainer.commands.train import run_training
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.checkpoint import load_checkpoint
from unet_trainer.training.loggers import flatten_config

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """A tracking URI in the test's folder; the file-store switch the logger sets is undone after."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return f"file:{tmp_path / 'mlruns'}"


def metric_steps(client, run_id, key) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_mlflow_round_trip_and_resume_continue_the_same_run(tiny_config, tmp_path, file_store):
    settings = (
        f"callbacks.mlflow.tracking_uri={file_store}",
        "callbacks.mlflow.experiment=tests",
        "callbacks.mlflow.log_checkpoints=true",
        "save_interval=2ba",
        "eval_interval=2ba",
        "save_num_checkpoints_to_keep=-1",
    )
    run_dir = tmp_path / "run"
    first = run_training(tiny_config("max_duration=4ba", *settings), progress=False)
    client = MlflowClient(tracking_uri=file_store)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == first["state"].config["run_name"]
    assert first["state"].extra_state["mlflow_run_id"] == run_id

    # Params: the flattened resolved config.
    assert run.data.params == flatten_config(first["state"].config)
    assert run.data.params["optimizer.radam.lr"] == "0.003" and run.data.params["data.patch_size"] == "[16, 16, 16]"
    # Metrics at their step numbers.
    assert metric_steps(client, run_id, "loss/train") == [1, 2, 3, 4]
    assert metric_steps(client, run_id, "eval/dice/mean") == [2, 4]
    assert metric_steps(client, run_id, "lr/group0") == [1, 2, 3, 4]
    assert set(run.data.metrics) >= {"eval/dice/WT", "eval/dice/TC", "eval/dice/ET", "throughput/samples_per_sec"}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "progress.png", "overlays", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "overlays")} == {"overlays/summary.png"}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best-rank0.pt"}
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "download"))
    assert open(local).read() == (run_dir / "config.yaml").read_text()

    # Resume from the checkpoint at step 2, as after a crash: the MLflow run already holds steps 3
    # and 4 of the interrupted run; the resumed run goes on to step 6 in the same MLflow run and
    # logs each step once.
    checkpoint = run_dir / "checkpoints" / "ep1-ba2-rank0.pt"
    assert load_checkpoint(checkpoint)["extra_state"]["mlflow_run_id"] == run_id
    # The crash came before step 4's checkpoint was written (a resume may not leave a later
    # checkpoint of its own run behind it: rotation would remove it).
    (run_dir / "checkpoints" / "ep2-ba4-rank0.pt").unlink()
    (run_dir / "checkpoints" / "latest-rank0.pt").unlink()
    resumed = run_training(tiny_config("max_duration=6ba", f"load_path={checkpoint}", *settings), progress=False)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["batch"] == 6
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert metric_steps(client, run_id, "loss/train") == [1, 2, 3, 4, 5, 6]
    assert metric_steps(client, run_id, "eval/dice/mean") == [2, 4, 6]
    # The values are those of the run folder's own log (a resumed run replays steps 3 and 4 exactly).
    logged = {
        r["batch"]: r["loss/train"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    }
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss/train")} == logged
    assert load_checkpoint(run_dir / "checkpoints" / "latest-rank0.pt")["extra_state"]["mlflow_run_id"] == run_id

    # A checkpoint whose MLflow run is not in the store starts a new one.
    other = f"file:{tmp_path / 'other-mlruns'}"
    moved = run_training(
        tiny_config("max_duration=7ba", *settings, f"callbacks.mlflow.tracking_uri={other}"), progress=False
    )
    assert moved["state"].extra_state["mlflow_run_id"] != run_id
    (new_run,) = MlflowClient(tracking_uri=other).search_runs(
        [MlflowClient(tracking_uri=other).get_experiment_by_name("tests").experiment_id]
    )
    assert metric_steps(MlflowClient(tracking_uri=other), new_run.info.run_id, "loss/train") == [7]


def test_mlflow_missing_is_a_one_line_error(tiny_config, monkeypatch):
    hide_package(monkeypatch, "mlflow")
    with pytest.raises(
        ConfigError, match=r"^callbacks.mlflow needs the mlflow package: pip install 'unet-trainer\[mlflow\]'$"
    ):
        run_training(tiny_config("max_duration=1ba", "callbacks.mlflow={}"), progress=False)
