"""The nnU-Net v2 raw layout: files, dataset.json, unlabelled imagesTs/ cases, errors, detection.

The expected files are spelled out here as nnU-Net's own BraTS 2021 conversion writes them
(Dataset137_BraTS2021: channels T1, T1ce, T2, Flair as _0000.._0003; labels 1 edema, 2 necrotic
core, 3 enhancing), so the layout is checked against that convention, not against its own tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet_trainer.data.layouts import DataFormatError, detect_format, list_cases, read_case, write_case

SHAPE_ZYX = (5, 6, 7)
CANONICAL_INDEX = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
# Dataset137_BraTS2021: file channel number -> sequence.
DATASET137_CHANNELS = {0: "t1", 1: "t1ce", 2: "t2", 3: "flair"}
# nnU-Net's BraTS labels of canonical background, necrotic core, edema, enhancing.
NNUNET_OF_CANONICAL = np.array([0, 2, 1, 3], np.uint8)
# Dataset001_BrainTumour (nnU-Net's conversion of MSD Task01): MSD's channel order and label names.
DATASET001_JSON = {
    "channel_names": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def oblique_affine() -> np.ndarray:
    """Rotation + translation + spacing x 0.9, y 1.1, z 2.5 mm, exact in float32."""
    angle = np.deg2rad(20.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    ) @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-90.5, 12.25, -70.0]
    return affine.astype(np.float32).astype(np.float64)


def coded_image(seed: int = 0) -> np.ndarray:
    """(4, Z, Y, X) float32 with a distinct offset per channel, so a channel mix-up shows."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(4, *SHAPE_ZYX)) + 100 * np.arange(4)[:, None, None, None]).astype(np.float32)


def canonical_labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=SHAPE_ZYX).astype(np.uint8)


def stored_zyx(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def assert_one_line(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def nnunet_dataset(root: Path, cases: dict[str, bool]) -> Path:
    """Write ``cases`` ({case id: labelled}) with write_case; return ``root``."""
    for seed, (case_id, labelled) in enumerate(cases.items()):
        label = canonical_labels(seed) if labelled else None
        write_case(root, "nnunetv2", case_id, coded_image(seed), label, oblique_affine())
    return root


def test_write_detect_list_read_round_trip(tmp_path):
    root = nnunet_dataset(tmp_path / "Dataset137_BraTS2021", {"BraTS2021_00002": True, "BraTS2021_00001": True})
    nnunet_dataset(root, {"BraTS2021_00003": False})
    assert detect_format(root) == "nnunetv2"

    # Files named and numbered as nnU-Net's conversion names them.
    for case_id in ("BraTS2021_00001", "BraTS2021_00002"):
        for number, channel in DATASET137_CHANNELS.items():
            path = root / "imagesTr" / f"{case_id}_{number:04d}.nii.gz"
            seed = 1 if case_id == "BraTS2021_00001" else 0
            np.testing.assert_array_equal(stored_zyx(path), coded_image(seed)[CANONICAL_INDEX[channel]])
        label = nib.load(str(root / "labelsTr" / f"{case_id}.nii.gz"))
        assert label.get_data_dtype() == np.uint8
        seed = 1 if case_id == "BraTS2021_00001" else 0
        np.testing.assert_array_equal(
            stored_zyx(root / "labelsTr" / f"{case_id}.nii.gz"), NNUNET_OF_CANONICAL[canonical_labels(seed)]
        )
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == [
        f"BraTS2021_00003_{n:04d}.nii.gz" for n in range(4)
    ]
    content = json.loads((root / "dataset.json").read_text())
    assert content["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert content["labels"] == {
        "background": 0,
        "whole tumor": [1, 2, 3],
        "tumor core": [2, 3],
        "enhancing tumor": [3],
    }
    assert content["regions_class_order"] == [1, 2, 3]
    assert content["numTraining"] == 2 and content["file_ending"] == ".nii.gz"

    labelled = list_cases(root)
    assert [case.case_id for case in labelled] == ["BraTS2021_00001", "BraTS2021_00002"]
    everything = list_cases(root, require_labels=False)
    assert [case.case_id for case in everything] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    assert everything[2].label is None and everything[2].images[0].parent.name == "imagesTs"
    for seed, case in [(1, everything[0]), (0, everything[1]), (0, everything[2])]:
        raw = read_case(case)
        np.testing.assert_array_equal(raw.image, coded_image(seed))
        np.testing.assert_array_equal(raw.affine, oblique_affine())
        assert raw.spacing == pytest.approx((2.5, 1.1, 0.9), abs=1e-6)
        assert raw.label_convention == "msd" and raw.preprocessed is False
        if case.case_id == "BraTS2021_00003":
            assert raw.label is None
        else:
            np.testing.assert_array_equal(raw.label, canonical_labels(seed))
    assert not list(root.rglob(".*"))  # no temporaries left behind


def test_reads_and_extends_the_msd_channel_order_of_dataset001(tmp_path):
    root = tmp_path / "Dataset001_BrainTumour"
    image, label, affine = coded_image(3), canonical_labels(3), oblique_affine()
    for number, channel in enumerate(("flair", "t1", "t1ce", "t2")):
        path = root / "imagesTr" / f"BRATS_001_{number:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image[CANONICAL_INDEX[channel]].T.copy(), affine), str(path))
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(NNUNET_OF_CANONICAL[label].T.copy(), affine), str(root / "labelsTr" / "BRATS_001.nii.gz"))
    (root / "dataset.json").write_text(json.dumps(DATASET001_JSON))

    assert detect_format(root) == "nnunetv2"
    (case,) = list_cases(root)
    raw = read_case(case)
    np.testing.assert_array_equal(raw.image, image)
    np.testing.assert_array_equal(raw.label, label)

    # A case written into it follows its channel order, and dataset.json keeps its own fields.
    write_case(root, "nnunetv2", "BRATS_002", coded_image(4), canonical_labels(4), affine)
    np.testing.assert_array_equal(stored_zyx(root / "imagesTr" / "BRATS_002_0000.nii.gz"), coded_image(4)[0])
    content = json.loads((root / "dataset.json").read_text())
    assert content == {**DATASET001_JSON, "numTraining": 2}


def test_unlabelled_cases_live_in_imagests(tmp_path):
    root = nnunet_dataset(tmp_path / "raw", {"case1": True, "case2": True})
    write_case(root, "nnunetv2", "case1", coded_image(), None, np.eye(4))
    # Rewritten without a label, the case moves to imagesTs/ and leaves no stale label behind.
    assert not list((root / "imagesTr").glob("case1_*")) and not (root / "labelsTr" / "case1.nii.gz").exists()
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1
    assert [case.case_id for case in list_cases(root)] == ["case2"]
    listed = {case.case_id: case for case in list_cases(root, require_labels=False)}
    assert listed["case1"].label is None and read_case(listed["case1"]).label is None

    write_case(root, "nnunetv2", "case1", coded_image(), canonical_labels(), np.eye(4))
    assert not list((root / "imagesTs").glob("case1_*"))
    assert [case.case_id for case in list_cases(root)] == ["case1", "case2"]

    # An imagesTr case whose label is gone: refused when labels are needed, unlabelled otherwise.
    (root / "labelsTr" / "case2.nii.gz").unlink()
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_one_line(excinfo, "case case2", str(root / "labelsTr" / "case2.nii.gz"))
    bad: dict[str, str] = {}
    assert [case.case_id for case in list_cases(root, bad=bad)] == ["case1"] and list(bad) == ["case2"]
    assert {case.case_id: case.label for case in list_cases(root, require_labels=False)}["case2"] is None


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda content: "{not json", ("cannot read JSON",)),
        (lambda content: {**content, "channel_names": None}, ("channel_names",)),
        (lambda content: {**content, "channel_names": {"0": "T1", "1": "T1w", "2": "T2", "3": "Flair"}}, ("T1w",)),
        (lambda content: {**content, "channel_names": {"1": "T1", "2": "T1ce", "3": "T2", "4": "Flair"}}, ('"4"',)),
        (lambda content: {**content, "labels": {"background": 0, "NCR": 1, "ED": 3}}, ("labels", "consecutive")),
        (
            lambda content: {
                **content,
                "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]},
            },
            ("regions_class_order",),
        ),
        (lambda content: {**content, "file_ending": ".mha"}, (".mha",)),
    ],
    ids=[
        "not JSON",
        "no channel_names",
        "channel twice",
        "keys 1-4",
        "labels with a gap",
        "regions without order",
        "not NIfTI",
    ],
)
def test_broken_dataset_json_is_one_line_naming_the_file(tmp_path, damage, words):
    root = nnunet_dataset(tmp_path / "raw", {"case1": True})
    dataset_json = root / "dataset.json"
    damaged = damage(json.loads(dataset_json.read_text()))
    dataset_json.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root, fmt="nnunetv2")
    assert_one_line(excinfo, str(dataset_json), *words)
    # Writing into it is refused before any file is written.
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(DataFormatError) as excinfo:
        write_case(root, "nnunetv2", "case2", coded_image(), canonical_labels(), np.eye(4))
    assert_one_line(excinfo, str(dataset_json))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_missing_extra_and_orphan_files_are_one_line_naming_the_file(tmp_path):
    root = nnunet_dataset(tmp_path / "raw", {"case1": True, "case2": True})
    missing = root / "imagesTr" / "case1_0002.nii.gz"  # T2 in Dataset137's order
    missing.unlink()
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_one_line(excinfo, "case case1", str(missing), "t2")
    bad: dict[str, str] = {}
    assert [case.case_id for case in list_cases(root, bad=bad)] == ["case2"] and str(missing) in bad["case1"]

    # A read of a case listed before its file went missing names it too.
    (case2,) = list_cases(root, bad={})
    case2.images[3].unlink()
    with pytest.raises(DataFormatError) as excinfo:
        read_case(case2)
    assert_one_line(excinfo, "case case2", str(case2.images[3]))

    root = nnunet_dataset(tmp_path / "extra", {"case1": True})
    extra = root / "imagesTr" / "case1_0004.nii.gz"
    extra.write_bytes((root / "imagesTr" / "case1_0000.nii.gz").read_bytes())
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_one_line(excinfo, "case case1", str(extra), "channel 4")

    root = nnunet_dataset(tmp_path / "orphan", {"case1": True})
    orphan = root / "labelsTr" / "case9.nii.gz"
    orphan.write_bytes((root / "labelsTr" / "case1.nii.gz").read_bytes())
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_one_line(excinfo, "case case9", str(orphan), "no image")

    root = nnunet_dataset(tmp_path / "unnamed", {"case1": True})
    unnamed = root / "imagesTr" / "case1.nii.gz"
    unnamed.write_bytes((root / "imagesTr" / "case1_0000.nii.gz").read_bytes())
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_one_line(excinfo, str(unnamed), "_XXXX")


def test_case_in_both_imagestr_and_imagests_is_ambiguous(tmp_path):
    root = nnunet_dataset(tmp_path / "raw", {"case1": True})
    (root / "imagesTs").mkdir()
    for path in (root / "imagesTr").iterdir():
        (root / "imagesTs" / path.name).write_bytes(path.read_bytes())
    assert [case.case_id for case in list_cases(root)] == ["case1"]  # imagesTs is not read for training
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root, require_labels=False)
    assert_one_line(excinfo, "case case1", "imagesTr", "imagesTs")


def test_detection_tells_nnunetv2_from_msd(tmp_path):
    # MSD with case ids that end in four digits, like nnU-Net's channel numbers: still MSD.
    msd = tmp_path / "msd"
    for case_id in ("case_0001", "case_0002"):
        write_case(msd, "msd", case_id, coded_image(), canonical_labels(), np.eye(4))
    assert detect_format(msd) == "msd"
    assert [case.case_id for case in list_cases(msd)] == ["case_0001", "case_0002"]
    # MSD without dataset.json, named as Task01 names its cases.
    bare_msd = tmp_path / "bare_msd"
    write_case(bare_msd, "msd", "BRATS_001", coded_image(), canonical_labels(), np.eye(4))
    (bare_msd / "dataset.json").unlink()
    assert detect_format(bare_msd) == "msd"

    nnunet = nnunet_dataset(tmp_path / "nnunet", {"BRATS_001": True})
    assert detect_format(nnunet) == "nnunetv2"
    # Without its dataset.json the file naming still says nnU-Net, and listing says what is missing.
    (nnunet / "dataset.json").rename(tmp_path / "dataset.json")
    assert detect_format(nnunet) == "nnunetv2"
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(nnunet)
    assert_one_line(excinfo, str(nnunet / "dataset.json"), "nnunetv2")
    (tmp_path / "dataset.json").rename(nnunet / "dataset.json")

    # Each layout forced onto the other fails in one line that says what the folder looks like.
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(nnunet, fmt="msd")
    assert_one_line(excinfo, str(nnunet), "read as msd", "looks like nnunetv2")
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(msd, fmt="nnunetv2")
    assert_one_line(excinfo, str(msd / "dataset.json"), "channel_names", "looks like msd")
