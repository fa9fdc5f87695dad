"""The canonical in-memory form every layout reads into and writes from, and the types they share.

Every mapping between a release and the canonical form is written down exactly once, here:

* images ``(4, Z, Y, X)`` float32 in :data:`CANONICAL_CHANNELS` order;
* labels ``(Z, Y, X)`` uint8 in :data:`CANONICAL_LABELS` numbering;
* ``affine`` is the NIfTI affine of the ``(x, y, z)`` voxel grid, unchanged;
* ``spacing`` is ``(z, y, x)`` in mm, taken from the header zooms.

A layout (one module of this package) says which :data:`LABEL_CONVENTIONS` entry its files use
and describes itself with a :class:`Layout`; nothing here knows any layout's file names. A folder
opened in one layout is a :class:`RawDataset`, which preparation reads without knowing the layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "MAX_IMAGE_VALUES",
    "CANONICAL_CHANNELS",
    "CANONICAL_LABELS",
    "CONVENTION_SCHEME",
    "LABEL_CONVENTIONS",
    "classes_present",
    "native_of_class",
    "native_regions",
    "register_dataset_convention",
    "CaseFiles",
    "DataFormatError",
    "Layout",
    "RawCase",
    "RawDataset",
    "from_canonical",
    "to_canonical",
]

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

#: Native label value -> class index of its scheme, per label convention.
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 1 necrotic core, 2 edema, 4 enhancing (3 is unused).
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 3},
    # BraTS 2023 renumbered enhancing tumour 4 -> 3; it is the canonical numbering.
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 3},
    # MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing; edema and core swap.
    "msd": {0: 0, 1: 2, 2: 1, 3: 3},
    # DLE preprocessed MSD Task01 without relabelling, so its labels are MSD's.
    "dle": {0: 0, 1: 2, 2: 1, 3: 3},
    # BraTS 2024 post-treatment glioma: 2023's numbering plus 4, the resection cavity.
    "brats2024-gli": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
    # BraTS 2024 pediatric: 1 enhancing, 2 non-enhancing core, 3 cyst, 4 edema (its own classes).
    "brats2024-ped": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
    # BraTS 2024 meningioma radiotherapy: 1 gross tumour volume.
    "brats-men-rt": {0: 0, 1: 1},
}

#: The scheme whose class indices each convention's values map onto.
CONVENTION_SCHEME: dict[str, str] = {
    "brats2021": "brats2021",
    "brats2023": "brats2023-gli",
    "msd": "msd",
    "dle": "msd",
    "brats2024-gli": "brats2024-gli",
    "brats2024-ped": "brats2024-ped",
    "brats-men-rt": "brats-men-rt",
}


def register_dataset_convention(scheme_name: str, num_classes: int) -> str:
    """The label convention of a scheme a dataset defines (nnU-Net v2's dataset.json: native value =
    class index, 0 to ``num_classes - 1``), added to :data:`LABEL_CONVENTIONS` and
    :data:`CONVENTION_SCHEME` under the scheme's own name (once; again is a no-op). Returns its name.

    Raises:
        ValueError: the name already holds another numbering.
    """
    mapping = {value: value for value in range(num_classes)}
    if LABEL_CONVENTIONS.setdefault(scheme_name, mapping) != mapping:
        raise ValueError(f"label convention {scheme_name} already holds another numbering")
    CONVENTION_SCHEME.setdefault(scheme_name, scheme_name)
    return scheme_name


def native_of_class(convention: str) -> dict[int, int]:
    """Class index -> the native value a convention's files hold for it (the inverse of its mapping)."""
    return {index: native for native, index in LABEL_CONVENTIONS[convention].items()}


def classes_present(labels: np.ndarray) -> set[int]:
    """The values a uint8 label map holds (one counting pass, not a sort)."""
    return {int(v) for v in np.flatnonzero(np.bincount(np.asarray(labels, np.uint8).ravel()))}


def native_regions(convention: str, regions: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``regions`` (name -> class indices of the convention's scheme) in the convention's native values."""
    native_of = native_of_class(convention)
    return {name: tuple(sorted(native_of[c] for c in members)) for name, members in regions.items()}


#: Two grids whose affines differ by more than this (in mm, any entry) are different grids.
AFFINE_TOLERANCE_MM = 1e-3

#: The most values (voxels x channels) one image may hold: an image file, as its header claims
#: (checked before its voxels are read), and a case after resampling to ``data.target_spacing``
#: (checked before resampling). 2**30 is 4 GiB as float32, 30 times a four-channel BraTS case
#: (240 x 240 x 155 x 4); preparing an image takes a few times its size in memory.
MAX_IMAGE_VALUES = 2**30


class DataFormatError(ValueError):
    """One-line message naming the case, the file and what was expected."""


@dataclass(frozen=True)
class CaseFiles:
    """Where one case's files live.

    Attributes:
        case_id: case identifier (folder name, or file name without extension/suffix).
        format: layout name, a key of :data:`unet_trainer.data.layouts.LAYOUTS`.
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


@dataclass(frozen=True)
class Layout:
    """One raw dataset layout: how to recognise, list, read and write it.

    The package's dispatchers (``detect_format``, ``list_cases``, ``read_case``, ``write_case``)
    do the checks every layout shares and call these functions.

    Attributes:
        name: the ``fmt`` / ``data.format`` / ``--format`` name.
        description: the layout's files in a few words, starting with ``name``, for messages.
        label_convention: key of :data:`LABEL_CONVENTIONS` its segmentation files are written in
            and, unless ``label_choices`` is set, read in.
        detect: ``detect(root) -> bool``, whether the existing folder ``root`` holds this layout.
            Cheap: looks at names (and at most a small JSON file), reads no image.
        list_cases: ``list_cases(root, require_labels, bad) -> [CaseFiles]`` in any order; a
            problem of one case is raised, or stored as ``bad[case_id]`` when ``bad`` is a dict.
        read: ``read(case, convention) -> RawCase``, labels read in the native ``convention``.
        write: ``write(root, case_id, image, native_label, affine) -> CaseFiles``: ``image``
            float32 ``(4, Z, Y, X)`` canonical channels, finite; ``native_label`` uint8
            ``(Z, Y, X)`` in ``label_convention`` or None; ``affine`` a finite ``(4, 4)``.
            Every file atomically; returns what ``list_cases`` would list.
        label_choices: for files that do not record their numbering (DLE arrays): the
            conventions a user may say they hold, the first being the default.
        refines: names of layouts this one is a stricter form of (nnU-Net v2's raw folders are
            MSD's folders with more rules); when both detect a folder, this one wins.
        schemes: the label schemes (:mod:`unet_trainer.data.schemes`) its files may hold, each with the
            convention its files number labels in, from the narrowest convention to the widest; empty:
            the one scheme of the convention it reads in.
        detect_schemes: ``detect_schemes(cases) -> scheme names`` the cases may hold, from their file
            names, narrowest first (the labels decide among them); None: every one of ``schemes``.
            Raises :class:`DataFormatError` for a folder that mixes families.
        channels: the channels its images hold, in order, by canonical name.
        dataset_schemes: for a layout whose dataset files define the scheme (nnU-Net v2's dataset.json):
            ``dataset_schemes(cases) -> {scheme: convention}`` of the dataset the cases belong to, which
            then replaces ``schemes``; registers a scheme the dataset defines.
    """

    name: str
    description: str
    label_convention: str
    detect: Callable[[Path], bool]
    list_cases: Callable[[Path, bool, dict[str, str] | None], list[CaseFiles]]
    read: Callable[[CaseFiles, str], RawCase]
    write: Callable[[Path, str, np.ndarray, np.ndarray | None, np.ndarray], CaseFiles]
    label_choices: tuple[str, ...] = ()
    refines: tuple[str, ...] = ()
    schemes: Mapping[str, str] = field(default_factory=dict)
    detect_schemes: Callable[[Sequence[CaseFiles]], tuple[str, ...]] | None = None
    channels: tuple[str, ...] = CANONICAL_CHANNELS
    dataset_schemes: Callable[[Sequence[CaseFiles]], Mapping[str, str]] | None = None

    def read_convention(self, dle_labels: str) -> str:
        """The label convention this layout's segmentation files are read in: ``label_convention``, or
        for files that do not record their numbering, ``dle_labels``, one of ``label_choices``.

        Raises:
            ValueError: ``dle_labels`` is not one of ``label_choices`` (where the layout has choices).
        """
        if not self.label_choices:
            return self.label_convention
        if dle_labels not in self.label_choices:
            raise ValueError(f"dle_labels must be one of {self.label_choices}, got {dle_labels!r}")
        return dle_labels

    def scheme_conventions(self, dle_labels: str, cases: Sequence[CaseFiles] = ()) -> dict[str, str]:
        """Scheme -> the convention this layout's files number its labels in, narrowest first; for a
        layout whose datasets define their scheme, that of the dataset ``cases`` belong to.

        Raises:
            ValueError: ``dle_labels`` is not one of ``label_choices``.
            DataFormatError: the dataset's own definition of its scheme is bad (one line).
        """
        if self.dataset_schemes is not None and cases:
            return dict(self.dataset_schemes(cases))
        if self.schemes:
            return dict(self.schemes)
        convention = self.read_convention(dle_labels)
        return {CONVENTION_SCHEME[convention]: convention}

    def candidate_schemes(
        self, cases: Sequence[CaseFiles], dle_labels: str, requested: str = "auto"
    ) -> tuple[str, ...]:
        """The schemes a dataset of ``cases`` may hold, narrowest first: ``requested`` alone, or for
        "auto" what the file names say (the labels decide among them when the cases are read).

        Raises:
            DataFormatError: ``requested`` is a scheme this layout's files cannot hold, or the cases
                mix families (one line).
            ValueError: ``dle_labels`` is not one of ``label_choices``.
        """
        known = self.scheme_conventions(dle_labels, cases)
        if requested != "auto":
            if requested not in known:
                raise DataFormatError(
                    f"data.scheme {requested}: a {self.name} folder holds one of {', '.join(known)}; "
                    "choose one of them, or auto"
                )
            return (requested,)
        return self.detect_schemes(cases) if self.detect_schemes else tuple(known)

    def convention_holding(
        self, classes: set[int], dle_labels: str, preferred: str, cases: Sequence[CaseFiles] = ()
    ) -> str:
        """The convention to write labels of ``classes`` in: ``preferred`` (the case's own) when it
        holds them all, else the narrowest of this layout's that does (a model that predicts a
        resection cavity writes 2024's numbering into a 2023-named folder); ``cases``: of the folder,
        for a layout whose datasets define their scheme.

        Raises:
            DataFormatError: no convention of this layout holds every class.
        """
        for convention in (preferred, *dict.fromkeys(self.scheme_conventions(dle_labels, cases).values())):
            if classes <= set(LABEL_CONVENTIONS[convention].values()):
                return convention
        raise DataFormatError(
            f"classes {sorted(classes)} cannot be written in a {self.name} folder's label numbering; "
            "the model was trained on another label scheme"
        )

    def read_case(self, case: CaseFiles, dle_labels: str, schemes: Sequence[str] = ()) -> RawCase:
        """Read one case of this layout, its labels in the widest convention of ``schemes`` (default:
        every scheme the layout holds); the case records the narrowest of them that holds its labels.

        Raises:
            DataFormatError: what ``read`` raises (one line naming the case and file).
            ValueError: ``dle_labels`` is not one of ``label_choices``.
        """
        known = self.scheme_conventions(dle_labels, (case,))
        conventions = list(dict.fromkeys(known[s] for s in schemes or known))
        raw = self.read(case, conventions[-1])
        if raw.label is not None and len(conventions) > 1:
            present = classes_present(raw.label)
            # The layout's conventions agree on the values they share (identity maps), so the labels
            # read in the widest are those of the narrowest that holds them.
            raw.label_convention = next(c for c in conventions if present <= set(LABEL_CONVENTIONS[c].values()))
        return raw


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset folder opened in one layout: its listed cases and how to read them.

    Made by the registry's ``open_dataset`` (``unet_trainer.data.layouts``), which lists the folder;
    nothing here reads an image. Picklable when its layout is (every registered one is), so worker
    processes can read its cases.

    Attributes:
        root: the dataset folder.
        layout: the layout its cases are listed and read in (detected, or the one asked for).
        cases: its cases sorted by case id, each of ``layout``.
        skip_bad: a case with a problem of its own is set aside with its one-line message instead
            of stopping whoever works on the dataset (``--skip-bad``): while listing, into
            ``skipped``, and when a case is read.
        skipped: the cases the listing set aside, ``{case_id: message}``; empty unless ``skip_bad``.
        schemes: the label schemes its cases may hold, narrowest first (:meth:`Layout.candidate_schemes`);
            preparation keeps the narrowest that holds every case's labels.
    """

    root: Path
    layout: Layout
    cases: tuple[CaseFiles, ...]
    skip_bad: bool = False
    skipped: Mapping[str, str] = field(default_factory=dict)
    schemes: tuple[str, ...] = ()

    @property
    def format(self) -> str:
        """The layout's name, as ``prepare.json`` records it."""
        return self.layout.name


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
    _check_convention(convention)
    return _remap_labels(labels, native_of_class(convention), f"canonical labels (for {convention})")
