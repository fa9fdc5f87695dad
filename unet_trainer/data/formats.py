"""Read and write every raw BraTS release layout through one canonical in-memory form.

Users arrive with whichever release they have. This module detects the layout, lists
the cases, reads each case into a :class:`RawCase` with canonical channel order,
canonical labels and a fixed array layout, validates it with one-line errors, and
writes cases back in any layout (synthetic phantoms, tests, and ``unet-predict``
writing predictions in the input's own label convention).

Supported layouts (``fmt`` names):

``"msd"``
    Medical Segmentation Decathlon Task01_BrainTumour: ``imagesTr/<case>.nii.gz`` 4D
    ``(x, y, z, 4)`` images, ``labelsTr/<case>.nii.gz`` labels, ``dataset.json``.
``"brats2021"``
    One folder per case, ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or ``.nii``).
    BraTS 2020 folders use the same file naming and label numbering and are read too.
``"brats2023"``
    One folder per case, ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (or ``.nii``)
    for every BraTS 2023 challenge prefix (GLI, MEN, MET, PED, SSA).
``"dle"``
    NVIDIA DeepLearningExamples nnU-Net preprocessed arrays in one flat folder:
    ``<case>_x.npy`` float32 ``(C, Z, Y, X)``, ``<case>_y.npy`` uint8 ``(1, Z, Y, X)``,
    optional ``<case>_meta.npy`` (not needed here and not read).

Canonical in-memory form:

* images ``(4, Z, Y, X)`` float32 in :data:`CANONICAL_CHANNELS` order;
* labels ``(Z, Y, X)`` uint8 in :data:`CANONICAL_LABELS` numbering;
* ``affine`` is the NIfTI affine of the ``(x, y, z)`` voxel grid, unchanged;
* ``spacing`` is ``(z, y, x)`` in mm, taken from the header zooms.

Preparation (cropping, normalisation, resampling, caching) lives elsewhere.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from ..fileio import atomic_save_npy, atomic_write, atomic_write_text

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CANONICAL_CHANNELS",
    "CANONICAL_LABELS",
    "FORMATS",
    "FORMAT_LABEL_CONVENTION",
    "LAYOUT_DESCRIPTIONS",
    "LABEL_CONVENTIONS",
    "NATIVE_REGIONS",
    "REGIONS",
    "REGION_NAMES",
    "CaseFiles",
    "DataFormatError",
    "RawCase",
    "detect_format",
    "from_canonical",
    "list_cases",
    "read_case",
    "to_canonical",
    "write_case",
    "write_label_nifti",
    "write_probabilities_nifti",
]

# ---------------------------------------------------------------------------
# Canonical conventions. Every mapping between a release and the canonical form is
# written down exactly once, here.
# ---------------------------------------------------------------------------

#: Canonical channel order; it is MSD's order (FLAIR, T1w, t1gd, T2w) so MSD images and
#: DLE arrays (preprocessed from MSD) need no reordering.
CANONICAL_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

#: Canonical label numbering: the BraTS 2023 numbering.
CANONICAL_LABELS: dict[int, str] = {
    0: "background",
    1: "necrotic / non-enhancing tumour core",
    2: "peritumoral edema",
    3: "enhancing tumour",
}

#: Evaluation regions in canonical labels: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
#: Order in which region channels/metrics are reported everywhere.
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")

#: Native label value -> canonical label value, per label convention.
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 1 necrotic core, 2 edema, 4 enhancing (3 is unused).
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 3},
    # BraTS 2023 renumbered enhancing tumour 4 -> 3; it is the canonical numbering.
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    # MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing; edema and core swap.
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
    # DLE preprocessed MSD Task01 without relabelling, so its labels are MSD's.
    "dle": {0: 0, 1: 2, 2: 1, 3: 3},
}

#: The evaluation regions expressed in each convention's native label values.
NATIVE_REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    "dle": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
}

#: Layout names accepted by ``fmt`` arguments, in the order detection reports them.
FORMATS: tuple[str, ...] = ("msd", "brats2021", "brats2023", "dle")

#: Label convention of each layout's segmentation files.
FORMAT_LABEL_CONVENTION: dict[str, str] = {
    "msd": "msd",
    "brats2021": "brats2021",
    "brats2023": "brats2023",
    "dle": "dle",
}

#: Two grids whose affines differ by more than this (in mm, any entry) are different grids.
AFFINE_TOLERANCE_MM = 1e-3

# Canonical channel -> file-name suffix for the per-modality releases.
_BRATS2021_SUFFIXES: dict[str, str] = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
_BRATS2023_SUFFIXES: dict[str, str] = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
_SEG_SUFFIX = "seg"
# Separator between case id and suffix in the per-modality releases.
_SUFFIX_SEPARATOR: dict[str, str] = {"brats2021": "_", "brats2023": "-"}
_MODALITY_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2021": _BRATS2021_SUFFIXES,
    "brats2023": _BRATS2023_SUFFIXES,
}
# Case-folder names of the official releases; folders of another name count as cases
# only when they hold files named after them (e.g. BraTS 2020, or phantoms).
_CASE_FOLDER_PATTERNS: dict[str, re.Pattern[str]] = {
    "brats2021": re.compile(r"^BraTS2021_\d+$"),
    "brats2023": re.compile(r"^BraTS-(GLI|MEN|MET|PED|SSA)-\d+-\d+$"),
}

# MSD dataset.json channel names in canonical order (compared case-insensitively).
_MSD_MODALITY_NAMES: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w")
# MSD dataset.json label names, keyed by native MSD value.
_MSD_LABEL_NAMES: dict[str, str] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}
_MSD_IMAGES_DIR = "imagesTr"
_MSD_LABELS_DIR = "labelsTr"
_MSD_DATASET_JSON = "dataset.json"

_DLE_IMAGE_SUFFIX = "_x.npy"
_DLE_LABEL_SUFFIX = "_y.npy"
# DLE may append a one-hot foreground channel after the four modalities.
_DLE_ALLOWED_CHANNELS = (4, 5)

_NIFTI_EXTENSIONS = (".nii.gz", ".nii")

# Errors nibabel, gzip, zlib and numpy raise for truncated or corrupt files.
_CORRUPT_FILE_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,  # includes gzip.BadGzipFile and nibabel's "Expected N bytes" errors
    EOFError,
    zlib.error,
    struct.error,
    ValueError,  # nibabel header problems; numpy "cannot load object arrays" and bad .npy headers
)

#: Each layout's files in a few words, for error messages.
LAYOUT_DESCRIPTIONS: dict[str, str] = {
    "msd": "msd (imagesTr/<case>.nii.gz [+ labelsTr/, dataset.json])",
    "brats2021": "brats2021 (<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz])",
    "brats2023": "brats2023 (<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii[.gz])",
    "dle": "dle (<case>_x.npy [+ <case>_y.npy])",
}
_LAYOUT_DESCRIPTIONS = tuple(LAYOUT_DESCRIPTIONS[fmt] for fmt in FORMATS)


class DataFormatError(ValueError):
    """One-line message naming the case, the file and what was expected."""


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files live.

    Attributes:
        case_id: case identifier (folder name, or file name without extension/suffix).
        format: layout name, one of :data:`FORMATS`.
        images: image files in canonical channel order; msd: the single 4D file;
            dle: the ``_x.npy`` file.
        label: segmentation file, or None when the case has none.
    """

    case_id: str
    format: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class RawCase:
    """One case in canonical in-memory form.

    Attributes:
        case_id: case identifier.
        image: float32 ``(4, Z, Y, X)`` in :data:`CANONICAL_CHANNELS` order.
        label: uint8 ``(Z, Y, X)`` in canonical labels, or None.
        affine: float64 ``(4, 4)`` NIfTI affine mapping ``(x, y, z)`` voxel indices to mm;
            identity for DLE arrays.
        spacing: voxel size ``(z, y, x)`` in mm; ``(1, 1, 1)`` for DLE arrays.
        label_convention: native label convention of the source (key of
            :data:`LABEL_CONVENTIONS`), used to write predictions back natively.
        preprocessed: True when the source was already cropped and normalised (DLE).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    label_convention: str
    preprocessed: bool


# ---------------------------------------------------------------------------
# Label conventions
# ---------------------------------------------------------------------------


def _check_convention(convention: str) -> dict[int, int]:
    try:
        return LABEL_CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"unknown label convention {convention!r}; expected one of {sorted(LABEL_CONVENTIONS)}"
        ) from None


def _remap_labels(labels: np.ndarray, mapping: dict[int, int], description: str) -> np.ndarray:
    """Apply an integer value mapping through a lookup table; unknown values raise."""
    values = np.asarray(labels)
    if values.dtype == bool or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise DataFormatError(f"{description}: label dtype {values.dtype} is not numeric")
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise DataFormatError(f"{description}: NaN/Inf label values; expected integers in {sorted(mapping)}")
        # Integer-valued floats are common in NIfTI segmentations.
        if not np.array_equal(values, np.round(values)):
            bad = values[values != np.round(values)]
            raise DataFormatError(
                f"{description}: non-integer label values (e.g. {float(bad.flat[0])!r}); "
                f"expected integers in {sorted(mapping)}"
            )
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = int(values.min()), int(values.max())
    table_size = max(mapping) + 1
    if low >= 0 and high < table_size:
        # 255 marks values absent from the mapping; no convention uses 255.
        lookup = np.full(table_size, 255, dtype=np.uint8)
        for native, canonical in mapping.items():
            lookup[native] = canonical
        out = lookup[values.astype(np.intp, copy=False)]
        if not (out == 255).any():
            return out
    unknown = sorted(set(np.unique(values).astype(np.int64).tolist()) - set(mapping))
    raise DataFormatError(f"{description}: unknown label values {unknown}; expected only {sorted(mapping)}")


def to_canonical(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map native labels of ``convention`` to canonical labels.

    Args:
        labels: integer (or integer-valued float) array of any shape, native values.
        convention: a key of :data:`LABEL_CONVENTIONS`.

    Returns:
        uint8 array of the same shape with canonical values 0..3.

    Raises:
        DataFormatError: a value is not part of the convention, or is not an integer.
        ValueError: unknown convention name.
    """
    mapping = _check_convention(convention)
    return _remap_labels(labels, mapping, f"{convention} labels")


def from_canonical(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical labels (0..3) to the native values of ``convention``.

    Args:
        labels: integer (or integer-valued float) array of any shape, canonical values.
        convention: a key of :data:`LABEL_CONVENTIONS`.

    Returns:
        uint8 array of the same shape with native values.

    Raises:
        DataFormatError: a value is not a canonical label, or is not an integer.
        ValueError: unknown convention name.
    """
    mapping = _check_convention(convention)
    inverse = {canonical: native for native, canonical in mapping.items()}
    return _remap_labels(labels, inverse, f"canonical labels (for {convention})")


# ---------------------------------------------------------------------------
# Detection and listing
# ---------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    # Covers macOS "._*" resource forks, ".DS_Store" and our own temp files.
    return name.startswith(".")


def _strip_nifti_extension(name: str) -> str | None:
    for extension in _NIFTI_EXTENSIONS:
        if name.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return None


def _visible_subdirectories(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name)]


def _is_per_modality_case_folder(folder: Path, fmt: str) -> bool:
    """A folder is a case of ``fmt`` if named like one, or holding files named after it."""
    if _CASE_FOLDER_PATTERNS[fmt].match(folder.name):
        return True
    separator = _SUFFIX_SEPARATOR[fmt]
    suffixes = (*_MODALITY_SUFFIXES[fmt].values(), _SEG_SUFFIX)
    stem_prefix = folder.name + separator
    for entry in folder.iterdir():
        stem = _strip_nifti_extension(entry.name)
        if stem is not None and stem.startswith(stem_prefix) and stem[len(stem_prefix) :] in suffixes:
            return True
    return False


def _msd_image_files(images_dir: Path) -> list[Path]:
    return [
        p
        for p in images_dir.iterdir()
        if p.is_file() and not _is_hidden(p.name) and _strip_nifti_extension(p.name) is not None
    ]


def _dle_files(root: Path, suffix: str) -> list[Path]:
    return [
        p
        for p in root.iterdir()
        if p.is_file() and not _is_hidden(p.name) and p.name.endswith(suffix) and len(p.name) > len(suffix)
    ]


def _require_folder(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(
            f"{root}: folder does not exist or is not a directory; "
            f"expected one of the layouts {'; '.join(_LAYOUT_DESCRIPTIONS)}"
        )
    return root


def detect_format(root: Path) -> str:
    """Decide which layout the folder ``root`` holds.

    Args:
        root: dataset folder.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        DataFormatError: the folder is missing, empty, matches no layout, or matches
            more than one layout (mixed releases in one folder).
    """
    root = _require_folder(root)
    matches: list[str] = []
    images_dir = root / _MSD_IMAGES_DIR
    if images_dir.is_dir() and (_msd_image_files(images_dir) or (root / _MSD_DATASET_JSON).is_file()):
        matches.append("msd")
    subdirectories = _visible_subdirectories(root)
    for fmt in ("brats2021", "brats2023"):
        if any(_is_per_modality_case_folder(folder, fmt) for folder in subdirectories):
            matches.append(fmt)
    if _dle_files(root, _DLE_IMAGE_SUFFIX) or _dle_files(root, _DLE_LABEL_SUFFIX):
        matches.append("dle")
    if len(matches) == 1:
        return matches[0]
    if not matches:
        state = "is empty" if not any(root.iterdir()) else "matches no known layout"
        raise DataFormatError(f"{root}: folder {state}; looked for {'; '.join(_LAYOUT_DESCRIPTIONS)}")
    raise DataFormatError(f"{root}: folder mixes layouts {matches}; keep one release per folder or pass fmt explicitly")


def _find_nifti(folder: Path, stem: str, case_id: str) -> Path | None:
    """Return ``folder/stem.nii.gz`` or ``folder/stem.nii``; both present is ambiguous."""
    found = [folder / (stem + ext) for ext in _NIFTI_EXTENSIONS if (folder / (stem + ext)).is_file()]
    if len(found) > 1:
        raise DataFormatError(f"case {case_id}: both {found[0]} and {found[1]} exist; expected exactly one of them")
    return found[0] if found else None


def _record_bad(bad: dict[str, str] | None, case_id: str, error: DataFormatError) -> None:
    """Raise ``error``, or note it under ``case_id`` when the caller collects bad cases."""
    if bad is None:
        raise error
    bad.setdefault(case_id, str(error))


def _per_modality_case_files(folder: Path, fmt: str, require_labels: bool) -> CaseFiles:
    separator = _SUFFIX_SEPARATOR[fmt]
    suffixes = _MODALITY_SUFFIXES[fmt]
    case_id = folder.name
    images: list[Path] = []
    for channel in CANONICAL_CHANNELS:
        stem = f"{case_id}{separator}{suffixes[channel]}"
        path = _find_nifti(folder, stem, case_id)
        if path is None:
            raise DataFormatError(
                f"case {case_id}: missing {channel} file {folder / stem}.nii[.gz]; "
                f"expected all of {[suffixes[c] for c in CANONICAL_CHANNELS]}"
            )
        images.append(path)
    seg_stem = f"{case_id}{separator}{_SEG_SUFFIX}"
    label = _find_nifti(folder, seg_stem, case_id)
    if label is None and require_labels:
        raise DataFormatError(
            f"case {case_id}: missing segmentation file {folder / seg_stem}.nii[.gz]; "
            "training and scoring need a segmentation for every case (unet-predict does not)"
        )
    return CaseFiles(case_id, fmt, tuple(images), label)


def _list_per_modality_cases(root: Path, fmt: str, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    cases: list[CaseFiles] = []
    for folder in _visible_subdirectories(root):
        if not _is_per_modality_case_folder(folder, fmt):
            continue
        try:
            cases.append(_per_modality_case_files(folder, fmt, require_labels))
        except DataFormatError as error:
            _record_bad(bad, folder.name, error)
    return cases


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataFormatError(f"{path}: cannot read JSON ({_one_line(error)}); expected a JSON object") from error
    if not isinstance(content, dict):
        raise DataFormatError(f"{path}: top level is {type(content).__name__}; expected a JSON object")
    return content


def _check_msd_dataset_json(path: Path) -> dict:
    """Load dataset.json and make sure its channel names are MSD's canonical order."""
    content = _read_json(path)
    modality = content.get("modality")
    if modality is None:
        return content
    expected = {str(i): name for i, name in enumerate(_MSD_MODALITY_NAMES)}
    found = {str(k): str(v) for k, v in modality.items()} if isinstance(modality, dict) else modality
    if not isinstance(found, dict) or {k: v.lower() for k, v in found.items()} != {
        k: v.lower() for k, v in expected.items()
    }:
        raise DataFormatError(f"{path}: modality is {found}; expected {expected} (MSD Task01 channel order)")
    return content


def _list_msd_cases(root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    dataset_json = root / _MSD_DATASET_JSON
    if dataset_json.is_file():
        _check_msd_dataset_json(dataset_json)
    images_dir = root / _MSD_IMAGES_DIR
    labels_dir = root / _MSD_LABELS_DIR
    if not images_dir.is_dir():
        raise DataFormatError(f"{root}: no msd cases: missing {images_dir}; expected {LAYOUT_DESCRIPTIONS['msd']}")
    image_by_case: dict[str, Path] = {}
    for path in _msd_image_files(images_dir):
        case_id = _strip_nifti_extension(path.name)
        if case_id in image_by_case:
            _record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: both {image_by_case[case_id]} and {path} exist; expected exactly one"
                ),
            )
        image_by_case[case_id] = path
    if labels_dir.is_dir():
        for path in _msd_image_files(labels_dir):
            case_id = _strip_nifti_extension(path.name)
            if case_id not in image_by_case:
                _record_bad(
                    bad,
                    case_id,
                    DataFormatError(f"case {case_id}: label {path} has no image; expected {images_dir / path.name}"),
                )
    cases: list[CaseFiles] = []
    for case_id, image_path in image_by_case.items():
        if bad is not None and case_id in bad:
            continue
        try:
            label = _find_nifti(labels_dir, case_id, case_id) if labels_dir.is_dir() else None
            if label is None and require_labels:
                raise DataFormatError(
                    f"case {case_id}: missing label file {labels_dir / case_id}.nii[.gz] for image "
                    f"{image_path.name}; training and scoring need a segmentation for every case (unet-predict does not)"
                )
        except DataFormatError as error:
            _record_bad(bad, case_id, error)
            continue
        cases.append(CaseFiles(case_id, "msd", (image_path,), label))
    return cases


def _list_dle_cases(root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    images = {p.name[: -len(_DLE_IMAGE_SUFFIX)]: p for p in _dle_files(root, _DLE_IMAGE_SUFFIX)}
    labels = {p.name[: -len(_DLE_LABEL_SUFFIX)]: p for p in _dle_files(root, _DLE_LABEL_SUFFIX)}
    for case_id, label_path in labels.items():
        if case_id not in images:
            _record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: label {label_path} has no image; expected {root / (case_id + _DLE_IMAGE_SUFFIX)}"
                ),
            )
    cases: list[CaseFiles] = []
    for case_id, image_path in images.items():
        label = labels.get(case_id)
        if label is None and require_labels:
            _record_bad(
                bad,
                case_id,
                DataFormatError(
                    f"case {case_id}: missing label file {root / (case_id + _DLE_LABEL_SUFFIX)}; "
                    "training and scoring need a segmentation for every case (unet-predict does not)"
                ),
            )
            continue
        cases.append(CaseFiles(case_id, "dle", (image_path,), label))
    return cases


def list_cases(
    root: Path, fmt: str = "auto", require_labels: bool = True, bad: dict[str, str] | None = None
) -> list[CaseFiles]:
    """List the cases of a dataset folder, sorted by case id.

    Args:
        root: dataset folder.
        fmt: one of :data:`FORMATS`, or "auto" to call :func:`detect_format`.
        require_labels: when True every case must have a segmentation file.
        bad: when given, a case with a problem of its own (missing modality or
            segmentation, orphan label, both ``.nii`` and ``.nii.gz``) is left out and
            its one-line message stored as ``bad[case_id]`` instead of raised (for
            ``--skip-bad``); folder-level problems still raise.

    Returns:
        One :class:`CaseFiles` per case, sorted by ``case_id``.

    Raises:
        DataFormatError: missing folder, unknown ``fmt``, a case missing a modality file
            (message names the case and the missing file pattern), a case missing its
            segmentation while ``require_labels``, an orphan label file, a file present
            as both ``.nii`` and ``.nii.gz`` (these four unless ``bad`` collects them), a
            missing MSD imagesTr/ folder, or an MSD dataset.json with other channels.
    """
    root = _require_folder(root)
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "msd":
        cases = _list_msd_cases(root, require_labels, bad)
    elif fmt in ("brats2021", "brats2023"):
        cases = _list_per_modality_cases(root, fmt, require_labels, bad)
    elif fmt == "dle":
        cases = _list_dle_cases(root, require_labels, bad)
    else:
        raise DataFormatError(f"unknown layout {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    return sorted(cases, key=lambda case: case.case_id)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    # Library messages sometimes span lines (nibabel's "could the file be damaged?").
    return " ".join(str(error).split()) or type(error).__name__


def _nifti_from_bytes(raw: bytes) -> nib.Nifti1Image:
    """Build a NIfTI-1 or NIfTI-2 image from the uncompressed file bytes."""
    # sizeof_hdr (first int32, either byte order) tells the two versions apart; checking it
    # first keeps nibabel from logging header-repair chatter about files that are neither.
    if len(raw) < 4:
        raise DataFormatError(f"file has {len(raw)} bytes")
    header_sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 348 in header_sizes:
        return nib.Nifti1Image.from_bytes(raw)
    if 540 in header_sizes:
        return nib.Nifti2Image.from_bytes(raw)
    raise DataFormatError(f"header size field is {int.from_bytes(raw[:4], 'little')}, not 348 or 540")


def _load_nifti(path: Path, case_id: str, label: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Load one NIfTI file fully; return (data in file order, affine, zooms).

    Images come back float32; labels keep their stored dtype for the integer check.
    """
    if not path.is_file():
        raise DataFormatError(f"case {case_id}: missing file {path}; expected it to exist")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            # Decompressing the whole stream verifies the gzip CRC and length; nibabel's
            # lazy reader stops after the voxels it needs and would accept flipped bytes.
            raw = gzip.decompress(raw)
        image = _nifti_from_bytes(raw)
        # Convert inside the try: the data array is only decoded here.
        if label:
            data = np.array(np.asanyarray(image.dataobj))
        else:
            data = np.asanyarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except _CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case_id}: cannot read {path} ({_one_line(error)}); expected a readable NIfTI file"
        ) from error
    return data, affine, zooms


def _squeeze_to_3d(data: np.ndarray, path: Path, case_id: str, what: str) -> np.ndarray:
    # Some tools append singleton 4th/5th axes to 3D volumes; those are still 3D.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataFormatError(f"case {case_id}: {path} has shape {tuple(data.shape)}; expected a 3D (x, y, z) {what}")
    return data


def _check_finite(data: np.ndarray, path: Path, case_id: str, channel: str) -> None:
    if not np.isfinite(data).all():
        count = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise DataFormatError(
            f"case {case_id}: {path} ({channel} channel) has {count} NaN/Inf voxels; expected finite values"
        )


def _check_grid(
    case_id: str,
    path: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    reference_path: Path,
    reference_shape: tuple[int, ...],
    reference_affine: np.ndarray,
) -> None:
    """Raise unless ``path`` lies on the same voxel grid as ``reference_path``."""
    if tuple(shape) != tuple(reference_shape):
        raise DataFormatError(
            f"case {case_id}: {path} has (x, y, z) shape {tuple(shape)} but {reference_path.name} "
            f"has {tuple(reference_shape)}; expected identical shapes"
        )
    difference = np.abs(affine - reference_affine)
    if not np.all(difference <= AFFINE_TOLERANCE_MM):
        row, column = np.unravel_index(int(np.argmax(difference)), difference.shape)
        raise DataFormatError(
            f"case {case_id}: {path} affine[{row},{column}]={affine[row, column]:.6g} but "
            f"{reference_path.name} has {reference_affine[row, column]:.6g}; expected affines equal "
            f"within {AFFINE_TOLERANCE_MM} mm"
        )


def _spacing_from_zooms(zooms: tuple[float, ...], path: Path, case_id: str) -> tuple[float, float, float]:
    x, y, z = zooms[:3]
    if not all(np.isfinite(v) and v > 0 for v in (x, y, z)):
        raise DataFormatError(
            f"case {case_id}: {path} has voxel sizes (x, y, z)={tuple(zooms[:3])}; expected positive finite mm"
        )
    return (z, y, x)


def _labels_to_canonical(native: np.ndarray, convention: str, path: Path, case_id: str) -> np.ndarray:
    try:
        return to_canonical(native, convention)
    except DataFormatError as error:
        raise DataFormatError(f"case {case_id}: {path}: {error}") from error


def _read_per_modality_case(case: CaseFiles) -> RawCase:
    if len(case.images) != len(CANONICAL_CHANNELS):
        raise DataFormatError(
            f"case {case.case_id}: {len(case.images)} image files given; "
            f"expected {len(CANONICAL_CHANNELS)} ({', '.join(CANONICAL_CHANNELS)})"
        )
    reference_path = case.images[0]
    image: np.ndarray | None = None
    reference_shape: tuple[int, ...] = ()
    reference_affine = np.eye(4)
    spacing = (1.0, 1.0, 1.0)
    for index, (channel, path) in enumerate(zip(CANONICAL_CHANNELS, case.images)):
        data, affine, zooms = _load_nifti(path, case.case_id, label=False)
        data = _squeeze_to_3d(data, path, case.case_id, f"{channel} volume")
        if index == 0:
            reference_shape, reference_affine = data.shape, affine
            spacing = _spacing_from_zooms(zooms, path, case.case_id)
            x, y, z = data.shape
            image = np.empty((len(CANONICAL_CHANNELS), z, y, x), dtype=np.float32)
        else:
            _check_grid(case.case_id, path, data.shape, affine, reference_path, reference_shape, reference_affine)
        _check_finite(data, path, case.case_id, channel)
        image[index] = data.transpose(2, 1, 0)
    label = None
    convention = FORMAT_LABEL_CONVENTION[case.format]
    if case.label is not None:
        native, affine, _ = _load_nifti(case.label, case.case_id, label=True)
        native = _squeeze_to_3d(native, case.label, case.case_id, "segmentation")
        _check_grid(case.case_id, case.label, native.shape, affine, reference_path, reference_shape, reference_affine)
        label = np.ascontiguousarray(
            _labels_to_canonical(native, convention, case.label, case.case_id).transpose(2, 1, 0)
        )
    return RawCase(case.case_id, image, label, reference_affine, spacing, convention, preprocessed=False)


def _read_msd_case(case: CaseFiles) -> RawCase:
    (path,) = case.images
    data, affine, zooms = _load_nifti(path, case.case_id, label=False)
    if data.ndim != 4 or data.shape[3] != len(CANONICAL_CHANNELS):
        raise DataFormatError(
            f"case {case.case_id}: {path} has shape {tuple(data.shape)}; "
            f"expected 4D (x, y, z, {len(CANONICAL_CHANNELS)}) with channels {', '.join(_MSD_MODALITY_NAMES)}"
        )
    for index, channel in enumerate(CANONICAL_CHANNELS):
        _check_finite(data[..., index], path, case.case_id, f"{channel} (MSD channel {index})")
    spacing = _spacing_from_zooms(zooms, path, case.case_id)
    image = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    label = None
    if case.label is not None:
        native, label_affine, _ = _load_nifti(case.label, case.case_id, label=True)
        native = _squeeze_to_3d(native, case.label, case.case_id, "segmentation")
        _check_grid(case.case_id, case.label, native.shape, label_affine, path, data.shape[:3], affine)
        label = np.ascontiguousarray(_labels_to_canonical(native, "msd", case.label, case.case_id).transpose(2, 1, 0))
    return RawCase(case.case_id, image, label, affine, spacing, "msd", preprocessed=False)


def _load_npy(path: Path, case_id: str) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"case {case_id}: missing file {path}; expected it to exist")
    try:
        # allow_pickle=False: never execute code from data files; object arrays raise here.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except _CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case_id}: cannot read {path} ({_one_line(error)}); expected a numeric .npy array"
        ) from error


def _read_dle_case(case: CaseFiles, dle_labels: str = "msd") -> RawCase:
    (path,) = case.images
    stored = _load_npy(path, case.case_id)
    if stored.ndim != 4 or stored.shape[0] not in _DLE_ALLOWED_CHANNELS:
        raise DataFormatError(
            f"case {case.case_id}: {path} has shape {tuple(stored.shape)}; "
            f"expected (C, Z, Y, X) with C in {_DLE_ALLOWED_CHANNELS}"
        )
    if not (np.issubdtype(stored.dtype, np.floating) or np.issubdtype(stored.dtype, np.integer)):
        raise DataFormatError(f"case {case.case_id}: {path} has dtype {stored.dtype}; expected float32")
    try:
        # Only the four modalities; a fifth one-hot foreground channel is DLE's own addition.
        image = np.array(stored[: len(CANONICAL_CHANNELS)], dtype=np.float32)
    except _CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case.case_id}: cannot read {path} ({_one_line(error)}); expected a complete .npy array"
        ) from error
    for index, channel in enumerate(CANONICAL_CHANNELS):
        _check_finite(image[index], path, case.case_id, channel)
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
        except _CORRUPT_FILE_ERRORS as error:
            raise DataFormatError(
                f"case {case.case_id}: cannot read {case.label} ({_one_line(error)}); expected a complete .npy array"
            ) from error
        label = _labels_to_canonical(native, dle_labels, case.label, case.case_id)
    return RawCase(case.case_id, image, label, np.eye(4), (1.0, 1.0, 1.0), dle_labels, preprocessed=True)


# DLE's arrays carry no record of their numbering: preprocessed from MSD Task01 (what Composer
# read) they keep MSD's labels; preprocessed from BraTS 2021 they hold 1, 2 and 4 -> 3, which is
# the BraTS 2023 numbering. Read with the wrong one, oedema and necrotic core swap.
DLE_LABEL_CONVENTIONS = ("msd", "brats2023")


def read_case(case: CaseFiles, dle_labels: str = "msd") -> RawCase:
    """Read one case into canonical form, validating it.

    Args:
        case: files of one case, usually from :func:`list_cases`.
        dle_labels: the label numbering of DLE arrays, one of :data:`DLE_LABEL_CONVENTIONS`
            (ignored for other layouts).

    Returns:
        A :class:`RawCase`: image float32 ``(4, Z, Y, X)`` canonical channels, label uint8
        ``(Z, Y, X)`` canonical labels (or None), affine of the ``(x, y, z)`` grid,
        spacing ``(z, y, x)`` mm.

    Raises:
        DataFormatError: (one line naming the case and file) a missing file; modalities
            and segmentation with different shapes or affines (beyond
            :data:`AFFINE_TOLERANCE_MM`); an MSD image that is not 4D with 4 channels; a
            modality that is not 3D; unknown or non-integer label values; NaN/Inf voxels;
            a truncated or corrupt file; non-positive voxel sizes; an unknown format.
    """
    if case.format in ("brats2021", "brats2023"):
        return _read_per_modality_case(case)
    if case.format == "msd":
        return _read_msd_case(case)
    if case.format == "dle":
        if dle_labels not in DLE_LABEL_CONVENTIONS:
            raise ValueError(f"dle_labels must be one of {DLE_LABEL_CONVENTIONS}, got {dle_labels!r}")
        return _read_dle_case(case, dle_labels)
    raise DataFormatError(f"case {case.case_id}: unknown layout {case.format!r}; expected one of {list(FORMATS)}")


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _check_nifti_path(path: Path) -> Path:
    path = Path(path)
    if _strip_nifti_extension(path.name) is None:
        raise DataFormatError(f"{path}: expected a file name ending in .nii.gz or .nii")
    return path


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite (4, 4) array, got shape {affine.shape}")
    return affine


def _save_nifti_atomic(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data_xyz`` (already in (x, y, z[, c]) order) with ``affine`` atomically.

    Both sform and qform carry the affine (code 1, scanner) so tools that prefer either
    agree. NIfTI stores the sform in float32, so affine entries round to float32.
    """
    image = nib.Nifti1Image(np.asarray(data_xyz), affine)
    image.header.set_data_dtype(data_xyz.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    atomic_write(path, lambda temporary: nib.save(image, str(temporary)))


def write_label_nifti(path: Path, label: np.ndarray, affine: np.ndarray, convention: str) -> None:
    """Write canonical labels as a uint8 NIfTI in a native label convention, atomically.

    Args:
        path: output file ending in ``.nii.gz`` or ``.nii``; parent folders are created.
        label: ``(Z, Y, X)`` canonical labels 0..3.
        affine: ``(4, 4)`` NIfTI affine of the ``(x, y, z)`` grid.
        convention: native convention to write (key of :data:`LABEL_CONVENTIONS`);
            "dle" writes MSD numbering.

    Raises:
        DataFormatError: a value is not a canonical label, or the path is not NIfTI.
        ValueError: label not 3D, bad affine, or unknown convention.
    """
    path = _check_nifti_path(path)
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be (Z, Y, X), got shape {label.shape}")
    affine = _check_affine(affine)
    native = from_canonical(label, convention)
    _save_nifti_atomic(path, np.ascontiguousarray(native.transpose(2, 1, 0)), affine)


def write_probabilities_nifti(path: Path, probs: np.ndarray, affine: np.ndarray) -> None:
    """Write per-class (or per-region) probabilities as a 4D float32 NIfTI, atomically.

    Args:
        path: output file ending in ``.nii.gz`` or ``.nii``; parent folders are created.
        probs: ``(K, Z, Y, X)`` probabilities (any float dtype; written as float32).
        affine: ``(4, 4)`` NIfTI affine of the ``(x, y, z)`` grid.

    Raises:
        DataFormatError: the path is not NIfTI.
        ValueError: probs not 4D or bad affine.
    """
    path = _check_nifti_path(path)
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must be (K, Z, Y, X), got shape {probs.shape}")
    affine = _check_affine(affine)
    data = np.ascontiguousarray(probs.transpose(3, 2, 1, 0), dtype=np.float32)
    _save_nifti_atomic(path, data, affine)


def _check_case_id(case_id: str) -> None:
    if not case_id or _is_hidden(case_id) or "/" in case_id or "\\" in case_id or case_id != case_id.strip():
        raise ValueError(
            f"case id {case_id!r} must be a non-empty file name without slashes, surrounding spaces or a leading '.'"
        )


def _update_msd_dataset_json(root: Path, case_id: str, image_name: str, label_name: str | None) -> None:
    """Create or update dataset.json with the MSD fields and this case's entry."""
    path = root / _MSD_DATASET_JSON
    content = _check_msd_dataset_json(path) if path.is_file() else {}
    content.setdefault("name", "BRATS")
    content.setdefault("description", "Gliomas segmentation: necrotic/active tumour and oedema")
    content.setdefault("tensorImageSize", "4D")
    content["modality"] = {str(i): name for i, name in enumerate(_MSD_MODALITY_NAMES)}
    content.setdefault("labels", dict(_MSD_LABEL_NAMES))
    image_entry = f"./{_MSD_IMAGES_DIR}/{image_name}"
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
        training.append({"image": image_entry, "label": f"./{_MSD_LABELS_DIR}/{label_name}"})
    content["training"] = sorted(training, key=lambda entry: str(entry.get("image", "")))
    content["test"] = sorted(test, key=str)
    content["numTraining"] = len(content["training"])
    content["numTest"] = len(content["test"])
    text = json.dumps(content, indent=4) + "\n"
    atomic_write_text(path, text)


def _remove_stale(paths: list[Path]) -> None:
    # A case rewritten without a label must not pick up the label of its previous version.
    for path in paths:
        if path.is_file():
            path.unlink()


def write_case(
    root: Path,
    fmt: str,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
) -> CaseFiles:
    """Write one case in the layout ``fmt`` under ``root``; every file atomically.

    Args:
        root: dataset folder (created if missing).
        fmt: one of :data:`FORMATS`.
        case_id: case identifier; becomes the folder/file name.
        image: ``(4, Z, Y, X)`` canonical-channel images, written as float32.
        label: ``(Z, Y, X)`` canonical labels written in the layout's native convention
            as uint8, or None for an unlabelled case (a previous label file of this case
            is removed; msd lists it under dataset.json "test").
        affine: ``(4, 4)`` NIfTI affine of the ``(x, y, z)`` grid (float32 precision in
            the file). Not stored by "dle", whose arrays have no geometry.

    Returns:
        The :class:`CaseFiles` of the written case, as :func:`list_cases` would list it.

    Raises:
        ValueError: unknown ``fmt``, bad case id, wrong image/label shapes, non-finite
            image values, bad affine.
        DataFormatError: label values that are not canonical; an existing msd
            dataset.json with other channel names.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown layout {fmt!r}; expected one of {list(FORMATS)}")
    _check_case_id(case_id)
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != len(CANONICAL_CHANNELS):
        raise ValueError(f"image must be ({len(CANONICAL_CHANNELS)}, Z, Y, X), got shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError(f"case {case_id}: image has NaN/Inf values; the reader would reject them")
    native_label = None
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[1:]:
            raise ValueError(f"label must have shape {image.shape[1:]} (Z, Y, X), got {label.shape}")
        native_label = from_canonical(label, FORMAT_LABEL_CONVENTION[fmt])
    affine = _check_affine(affine)
    root = Path(root)
    if fmt == "msd" and (root / _MSD_DATASET_JSON).is_file():
        # Refuse before writing any image into a dataset with another channel order.
        _check_msd_dataset_json(root / _MSD_DATASET_JSON)

    if fmt == "dle":
        image_path = root / f"{case_id}{_DLE_IMAGE_SUFFIX}"
        label_path = root / f"{case_id}{_DLE_LABEL_SUFFIX}"
        atomic_save_npy(image_path, np.ascontiguousarray(image))
        if native_label is None:
            _remove_stale([label_path])
            return CaseFiles(case_id, fmt, (image_path,), None)
        atomic_save_npy(label_path, np.ascontiguousarray(native_label[np.newaxis]))
        return CaseFiles(case_id, fmt, (image_path,), label_path)

    if fmt == "msd":
        file_name = f"{case_id}.nii.gz"
        image_path = root / _MSD_IMAGES_DIR / file_name
        label_path = root / _MSD_LABELS_DIR / file_name
        _save_nifti_atomic(image_path, np.ascontiguousarray(image.transpose(3, 2, 1, 0)), affine)
        if native_label is None:
            _remove_stale([label_path, label_path.with_name(f"{case_id}.nii")])
        else:
            _save_nifti_atomic(label_path, np.ascontiguousarray(native_label.transpose(2, 1, 0)), affine)
        _update_msd_dataset_json(root, case_id, file_name, None if native_label is None else file_name)
        return CaseFiles(case_id, fmt, (image_path,), None if native_label is None else label_path)

    folder = root / case_id
    separator = _SUFFIX_SEPARATOR[fmt]
    suffixes = _MODALITY_SUFFIXES[fmt]
    image_paths: list[Path] = []
    for index, channel in enumerate(CANONICAL_CHANNELS):
        path = folder / f"{case_id}{separator}{suffixes[channel]}.nii.gz"
        _save_nifti_atomic(path, np.ascontiguousarray(image[index].transpose(2, 1, 0)), affine)
        image_paths.append(path)
    label_path = folder / f"{case_id}{separator}{_SEG_SUFFIX}.nii.gz"
    if native_label is None:
        _remove_stale([label_path, folder / f"{case_id}{separator}{_SEG_SUFFIX}.nii"])
        return CaseFiles(case_id, fmt, tuple(image_paths), None)
    _save_nifti_atomic(label_path, np.ascontiguousarray(native_label.transpose(2, 1, 0)), affine)
    return CaseFiles(case_id, fmt, tuple(image_paths), label_path)
