"""Tests for unet_trainer.data.layouts: layouts, canonical conventions, validation, writing.

Native files are built by hand with nibabel/numpy wherever a test checks a convention,
so the reader is checked against an oracle that does not share the writer's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from unet_trainer.data.layouts import (
    CANONICAL_CHANNELS,
    CONVENTION_SCHEME,
    FORMATS,
    LABEL_CONVENTIONS,
    LAYOUTS,
    NATIVE_REGIONS,
    REGION_NAMES,
    REGIONS,
    CaseFiles,
    DataFormatError,
    detect_format,
    from_canonical,
    list_cases,
    read_case,
    to_canonical,
    write_case,
    write_label_nifti,
    write_probabilities_nifti,
)
from unet_trainer.data.layouts import files as layout_files
from unet_trainer.data.schemes import SCHEMES

# Distinct sizes per axis so any axis mix-up changes the shape.
SHAPE_ZYX = (5, 6, 7)

# Oracle file naming, written independently of the module under test.
BRATS2021_FILE_SUFFIX = {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"}
BRATS2023_FILE_SUFFIX = {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"}
# nnU-Net's Dataset137_BraTS2021 conversion: channel file numbers, channel_names and region labels.
NNUNET_CHANNEL_NUMBER = {"t1": 0, "t1ce": 1, "t2": 2, "flair": 3}
NNUNET_DATASET_JSON = {
    "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "numTraining": 1,
    "file_ending": ".nii.gz",
}
# Native values of: background, necrotic core, edema, enhancing, per convention.
NATIVE_OF_CANONICAL = {
    "brats2021": (0, 1, 2, 4),
    "brats2023": (0, 1, 2, 3),
    "msd": (0, 2, 1, 3),
    "dle": (0, 2, 1, 3),
    "brats2024-gli": (0, 1, 2, 3, 4),  # 2023's numbering plus 4, the resection cavity
    "brats2024-ped": (0, 1, 2, 3, 4),  # its own classes, numbered as its files number them
    "brats-men-rt": (0, 1),  # one class, the gross tumour volume
    "nnunetv2": (0, 2, 1, 3),  # nnU-Net's BraTS conversion: 1 edema, 2 necrotic core, 3 enhancing
}
CASE_IDS = {
    "msd": ["BRATS_003", "BRATS_001", "BRATS_002"],
    "brats2021": ["BraTS2021_00010", "BraTS2021_00002", "BraTS2021_00005"],
    "brats2023": ["BraTS-MEN-00004-000", "BraTS-GLI-00002-001", "BraTS-GLI-00002-000"],
    "dle": ["BraTS2021_00003", "BraTS2021_00001", "BraTS2021_00002"],
    # A case id ending in four digits, like nnU-Net's channel numbers, must survive listing.
    "nnunetv2": ["BraTS2021_00010", "BraTS2021_00002", "case_0005"],
    "brats-men-rt": ["BraTS-MEN-RT-0004-1", "BraTS-MEN-RT-0002-1", "BraTS-MEN-RT-0010-1"],
}


def oblique_affine() -> np.ndarray:
    """Rotation + translation + anisotropic spacing (x 0.9, y 1.1, z 2.5 mm), float32-exact.

    NIfTI stores the sform in float32, so the expected affine is rounded to float32 first.
    """
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-90.5, 12.25, -70.0]
    return affine.astype(np.float32).astype(np.float64)


def coded_image(shape_zyx=SHAPE_ZYX, channels: int = 4) -> np.ndarray:
    """(C, Z, Y, X) float32 where every voxel encodes channel and position: 1000c+100z+10y+x."""
    c, z, y, x = np.indices((channels, *shape_zyx))
    return (1000 * c + 100 * z + 10 * y + x).astype(np.float32)


def canonical_labels(shape_zyx=SHAPE_ZYX, classes: int = 4) -> np.ndarray:
    """(Z, Y, X) uint8 class indices using every value 0..classes-1 at known places."""
    z, y, x = np.indices(shape_zyx)
    return ((z + 2 * y + 3 * x) % classes).astype(np.uint8)


def channels_of(fmt: str) -> int:
    """How many channels a layout's images hold (MEN-RT: one, T1c)."""
    return len(LAYOUTS[fmt].channels)


def classes_of(fmt: str) -> int:
    """How many classes, background included, a layout's (or convention's) files number."""
    return len(NATIVE_OF_CANONICAL[fmt])


def save_nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data_xyz, affine), str(path))


def write_native_case(
    root: Path, fmt: str, case_id: str, image: np.ndarray, native_label: np.ndarray | None, affine: np.ndarray
) -> None:
    """Write a case by hand in the release's own naming; image (4,Z,Y,X), label native (Z,Y,X)."""
    if fmt in ("brats2021", "brats2023"):
        suffix = BRATS2021_FILE_SUFFIX if fmt == "brats2021" else BRATS2023_FILE_SUFFIX
        for index, channel in enumerate(CANONICAL_CHANNELS):
            save_nifti(root / case_id / f"{case_id}{suffix[channel]}.nii.gz", image[index].T.copy(), affine)
        if native_label is not None:
            save_nifti(root / case_id / f"{case_id}{suffix['seg']}.nii.gz", native_label.T.astype(np.uint8), affine)
    elif fmt == "msd":
        save_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image.transpose(3, 2, 1, 0).copy(), affine)
        if native_label is not None:
            save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", native_label.T.astype(np.uint8), affine)
    elif fmt == "dle":
        root.mkdir(parents=True, exist_ok=True)
        np.save(root / f"{case_id}_x.npy", image.astype(np.float32))
        if native_label is not None:
            np.save(root / f"{case_id}_y.npy", native_label[np.newaxis].astype(np.uint8))
    elif fmt == "brats-men-rt":
        save_nifti(root / case_id / f"{case_id}_t1c.nii.gz", image[0].T.copy(), affine)
        if native_label is not None:
            save_nifti(root / case_id / f"{case_id}_gtv.nii.gz", native_label.T.astype(np.uint8), affine)
    elif fmt == "nnunetv2":
        for index, channel in enumerate(CANONICAL_CHANNELS):
            number = NNUNET_CHANNEL_NUMBER[channel]
            save_nifti(root / "imagesTr" / f"{case_id}_{number:04d}.nii.gz", image[index].T.copy(), affine)
        if native_label is not None:
            save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", native_label.T.astype(np.uint8), affine)
        (root / "dataset.json").write_text(json.dumps(NNUNET_DATASET_JSON))
    else:
        raise AssertionError(fmt)


def brats2021_case(tmp_path: Path, case_id: str = "BraTS2021_00042") -> tuple[Path, Path]:
    """Hand-written valid brats2021 case; returns (root, case folder)."""
    root = tmp_path / "brats2021"
    native = np.asarray(NATIVE_OF_CANONICAL["brats2021"], np.uint8)[canonical_labels()]
    write_native_case(root, "brats2021", case_id, coded_image(), native, oblique_affine())
    return root, root / case_id


def msd_case(tmp_path: Path, case_id: str = "BRATS_007") -> Path:
    root = tmp_path / "msd"
    native = np.asarray(NATIVE_OF_CANONICAL["msd"], np.uint8)[canonical_labels()]
    write_native_case(root, "msd", case_id, coded_image(), native, oblique_affine())
    return root


def assert_error_names(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ---------------------------------------------------------------------------
# Label conventions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(LABEL_CONVENTIONS))
def test_label_mapping_matches_documented_native_values_and_inverts(convention):
    native_values = np.asarray(NATIVE_OF_CANONICAL[convention])
    canonical = to_canonical(native_values, convention)
    assert canonical.dtype == np.uint8
    assert canonical.tolist() == list(range(len(native_values)))
    assert from_canonical(canonical, convention).tolist() == native_values.tolist()
    volume = canonical_labels(classes=classes_of(convention))
    round_trip = to_canonical(from_canonical(volume, convention), convention)
    assert round_trip.dtype == np.uint8 and np.array_equal(round_trip, volume)
    # Integer-valued floats are accepted.
    assert to_canonical(native_values.astype(np.float32), convention).tolist() == list(range(len(native_values)))


@pytest.mark.parametrize(
    "convention, bad_value",
    [("brats2021", 3), ("brats2021", 5), ("brats2023", 4), ("msd", 4), ("dle", 4), ("msd", -1)],
)
def test_to_canonical_rejects_unknown_values(convention, bad_value):
    with pytest.raises(DataFormatError) as excinfo:
        to_canonical(np.array([0, 1, bad_value]), convention)
    assert_error_names(excinfo, str(bad_value), convention)


def test_label_mapping_rejects_non_integers_unknown_canonical_and_unknown_convention():
    with pytest.raises(DataFormatError, match="non-integer"):
        to_canonical(np.array([0.0, 1.5]), "brats2023")
    with pytest.raises(DataFormatError):
        to_canonical(np.array([0.0, np.nan]), "brats2023")
    with pytest.raises(DataFormatError) as excinfo:
        from_canonical(np.array([0, 4]), "brats2021")
    assert_error_names(excinfo, "4")
    with pytest.raises(ValueError, match="unknown label convention"):
        to_canonical(np.array([0]), "brats2019")


@pytest.mark.parametrize("convention", sorted(LABEL_CONVENTIONS))
def test_native_regions_map_onto_the_schemes_regions(convention):
    assert tuple(REGIONS) == REGION_NAMES == ("WT", "TC", "ET")
    regions = SCHEMES[CONVENTION_SCHEME[convention]].regions
    assert set(NATIVE_REGIONS[convention]) == set(regions)
    for region, members in regions.items():
        mapped = to_canonical(np.asarray(NATIVE_REGIONS[convention][region]), convention)
        assert sorted(mapped.tolist()) == sorted(members)


# ---------------------------------------------------------------------------
# Detection and listing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_and_list_cases_sorted(tmp_path, fmt):
    root = tmp_path / fmt
    for case_id in CASE_IDS[fmt]:
        image, label = coded_image((2, 3, 4), channels_of(fmt)), canonical_labels((2, 3, 4), classes_of(fmt))
        write_case(root, fmt, case_id, image, label, oblique_affine())
    assert detect_format(root) == fmt
    cases = list_cases(root)
    assert [case.case_id for case in cases] == sorted(CASE_IDS[fmt])
    assert all(case.format == fmt and case.label is not None and case.label.is_file() for case in cases)
    expected_image_count = 1 if fmt in ("msd", "dle") else channels_of(fmt)
    assert all(len(case.images) == expected_image_count for case in cases)
    assert list_cases(root, fmt=fmt) == cases


def test_detect_format_errors_name_folder_and_layouts(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataFormatError) as excinfo:
        detect_format(missing)
    assert_error_names(excinfo, str(missing))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError) as excinfo:
        detect_format(empty)
    assert_error_names(excinfo, str(empty), "empty", *FORMATS)

    unrelated = tmp_path / "unrelated"
    (unrelated / "notes").mkdir(parents=True)
    (unrelated / "readme.txt").write_text("hello")
    (unrelated / "notes" / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DataFormatError) as excinfo:
        detect_format(unrelated)
    assert_error_names(excinfo, str(unrelated), *FORMATS)


def test_detect_format_rejects_mixed_releases(tmp_path):
    write_case(tmp_path, "brats2021", "BraTS2021_00001", coded_image((2, 3, 4)), None, np.eye(4))
    write_case(tmp_path, "brats2023", "BraTS-GLI-00001-000", coded_image((2, 3, 4)), None, np.eye(4))
    with pytest.raises(DataFormatError) as excinfo:
        detect_format(tmp_path)
    assert_error_names(excinfo, "brats2021", "brats2023")


def test_unknown_fmt_is_rejected(tmp_path):
    with pytest.raises(DataFormatError, match="brats2019"):
        list_cases(tmp_path, fmt="brats2019")
    with pytest.raises(ValueError, match="brats2019"):
        write_case(tmp_path, "brats2019", "case", coded_image(), None, np.eye(4))


# ---------------------------------------------------------------------------
# Reading hand-written native files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_case_gives_canonical_channels_labels_and_layout(tmp_path, fmt):
    root = tmp_path / fmt
    case_id = CASE_IDS[fmt][0]
    image = coded_image(channels=channels_of(fmt))
    expected_labels = canonical_labels(classes=classes_of(fmt))
    native = np.asarray(NATIVE_OF_CANONICAL[fmt], np.uint8)[expected_labels]
    stored_image = image
    if fmt == "dle":
        # DLE may append a one-hot foreground channel; it must be dropped.
        stored_image = np.concatenate([image, (expected_labels > 0)[np.newaxis].astype(np.float32)])
    write_native_case(root, fmt, case_id, stored_image, native, oblique_affine())

    (case,) = list_cases(root)
    raw = read_case(case)
    assert raw.case_id == case_id
    assert raw.image.dtype == np.float32 and raw.image.shape == (channels_of(fmt), *SHAPE_ZYX)
    # Each voxel encodes channel and (z, y, x) position, so order and axes are both checked.
    np.testing.assert_array_equal(raw.image, image)
    assert raw.label.dtype == np.uint8
    np.testing.assert_array_equal(raw.label, expected_labels)
    # DLE: the numbering read (MSD by default); nnU-Net v2: its BraTS numbering, which is MSD's.
    assert raw.label_convention == ("msd" if fmt in ("dle", "nnunetv2") else fmt)
    if fmt == "dle":
        assert raw.preprocessed is True
        np.testing.assert_array_equal(raw.affine, np.eye(4))
        assert raw.spacing == (1.0, 1.0, 1.0)
    else:
        assert raw.preprocessed is False
        np.testing.assert_array_equal(raw.affine, oblique_affine())
        assert raw.spacing == pytest.approx((2.5, 1.1, 0.9), abs=1e-6)


def test_brats2021_accepts_uncompressed_nii_but_not_both_extensions(tmp_path):
    root, folder = brats2021_case(tmp_path)
    flair_gz = folder / "BraTS2021_00042_flair.nii.gz"
    flair = nib.load(str(flair_gz))
    nib.save(nib.Nifti1Image(np.asarray(flair.dataobj), flair.affine), str(folder / "BraTS2021_00042_flair.nii"))
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_flair.nii")
    flair_gz.unlink()
    (case,) = list_cases(root)
    assert case.images[0].name == "BraTS2021_00042_flair.nii"
    np.testing.assert_array_equal(read_case(case).image, coded_image())


def test_msd_ignores_macos_resource_forks_and_checks_dataset_json(tmp_path):
    root = msd_case(tmp_path)
    (root / "imagesTr" / "._BRATS_007.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "labelsTr" / "._BRATS_007.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / ".DS_Store").write_bytes(b"junk")
    assert [case.case_id for case in list_cases(root)] == ["BRATS_007"]

    dataset_json = root / "dataset.json"
    dataset_json.write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    assert len(list_cases(root)) == 1
    dataset_json.write_text(json.dumps({"modality": {"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"}}))
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, "dataset.json", "modality")
    with pytest.raises(DataFormatError) as excinfo:
        write_case(root, "msd", "BRATS_008", coded_image(), None, np.eye(4))
    assert_error_names(excinfo, "dataset.json")
    assert not (root / "imagesTr" / "BRATS_008.nii.gz").exists()


# ---------------------------------------------------------------------------
# Round trips through write_case
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_then_read_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(channels_of(fmt), *SHAPE_ZYX)).astype(np.float32)
    label = rng.integers(0, classes_of(fmt), size=SHAPE_ZYX).astype(np.uint8)
    affine = oblique_affine()
    case_id = CASE_IDS[fmt][0]
    written = write_case(tmp_path / fmt, fmt, case_id, image, label, affine)
    (listed,) = list_cases(tmp_path / fmt)
    assert listed == written

    raw = read_case(listed)
    np.testing.assert_array_equal(raw.image, image)
    np.testing.assert_array_equal(raw.label, label)
    if fmt == "dle":
        np.testing.assert_array_equal(raw.affine, np.eye(4))
    else:
        np.testing.assert_array_equal(raw.affine, affine)
        # (z, y, x) order: z was given 2.5 mm, x 0.9 mm.
        assert raw.spacing == pytest.approx((2.5, 1.1, 0.9), abs=1e-6)
    # No temporary files are left next to the written ones.
    assert not [p for p in (tmp_path / fmt).rglob(".*")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_case_uses_native_file_naming_and_label_convention(tmp_path, fmt):
    label = canonical_labels(classes=classes_of(fmt))
    case = write_case(tmp_path, fmt, "case9", coded_image(channels=channels_of(fmt)), label, oblique_affine())
    if fmt == "dle":
        stored = np.load(case.label, allow_pickle=False)
        assert stored.shape == (1, *SHAPE_ZYX) and stored.dtype == np.uint8
        native = stored[0]
    else:
        stored = nib.load(str(case.label))
        assert stored.get_data_dtype() == np.uint8
        native = np.asarray(stored.dataobj).transpose(2, 1, 0)
    expected_native = np.asarray(NATIVE_OF_CANONICAL[fmt])[label]
    np.testing.assert_array_equal(native, expected_native)
    if fmt == "brats2023":
        assert [p.name for p in case.images] == [f"case9{BRATS2023_FILE_SUFFIX[c]}.nii.gz" for c in CANONICAL_CHANNELS]
    if fmt == "msd":
        content = json.loads((tmp_path / "dataset.json").read_text())
        assert content["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
        assert content["numTraining"] == 1
        assert content["training"] == [{"image": "./imagesTr/case9.nii.gz", "label": "./labelsTr/case9.nii.gz"}]


# nnunetv2 keeps unlabelled cases apart, in imagesTs/: test_nnunetv2.py checks them.
@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt != "nnunetv2"])
def test_unlabelled_cases_and_rewrite_without_label(tmp_path, fmt):
    root = tmp_path / fmt
    image = coded_image(channels=channels_of(fmt))
    write_case(root, fmt, "case1", image, canonical_labels(classes=classes_of(fmt)), np.eye(4))
    case = write_case(root, fmt, "case1", image, None, np.eye(4))
    assert case.label is None
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, "case1")
    (listed,) = list_cases(root, require_labels=False)
    assert listed.label is None and read_case(listed).label is None
    if fmt == "msd":
        content = json.loads((root / "dataset.json").read_text())
        assert content["numTraining"] == 0 and content["test"] == ["./imagesTr/case1.nii.gz"]


def test_write_case_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="image must be"):
        write_case(tmp_path, "brats2021", "c", np.zeros((3, *SHAPE_ZYX)), None, np.eye(4))
    with pytest.raises(ValueError, match="label must have shape"):
        write_case(tmp_path, "brats2021", "c", coded_image(), np.zeros((5, 5, 5)), np.eye(4))
    with pytest.raises(DataFormatError):
        write_case(tmp_path, "brats2021", "c", coded_image(), np.full(SHAPE_ZYX, 4), np.eye(4))
    with pytest.raises(ValueError, match="case id"):
        write_case(tmp_path, "brats2021", "../escape", coded_image(), None, np.eye(4))
    nan_image = coded_image()
    nan_image[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_case(tmp_path, "brats2021", "c", nan_image, None, np.eye(4))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Bad inputs: each error names the case and the file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, case_id, missing_name",
    [
        ("brats2021", "BraTS2021_00042", "BraTS2021_00042_t1ce.nii"),
        ("brats2023", "BraTS-PED-00042-000", "BraTS-PED-00042-000-t2f.nii"),
    ],
)
def test_missing_modality_is_reported_by_list_and_read(tmp_path, fmt, case_id, missing_name):
    root = tmp_path / fmt
    case = write_case(root, fmt, case_id, coded_image(), canonical_labels(), np.eye(4))
    (root / case_id / (missing_name + ".gz")).unlink()
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, case_id, missing_name)
    with pytest.raises(DataFormatError) as excinfo:
        read_case(case)
    assert_error_names(excinfo, case_id, missing_name)


def test_missing_segmentation_respects_require_labels(tmp_path):
    root, folder = brats2021_case(tmp_path)
    (folder / "BraTS2021_00042_seg.nii.gz").unlink()
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_seg.nii")
    (case,) = list_cases(root, require_labels=False)
    assert case.label is None


def test_msd_and_dle_missing_or_orphan_files(tmp_path):
    root = msd_case(tmp_path)
    (root / "labelsTr" / "BRATS_007.nii.gz").unlink()
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(root)
    assert_error_names(excinfo, "BRATS_007", "labelsTr")
    assert list_cases(root, require_labels=False)[0].label is None

    dle = tmp_path / "dle"
    write_case(dle, "dle", "case1", coded_image(), canonical_labels(), np.eye(4))
    (dle / "case1_y.npy").rename(dle / "case2_y.npy")
    with pytest.raises(DataFormatError) as excinfo:
        list_cases(dle)
    assert_error_names(excinfo, "case2", "case2_x.npy")


def test_segmentation_shape_mismatch(tmp_path):
    root, folder = brats2021_case(tmp_path)
    save_nifti(folder / "BraTS2021_00042_seg.nii.gz", np.zeros((7, 6, 4), np.uint8), oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_seg.nii.gz", "(7, 6, 4)", "(7, 6, 5)")


def test_affine_mismatch_beyond_tolerance_only(tmp_path):
    root, folder = brats2021_case(tmp_path)
    t2_path = folder / "BraTS2021_00042_t2.nii.gz"
    nudged = oblique_affine()
    nudged[0, 3] += 1e-5  # within tolerance: still the same grid
    save_nifti(t2_path, coded_image()[3].T.copy(), nudged)
    read_case(list_cases(root)[0])

    shifted = oblique_affine()
    shifted[0, 3] += 0.5
    save_nifti(t2_path, coded_image()[3].T.copy(), shifted)
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_t2.nii.gz", "-90", "affine")

    msd_root = msd_case(tmp_path)
    save_nifti(msd_root / "labelsTr" / "BRATS_007.nii.gz", canonical_labels().T.copy(), shifted)
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(msd_root)[0])
    assert_error_names(excinfo, "BRATS_007", "labelsTr/BRATS_007.nii.gz", "affine")


def test_wrong_dimensionality(tmp_path):
    msd_root = tmp_path / "msd"
    save_nifti(msd_root / "imagesTr" / "BRATS_001.nii.gz", np.zeros((7, 6, 5, 3), np.float32), np.eye(4))
    save_nifti(msd_root / "labelsTr" / "BRATS_001.nii.gz", np.zeros((7, 6, 5), np.uint8), np.eye(4))
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(msd_root)[0])
    assert_error_names(excinfo, "BRATS_001", "BRATS_001.nii.gz", "(7, 6, 5, 3)")

    root, folder = brats2021_case(tmp_path)
    save_nifti(folder / "BraTS2021_00042_t1.nii.gz", np.zeros((7, 6, 5, 2), np.float32), oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_t1.nii.gz", "3D")

    dle = tmp_path / "dle"
    dle.mkdir()
    np.save(dle / "case1_x.npy", np.zeros((3, *SHAPE_ZYX), np.float32))
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(dle, require_labels=False)[0])
    assert_error_names(excinfo, "case1", "case1_x.npy", "(3, 5, 6, 7)")


@pytest.mark.parametrize(
    "native_values, expected_text",
    [(np.array([0, 1, 3], np.uint8), "[3]"), (np.array([0.0, 1.5, 2.0], np.float32), "non-integer")],
)
def test_bad_label_values(tmp_path, native_values, expected_text):
    root, folder = brats2021_case(tmp_path)
    seg = native_values[canonical_labels() % len(native_values)]
    save_nifti(folder / "BraTS2021_00042_seg.nii.gz", seg.T.copy(), oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_seg.nii.gz", expected_text)


def test_msd_label_value_four_is_unknown(tmp_path):
    root = msd_case(tmp_path)
    save_nifti(root / "labelsTr" / "BRATS_007.nii.gz", np.full(SHAPE_ZYX[::-1], 4, np.uint8), oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BRATS_007", "BRATS_007.nii.gz", "[4]")


def test_non_finite_voxels_name_channel_and_file(tmp_path):
    root, folder = brats2021_case(tmp_path)
    t1ce = coded_image()[2].T.copy()
    t1ce[1, 2, 3] = np.nan
    save_nifti(folder / "BraTS2021_00042_t1ce.nii.gz", t1ce, oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_t1ce.nii.gz", "t1ce", "NaN")

    msd_root = msd_case(tmp_path)
    image = coded_image().transpose(3, 2, 1, 0).copy()
    image[0, 0, 0, 3] = np.inf
    save_nifti(msd_root / "imagesTr" / "BRATS_007.nii.gz", image, oblique_affine())
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(msd_root)[0])
    assert_error_names(excinfo, "BRATS_007", "BRATS_007.nii.gz", "t2 (MSD channel 3)")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "corrupt_middle"])
def test_corrupt_nifti_is_a_data_format_error(tmp_path, damage):
    root, folder = brats2021_case(tmp_path)
    path = folder / "BraTS2021_00042_flair.nii.gz"
    payload = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(payload[: len(payload) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a nifti file at all" * 10)
    else:
        broken = bytearray(payload)
        middle = len(broken) // 2
        broken[middle : middle + 32] = bytes(32)
        path.write_bytes(bytes(broken))
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "BraTS2021_00042", "BraTS2021_00042_flair.nii.gz")


def test_corrupt_or_pickled_npy_is_a_data_format_error(tmp_path):
    root = tmp_path / "dle"
    write_case(root, "dle", "case1", coded_image(), canonical_labels(), np.eye(4))
    image_path = root / "case1_x.npy"
    payload = image_path.read_bytes()
    image_path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "case1", "case1_x.npy")

    # Object arrays need pickle; the reader must refuse rather than unpickle.
    write_case(root, "dle", "case1", coded_image(), canonical_labels(), np.eye(4))
    np.save(root / "case1_y.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError) as excinfo:
        read_case(list_cases(root)[0])
    assert_error_names(excinfo, "case1", "case1_y.npy")


# ---------------------------------------------------------------------------
# Prediction writers and atomicity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("convention", sorted(LABEL_CONVENTIONS))
def test_write_label_nifti_writes_native_convention_in_xyz_order(tmp_path, convention):
    label = canonical_labels(classes=classes_of(convention))
    path = tmp_path / "pred" / "case.nii.gz"
    write_label_nifti(path, label, oblique_affine(), convention)
    stored = nib.load(str(path))
    assert stored.shape == SHAPE_ZYX[::-1]
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(stored.affine, oblique_affine())
    expected = np.asarray(NATIVE_OF_CANONICAL[convention], np.uint8)[label].transpose()
    np.testing.assert_array_equal(np.asarray(stored.dataobj), expected)
    if convention == "brats2021":
        assert np.asarray(stored.dataobj).max() == 4


def test_write_label_nifti_rejects_bad_input(tmp_path):
    with pytest.raises(DataFormatError):
        write_label_nifti(tmp_path / "p.nii.gz", np.full(SHAPE_ZYX, 7), np.eye(4), "brats2021")
    with pytest.raises(DataFormatError, match="nii"):
        write_label_nifti(tmp_path / "p.png", canonical_labels(), np.eye(4), "brats2021")
    assert not any(tmp_path.iterdir())


def test_write_probabilities_nifti_layout(tmp_path):
    probs = np.random.default_rng(1).random((3, *SHAPE_ZYX))
    path = tmp_path / "probs.nii.gz"
    write_probabilities_nifti(path, probs, oblique_affine())
    stored = nib.load(str(path))
    assert stored.shape == (*SHAPE_ZYX[::-1], 3)
    assert stored.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(stored.dataobj), probs.transpose(3, 2, 1, 0).astype(np.float32))
    np.testing.assert_array_equal(stored.affine, oblique_affine())


def test_failed_write_leaves_previous_file_intact_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "seg.nii.gz"
    write_label_nifti(path, canonical_labels(), np.eye(4), "brats2023")
    original = path.read_bytes()

    def crash_half_way(image, filename, compressed):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(layout_files, "_write_nifti", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_label_nifti(path, np.zeros(SHAPE_ZYX, np.uint8), np.eye(4), "brats2023")
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_case_files_is_frozen():
    case = CaseFiles("c", "dle", (Path("c_x.npy"),), None)
    with pytest.raises(AttributeError):
        case.case_id = "d"  # type: ignore[misc]
