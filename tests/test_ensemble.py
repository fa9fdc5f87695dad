"""Fold ensembles in unet-predict: probabilities averaged over models, two identical checkpoints
giving the single model's output, incompatible checkpoints refused in one line."""

import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.parsing import parse_command_line
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.cli.predict import make_parser
from unet_trainer.commands.builders import build_model, build_sliding_window
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.loading import (
    EnsembleError,
    EnsembleModel,
    LoadedModel,
    check_compatible,
    load_model,
    load_models,
)
from unet_trainer.commands.predict import predict_dataset
from unet_trainer.commands.train import run_training
from unet_trainer.config.components import output_mode
from unet_trainer.config.config import resolve_config
from unet_trainer.core.checkpoint import atomic_torch_save, load_checkpoint
from unet_trainer.evaluation.evaluation import probabilities_to_labels
from unet_trainer.training.losses import OutputMode


@pytest.fixture(scope="module")
def checkpoint(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ensemble-run") / "run"
    cfg = resolve_config(ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, run_dir, "max_duration=2ba"))
    run_training(cfg, progress=False)
    return {"path": run_dir / "checkpoints" / "latest-rank0.pt", "phantom": raw_data_dir(cfg, progress=False)}


def loaded_model(cfg: dict, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(
        model=build_model(cfg["model"]).eval(),
        cfg=cfg,
        device=torch.device("cpu"),
        sliding_window=build_sliding_window(cfg),
        region_mode=output_mode(cfg["loss"]) is OutputMode.REGIONS,
        checkpoint=Path(f"model{seed}.pt"),
        weights="model",
    )


@pytest.mark.parametrize("region", [False, True])
def test_the_ensemble_averages_its_models_probabilities(tiny_config, region):
    extra = ("loss={region_dice_bce: {}}", "model.unet.num_classes=3") if region else ()
    cfg = tiny_config(*extra)
    members = [loaded_model(cfg, seed) for seed in (0, 1, 2)]
    # A member with another architecture and sliding window still averages (its outputs agree).
    other = tiny_config(*extra, "model.unet.filters=[6, 12]", "data.patch_size=[8, 16, 8]", "eval.mirror_tta=true")
    members.append(loaded_model(other, 3))
    assert check_compatible(members) == ["data.patch_size", "eval.mirror_tta", "model.unet.filters"]
    image = torch.randn(4, 20, 18, 22)
    ensemble = EnsembleModel(members)
    with torch.no_grad():
        each = [m.probabilities(image) for m in members]
        mean = ensemble.probabilities(image)
    assert mean.shape == (3 if region else 4, 20, 18, 22)
    torch.testing.assert_close(mean, torch.stack(each).mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(each[0], each[1])  # the members really differ
    if not region:
        torch.testing.assert_close(mean.sum(0), torch.ones(20, 18, 22))
    labels = probabilities_to_labels(mean, region)
    assert labels.dtype == torch.uint8 and set(labels.unique().tolist()) <= {0, 1, 2, 3}


def test_two_identical_checkpoints_give_the_single_models_output(checkpoint, tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copy(checkpoint["path"], copy)
    overrides = ["eval.mirror_tta=true"]
    single, pair = tmp_path / "single", tmp_path / "pair"
    log = io.StringIO()
    predict_dataset(
        checkpoint["path"], checkpoint["phantom"], single, overrides=overrides, probabilities=True, progress=False
    )
    summary = predict_dataset(
        [checkpoint["path"], copy],
        checkpoint["phantom"],
        pair,
        overrides=overrides,
        probabilities=True,
        progress=False,
        log=log,
    )
    assert "Ensemble of 2 models" in log.getvalue() and str(copy) in log.getvalue()
    assert len(summary.written) == 6 and not summary.failed
    for path in sorted(single.iterdir()):
        mine, theirs = nib.load(str(pair / path.name)), nib.load(str(path))
        if path.name.endswith("_probabilities.nii.gz"):
            np.testing.assert_allclose(np.asarray(mine.dataobj), np.asarray(theirs.dataobj), rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
        assert np.allclose(mine.affine, theirs.affine)


def test_checkpoints_of_other_label_conventions_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    state = load_checkpoint(checkpoint["path"])
    state["config"]["loss"] = {"region_dice_bce": {"dice_weight": 1.0, "bce_weight": 1.0}}  # sigmoid regions
    regions = tmp_path / "regions.pt"
    atomic_torch_save(state, regions)
    status = predict_main(
        [str(checkpoint["path"]), str(regions), str(checkpoint["phantom"]), str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith("error: ") and "\n" not in err, err
    assert str(load_model(checkpoint["path"]).checkpoint) in err and str(regions) in err
    assert "region mode (loss) differ (softmax classes vs sigmoid regions)" in err
    assert not (tmp_path / "o").exists()
    # Architectures may differ, not the number of outputs or the inputs.
    for key, value in (
        ("model", {"num_classes": 3}),
        ("model", {"in_channels": 2}),
        ("data", {"target_spacing": [1.0, 1.0, 1.0]}),
    ):
        first = load_model(checkpoint["path"])
        other = load_model(checkpoint["path"])
        # The model's settings sit under its name (model: {unet: {...}}).
        (other.cfg[key]["unet"] if key == "model" else other.cfg[key]).update(value)
        with pytest.raises(EnsembleError, match=f"their {key}.{next(iter(value))} differ"):
            check_compatible([first, other])


def test_a_folder_without_runs_is_refused(checkpoint, tmp_path):
    with pytest.raises(EnsembleError, match="neither a unet-cv folder .* nor a run folder"):
        load_models([tmp_path], log=io.StringIO())
    # A run folder stands for its chosen checkpoint (its best one here: it evaluated at the end).
    log = io.StringIO()
    loaded = load_models([checkpoint["path"].parent.parent], log=log)
    assert isinstance(loaded, LoadedModel) and loaded.checkpoint.name == "best-rank0.pt"
    assert "(run, best)" in log.getvalue()


def test_predict_command_line_takes_every_plain_word_but_the_last_two_as_checkpoints():
    args = ["a.pt", "cv/", "--eval.overlap", "0.25", "in", "out", "eval.mirror_tta=true", "--probabilities"]
    positionals, flags, overrides = parse_command_line(make_parser(), args, 3, more_positionals=True)
    assert positionals == ["a.pt", "cv/", "in", "out"]
    assert overrides == ["--eval.overlap", "0.25", "eval.mirror_tta=true"] and flags["--probabilities"]
