"""The BraTS challenge releases: one folder per case, one NIfTI file per MRI sequence.

``brats2021``
    ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or ``.nii``), labels 1 necrotic core,
    2 edema, 4 enhancing. BraTS 2020 folders use the same file naming and label numbering and
    are read too.
``brats-men-rt``
    ``<case>/<case>_{t1c,gtv}.nii.gz``: BraTS 2024 meningioma radiotherapy, one channel (T1c) and
    one label, 1 gross tumour volume.
``brats2023``
    ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (or ``.nii``) for every BraTS 2023 challenge
    prefix (GLI, MEN, MET, PED, SSA), labels 1 necrotic core, 2 edema, 3 enhancing; and BraTS 2024
    post-treatment glioma and pediatric tumours, the same files with a label 4. The label scheme follows
    the prefix (one sub-challenge per folder) and, for GLI and PED, the labels.

A folder counts as a case when it is named like the release's case folders, or holds files
named after itself (BraTS 2020, phantoms, renamed copies).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..schemes import SCHEMES
from .canonical import CaseFiles, DataFormatError, Layout, RawCase
from .files import (
    LABELS_NEEDED,
    find_nifti,
    read_channel_files,
    record_bad,
    remove_stale,
    save_volume,
    strip_nifti_extension,
    visible_subdirectories,
)


@dataclass(frozen=True)
class _Release:
    """One per-modality release: how its case folders and files are named."""

    name: str
    separator: str  # between case id and suffix
    suffixes: dict[str, str]  # canonical channel -> file-name suffix, in the release's channel order
    case_folder: re.Pattern[str]  # the official releases' case-folder names
    seg_suffix: str = "seg"

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.suffixes)

    def is_case_folder(self, folder: Path) -> bool:
        """A folder is a case if named like one, or holding files named after it."""
        if self.case_folder.match(folder.name):
            return True
        suffixes = (*self.suffixes.values(), self.seg_suffix)
        stem_prefix = folder.name + self.separator
        for entry in folder.iterdir():
            stem = strip_nifti_extension(entry.name)
            if stem is not None and stem.startswith(stem_prefix) and stem[len(stem_prefix) :] in suffixes:
                return True
        return False

    def detect(self, root: Path) -> bool:
        return any(self.is_case_folder(folder) for folder in visible_subdirectories(root))

    def case_files(self, folder: Path, require_labels: bool) -> CaseFiles:
        case_id = folder.name
        images: list[Path] = []
        for channel in self.channels:
            stem = f"{case_id}{self.separator}{self.suffixes[channel]}"
            path = find_nifti(folder, stem, case_id)
            if path is None:
                raise DataFormatError(
                    f"case {case_id}: missing {channel} file {folder / stem}.nii[.gz]; "
                    f"expected all of {list(self.suffixes.values())}"
                )
            images.append(path)
        seg_stem = f"{case_id}{self.separator}{self.seg_suffix}"
        label = find_nifti(folder, seg_stem, case_id)
        if label is None and require_labels:
            raise DataFormatError(
                f"case {case_id}: missing segmentation file {folder / seg_stem}.nii[.gz]; {LABELS_NEEDED}"
            )
        return CaseFiles(case_id, self.name, tuple(images), label)

    def list_cases(self, root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
        cases: list[CaseFiles] = []
        for folder in visible_subdirectories(root):
            if not self.is_case_folder(folder):
                continue
            try:
                cases.append(self.case_files(folder, require_labels))
            except DataFormatError as error:
                record_bad(bad, folder.name, error)
        return cases

    def read(self, case: CaseFiles, convention: str) -> RawCase:
        return read_channel_files(case, convention, self.channels)

    def write(
        self, root: Path, case_id: str, image: np.ndarray, native_label: np.ndarray | None, affine: np.ndarray
    ) -> CaseFiles:
        folder = root / case_id
        image_paths: list[Path] = []
        for index, channel in enumerate(self.channels):
            path = folder / f"{case_id}{self.separator}{self.suffixes[channel]}.nii.gz"
            save_volume(path, image[index], affine)
            image_paths.append(path)
        label_path = folder / f"{case_id}{self.separator}{self.seg_suffix}.nii.gz"
        if native_label is None:
            remove_stale([label_path, folder / f"{case_id}{self.separator}{self.seg_suffix}.nii"])
            return CaseFiles(case_id, self.name, tuple(image_paths), None)
        save_volume(label_path, native_label, affine)
        return CaseFiles(case_id, self.name, tuple(image_paths), label_path)

    def layout(
        self,
        description: str,
        schemes: dict[str, str] | None = None,
        detect_schemes: Callable[[Sequence[CaseFiles]], tuple[str, ...]] | None = None,
    ) -> Layout:
        return Layout(
            name=self.name,
            description=description,
            label_convention=self.name,
            detect=self.detect,
            list_cases=self.list_cases,
            read=self.read,
            write=self.write,
            schemes=schemes or {},
            detect_schemes=detect_schemes,
            channels=self.channels,
        )


# The releases since 2023 name each case after its sub-challenge (BraTS-GLI-00000-000); the file names
# cannot tell 2023's adult glioma from 2024's post-treatment glioma, whose labels add 4 (resection
# cavity), nor 2023's pediatric numbering from 2024's (1 ET, 2 NETC, 3 CC, 4 ED): the labels decide,
# a label 4 meaning 2024.
_SUB_CHALLENGE = re.compile(r"^BraTS-(GLI|MEN|MET|PED|SSA)-")
_SUB_CHALLENGE_SCHEMES: dict[str, tuple[str, ...]] = {
    "GLI": ("brats2023-gli", "brats2024-gli"),
    "SSA": ("brats2023-ssa",),
    "PED": ("brats2023-ped", "brats2024-ped"),
    "MEN": ("brats2023-men",),
    "MET": ("brats2023-met",),
}


def _sub_challenge_schemes(cases: Sequence[CaseFiles]) -> tuple[str, ...]:
    """The schemes a folder of BraTS 2023-style cases may hold, from their sub-challenge prefixes;
    cases named otherwise (renamed copies, phantoms) count as adult glioma.

    Raises:
        DataFormatError: the cases come from more than one sub-challenge.
    """
    counts: dict[str, int] = {}
    for case in cases:
        match = _SUB_CHALLENGE.match(case.case_id)
        prefix = match.group(1) if match else "GLI"
        counts[prefix] = counts.get(prefix, 0) + 1
    if len(counts) > 1:
        mixed = ", ".join(f"{n} {prefix}" for prefix, n in sorted(counts.items()))
        raise DataFormatError(
            f"the folder mixes BraTS sub-challenges ({mixed} cases); keep one per folder, each is scored its own way"
        )
    return _SUB_CHALLENGE_SCHEMES[next(iter(counts), "GLI")]


BRATS2021 = _Release(
    name="brats2021",
    separator="_",
    suffixes={"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    case_folder=re.compile(r"^BraTS2021_\d+$"),
).layout("brats2021 (<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz])")

BRATS2023 = _Release(
    name="brats2023",
    separator="-",
    suffixes={"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
    case_folder=re.compile(r"^BraTS-(GLI|MEN|MET|PED|SSA)-\d+-\d+$"),
).layout(
    "brats2023 (<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii[.gz])",
    schemes={
        **{scheme: "brats2023" for scheme in SCHEMES if scheme.startswith("brats2023-")},
        "brats2024-gli": "brats2024-gli",
        "brats2024-ped": "brats2024-ped",
    },
    detect_schemes=_sub_challenge_schemes,
)

BRATS_MEN_RT = _Release(
    name="brats-men-rt",
    separator="_",
    suffixes={"t1ce": "t1c"},
    case_folder=re.compile(r"^BraTS-MEN-RT-\d+-\d+$"),
    seg_suffix="gtv",
).layout("brats-men-rt (<case>/<case>_{t1c,gtv}.nii[.gz], one channel)")
