"""File helpers every layout shares: NIfTI reading and atomic writing, validation, listing aids, and
the checks of a case before any layout writes it (:func:`write_layout_case`).

Reading loads a whole file (a ``.nii.gz`` is fully decompressed, so its CRC is checked) and turns
every failure of nibabel, gzip, zlib or numpy into one :class:`DataFormatError` line naming the
case and the file. Writing goes through :mod:`unet_trainer.core.fileio`, so a crash leaves the
previous file or the complete new one, never half a file.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from ...core.fileio import atomic_write
from .canonical import (
    AFFINE_TOLERANCE_MM,
    CANONICAL_CHANNELS,
    MAX_IMAGE_VALUES,
    CaseFiles,
    DataFormatError,
    Layout,
    RawCase,
    from_canonical,
    to_canonical,
)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# What a case's probabilities file adds to its id (``<case id>_probabilities.nii.gz``, beside its labels).
PROBABILITIES_SUFFIX = "_probabilities"

#: Said when a case without a segmentation is refused.
LABELS_NEEDED = "training and scoring need a segmentation for every case (unet-predict does not)"

# Errors nibabel, gzip, zlib and numpy raise for truncated or corrupt files.
CORRUPT_FILE_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,  # includes gzip.BadGzipFile and nibabel's "Expected N bytes" errors
    EOFError,
    zlib.error,
    struct.error,
    ValueError,  # nibabel header problems; numpy "cannot load object arrays" and bad .npy headers
)


# ---------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    # Covers macOS "._*" resource forks, ".DS_Store" and our own temp files.
    return name.startswith(".")


def strip_nifti_extension(name: str) -> str | None:
    """``name`` without ``.nii.gz`` / ``.nii``, or None when it has neither (or nothing else)."""
    for extension in NIFTI_EXTENSIONS:
        if name.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)]
    return None


def visible_subdirectories(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)]


def nifti_files(folder: Path) -> list[Path]:
    """The visible ``.nii.gz`` / ``.nii`` files directly in ``folder``."""
    return [
        p
        for p in folder.iterdir()
        if p.is_file() and not is_hidden(p.name) and strip_nifti_extension(p.name) is not None
    ]


def find_nifti(folder: Path, stem: str, case_id: str) -> Path | None:
    """Return ``folder/stem.nii.gz`` or ``folder/stem.nii``; both present is ambiguous."""
    found = [folder / (stem + ext) for ext in NIFTI_EXTENSIONS if (folder / (stem + ext)).is_file()]
    if len(found) > 1:
        raise DataFormatError(f"case {case_id}: both {found[0]} and {found[1]} exist; expected exactly one of them")
    return found[0] if found else None


def record_bad(bad: dict[str, str] | None, case_id: str, error: DataFormatError) -> None:
    """Raise ``error``, or note it under ``case_id`` when the caller collects bad cases."""
    if bad is None:
        raise error
    bad.setdefault(case_id, str(error))


def one_line(error: BaseException) -> str:
    # Library messages sometimes span lines (nibabel's "could the file be damaged?").
    return " ".join(str(error).split()) or type(error).__name__


def read_json(path: Path) -> dict:
    """Load a JSON object.

    Raises:
        DataFormatError: unreadable, not JSON, or not an object (one line naming ``path``).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataFormatError(f"{path}: cannot read JSON ({one_line(error)}); expected a JSON object") from error
    if not isinstance(content, dict):
        raise DataFormatError(f"{path}: top level is {type(content).__name__}; expected a JSON object")
    return content


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _nifti_class(raw: bytes) -> type[nib.Nifti1Image]:
    """NIfTI-1 or NIfTI-2, from the first bytes of the uncompressed file."""
    # sizeof_hdr (first int32, either byte order) tells the two versions apart; checking it
    # first keeps nibabel from logging header-repair chatter about files that are neither.
    if len(raw) < 4:
        raise DataFormatError(f"file has {len(raw)} bytes")
    header_sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 348 in header_sizes:
        return nib.Nifti1Image
    if 540 in header_sizes:
        return nib.Nifti2Image
    raise DataFormatError(f"header size field is {int.from_bytes(raw[:4], 'little')}, not 348 or 540")


def _nifti_from_bytes(raw: bytes) -> nib.Nifti1Image:
    """Build a NIfTI-1 or NIfTI-2 image from the uncompressed file bytes."""
    return _nifti_class(raw).from_bytes(raw)


def _first_bytes(path: Path, raw: bytes, count: int) -> bytes:
    """The first ``count`` bytes of the uncompressed file (of ``raw``, its bytes as stored)."""
    if not path.name.endswith(".gz"):
        return raw[:count]
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
        return stream.read(count)


class ImageSizeError(DataFormatError):
    """A file whose header claims a size that cannot be (or must not be) read; one line."""


def check_claimed_size(path: Path, case_id: str, head: bytes, stored: int | None) -> None:
    """Refuse a file whose header claims more values than :data:`MAX_IMAGE_VALUES`, or more voxel
    bytes than the file holds, before anything of that size is allocated.

    Args:
        head: the first bytes of the uncompressed file (its header).
        stored: the uncompressed file's length in bytes, None while unknown.

    Raises:
        ImageSizeError: one line naming the case, the file and the claimed shape.
        whatever nibabel raises for a header it cannot parse.
    """
    header_class = _nifti_class(head).header_class
    header = header_class(head[: header_class.sizeof_hdr], check=False)
    shape = tuple(int(n) for n in header.get_data_shape())
    values = int(np.prod(shape, dtype=object))
    if values > MAX_IMAGE_VALUES:
        raise ImageSizeError(
            f"case {case_id}: {path} header claims shape {shape} ({values:,} values); accepted: at most "
            f"{MAX_IMAGE_VALUES:,} values (voxels x channels) per image, so the header is damaged or the image "
            "is far larger than a brain MRI"
        )
    needed = int(header.get_data_offset()) + values * header.get_data_dtype().itemsize
    if stored is not None and stored < needed:
        raise ImageSizeError(
            f"case {case_id}: cannot read {path} (its header claims shape {shape}, {needed:,} bytes with the "
            f"header, but the file holds {stored:,}); expected a complete NIfTI file"
        )


def load_nifti(path: Path, case_id: str, label: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Load one NIfTI file fully; return (data in file order, affine, zooms).

    Images come back float32; labels keep their stored dtype for the integer check.
    """
    if not path.is_file():
        raise DataFormatError(f"case {case_id}: missing file {path}; expected it to exist")
    try:
        raw = path.read_bytes()
        # The size the header claims is checked before the file is decompressed or its voxels
        # allocated: a damaged header could otherwise ask for terabytes.
        check_claimed_size(path, case_id, _first_bytes(path, raw, 540), None)
        if path.name.endswith(".gz"):
            # Decompressing the whole stream verifies the gzip CRC and length; nibabel's
            # lazy reader stops after the voxels it needs and would accept flipped bytes.
            raw = gzip.decompress(raw)
        check_claimed_size(path, case_id, raw, len(raw))
        image = _nifti_from_bytes(raw)
        # Convert inside the try: the data array is only decoded here.
        if label:
            data = np.array(np.asanyarray(image.dataobj))
        else:
            data = np.asanyarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except ImageSizeError:
        raise
    except CORRUPT_FILE_ERRORS as error:
        raise DataFormatError(
            f"case {case_id}: cannot read {path} ({one_line(error)}); expected a readable NIfTI file"
        ) from error
    return data, affine, zooms


def squeeze_to_3d(data: np.ndarray, path: Path, case_id: str, what: str) -> np.ndarray:
    # Some tools append singleton 4th/5th axes to 3D volumes; those are still 3D.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataFormatError(f"case {case_id}: {path} has shape {tuple(data.shape)}; expected a 3D (x, y, z) {what}")
    return data


def check_finite(data: np.ndarray, path: Path, case_id: str, channel: str) -> None:
    if not np.isfinite(data).all():
        count = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise DataFormatError(
            f"case {case_id}: {path} ({channel} channel) has {count} NaN/Inf voxels; expected finite values"
        )


def check_grid(
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


def spacing_from_zooms(zooms: tuple[float, ...], path: Path, case_id: str) -> tuple[float, float, float]:
    x, y, z = zooms[:3]
    if not all(np.isfinite(v) and v > 0 for v in (x, y, z)):
        raise DataFormatError(
            f"case {case_id}: {path} has voxel sizes (x, y, z)={tuple(zooms[:3])}; expected positive finite mm"
        )
    return (z, y, x)


def labels_to_canonical(native: np.ndarray, convention: str, path: Path, case_id: str) -> np.ndarray:
    try:
        return to_canonical(native, convention)
    except DataFormatError as error:
        raise DataFormatError(f"case {case_id}: {path}: {error}") from error


def read_label_on_grid(
    case: CaseFiles,
    convention: str,
    reference_path: Path,
    reference_shape: tuple[int, ...],
    reference_affine: np.ndarray,
) -> np.ndarray | None:
    """The case's segmentation as canonical ``(Z, Y, X)`` uint8, checked to lie on the images' grid."""
    if case.label is None:
        return None
    native, affine, _ = load_nifti(case.label, case.case_id, label=True)
    native = squeeze_to_3d(native, case.label, case.case_id, "segmentation")
    check_grid(case.case_id, case.label, native.shape, affine, reference_path, reference_shape, reference_affine)
    return np.ascontiguousarray(labels_to_canonical(native, convention, case.label, case.case_id).transpose(2, 1, 0))


def read_prediction_of(case: CaseFiles, raw: RawCase, path: Path) -> np.ndarray:
    """A label map another tool wrote for ``case`` (a NIfTI in the case's own label convention, on
    its grid), as canonical ``(Z, Y, X)`` uint8.

    Args:
        case: the case's files, as listed; raw: the case as read (its grid, affine and convention).
        path: the prediction's NIfTI file.

    Raises:
        DataFormatError: (one line naming the file) an unreadable file, a shape or affine other than
            the case's, or a value that is no label of the case's convention.
    """
    prediction = CaseFiles(case.case_id, case.format, case.images, path)
    reference = case.label if case.label is not None else case.images[0]
    shape_xyz = tuple(reversed(raw.image.shape[1:]))
    return read_label_on_grid(prediction, raw.label_convention, reference, shape_xyz, raw.affine)


def read_channel_files(case: CaseFiles, convention: str, channels: tuple[str, ...] = CANONICAL_CHANNELS) -> RawCase:
    """Read a case stored as one 3D NIfTI per channel (``case.images`` in the order of ``channels``,
    canonical channel names).

    Raises:
        DataFormatError: a missing or unreadable file, a volume that is not 3D, files on
            different grids, NaN/Inf voxels, bad voxel sizes, labels outside ``convention``.
    """
    if len(case.images) != len(channels):
        raise DataFormatError(
            f"case {case.case_id}: {len(case.images)} image files given; "
            f"expected {len(channels)} ({', '.join(channels)})"
        )
    reference_path = case.images[0]
    image: np.ndarray | None = None
    reference_shape: tuple[int, ...] = ()
    reference_affine = np.eye(4)
    spacing = (1.0, 1.0, 1.0)
    for index, (channel, path) in enumerate(zip(channels, case.images)):
        data, affine, zooms = load_nifti(path, case.case_id, label=False)
        data = squeeze_to_3d(data, path, case.case_id, f"{channel} volume")
        if index == 0:
            reference_shape, reference_affine = data.shape, affine
            spacing = spacing_from_zooms(zooms, path, case.case_id)
            x, y, z = data.shape
            image = np.empty((len(channels), z, y, x), dtype=np.float32)
        else:
            check_grid(case.case_id, path, data.shape, affine, reference_path, reference_shape, reference_affine)
        check_finite(data, path, case.case_id, channel)
        image[index] = data.transpose(2, 1, 0)
    label = read_label_on_grid(case, convention, reference_path, reference_shape, reference_affine)
    return RawCase(case.case_id, image, label, reference_affine, spacing, convention, preprocessed=False)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def check_nifti_path(path: Path) -> Path:
    path = Path(path)
    if strip_nifti_extension(path.name) is None:
        raise DataFormatError(f"{path}: expected a file name ending in .nii.gz or .nii")
    return path


def check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite (4, 4) array, got shape {affine.shape}")
    return affine


def save_nifti_atomic(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data_xyz`` (already in (x, y, z[, c]) order) with ``affine`` atomically.

    Both sform and qform carry the affine (code 1, scanner) so tools that prefer either
    agree. NIfTI stores the sform in float32, so affine entries round to float32.
    """
    path = check_nifti_path(path)
    image = nib.Nifti1Image(np.asarray(data_xyz), affine)
    image.header.set_data_dtype(data_xyz.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    atomic_write(path, lambda temporary: _write_nifti(image, temporary, compressed=path.name.endswith(".gz")))


def _write_nifti(image: nib.Nifti1Image, destination: Path, compressed: bool) -> None:
    """Serialise ``image`` as one ``.nii`` file, gzipped when ``compressed``, to ``destination``
    whatever its name: nib.save takes the format from the name, and temporaries end in ".tmp"."""
    with open(destination, "wb") as handle:
        # The bytes nib.save writes: gzip level 1, no time stamp and no file name in the gzip header
        # (else the temporary's name would be stored in the file).
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=1, mtime=0)
            if compressed
            else contextlib.nullcontext(handle)
        ) as stream:
            image.to_file_map({"image": nib.FileHolder(fileobj=stream)})


def save_volume(path: Path, volume_zyx: np.ndarray, affine: np.ndarray) -> None:
    """Write one ``(Z, Y, X)`` volume as a 3D NIfTI in ``(x, y, z)`` order, atomically."""
    save_nifti_atomic(path, np.ascontiguousarray(volume_zyx.transpose(2, 1, 0)), affine)


def remove_stale(paths: list[Path]) -> None:
    # A case rewritten without a label must not pick up the label of its previous version.
    for path in paths:
        if path.is_file():
            path.unlink()


def write_label_nifti(path: Path, label: np.ndarray, affine: np.ndarray, convention: str) -> None:
    """Write canonical labels as a uint8 NIfTI in a native label convention, atomically.

    Args:
        path: output file ending in ``.nii.gz`` or ``.nii``; parent folders are created.
        label: ``(Z, Y, X)`` canonical labels 0..3.
        affine: ``(4, 4)`` NIfTI affine of the ``(x, y, z)`` grid.
        convention: native convention to write (key of ``LABEL_CONVENTIONS``);
            "dle" writes MSD numbering.

    Raises:
        DataFormatError: a value is not a canonical label, or the path is not NIfTI.
        ValueError: label not 3D, bad affine, or unknown convention.
    """
    path = check_nifti_path(path)
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be (Z, Y, X), got shape {label.shape}")
    affine = check_affine(affine)
    native = from_canonical(label, convention)
    save_volume(path, native, affine)


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
    path = check_nifti_path(path)
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must be (K, Z, Y, X), got shape {probs.shape}")
    affine = check_affine(affine)
    data = np.ascontiguousarray(probs.transpose(3, 2, 1, 0), dtype=np.float32)
    save_nifti_atomic(path, data, affine)


def check_case_id(case_id: str) -> None:
    """Raise ValueError unless ``case_id`` can name a case's folder or files."""
    if not case_id or is_hidden(case_id) or "/" in case_id or "\\" in case_id or case_id != case_id.strip():
        raise ValueError(
            f"case id {case_id!r} must be a non-empty file name without slashes, surrounding spaces or a leading '.'"
        )


def write_layout_case(
    root: Path,
    layout: Layout,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    convention: str | None = None,
) -> CaseFiles:
    """Write one case in ``layout`` under ``root``, every file atomically, after the checks every
    layout shares; the registry's ``write_case`` picks the layout by name and calls this.

    Args:
        root: dataset folder (created if missing).
        layout: the layout to write, e.g. ``brats.BRATS2021``.
        case_id: case identifier; becomes the folder/file name.
        image: ``(C, Z, Y, X)`` images in the layout's channels (``layout.channels``), written as float32.
        label: ``(Z, Y, X)`` canonical labels written in the layout's native convention
            as uint8, or None for an unlabelled case (a previous label file of this case
            is removed; where a layout keeps unlabelled cases, its module says).
        affine: ``(4, 4)`` NIfTI affine of the ``(x, y, z)`` grid (float32 precision in
            the file). Not stored by "dle", whose arrays have no geometry.
        convention: the label convention to write ``label`` in (a key of ``LABEL_CONVENTIONS``, one
            of the layout's schemes' conventions); None: the layout's own ``label_convention``.

    Returns:
        The :class:`CaseFiles` of the written case, as the layout's listing would list it.

    Raises:
        ValueError: bad case id, wrong image/label shapes, non-finite image values, bad affine.
        DataFormatError: label values that are not canonical; an existing dataset file the
            layout cannot write into (e.g. a dataset.json with other channel names).
    """
    check_case_id(case_id)
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != len(layout.channels):
        raise ValueError(f"image must be ({len(layout.channels)}, Z, Y, X), got shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError(f"case {case_id}: image has NaN/Inf values; the reader would reject them")
    native_label = None
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[1:]:
            raise ValueError(f"label must have shape {image.shape[1:]} (Z, Y, X), got {label.shape}")
        native_label = from_canonical(label, convention or layout.label_convention)
    affine = check_affine(affine)
    return layout.write(Path(root), case_id, image, native_label, affine)
