"""NVIDIA DeepLearningExamples nnU-Net preprocessed arrays, in one flat folder.

``<case>_x.npy`` float32 ``(C, Z, Y, X)`` (four modalities in canonical order, optionally a
fifth one-hot foreground channel that is dropped), ``<case>_y.npy`` uint8 ``(1, Z, Y, X)``,
optional ``<case>_meta.npy`` (not needed here and not read). The arrays are already cropped and
normalised and carry no geometry: affine identity, spacing 1 mm.

Nor do they record their label numbering: preprocessed from MSD Task01 (what Composer read) they
keep MSD's labels; preprocessed from BraTS 2021 they hold 1, 2 and 4 -> 3, which is the BraTS
2023 numbering. Read with the wrong one, oedema and necrotic core swap, so the user says which
(``data.dle_labels`` / ``--dle-labels``, one of :data:`DLE_LABEL_CONVENTIONS`; MSD's by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core.fileio import atomic_save_npy
from .canonical import CANONICAL_CHANNELS, CaseFiles, DataFormatError, Layout, RawCase
from .files import (
    CORRUPT_FILE_ERRORS,
    LABELS_NEEDED,
    check_finite,
    is_hidden,
    labels_to_canonical,
    one_line,
    record_bad,
    remove_stale,
)

NAME = "dle"

#: The label numberings DLE arrays may hold; the first is the default.
DLE_LABEL_CONVENTIONS: tuple[str, ...] = ("msd", "brats2023")

_IMAGE_SUFFIX = "_x.npy"
_LABEL_SUFFIX = "_y.npy"
# DLE may append a one-hot foreground channel after the four modalities.
_ALLOWED_CHANNELS = (4, 5)


def _files(root: Path, suffix: str) -> list[Path]:
    return [
        p
        for p in root.iterdir()
        if p.is_file() and not is_hidden(p.name) and p.name.endswith(suffix) and len(p.name) > len(suffix)
    ]


def _detect(root: Path) -> bool:
    return bool(_files(root, _IMAGE_SUFFIX) or _files(root, _LABEL_SUFFIX))


def _list_cases(root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    images = {p.name[: -len(_IMAGE_SUFFIX)]: p for p in _files(root, _IMAGE_SUFFIX)}
    labels = {p.name[: -len(_LABEL_SUFFIX)]: p for p in _files(root, _LABEL_SUFFIX)}
    for case_id, label_path in labels.items():
        if case_id not in images:
            record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: label {label_path} has no image; expected {root / (case_id + _IMAGE_SUFFIX)}"
                ),
            )
    cases: list[CaseFiles] = []
    for case_id, image_path in images.items():
        label = labels.get(case_id)
        if label is None and require_labels:
            record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: missing label file {root / (case_id + _LABEL_SUFFIX)}; {LABELS_NEEDED}"
                ),
            )
            continue
        cases.append(CaseFiles(case_id, NAME, (image_path,), label))
    return cases


def _load_npy(path: Path, case_id: str) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"case {case_id}: missing file {path}; expected it to exist")
    try:
        # allow_pickle=False: never execute code from data files; object arrays raise here.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case_id}: cannot read {path} ({one_line(error)}); expected a numeric .npy array"
        ) from error


def _read(case: CaseFiles, convention: str) -> RawCase:
    (path,) = case.images
    stored = _load_npy(path, case.case_id)
    if stored.ndim != 4 or stored.shape[0] not in _ALLOWED_CHANNELS:
        raise DataFormatError(
            f"case {case.case_id}: {path} has shape {tuple(stored.shape)}; "
            f"expected (C, Z, Y, X) with C in {_ALLOWED_CHANNELS}"
        )
    if not (np.issubdtype(stored.dtype, np.floating) or np.issubdtype(stored.dtype, np.integer)):
        raise DataFormatError(f"case {case.case_id}: {path} has dtype {stored.dtype}; expected float32")
    try:
        # Only the four modalities; a fifth one-hot foreground channel is DLE's own addition.
        image = np.array(stored[: len(CANONICAL_CHANNELS)], dtype=np.float32)
    except CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case.case_id}: cannot read {path} ({one_line(error)}); expected a complete .npy array"
        ) from error
    for index, channel in enumerate(CANONICAL_CHANNELS):
        check_finite(image[index], path, case.case_id, channel)
    label = None
    if case.label is not None:
        stored_label = _load_npy(case.label, case.case_id)
        if stored_label.ndim == 4 and stored_label.shape[0] == 1:
            stored_label = stored_label[0]
        if stored_label.shape != image.shape[1:]:
            raise DataFormatError(
                f"case {case.case_id}: {case.label} has shape {tuple(stored_label.shape)}; "
                f"expected (1, Z, Y, X) = (1, {', '.join(map(str, image.shape[1:]))}) to match {path.name}"
            )
        try:
            native = np.array(stored_label)
        except CORRUPT_FILE_ERRORS as error:
            raise DataFormatError(
                f"case {case.case_id}: cannot read {case.label} ({one_line(error)}); expected a complete .npy array"
            ) from error
        label = labels_to_canonical(native, convention, case.label, case.case_id)
    return RawCase(case.case_id, image, label, np.eye(4), (1.0, 1.0, 1.0), convention, preprocessed=True)


def _write(
    root: Path, case_id: str, image: np.ndarray, native_label: np.ndarray | None, affine: np.ndarray
) -> CaseFiles:
    # The arrays have no geometry: ``affine`` is not stored.
    image_path = root / f"{case_id}{_IMAGE_SUFFIX}"
    label_path = root / f"{case_id}{_LABEL_SUFFIX}"
    atomic_save_npy(image_path, np.ascontiguousarray(image))
    if native_label is None:
        remove_stale([label_path])
        return CaseFiles(case_id, NAME, (image_path,), None)
    atomic_save_npy(label_path, np.ascontiguousarray(native_label[np.newaxis]))
    return CaseFiles(case_id, NAME, (image_path,), label_path)


DLE = Layout(
    name=NAME,
    description="dle (<case>_x.npy [+ <case>_y.npy])",
    # Written in MSD's numbering (the "dle" convention); read in the numbering the user names.
    label_convention="dle",
    detect=_detect,
    list_cases=_list_cases,
    read=_read,
    write=_write,
    label_choices=DLE_LABEL_CONVENTIONS,
)
