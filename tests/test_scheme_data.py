"""Label schemes in the data stage: detection from case names and labels, the data.scheme override,
phantoms per scheme, and the scheme recorded by preparation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet_trainer.cli.data import main as data_main
from unet_trainer.data.layouts import DataFormatError, open_dataset
from unet_trainer.data.phantom import PHANTOM_SCHEMES, write_phantom_dataset
from unet_trainer.data.prepare import prepare_dataset

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def post_treatment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gli2024") / "raw"
    write_phantom_dataset(root, 3, SHAPE, seed=0, progress=False, scheme="brats2024-gli")
    return root


def _labels(root: Path) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(path).dataobj) for path in sorted(root.glob("*/*-seg.nii.gz"))]


def test_post_treatment_phantom_has_a_fluid_resection_cavity(post_treatment):
    labels = _labels(post_treatment)
    assert sorted(p.name for p in post_treatment.iterdir() if p.is_dir())[0] == "BraTS-GLI-00000-000"
    assert all((label == 4).any() for label in labels)
    case = post_treatment / "BraTS-GLI-00000-000"
    t1, t2 = (np.asanyarray(nib.load(case / f"BraTS-GLI-00000-000-{s}.nii.gz").dataobj) for s in ("t1n", "t2w"))
    cavity, white = labels[0] == 4, labels[0] == 0
    # Fluid: darker than the rest of the head in T1, brighter in T2.
    assert t1[cavity].mean() < t1[white & (t1 > 0)].mean() and t2[cavity].mean() > t2[white & (t2 > 0)].mean()


def test_the_default_phantom_is_unchanged_by_the_scheme_option(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", 1, SHAPE, seed=3, progress=False)
    b = write_phantom_dataset(tmp_path / "b", 1, SHAPE, seed=3, progress=False, scheme="brats2021")
    assert a == b == ["BraTS2021_00000"]
    assert json.loads((tmp_path / "a" / "phantom.json").read_text()).get("scheme") is None
    (one,), (two,) = _labels_2021(tmp_path / "a"), _labels_2021(tmp_path / "b")
    assert np.array_equal(one, two) and set(np.unique(one)) <= {0, 1, 2, 4}


def _labels_2021(root: Path) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(path).dataobj) for path in sorted(root.glob("*/*_seg.nii.gz"))]


def test_labels_choose_post_treatment_and_the_choice_is_recorded(post_treatment, tmp_path, capsys):
    assert data_main(["prepare", str(post_treatment), "--out", str(tmp_path / "p")]) == 0
    assert "label scheme brats2024-gli" in capsys.readouterr().out
    record = json.loads((tmp_path / "p" / "prepare.json").read_text())
    assert record["scheme"] == "brats2024-gli"
    prepared = np.load(tmp_path / "p" / "BraTS-GLI-00000-000_y.npy")
    # The class indices are the native values: the same voxel counts per class after cropping to the head.
    raw = np.bincount(_labels(post_treatment)[0].ravel(), minlength=5)
    assert np.array_equal(np.bincount(prepared.ravel(), minlength=5)[1:], raw[1:])


def test_a_glioma_folder_without_cavity_stays_2023(tmp_path):
    root = tmp_path / "raw"
    write_phantom_dataset(root, 2, SHAPE, seed=0, progress=False, scheme="brats2024-gli")
    for path in root.glob("*/*-seg.nii.gz"):
        image = nib.load(path)
        data = np.asanyarray(image.dataobj).copy()
        data[data == 4] = 0
        nib.save(nib.Nifti1Image(data, image.affine), str(path))
    record = prepare_dataset(open_dataset(root), tmp_path / "p", progress=False)
    assert record["scheme"] == "brats2023-gli"


def test_data_scheme_override_refuses_labels_outside_it(post_treatment, tmp_path, capsys):
    args = ["prepare", str(post_treatment), "--out", str(tmp_path / "p"), "--scheme", "brats2023-gli"]
    assert data_main(args) != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown label values [4]" in line and "-seg.nii.gz" in line


def test_a_scheme_the_layout_cannot_hold_is_refused_in_one_line(post_treatment):
    with pytest.raises(DataFormatError, match="data.scheme brats2021: a brats2023 folder holds one of brats2023-gli"):
        open_dataset(post_treatment, scheme="brats2021")


def test_a_folder_mixing_sub_challenges_is_refused(post_treatment, tmp_path):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(post_treatment, root)
    old = root / "BraTS-GLI-00002-000"
    new = root / "BraTS-MET-00002-000"
    old.rename(new)
    for path in new.iterdir():
        path.rename(new / path.name.replace("BraTS-GLI", "BraTS-MET"))
    with pytest.raises(DataFormatError, match=r"mixes BraTS sub-challenges \(2 GLI, 1 MET cases\)"):
        open_dataset(root)


@pytest.mark.parametrize("scheme", sorted(PHANTOM_SCHEMES))
def test_each_scheme_phantom_is_detected_as_its_scheme(tmp_path, scheme):
    root = tmp_path / "raw"
    write_phantom_dataset(root, 2, SHAPE, seed=1, progress=False, scheme=scheme)
    assert scheme in open_dataset(root).schemes
    assert prepare_dataset(open_dataset(root), tmp_path / "p", progress=False)["scheme"] == scheme


def test_every_phantom_scheme_is_a_known_scheme():
    from unet_trainer.data.schemes import SCHEMES

    assert set(PHANTOM_SCHEMES) <= set(SCHEMES)


def test_a_preparation_from_before_schemes_gets_its_scheme_without_redoing_its_cases(tmp_path):
    from unet_trainer.data.layouts import list_cases
    from unet_trainer.data.prepare import PrepareSettings, prepared_is_current

    root = tmp_path / "raw"
    write_phantom_dataset(root, 2, SHAPE, seed=1, progress=False, scheme="brats2023-met")
    out = tmp_path / "p"
    prepare_dataset(open_dataset(root), out, progress=False)
    record = json.loads((out / "prepare.json").read_text())
    del record["scheme"]  # as an earlier version wrote it
    (out / "prepare.json").write_text(json.dumps(record))
    arrays = {path: path.stat().st_mtime_ns for path in out.glob("*.npy")}
    assert not prepared_is_current(out, root, PrepareSettings(), list_cases=list_cases)
    assert prepare_dataset(open_dataset(root), out, progress=False)["scheme"] == "brats2023-met"
    assert {path: path.stat().st_mtime_ns for path in out.glob("*.npy")} == arrays
    assert prepared_is_current(out, root, PrepareSettings(), list_cases=list_cases)
