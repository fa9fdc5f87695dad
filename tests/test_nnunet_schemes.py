"""nnU-Net v2 raw datasets whose dataset.json defines the label scheme: the scheme built from the
dataset.json (channels, labels by name or as regions with regions_class_order), its one-line
refusals, and such a dataset end to end (prepare, train 2 steps, evaluate, predict, re-read) with the
scheme rebuilt from the checkpoint alone where the process never saw the dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.commands.builders import build_scheme
from unet_trainer.commands.datasets import ensure_prepared
from unet_trainer.commands.evaluate import evaluate_folder, evaluate_model
from unet_trainer.commands.export import labels_section
from unet_trainer.commands.exported import exported_scheme
from unet_trainer.commands.loading import load_model
from unet_trainer.commands.predict import predict_dataset
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.distributed import DistInfo
from unet_trainer.data.layouts import CONVENTION_SCHEME, LABEL_CONVENTIONS, open_dataset, read_case
from unet_trainer.data.phantom import write_phantom_dataset
from unet_trainer.data.schemes import SCHEMES, SchemeDefinitionError, scheme_from_dataset_json

# nnU-Net's region form of BraTS 2024 post-treatment glioma (labels 1 NETC, 2 SNFH, 3 ET, 4 RC, as the
# challenge numbers them), channels in another order than the phantom's files.
GLI_2024 = {
    "name": "Dataset226_BraTS2024",
    "channel_names": {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
    "labels": {
        "background": 0,
        "whole tumor": [1, 2, 3],
        "tumor core": [1, 3],
        "enhancing tumor": [3],
        "resection cavity": [4],
    },
    "regions_class_order": [2, 1, 3, 4],
}
GLI_2024_FILES = [1, 2, 3, 0]  # the phantom's channel (flair, t1, t1ce, t2) of each nnU-Net file 0..3


def nnunet_from_phantom(root: Path, scheme: str, content: dict, files: list[int], cases: int = 4) -> Path:
    """A phantom of ``scheme`` copied into an nnU-Net v2 raw folder with ``content`` as its dataset.json."""
    raw = root / "phantom"
    write_phantom_dataset(raw, cases, (32, 32, 32), seed=0, progress=False, scheme=scheme)
    out = root / "nnunet"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for case in open_dataset(raw).cases:
        for number, index in enumerate(files):
            shutil.copy(case.images[index], out / "imagesTr" / f"{case.case_id}_{number:04d}.nii.gz")
        shutil.copy(case.label, out / "labelsTr" / f"{case.case_id}.nii.gz")
    (out / "dataset.json").write_text(json.dumps({**content, "numTraining": cases, "file_ending": ".nii.gz"}))
    return out


def test_a_region_dataset_json_defines_channels_regions_and_painting_order():
    scheme = scheme_from_dataset_json(GLI_2024)
    assert scheme.name.startswith("nnunetv2-") and scheme.title == "Dataset226_BraTS2024"
    assert scheme.channels == ("t1", "t1ce", "t2", "flair")  # the sequences by their canonical names
    assert scheme.classes == ("L1", "L2", "L3", "L4") and scheme.num_classes == 5
    assert dict(scheme.regions) == {
        "whole_tumor": (1, 2, 3),
        "tumor_core": (1, 3),
        "enhancing_tumor": (3,),
        "resection_cavity": (4,),
    }
    assert scheme.trained_regions == tuple(scheme.regions) and scheme.regions_class_order == (2, 1, 3, 4)
    # The same definition is the same scheme; another order of the same labels is another one.
    assert scheme_from_dataset_json(json.loads(json.dumps(GLI_2024))) == scheme
    shuffled = {**GLI_2024, "channel_names": {"0": "t1c", "1": "t1n", "2": "t2w", "3": "t2f"}}
    assert scheme_from_dataset_json(shuffled).name != scheme.name


def test_labels_by_name_are_a_class_and_a_region_each():
    content = {"channel_names": {"0": "T1c"}, "labels": {"background": 0, "enhancing": 2, "necrosis": 1}}
    scheme = scheme_from_dataset_json(content, title="Dataset500_Mets")
    assert scheme.title == "Dataset500_Mets" and scheme.channels == ("t1ce",)
    assert scheme.classes == ("necrosis", "enhancing")  # by label value
    assert dict(scheme.regions) == {"necrosis": (1,), "enhancing": (2,)}
    assert scheme.regions_class_order == (1, 2)
    # An MEN-RT conversion is compatible with the challenge's own scheme (same channel, class, region).
    men_rt = scheme_from_dataset_json({"channel_names": {"0": "t1c"}, "labels": {"background": 0, "GTV": 1}})
    assert men_rt.compatible_with(SCHEMES["brats-men-rt"])


@pytest.mark.parametrize(
    "content, words",
    [
        ({"labels": {"background": 0, "a": 1}}, "channel_names"),
        ({"channel_names": {"0": "T1"}, "labels": {"a": 1}}, "background"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 3}}, "consecutive"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "ignore": 2}}, "ignore"),
        ({"channel_names": {"0": "T1"}, "labels": {"background": 0, "a": [1, 2], "b": [2]}}, "regions_class_order"),
        (
            {
                "channel_names": {"0": "T1"},
                "labels": {"background": 0, "a": [1, 2], "b": [2]},
                "regions_class_order": [1, 1],
            },
            "its own labels",
        ),
        ({"channel_names": {"0": "T1", "2": "T2"}, "labels": {"background": 0, "a": 1}}, '"2"'),
        (
            {"channel_names": {"0": "T1"}, "labels": {"background": 0, **{f"l{i}": i for i in range(1, 256)}}},
            "at most 254",
        ),
        ({"channel_names": {"0": "t1c", "1": "T1ce"}, "labels": {"background": 0, "a": 1}}, "twice"),
    ],
    ids=[
        "no channels",
        "no background",
        "gap",
        "ignore",
        "no order",
        "order outside",
        "keys",
        "255 labels",
        "channel twice",
    ],
)
def test_a_dataset_json_that_makes_no_scheme_is_refused_in_one_line(content, words):
    with pytest.raises(SchemeDefinitionError) as excinfo:
        scheme_from_dataset_json(content)
    assert words in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_dataset_of_its_own_labels_reads_its_values_as_classes(tmp_path):
    root = nnunet_from_phantom(tmp_path, "brats2024-gli", GLI_2024, GLI_2024_FILES, cases=2)
    dataset = open_dataset(root)
    (name,) = dataset.schemes
    assert name.startswith("nnunetv2-") and CONVENTION_SCHEME[name] == name
    assert LABEL_CONVENTIONS[name] == {v: v for v in range(5)}
    phantom = open_dataset(tmp_path / "phantom")
    for case, original in zip(dataset.cases, phantom.cases):
        raw, source = read_case(case), read_case(original)
        assert raw.label_convention == name and np.array_equal(raw.label, source.label)
        assert np.array_equal(raw.image, source.image[GLI_2024_FILES])  # the dataset.json's channel order


def _forget(name: str) -> None:
    """As a new process: the scheme and its convention unknown until something rebuilds them."""
    SCHEMES.pop(name, None)
    LABEL_CONVENTIONS.pop(name, None)
    CONVENTION_SCHEME.pop(name, None)


def test_a_dataset_defined_scheme_end_to_end(tmp_path):
    raw = nnunet_from_phantom(tmp_path, "brats2024-gli", GLI_2024, GLI_2024_FILES)
    overrides = tiny_overrides(tmp_path / "cache", tmp_path / "run", f"data.path={raw}", "max_duration=2ba")
    summary = run_training(
        resolve_config(ROOT / "configs" / "demo.yaml", [*overrides, "eval.lesion_wise=true"]), progress=False
    )
    name = summary["scheme"]
    assert name == scheme_from_dataset_json(GLI_2024).name
    prepared = json.loads(next((tmp_path / "cache" / "prepared").glob("*/prepare.json")).read_text())
    assert prepared["scheme"] == name and prepared["scheme_definition"] == SCHEMES[name].definition

    # The checkpoint alone rebuilds the scheme (its config carries the definition).
    checkpoint = tmp_path / "run" / "checkpoints" / "latest-rank0.pt"
    _forget(name)
    loaded = load_model(checkpoint)
    assert loaded.cfg["data"]["scheme"] == name and build_scheme(loaded.cfg).regions_class_order == (2, 1, 3, 4)
    assert loaded.in_channels == 4 and loaded.num_outputs == 5
    section = labels_section(build_scheme(loaded.cfg))
    assert section["native"]["nnunetv2"]["label_of_class"] == {str(v): v for v in range(5)}
    _forget(name)
    assert exported_scheme({"labels": section}).name == name

    of_model = evaluate_model(loaded, raw, out_csv=tmp_path / "model.csv", progress=False, overlays=False)
    assert of_model.scheme == name and {"whole_tumor", "lesion_dice/resection_cavity"} <= set(of_model.means)
    predict_dataset(checkpoint, raw, tmp_path / "predictions", progress=False, cpu_path="fp32")
    for case in open_dataset(raw).cases:
        truth, predicted = nib.load(case.label), nib.load(tmp_path / "predictions" / f"{case.case_id}.nii.gz")
        assert predicted.shape == truth.shape and np.array_equal(predicted.affine, truth.affine)
        assert set(np.unique(np.asarray(predicted.dataobj)).tolist()) <= set(range(5))
    # Its class indices mean nothing in a BraTS folder (and a BraTS model's nothing in this one): refused.
    elsewhere = predict_dataset(checkpoint, tmp_path / "phantom", tmp_path / "other", progress=False, cpu_path="fp32")
    assert not elsewhere.written and len(elsewhere.failed) == 4
    assert all(f"not those of the model's {name}" in message for message in elsewhere.failed.values())
    # The truth as predictions scores Dice 1 in every class and region.
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    for case in open_dataset(raw).cases:
        shutil.copy(case.label, truth_dir / f"{case.case_id}.nii.gz")
    perfect = evaluate_folder(truth_dir, raw, loaded.cfg, out_csv=tmp_path / "t.csv", progress=False)
    assert perfect.scheme == name
    for row in perfect.per_case:
        assert all(math.isclose(row[k], 1.0) for k in (*SCHEMES[name].regions, *SCHEMES[name].classes)), row


def test_the_config_checks_the_scheme_against_its_definition():
    scheme = scheme_from_dataset_json(GLI_2024)
    name, definition = scheme.name, f"'{scheme.definition}'"  # quoted: YAML would read the JSON as a mapping
    with pytest.raises(ConfigError, match="must be nnunetv2-"):
        resolve_config(None, ["data.scheme=brats2021", f"data.scheme_definition={definition}"])
    with pytest.raises(ConfigError, match="data.scheme_definition"):
        resolve_config(None, [f"data.scheme={name}", "data.scheme_definition='{}'"])
    with pytest.raises(ConfigError, match="data.scheme"):
        resolve_config(None, ["data.scheme=brats1999"])
    assert (
        resolve_config(None, [f"data.scheme={name}", f"data.scheme_definition={definition}"])["data"]["scheme"] == name
    )


def test_a_dataset_json_edited_after_preparation_prepares_again(tmp_path):
    raw = nnunet_from_phantom(tmp_path, "brats2024-gli", GLI_2024, GLI_2024_FILES, cases=2)
    cfg = resolve_config(
        ROOT / "configs" / "demo.yaml", tiny_overrides(tmp_path / "cache", tmp_path / "run", f"data.path={raw}")
    )
    folder, index = ensure_prepared(cfg, DistInfo(), progress=False)
    assert index["scheme"] == scheme_from_dataset_json(GLI_2024).name
    renamed = {
        **GLI_2024,
        "labels": {
            "background": 0,
            **{k.replace("tumor", "tumour"): v for k, v in GLI_2024["labels"].items() if k != "background"},
        },
    }
    (raw / "dataset.json").write_text(json.dumps({**renamed, "file_ending": ".nii.gz"}))
    again_folder, again = ensure_prepared(cfg, DistInfo(), progress=False)
    assert again_folder == folder and again["scheme"] == scheme_from_dataset_json(renamed).name != index["scheme"]
    for case_id in again["cases"]:  # every case read again, in the new scheme's numbering
        assert json.loads((folder / f"{case_id}_meta.json").read_text())["label_convention"] == again["scheme"]
    assert {"whole_tumour", "tumour_core"} <= set(SCHEMES[again["scheme"]].regions)
