"""The checkpoint saver and the MLflow destination get the run folder's checkpoints from the builder: the saver
writes through exactly the store it is given, the MLflow logger uploads the best checkpoint the builder names, and
neither the callbacks nor the overlays import the checkpoint manager or the logger destinations."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_architecture import PACKAGE, import_graph

from unet_trainer.commands.builders import build_callbacks, build_logger_destinations
from unet_trainer.config import components
from unet_trainer.config.config import CALLBACKS, resolve_config
from unet_trainer.core.checkpoints import CheckpointManager
from unet_trainer.core.schema import Duration
from unet_trainer.training import callbacks as cb
from unet_trainer.training import loggers


class RecordingStore:
    """A checkpoint store that records what the saver asks of it and writes nothing."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.best_path = run_dir / "elsewhere" / "the-best.pt"
        self.calls: list[tuple] = []

    def path_for(self, epoch: int, batch: int) -> Path:
        return self.run_dir / f"periodic-{epoch}-{batch}.pt"

    def save(self, payload, path: Path, run_id: str, batch: int) -> None:
        self.calls.append(("save", path, run_id, batch, sorted(payload)))

    def save_periodic(self, payload, epoch: int, run_id: str, batch: int) -> Path:
        self.calls.append(("save_periodic", epoch, run_id, batch, sorted(payload)))
        return self.path_for(epoch, batch)

    def rotate(self, run_id: str, keep: int) -> None:
        self.calls.append(("rotate", run_id, keep))


def _state(run_dir: Path, batch: int, dice: float | None = None) -> SimpleNamespace:
    """What the saver reads of the training state."""
    return SimpleNamespace(
        state_dict=lambda: {"model": {"w": torch.ones(1)}},
        augmenter=None,
        timestamp=SimpleNamespace(batch=batch),
        finished_epochs=batch // 2,
        run_id="run-a",
        run_dir=run_dir,
        extra_state={},
        eval_history=[] if dice is None else [{"dice/mean": dice}],
        evaluator=None,
    )


def test_the_saver_writes_through_exactly_the_store_it_is_given(tmp_path):
    store = RecordingStore(tmp_path)
    saver = cb.CheckpointSaver(store, Duration.parse("1ba"), keep=2)
    assert saver.checkpoints is store
    assert saver.save(_state(tmp_path, 3)) == tmp_path / "periodic-1-3.pt"
    assert saver.save(_state(tmp_path, 3)) is None  # once per batch
    saver.eval_end(_state(tmp_path, 4, dice=0.5))
    payload = ["augmenter_per_rank", "model", "rng", "rng_per_rank"]
    assert store.calls == [
        ("save_periodic", 1, "run-a", 3, payload),
        ("rotate", "run-a", 2),
        ("save", store.best_path, "run-a", 4, payload),
    ]
    assert not list(tmp_path.iterdir())  # nothing written but through the store


def test_a_saver_that_is_not_the_writer_asks_only_for_names(tmp_path):
    store = RecordingStore(tmp_path)
    saver = cb.CheckpointSaver(store, Duration.parse("1ba"), keep=-1, is_writer=False)
    assert saver.save(_state(tmp_path, 2)) == tmp_path / "periodic-1-2.pt"
    saver.eval_end(_state(tmp_path, 2, dice=0.7))
    assert store.calls == []


def test_the_checkpoint_manager_is_a_checkpoint_store():
    # Every member the saver's protocol names exists on the manager, with the protocol's parameters first.
    members = {name for name in vars(cb.CheckpointStore) if not name.startswith("_")}
    assert members == {"run_dir", "best_path", "path_for", "save", "save_periodic", "rotate"}
    for name in members:
        wanted, offered = getattr(cb.CheckpointStore, name), getattr(CheckpointManager, name)
        assert isinstance(offered, property) == isinstance(wanted, property), name
        if not isinstance(wanted, property):
            expected = list(inspect.signature(wanted).parameters)
            assert list(inspect.signature(offered).parameters)[: len(expected)] == expected, name


def test_the_builder_gives_the_saver_the_run_folders_manager(tmp_path):
    cfg = resolve_config(None, [])
    saver = build_callbacks(cfg, tmp_path, is_main=True, progress=False)[-1]
    assert isinstance(saver, cb.CheckpointSaver) and isinstance(saver.checkpoints, CheckpointManager)
    assert saver.checkpoints.folder == CheckpointManager.of_run(tmp_path).folder
    assert saver.checkpoints.best_path == tmp_path / "checkpoints" / "best-rank0.pt"


class RecordingClient:
    def __init__(self):
        self.artifacts: list[tuple] = []

    def log_artifact(self, run_id, path, folder):
        self.artifacts.append((run_id, path, folder))

    def set_tag(self, *args):
        pass

    def set_terminated(self, *args):
        pass


def test_mlflow_uploads_the_best_checkpoint_the_builder_names(tmp_path):
    assert components.LOGGER_DESTINATIONS["mlflow"] is loggers.MLflowLogger
    assert "best_checkpoint" in components.BUILDER_SUPPLIED and "best_checkpoint" not in CALLBACKS["mlflow"]
    cfg = resolve_config(None, ["callbacks.mlflow.log_checkpoints=true"])
    destination = components.build(
        components.LOGGER_DESTINATIONS["mlflow"],
        cfg["callbacks"]["mlflow"],
        {"run_dir": tmp_path, "config": cfg, "best_checkpoint": tmp_path / "kept" / "chosen.pt"},
    )
    destination.client, destination.run_id = RecordingClient(), "r1"
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "chosen.pt").write_bytes(b"x")
    (tmp_path / "config.yaml").write_text("a: 1\n")
    client = destination.client
    destination.close(None)
    assert client.artifacts == [
        ("r1", str(tmp_path / "config.yaml"), None),
        ("r1", str(tmp_path / "kept" / "chosen.pt"), "kept"),
    ]


def test_the_builder_supplies_the_managers_best_checkpoint(tmp_path):
    pytest.importorskip("mlflow")
    cfg = resolve_config(None, ["callbacks.mlflow.log_checkpoints=true"])
    (mlflow,) = [d for d in build_logger_destinations(cfg, tmp_path) if isinstance(d, loggers.MLflowLogger)]
    assert mlflow.best_checkpoint == CheckpointManager.of_run(tmp_path).best_path
    assert mlflow.best_checkpoint.relative_to(tmp_path).as_posix() == "checkpoints/best-rank0.pt"


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("training.callbacks", {"core.checkpoints"}),
        ("training.reporting", {"core.checkpoints", "training.loggers"}),
        ("training.loggers", {"core.checkpoints"}),
    ],
)
def test_the_training_callbacks_do_not_import_the_checkpoint_manager(module, forbidden):
    imported = import_graph()[f"{PACKAGE}.{module}"]
    assert not imported & {f"{PACKAGE}.{name}" for name in forbidden}
