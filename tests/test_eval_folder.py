"""``unet-eval --predictions DIR --dataset PATH``: a folder of label maps from any tool scored against a raw
dataset's truth gives the numbers ``unet-eval`` gives the checkpoint that wrote them; every mismatch between
the folder and the dataset is one line naming the file."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.evaluate import evaluate_folder, evaluate_model
from unet_trainer.commands.loading import load_model
from unet_trainer.commands.predict import predict_dataset
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.data.layouts import DataFormatError, list_cases

SCORES = ["eval.hd95=true", "eval.lesion_wise=true", "eval.lesion_min_volume=2"]


@pytest.fixture(scope="module")
def predicted(cache_root, tmp_path_factory):
    """A few steps of the tiny demo, then its predictions for every case of its phantom."""
    root = tmp_path_factory.mktemp("eval-folder")
    cfg = resolve_config(ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, root / "run", "max_duration=6ba"))
    run_training(cfg, progress=False)
    checkpoint = root / "run" / "checkpoints" / "latest-rank0.pt"
    phantom = raw_data_dir(cfg, progress=False)
    predict_dataset(checkpoint, phantom, root / "predictions", progress=False, cpu_path="fp32")  # as unet-eval runs
    return {"checkpoint": checkpoint, "phantom": phantom, "predictions": root / "predictions", "root": root}


def _rows(report) -> dict[str, dict]:
    return {row["case_id"]: {k: v for k, v in row.items() if k != "case_id"} for row in report.per_case}


@pytest.mark.parametrize("definition", ["brats2023", "panoptica"])
def test_the_folder_unet_predict_wrote_scores_as_its_checkpoint(predicted, tmp_path, definition):
    loaded = load_model(predicted["checkpoint"], [*SCORES, f"eval.lesion_definition={definition}"])
    of_model = evaluate_model(
        loaded, predicted["phantom"], out_csv=tmp_path / "model.csv", progress=False, overlays=False
    )
    of_folder = evaluate_folder(
        predicted["predictions"], predicted["phantom"], loaded.cfg, out_csv=tmp_path / "folder.csv", progress=False
    )
    model_rows, folder_rows = _rows(of_model), _rows(of_folder)
    assert sorted(folder_rows) == sorted(model_rows) and len(folder_rows) == 6
    keys = set(next(iter(model_rows.values())))
    assert {"WT", "mean", "hd95/WT", "lesion_dice/ET", "lesion_hd95/TC"} <= keys
    for case_id, expected in model_rows.items():
        assert set(folder_rows[case_id]) == keys
        for key, value in expected.items():
            got = folder_rows[case_id][key]
            assert (math.isnan(got) and math.isnan(value)) or abs(got - value) <= 1e-6, (case_id, key, got, value)
    assert of_folder.counts == of_model.counts and of_folder.label_convention == of_model.label_convention
    assert of_folder.loaded is None and of_folder.predictions == predicted["predictions"]
    assert (tmp_path / "folder.csv").read_text().splitlines()[0] == (tmp_path / "model.csv").read_text().splitlines()[0]
    assert of_folder.lesion_definition == of_model.lesion_definition == definition


def test_the_command_prints_the_table_of_the_folder(predicted, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    argv = ["--predictions", str(predicted["predictions"]), "--dataset", str(predicted["phantom"]), "device=cpu"]
    assert (
        eval_main([*argv, "--out", str(out), "--no-progress", "--lesion-wise", "eval.lesion_definition=panoptica"]) == 0
    )
    printed = capsys.readouterr().out
    assert "Metric definition panoptica: per region, mean over one-to-one matched lesions" in printed
    assert printed.startswith(f"Predictions: {predicted['predictions']}\n")
    assert "all 6 labelled cases of" in printed and f"Per-case scores: {out}" in printed
    assert len(out.read_text().splitlines()) == 7
    # Without the dataset, or asking to choose postprocessing: a usage error, nothing written.
    assert eval_main(["--predictions", str(predicted["predictions"]), "--out", str(tmp_path / "x.csv")]) == 2
    assert "--predictions needs --dataset" in capsys.readouterr().err
    assert eval_main([*argv, "--choose-postprocessing", "--out", str(tmp_path / "x.csv")]) == 2
    assert not (tmp_path / "x.csv").exists()


def _copy(predicted, tmp_path):
    folder = tmp_path / "predictions"
    shutil.copytree(predicted["predictions"], folder)
    return folder, sorted(case.case_id for case in list_cases(predicted["phantom"]))


def _score(folder, predicted):
    cfg = load_model(predicted["checkpoint"]).cfg
    return evaluate_folder(folder, predicted["phantom"], cfg, out_csv=folder.parent / "s.csv", progress=False)


def test_a_missing_or_extra_prediction_is_one_line(predicted, tmp_path):
    folder, ids = _copy(predicted, tmp_path)
    (folder / f"{ids[1]}.nii.gz").unlink()
    with pytest.raises(DataFormatError, match=rf"no prediction for {ids[1]} \(1 of the 6 labelled cases"):
        _score(folder, predicted)
    shutil.copy(folder / f"{ids[0]}.nii.gz", folder / f"{ids[1]}.nii.gz")
    shutil.copy(folder / f"{ids[0]}.nii.gz", folder / "BraTS2021_09999.nii.gz")
    (folder / "notes.txt").write_text("not a prediction")  # passed over, as the probabilities would be
    with pytest.raises(DataFormatError, match="BraTS2021_09999.nii.gz match no case of"):
        _score(folder, predicted)
    (folder / "BraTS2021_09999.nii.gz").unlink()
    shutil.copy(folder / f"{ids[2]}.nii.gz", folder / f"{ids[2]}.nii")
    with pytest.raises(DataFormatError, match=f"case {ids[2]} has both a .nii and a .nii.gz"):
        _score(folder, predicted)
    assert not (folder.parent / "s.csv").exists()


def _rewrite(path, data=None, affine=None):
    image = nib.load(path)
    array = np.asarray(image.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), path)


@pytest.mark.parametrize("problem", ["shape", "affine", "label"])
def test_a_prediction_off_the_grid_or_off_the_labels_is_one_line_naming_it(predicted, tmp_path, problem):
    folder, ids = _copy(predicted, tmp_path)
    path = folder / f"{ids[3]}.nii.gz"
    labels = np.asarray(nib.load(path).dataobj)
    if problem == "shape":
        _rewrite(path, data=labels[:-1])
        expected = "shape"
    elif problem == "affine":
        shifted = nib.load(path).affine.copy()
        shifted[0, 3] += 2.0
        _rewrite(path, affine=shifted)
        expected = "affine"
    else:
        changed = labels.copy()
        changed[0, 0, 0] = 3  # BraTS 2021 files number their labels 0, 1, 2, 4
        _rewrite(path, data=changed)
        expected = "3"
    with pytest.raises(DataFormatError) as error:
        _score(folder, predicted)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and expected in message
