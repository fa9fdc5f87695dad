"""Read and write every raw dataset layout through one canonical in-memory form.

Users arrive with whichever release they have. This package detects the layout, lists the cases,
reads each case into a :class:`RawCase` with canonical channel order, canonical labels and a fixed
array layout, validates it with one-line errors, and writes cases back in any layout (synthetic
phantoms, tests, and ``unet-predict`` writing predictions in the input's own label convention).
Preparation (cropping, normalisation, resampling, caching) lives elsewhere.

Modules:
    canonical   the canonical channels and labels, the label conventions and their regions; ``CaseFiles``,
                ``RawCase``, ``Layout``, ``RawDataset``, ``DataFormatError``, ``to_canonical``/``from_canonical``
    files       helpers the layouts share: NIfTI reading and atomic writing, grid/value checks, the checks
                before a case is written (``write_layout_case``)
    the others  one layout family each (its files, conventions and checks in its docstring),
                exposing a :class:`Layout` registered in :data:`LAYOUTS` below

A :class:`Layout` is a name, a description, a label convention and four functions: ``detect``,
``list_cases``, ``read``, ``write``. The functions here do what every layout shares (folder and
argument checks, sorting, label conversion, choosing among layouts that detect the same folder)
and dispatch through the registry; :func:`open_dataset` hands a folder to preparation as a
:class:`RawDataset`; the layout names that ``data.format``, ``--format`` and their
help texts accept are :data:`FORMAT_CHOICES`, derived from it. A new layout is one new module and
one entry in :data:`LAYOUTS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..schemes import REGION_NAMES, REGIONS, SCHEMES, LabelScheme, SchemeDefinitionError, scheme_from_definition
from . import brats, dle, msd, nnunetv2
from .canonical import (
    AFFINE_TOLERANCE_MM,
    CANONICAL_CHANNELS,
    CANONICAL_LABELS,
    CONVENTION_SCHEME,
    LABEL_CONVENTIONS,
    MAX_IMAGE_VALUES,
    CaseFiles,
    DataFormatError,
    Layout,
    RawCase,
    RawDataset,
    classes_present,
    from_canonical,
    native_of_class,
    native_regions,
    to_canonical,
)
from .files import load_nifti, write_label_nifti, write_layout_case, write_probabilities_nifti

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CANONICAL_CHANNELS",
    "CANONICAL_LABELS",
    "DLE_LABEL_CONVENTIONS",
    "FORMATS",
    "FORMAT_CHOICES",
    "FORMAT_LABEL_CONVENTION",
    "LABEL_CONVENTIONS",
    "LAYOUTS",
    "LAYOUT_DESCRIPTIONS",
    "MAX_IMAGE_VALUES",
    "NATIVE_REGIONS",
    "REGIONS",
    "REGION_NAMES",
    "CaseFiles",
    "DataFormatError",
    "Layout",
    "RawCase",
    "RawDataset",
    "dataset_scheme",
    "detect_format",
    "from_canonical",
    "classes_present",
    "list_cases",
    "native_of_class",
    "native_regions",
    "open_dataset",
    "read_case",
    "scheme_named",
    "to_canonical",
    "write_case",
    "write_label_nifti",
    "write_probabilities_nifti",
]

#: Every layout by name, in the order detection reports them.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        msd.MSD,
        brats.BRATS2021,
        brats.BRATS2023,
        dle.DLE,
        nnunetv2.NNUNET_V2,
        brats.BRATS_MEN_RT,
    )
}

#: The evaluation regions of each convention's scheme, in the convention's native label values.
NATIVE_REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    name: native_regions(name, SCHEMES[CONVENTION_SCHEME[name]].regions) for name in LABEL_CONVENTIONS
}
#: Layout names accepted by ``fmt`` arguments.
FORMATS: tuple[str, ...] = tuple(LAYOUTS)
#: What ``data.format`` and ``--format`` accept: "auto" (detect; the default) or a layout name.
FORMAT_CHOICES: tuple[str, ...] = ("auto", *FORMATS)
#: Label convention of each layout's segmentation files.
FORMAT_LABEL_CONVENTION: dict[str, str] = {name: layout.label_convention for name, layout in LAYOUTS.items()}
#: Each layout's files in a few words, for error messages.
LAYOUT_DESCRIPTIONS: dict[str, str] = {name: layout.description for name, layout in LAYOUTS.items()}
#: The label numberings DLE arrays may hold (``data.dle_labels``); the first is the default.
DLE_LABEL_CONVENTIONS: tuple[str, ...] = dle.DLE_LABEL_CONVENTIONS


def _require_folder(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(
            f"{root}: folder does not exist or is not a directory; "
            f"expected one of the layouts {'; '.join(LAYOUT_DESCRIPTIONS.values())}"
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
    matches = [name for name, layout in LAYOUTS.items() if layout.detect(root)]
    # A layout that refines another (nnU-Net v2 is MSD's folders with more rules) wins over it.
    refined = {other for name in matches for other in LAYOUTS[name].refines}
    matches = [name for name in matches if name not in refined]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        state = "is empty" if not any(root.iterdir()) else "matches no known layout"
        raise DataFormatError(f"{root}: folder {state}; looked for {'; '.join(LAYOUT_DESCRIPTIONS.values())}")
    raise DataFormatError(f"{root}: folder mixes layouts {matches}; keep one release per folder or pass fmt explicitly")


def _looks_like_hint(root: Path, fmt: str) -> str:
    """ "; the folder looks like X ..." when ``root`` is detected as another layout than ``fmt``."""
    try:
        detected = detect_format(root)
    except DataFormatError:
        return ""
    return f"; read as {fmt}, but the folder looks like {detected} (format auto detects it)" if detected != fmt else ""


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
            missing MSD imagesTr/ folder, or a dataset.json with other channels. With a
            forced ``fmt`` the folder does not look like, the message says what it looks like.
    """
    return _listing(root, fmt, require_labels, bad)[1]


def _listing(root: Path, fmt: str, require_labels: bool, bad: dict[str, str] | None) -> tuple[Layout, list[CaseFiles]]:
    """:func:`list_cases`, with the layout it listed in."""
    root = _require_folder(root)
    forced = fmt != "auto"
    if not forced:
        fmt = detect_format(root)
    layout = LAYOUTS.get(fmt)
    if layout is None:
        raise DataFormatError(f"unknown layout {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    try:
        cases = layout.list_cases(root, require_labels, bad)
    except DataFormatError as error:
        if not forced:
            raise
        raise DataFormatError(f"{error}{_looks_like_hint(root, fmt)}") from error
    return layout, sorted(cases, key=lambda case: case.case_id)


def _no_cases_message(root: Path, fmt: str) -> str:
    """Why ``root`` gave no case: for a forced layout, also what the folder looks like instead."""
    if fmt == "auto" or fmt not in LAYOUT_DESCRIPTIONS:
        return f"{root}: no cases found"
    try:
        detected = detect_format(root)
    except DataFormatError:
        detected = None
    hint = f"; the folder looks like {detected} (format auto detects it)" if detected and detected != fmt else ""
    return f"{root}: no {fmt} cases found; expected {LAYOUT_DESCRIPTIONS[fmt]}{hint}"


def open_dataset(
    root: Path,
    fmt: str = "auto",
    require_labels: bool = True,
    skip_bad: bool = False,
    scheme: str = "auto",
    dle_labels: str = DLE_LABEL_CONVENTIONS[0],
) -> RawDataset:
    """Open a raw dataset folder for preparation: list its cases in the layout ``fmt`` (or the
    detected one), as :func:`list_cases` does, and refuse a folder without cases. Reads no image.

    Args:
        root: dataset folder.
        fmt: one of :data:`FORMATS`, or "auto" to call :func:`detect_format`.
        require_labels: when True every case must have a segmentation file.
        skip_bad: a case with a problem of its own found while listing is set aside into
            ``skipped`` instead of raised (``--skip-bad``), and so is one that fails when read.
        scheme: the label scheme (a key of ``data.schemes.SCHEMES``), or "auto": the ones the file
            names allow, the labels deciding among them when the cases are prepared.
        dle_labels: the label numbering of files that do not record theirs (DLE arrays).

    Returns:
        The :class:`RawDataset`: the folder, its layout and its cases sorted by case id.

    Raises:
        DataFormatError: what :func:`list_cases` raises; a folder where no case is found (one
            line; for a forced ``fmt``, what it expected and what the folder looks like); a folder
            mixing sub-challenges, or a ``scheme`` its layout cannot hold.
    """
    bad: dict[str, str] = {}
    layout, cases = _listing(root, fmt, require_labels, bad if skip_bad else None)
    if not cases and not bad:
        raise DataFormatError(_no_cases_message(Path(root), fmt))
    try:
        schemes = layout.candidate_schemes(cases, dle_labels, scheme)
    except DataFormatError as error:
        raise DataFormatError(f"{root}: {error}") from None
    return RawDataset(Path(root), layout, tuple(cases), skip_bad, bad, schemes)


def read_case(case: CaseFiles, dle_labels: str = DLE_LABEL_CONVENTIONS[0]) -> RawCase:
    """Read one case into canonical form, validating it.

    Args:
        case: files of one case, usually from :func:`list_cases`.
        dle_labels: the label numbering of files that do not record theirs (DLE arrays), one of
            :data:`DLE_LABEL_CONVENTIONS`; ignored for other layouts.

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
        ValueError: ``dle_labels`` is not one of the layout's label choices.
    """
    layout = LAYOUTS.get(case.format)
    if layout is None:
        raise DataFormatError(f"case {case.case_id}: unknown layout {case.format!r}; expected one of {list(FORMATS)}")
    return layout.read_case(case, dle_labels)


def write_case(
    root: Path,
    fmt: str,
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
) -> CaseFiles:
    """Write one case in the layout ``fmt`` under ``root``; every file atomically
    (:func:`~unet_trainer.data.layouts.files.write_layout_case` of that layout, whose arguments
    these are, with the layout given by name: ``fmt``, one of :data:`FORMATS`).

    Returns:
        The :class:`CaseFiles` of the written case, as :func:`list_cases` would list it.

    Raises:
        ValueError: unknown ``fmt``; and what ``write_layout_case`` raises.
        DataFormatError: as ``write_layout_case``.
    """
    layout = LAYOUTS.get(fmt)
    if layout is None:
        raise ValueError(f"unknown layout {fmt!r}; expected one of {list(FORMATS)}")
    return write_layout_case(root, layout, case_id, image, label, affine)


def dataset_scheme(dataset: RawDataset, dle_labels: str = DLE_LABEL_CONVENTIONS[0]) -> str:
    """The label scheme of an opened dataset without preparing it: its one candidate, or, where the
    case names leave a choice (BraTS 2023 or 2024 glioma), the narrowest candidate whose numbering
    holds every value of its label files (only the label files are read).

    Raises:
        DataFormatError: a label file holds values no candidate numbers (one line), or is unreadable.
        ValueError: ``dle_labels`` is not one of the layout's label choices.
    """
    known = dataset.layout.scheme_conventions(dle_labels, dataset.cases)
    schemes = dataset.schemes or tuple(known)
    if len(schemes) == 1:
        return schemes[0]
    values: set[int] = set()
    for case in dataset.cases:
        if case.label is not None:
            data, _, _ = load_nifti(case.label, case.case_id, label=True)
            values |= {int(v) for v in np.unique(data)}
    for scheme in schemes:
        if values <= set(LABEL_CONVENTIONS[known[scheme]]):
            return scheme
    raise DataFormatError(
        f"{dataset.root}: label values {sorted(values)} fit none of the label schemes {', '.join(schemes)}"
    )


def scheme_named(name: str, definition: str | None = None) -> LabelScheme:
    """The label scheme called ``name``: a known one, or the one ``definition`` (a scheme's
    :attr:`~unet_trainer.data.schemes.LabelScheme.definition`, as a config, ``prepare.json`` or
    ``model.json`` records it) rebuilds, registered with its label convention.

    Raises:
        DataFormatError: no such scheme, or a definition that makes no scheme or another one (one line).
    """
    if definition:
        try:
            scheme = nnunetv2.register_dataset_scheme(scheme_from_definition(definition))
        except SchemeDefinitionError as error:
            raise DataFormatError(f"label scheme {name}: {error}") from None
        if scheme.name != name:
            raise DataFormatError(f"label scheme {name}: its recorded definition defines {scheme.name}")
        return scheme
    if name not in SCHEMES:
        raise DataFormatError(f"unknown label scheme {name!r}; expected one of {', '.join(SCHEMES)}")
    return SCHEMES[name]
