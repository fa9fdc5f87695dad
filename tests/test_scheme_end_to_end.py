"""Every label scheme end to end: a phantom of the scheme, prepared, trained 2 steps, evaluated, predicted,
and the predictions re-read: native label values only, the raw grid exactly, and the same scores from
the folder as from the checkpoint; the truth itself, scored as predictions, is perfect in every class."""

from __future__ import annotations

import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.commands.evaluate import evaluate_folder, evaluate_model
from unet_trainer.commands.loading import load_model
from unet_trainer.commands.predict import predict_dataset
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.data.layouts import LABEL_CONVENTIONS, open_dataset
from unet_trainer.data.phantom import PHANTOM_SCHEMES, write_phantom_dataset
from unet_trainer.data.schemes import SCHEMES

SHAPE = (32, 32, 32)
SCORES = ["eval.hd95=true", "eval.lesion_wise=true"]


def _rows(report) -> dict[str, dict]:
    return {row["case_id"]: {k: v for k, v in row.items() if k != "case_id"} for row in report.per_case}


def _assert_close(got: dict, expected: dict) -> None:
    """The same cases and keys, and Dice within 1e-3: a model trained 2 steps has near-ties, which the
    evaluator (argmax of logits) and unet-predict (argmax of probabilities) may break differently in a
    voxel or two; tests/test_eval_folder.py holds a trained model's folder to 1e-6 on every key."""
    assert sorted(got) == sorted(expected)
    for case_id, row in expected.items():
        assert set(got[case_id]) == set(row)
        for key, value in row.items():
            other = got[case_id][key]
            if "hd95" not in key:
                assert (math.isnan(other) and math.isnan(value)) or abs(other - value) <= 1e-3, (case_id, key, other)


@pytest.mark.parametrize("name", sorted(PHANTOM_SCHEMES))
def test_every_scheme_trains_evaluates_predicts_and_round_trips(name, tmp_path):
    scheme, raw = SCHEMES[name], tmp_path / "raw"
    write_phantom_dataset(raw, 4, SHAPE, seed=0, progress=False, scheme=name)
    overrides = tiny_overrides(tmp_path / "cache", tmp_path / "run", f"data.path={raw}", "max_duration=2ba", *SCORES)
    summary = run_training(resolve_config(ROOT / "configs" / "demo.yaml", overrides), progress=False)
    assert summary["scheme"] == name
    checkpoint = tmp_path / "run" / "checkpoints" / "latest-rank0.pt"
    loaded = load_model(checkpoint)
    assert loaded.in_channels == len(scheme.channels) and loaded.num_outputs == scheme.num_classes

    of_model = evaluate_model(loaded, raw, out_csv=tmp_path / "model.csv", progress=False, overlays=False)
    assert of_model.scheme == name
    assert {*scheme.regions, *(f"lesion_dice/{r}" for r in scheme.regions), "mean"} <= set(of_model.means)

    predict_dataset(checkpoint, raw, tmp_path / "predictions", progress=False, cpu_path="fp32")
    dataset = open_dataset(raw)
    native = set(LABEL_CONVENTIONS[PHANTOM_SCHEMES[name].convention])
    for case in dataset.cases:
        truth = nib.load(case.label)
        predicted = nib.load(tmp_path / "predictions" / f"{case.case_id}.nii.gz")
        assert predicted.shape == truth.shape and np.array_equal(predicted.affine, truth.affine)
        assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= native
    of_folder = evaluate_folder(tmp_path / "predictions", raw, loaded.cfg, out_csv=tmp_path / "f.csv", progress=False)
    assert of_folder.scheme == name
    _assert_close(_rows(of_folder), _rows(of_model))

    # The truth files as predictions: every native value reads back as its class, so every Dice is 1.
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    for case in dataset.cases:
        shutil.copy(case.label, truth_dir / f"{case.case_id}.nii.gz")
    perfect = evaluate_folder(truth_dir, raw, loaded.cfg, out_csv=tmp_path / "t.csv", progress=False)
    classes = {np.uint8(v) for case in dataset.cases for v in np.unique(np.asarray(nib.load(case.label).dataobj))}
    assert len(classes) == scheme.num_classes, f"the phantom shows only native values {sorted(classes)}"
    for row in perfect.per_case:
        assert all(row[key] == 1.0 for key in (*scheme.regions, *scheme.classes)), row
