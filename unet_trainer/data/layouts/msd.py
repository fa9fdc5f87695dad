"""Medical Segmentation Decathlon Task01_BrainTumour.

``imagesTr/<case>.nii.gz`` 4D ``(x, y, z, 4)`` images with channels FLAIR, T1w, t1gd, T2w
(the canonical order), ``labelsTr/<case>.nii.gz`` labels (1 edema, 2 non-enhancing tumour,
3 enhancing), and ``dataset.json``. An image without a label is an unlabelled case; written
ones are listed under dataset.json "test". MSD's own ``imagesTs/`` is not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...core.fileio import atomic_write_text
from .canonical import CANONICAL_CHANNELS, CaseFiles, DataFormatError, Layout, RawCase
from .files import (
    LABELS_NEEDED,
    check_finite,
    find_nifti,
    load_nifti,
    nifti_files,
    read_json,
    read_label_on_grid,
    record_bad,
    remove_stale,
    save_nifti_atomic,
    save_volume,
    spacing_from_zooms,
    strip_nifti_extension,
)

NAME = "msd"
DESCRIPTION = "msd (imagesTr/<case>.nii.gz [+ labelsTr/, dataset.json])"

# MSD dataset.json channel names in canonical order (compared case-insensitively).
_MODALITY_NAMES: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")
# MSD dataset.json label names, keyed by native MSD value.
_LABEL_NAMES: dict[str, str] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}
_IMAGES_DIR = "imagesTr"
_LABELS_DIR = "labelsTr"
_DATASET_JSON = "dataset.json"


def _detect(root: Path) -> bool:
    images_dir = root / _IMAGES_DIR
    return images_dir.is_dir() and bool(nifti_files(images_dir) or (root / _DATASET_JSON).is_file())


def _check_dataset_json(path: Path) -> dict:
    """Load dataset.json and make sure its channel names are MSD's canonical order."""
    content = read_json(path)
    modality = content.get("modality")
    if modality is None:
        return content
    expected = {str(i): name for i, name in enumerate(_MODALITY_NAMES)}
    found = {str(k): str(v) for k, v in modality.items()} if isinstance(modality, dict) else modality
    if not isinstance(found, dict) or {k: v.lower() for k, v in found.items()} != {
        k: v.lower() for k, v in expected.items()
    }:
        raise DataFormatError(f"{path}: modality is {found}; expected {expected} (MSD Task01 channel order)")
    return content


def _list_cases(root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    dataset_json = root / _DATASET_JSON
    if dataset_json.is_file():
        _check_dataset_json(dataset_json)
    images_dir = root / _IMAGES_DIR
    labels_dir = root / _LABELS_DIR
    if not images_dir.is_dir():
        raise DataFormatError(f"{root}: no msd cases: missing {images_dir}; expected {DESCRIPTION}")
    image_by_case: dict[str, Path] = {}
    for path in nifti_files(images_dir):
        case_id = strip_nifti_extension(path.name)
        if case_id in image_by_case:
            record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: both {image_by_case[case_id]} and {path} exist; expected exactly one"
                ),
            )
        image_by_case[case_id] = path
    if labels_dir.is_dir():
        for path in nifti_files(labels_dir):
            case_id = strip_nifti_extension(path.name)
            if case_id not in image_by_case:
                record_bad(
                    bad,
                    case_id,
                    DataFormatError(f"case {case_id}: label {path} has no image; expected {images_dir / path.name}"),
                )
    cases: list[CaseFiles] = []
    for case_id, image_path in image_by_case.items():
        if bad is not None and case_id in bad:
            continue
        try:
            label = find_nifti(labels_dir, case_id, case_id) if labels_dir.is_dir() else None
            if label is None and require_labels:
                raise DataFormatError(
                    f"case {case_id}: missing label file {labels_dir / case_id}.nii[.gz] for image "
                    f"{image_path.name}; {LABELS_NEEDED}"
                )
        except DataFormatError as error:
            record_bad(bad, case_id, error)
            continue
        cases.append(CaseFiles(case_id, NAME, (image_path,), label))
    return cases


def _read(case: CaseFiles, convention: str) -> RawCase:
    (path,) = case.images
    data, affine, zooms = load_nifti(path, case.case_id, label=False)
    if data.ndim != 4 or data.shape[3] != len(CANONICAL_CHANNELS):
        raise DataFormatError(
            f"case {case.case_id}: {path} has shape {tuple(data.shape)}; "
            f"expected 4D (x, y, z, {len(CANONICAL_CHANNELS)}) with channels {', '.join(_MODALITY_NAMES)}"
        )
    for index, channel in enumerate(CANONICAL_CHANNELS):
        check_finite(data[..., index], path, case.case_id, f"{channel} (MSD channel {index})")
    spacing = spacing_from_zooms(zooms, path, case.case_id)
    image = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    label = read_label_on_grid(case, convention, path, data.shape[:3], affine)
    return RawCase(case.case_id, image, label, affine, spacing, convention, preprocessed=False)


def _update_dataset_json(root: Path, image_name: str, label_name: str | None) -> None:
    """Create or update dataset.json with the MSD fields and this case's entry."""
    path = root / _DATASET_JSON
    content = _check_dataset_json(path) if path.is_file() else {}
    content.setdefault("name", "BRATS")
    content.setdefault("description", "Gliomas segmentation: necrotic/active tumour and oedema")
    content.setdefault("tensorImageSize", "4D")
    content["modality"] = {str(i): name for i, name in enumerate(_MODALITY_NAMES)}
    content.setdefault("labels", dict(_LABEL_NAMES))
    image_entry = f"./{_IMAGES_DIR}/{image_name}"
    # Drop any previous entry of this case, labelled or not, before adding the new one.
    training = [
        entry
        for entry in content.get("training", [])
        if not (isinstance(entry, dict) and entry.get("image") == image_entry)
    ]
    test = [entry for entry in content.get("test", []) if entry != image_entry]
    if label_name is None:
        test.append(image_entry)
    else:
        training.append({"image": image_entry, "label": f"./{_LABELS_DIR}/{label_name}"})
    content["training"] = sorted(training, key=lambda entry: str(entry.get("image", "")))
    content["test"] = sorted(test, key=str)
    content["numTraining"] = len(content["training"])
    content["numTest"] = len(content["test"])
    text = json.dumps(content, indent=4) + "\n"
    atomic_write_text(path, text)


def _write(
    root: Path, case_id: str, image: np.ndarray, native_label: np.ndarray | None, affine: np.ndarray
) -> CaseFiles:
    if (root / _DATASET_JSON).is_file():
        # Refuse before writing any image into a dataset with another channel order.
        _check_dataset_json(root / _DATASET_JSON)
    file_name = f"{case_id}.nii.gz"
    image_path = root / _IMAGES_DIR / file_name
    label_path = root / _LABELS_DIR / file_name
    save_nifti_atomic(image_path, np.ascontiguousarray(image.transpose(3, 2, 1, 0)), affine)
    if native_label is None:
        remove_stale([label_path, label_path.with_name(f"{case_id}.nii")])
    else:
        save_volume(label_path, native_label, affine)
    _update_dataset_json(root, file_name, None if native_label is None else file_name)
    return CaseFiles(case_id, NAME, (image_path,), None if native_label is None else label_path)


MSD = Layout(
    name=NAME,
    description=DESCRIPTION,
    label_convention="msd",
    detect=_detect,
    list_cases=_list_cases,
    read=_read,
    write=_write,
)
