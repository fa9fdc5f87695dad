"""End to end on the tiny phantom: a training smoke test, resume exactness, checkpoints, logs."""

import json
import math

import pytest
import torch

from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.train import run_training
from unet_trainer.core.checkpoint import load_checkpoint
from unet_trainer.core.checkpoints import list_checkpoints
from unet_trainer.core.runfolder import RunFolderError
from unet_trainer.training.trainer import TrainingDiverged


def weights(summary) -> dict:
    return {k: v.clone() for k, v in summary["state"].unwrapped_model.state_dict().items()}


def test_two_step_training_smoke(tiny_config, tmp_path):
    cfg = tiny_config("max_duration=2ba")
    summary = run_training(cfg, progress=False)
    run = tmp_path / "run"
    assert summary["batch"] == 2
    assert (run / "config.yaml").is_file() and (run / "split.json").is_file()
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 4 and len(split["val"]) == 2 and not set(split["train"]) & set(split["val"])
    final = summary["final_eval"]
    for key in ("dice/WT", "dice/TC", "dice/ET", "dice/mean"):
        assert 0.0 <= final[key] <= 1.0
    train_lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in train_lines if r["kind"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss/train"]) for r in train_lines if r["kind"] == "train")
    assert (run / "eval_cases.csv").read_text().count("\n") == 1 + len(split["val"])
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ep0-ba1-rank0.pt", "ep1-ba2-rank0.pt"]
    # Two batches per epoch: batch 2 finishes epoch 1 (State.finished_epochs).
    assert (run / "checkpoints" / "latest-rank0.pt").resolve().name == "ep1-ba2-rank0.pt"


def test_checkpoint_holds_the_full_state(tiny_config, tmp_path):
    run_training(tiny_config("max_duration=1ba"), progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "ep0-ba1-rank0.pt")
    assert set(state) >= {"model", "optimizer", "scheduler", "augmenter", "timestamp", "rng", "config", "eval_history"}
    assert state["timestamp"]["batch"] == 1 and state["timestamp"]["sample"] == 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["optimizer"]["state"], "optimizer moments must be saved"


def test_resume_gives_identical_weights(tiny_config, tmp_path):
    """4 steps in one go == 2 steps, then a new process-like run resuming, then 2 more."""
    straight = run_training(tiny_config("max_duration=4ba", run_dir=tmp_path / "straight"), progress=False)
    first = run_training(tiny_config("max_duration=2ba", run_dir=tmp_path / "split"), progress=False)
    assert first["batch"] == 2
    torch.manual_seed(12345)  # disturb the global streams: resume must restore them
    resumed = run_training(tiny_config("max_duration=4ba", run_dir=tmp_path / "split"), progress=False)
    assert resumed["resumed_from"] is not None and resumed["batch"] == 4
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_across_an_epoch_boundary_and_load_path(tiny_config, tmp_path):
    """Epochs here are 2 batches: resume from batch 3 (mid-epoch 2) via an explicit load_path."""
    straight = run_training(tiny_config("max_duration=3ep", run_dir=tmp_path / "a"), progress=False)
    run_training(tiny_config("max_duration=3ba", run_dir=tmp_path / "b"), progress=False)
    ckpt = tmp_path / "b" / "checkpoints" / "ep1-ba3-rank0.pt"
    resumed = run_training(
        tiny_config("max_duration=3ep", f"load_path={ckpt}", "autoresume=false", run_dir=tmp_path / "c"), progress=False
    )
    assert straight["batch"] == resumed["batch"] == 6
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_the_old_flat_model_section_resumes_and_loads(tiny_config, tmp_path, capsys):
    """Checkpoints of earlier versions store ``model: {filters: ...}`` without the model's name:
    they still resume (exactly, and without a config-differs warning) and still load for inference."""
    from unet_trainer.commands.loading import load_model

    straight = run_training(tiny_config("max_duration=3ba", run_dir=tmp_path / "straight"), progress=False)
    run_training(tiny_config("max_duration=2ba", run_dir=tmp_path / "old"), progress=False)
    checkpoint = (tmp_path / "old" / "checkpoints" / "latest-rank0.pt").resolve()
    state = torch.load(checkpoint, weights_only=True)
    ((name, settings),) = state["config"]["model"].items()
    assert name == "unet"
    state["config"]["model"] = settings  # the section as an earlier version saved it
    torch.save(state, checkpoint)
    capsys.readouterr()

    resumed = run_training(tiny_config("max_duration=3ba", run_dir=tmp_path / "old"), progress=False)
    err = capsys.readouterr().err
    assert resumed["resumed_from"] is not None and resumed["batch"] == 3
    assert "differs from the checkpoint" not in err
    assert f"note: {checkpoint}: 'model' without a model name (the old shape)" in err
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    loaded = load_model(checkpoint, ["device=cpu"])
    assert list(loaded.cfg["model"]) == ["unet"] and loaded.cfg["model"]["unet"]["filters"] == [4, 8]
    assert (loaded.in_channels, loaded.num_outputs, loaded.spatial_dims) == (4, 4, 3)
    assert f"note: {checkpoint} (stored config): 'model' without a model name" in capsys.readouterr().err


def test_autoresume_off_starts_over_only_with_save_overwrite(tiny_config, tmp_path):
    run_training(tiny_config("max_duration=2ba"), progress=False)
    with pytest.raises(RunFolderError, match="save_overwrite=true"):  # it would mix with the first run
        run_training(tiny_config("max_duration=1ba", "autoresume=false"), progress=False)
    again = run_training(tiny_config("max_duration=1ba", "autoresume=false", "save_overwrite=true"), progress=False)
    assert again["resumed_from"] is None and again["batch"] == 1


def test_config_change_on_resume_warns(tiny_config, tmp_path, capsys):
    run_training(tiny_config("max_duration=1ba"), progress=False)
    run_training(tiny_config("max_duration=2ba", "optimizer.radam.lr=0.01"), progress=False)
    assert "differs from the checkpoint's in: optimizer.radam.lr" in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_clear_error(tiny_config, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg_args = ["max_duration=1ba", f"load_path={bad}"]
    from conftest import ROOT, tiny_overrides  # the CLI path, for the exit status

    status = train_main(
        [str(ROOT / "configs" / "demo.yaml"), *tiny_overrides(tmp_path / "cache", tmp_path / "run", *cfg_args)]
    )
    err = capsys.readouterr().err
    assert status == 1 and "bad.pt: not a readable checkpoint" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    from unet_trainer.training import losses

    calls = {"n": 0}
    original = losses.DiceCELoss.forward

    def poisoned(self, logits, target):
        calls["n"] += 1
        value = original(self, logits, target)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(losses.DiceCELoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at batch 3"):
        run_training(tiny_config("max_duration=5ba", "eval_interval=0ep"), progress=False)
    latest = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest-rank0.pt")
    assert latest["timestamp"]["batch"] == 2
    assert all(torch.isfinite(v).all() for v in latest["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "config,extra",
    [
        ("brats.yaml", ["data.patch_size=[16, 16, 16]"]),
        ("brats-2d.yaml", ["data.patch_size=[1, 16, 16]"]),
        ("unet2015-2d.yaml", ["data.patch_size=[1, 52, 52]", "model.unet.filters=[4, 8, 16]"]),  # 52 -> 12 valid
        ("brats-resenc.yaml", ["data.patch_size=[16, 16, 16]", "model.resenc_unet.blocks_per_stage=[1, 2, 2]"]),
    ],
)
def test_shipped_brats_configs_train(cache_root, tmp_path, config, extra):
    """The shipped BraTS presets (3D DLE net, Composer's 2D residual net, the 2015 net, nnU-Net's
    ResEnc) train end to end, shrunk only in width, depth and size, on the phantom."""
    from conftest import ROOT

    from unet_trainer.config.config import resolve_config

    name = "resenc_unet" if config == "brats-resenc.yaml" else "unet"
    overrides = [
        f"data.cache_dir={cache_root}",
        f"save_folder={tmp_path / 'run'}",
        "data.path=null",
        "data.phantom.cases=6",
        "data.phantom.shape=[24, 24, 24]",
        "data.num_folds=3",
        "data.num_workers=0",
        f"model.{name}.filters=[4, 8, 8]",
        f"model.{name}.kernel_sizes=[3, 3, 3]",
        f"model.{name}.strides=[1, 2, 2]",
        "train_batch_size=2",
        "device_train_microbatch_size=null",
        "max_duration=2ba",
        "device=cpu",
        *extra,
    ]
    cfg = resolve_config(ROOT / "configs" / config, overrides)
    summary = run_training(cfg, progress=False)
    model = summary["state"].unwrapped_model
    assert summary["batch"] == 2 and 0.0 <= summary["final_eval"]["dice/mean"] <= 1.0
    settings = cfg["model"][name]
    conv = torch.nn.Conv2d if settings["spatial_dims"] == 2 else torch.nn.Conv3d
    assert any(isinstance(m, conv) for m in model.modules())
    if config == "unet2015-2d.yaml":
        assert model.output_size((52, 52)) == (12, 12)
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in model.modules())
    if config == "brats-2d.yaml":
        assert settings["residual"] and settings["norm"] == "batch"
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    if config == "brats-resenc.yaml":
        from unet_trainer.models.resenc import ResidualEncoderUNet

        assert isinstance(model, ResidualEncoderUNet) and model.blocks_per_stage == (1, 2, 2)
        assert model.deep_supervision_heads == 1
