"""nnU-Net v2 raw datasets (``nnUNet_raw/DatasetXXX_Name``).

Files::

    dataset.json                        channel_names, labels, numTraining, file_ending
    imagesTr/<case>_0000.nii.gz ...     one 3D file per channel, numbered as in channel_names
    labelsTr/<case>.nii.gz              the segmentation of each imagesTr case
    imagesTs/<case>_0000.nii.gz ...     unlabelled (test) cases, optional

Channels and labels: nnU-Net's BraTS numbering, or the dataset's own scheme.

* **BraTS numbering** (the ``msd`` scheme). nnU-Net needs consecutive labels, so its BraTS 2021
  conversion renumbers BraTS' 2 (edema) to 1, 1 (necrotic core) to 2 and 4 (enhancing) to 3. That
  is exactly MSD Task01's numbering (1 edema, 2 non-enhancing tumour, 3 enhancing), which
  ``Dataset001_BrainTumour`` keeps, so these datasets read in the label convention ``"msd"``. A
  dataset.json says so in either of nnU-Net's two forms: labels by name (``{"background": 0,
  "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}``), or the regions Dataset137
  trains on (``{"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing
  tumor": [3]}`` with ``"regions_class_order": [1, 2, 3]``); and ``channel_names`` holds each of
  the four BraTS sequences once, under the keys "0" to "3", by any of its usual names (compared
  ignoring case and punctuation): FLAIR (flair, t2f, t2flair), T1 (t1, t1w, t1n), T1ce (t1ce,
  t1gd, t1c) and T2 (t2, t2w). New datasets are written this way, in the channel order of nnU-Net's
  ``Dataset137_BraTS2021`` (``{"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}``), so a dataset
  converted by nnU-Net and one written here name their files alike; MSD's order reads as well.
* **Any other dataset.json** defines its own label scheme
  (:func:`~unet_trainer.data.schemes.scheme_from_dataset_json`): its channels in ``channel_names``
  order, its labels by name (a class and a region each) or as regions with
  ``regions_class_order`` (evaluated and trained as given), e.g. nnU-Net's conversions of BraTS
  2023 (1 necrotic core), BraTS 2024 with the resection cavity, or the one-channel MEN-RT. The
  scheme is named ``nnunetv2-`` and a hash of its definition; it is registered, with its label
  convention (file value = class index), when the dataset is listed or a case read, and the
  definition travels in ``prepare.json``, the run's config (``data.scheme_definition``) and
  ``model.json``. Cases are not written into such a dataset.

Unlabelled cases. ``imagesTs/`` holds nnU-Net's unlabelled test cases: listed when labels are not
needed (``unet-predict``), left out when they are (training, scoring), as nnU-Net itself does.
``write`` puts a case without a label there, and one with a label into imagesTr/labelsTr, removing
the case's files from the other folder; ``numTraining`` always counts the imagesTr cases.

Detection. MSD folders also have imagesTr/, labelsTr/ and dataset.json, so this layout refines
``msd``: a folder is nnU-Net v2 when its dataset.json has ``channel_names`` (MSD's has
``modality``), or, without a readable dataset.json, when every image is named ``<case>_XXXX``
(MSD's are ``<case>.nii.gz``, 4D).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.fileio import atomic_write_text
from ..schemes import (
    SCHEMES,
    LabelScheme,
    SchemeDefinitionError,
    canonical_sequence,
    name_key,
    register_scheme,
    scheme_from_dataset_json,
)
from .canonical import (
    CANONICAL_CHANNELS,
    CONVENTION_SCHEME,
    CaseFiles,
    DataFormatError,
    Layout,
    RawCase,
    native_regions,
    register_dataset_convention,
)
from .files import (
    LABELS_NEEDED,
    NIFTI_EXTENSIONS,
    is_hidden,
    nifti_files,
    read_channel_files,
    read_json,
    record_bad,
    remove_stale,
    save_volume,
    strip_nifti_extension,
)

NAME = "nnunetv2"
DESCRIPTION = (
    "nnunetv2 (imagesTr/<case>_{0000..0003}.nii.gz [+ labelsTr/<case>.nii.gz, imagesTs/], "
    "dataset.json with channel_names)"
)
_LABEL_CONVENTION = "msd"

_IMAGES_TR = "imagesTr"
_LABELS_TR = "labelsTr"
_IMAGES_TS = "imagesTs"
_DATASET_JSON = "dataset.json"
# <case>_<four-digit channel number>, the name of every nnU-Net image file (before file_ending).
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

# A new dataset.json: nnU-Net's Dataset137_BraTS2021 channel order, labels and regions.
_NEW_CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
_NEW_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
_NEW_REGIONS_CLASS_ORDER = [1, 2, 3]
_NEW_FILE_ENDING = ".nii.gz"
# The same numbering labelled by name, as in Dataset001_BrainTumour (from MSD Task01).
_NAMED_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}

# What each native label value means in this layout's convention (for checking label names).
_LABEL_ROLES = {1: "edema", 2: "core", 3: "enhancing"}


@dataclass(frozen=True)
class _Spec:
    """What dataset.json says about the files."""

    file_index: tuple[int, ...]  # the file channel number of each channel of the scheme, in its order
    file_ending: str
    scheme: str  # the label scheme: msd, or the one dataset.json defines
    channels: tuple[str, ...]  # the scheme's channels

    @property
    def convention(self) -> str:
        """The label convention of the files: MSD's, or the dataset's own (native = class index)."""
        return _LABEL_CONVENTION if self.scheme == CONVENTION_SCHEME[_LABEL_CONVENTION] else self.scheme


def _file_index(path: Path, channel_names: object) -> tuple[int, ...]:
    """The file channel number of each canonical channel, from dataset.json's ``channel_names``."""
    count = len(CANONICAL_CHANNELS)
    expected = (
        f'expected each of FLAIR, T1, T1ce and T2 once under the keys "0" to "{count - 1}", '
        f"e.g. {json.dumps(_NEW_CHANNEL_NAMES)} (nnU-Net's Dataset137_BraTS2021)"
    )
    if not isinstance(channel_names, dict):
        raise DataFormatError(f"{path}: no channel_names object, which a nnunetv2 dataset.json needs; {expected}")
    by_channel = {canonical_sequence(name): str(key) for key, name in channel_names.items()}
    if set(by_channel) != set(CANONICAL_CHANNELS) or {str(k) for k in channel_names} != {str(i) for i in range(count)}:
        raise DataFormatError(
            f"{path}: channel_names {json.dumps(channel_names)} are not the four BraTS MRI sequences; {expected}"
        )
    return tuple(int(by_channel[channel]) for channel in CANONICAL_CHANNELS)


def _label_role(name: str) -> str:
    key = name_key(name)
    if "edema" in key or key == "ed":
        return "edema"
    if ("enhanc" in key and "non" not in key) or key in ("et", "en"):
        return "enhancing"
    return "core"


def _labels_follow_convention(labels: object) -> bool:
    """Whether dataset.json's ``labels`` (by name or as regions) are this layout's numbering."""
    if not isinstance(labels, dict) or type(labels.get("background")) is not int or labels["background"] != 0:
        return False
    values = [value for name, value in labels.items() if name != "background"]
    if any(isinstance(value, list) for value in values):  # region-based, as Dataset137
        regions = [tuple(value) if isinstance(value, list) else (value,) for value in values]
        if not all(type(v) is int for region in regions for v in region):
            return False
        expected = sorted(
            tuple(sorted(region))
            for region in native_regions(
                _LABEL_CONVENTION, SCHEMES[CONVENTION_SCHEME[_LABEL_CONVENTION]].regions
            ).values()
        )
        return sorted(tuple(sorted(region)) for region in regions) == expected
    if not all(type(value) is int for value in values) or sorted(values) != sorted(_LABEL_ROLES):
        return False
    return all(_label_role(name) == _LABEL_ROLES[value] for name, value in labels.items() if name != "background")


def register_dataset_scheme(scheme: LabelScheme) -> LabelScheme:
    """Register a scheme a dataset.json defines and its label convention (native value = class index),
    so that every lookup by name finds them; again is a no-op. Returns the registered scheme.

    Raises:
        SchemeDefinitionError: the name already holds another scheme.
    """
    scheme = register_scheme(scheme)
    register_dataset_convention(scheme.name, scheme.num_classes)
    return scheme


def _brats_file_index(content: dict) -> tuple[int, ...] | None:
    """The file channel number of each canonical channel where dataset.json holds the four BraTS
    sequences in nnU-Net's BraTS numbering (as Dataset137 and Dataset001 do), else None."""
    try:
        file_index = _file_index(Path(_DATASET_JSON), content.get("channel_names"))
    except DataFormatError:
        return None
    return file_index if _labels_follow_convention(content.get("labels")) else None


def _spec(path: Path, content: dict) -> _Spec:
    """Check dataset.json's channels, labels and file ending: nnU-Net's BraTS numbering (the
    ``msd`` scheme), or a label scheme of its own (:func:`~unet_trainer.data.schemes.scheme_from_dataset_json`),
    which is registered, with its label convention, so that every scheme lookup finds it.

    Raises:
        DataFormatError: (one line naming ``path``) channels or labels that make no scheme, or files
            that are not NIfTI.
    """
    file_ending = content.get("file_ending", _NEW_FILE_ENDING)
    if file_ending not in NIFTI_EXTENSIONS:
        raise DataFormatError(
            f"{path}: file_ending is {json.dumps(file_ending)}; expected one of {list(NIFTI_EXTENSIONS)}"
        )
    brats = _brats_file_index(content)
    if brats is not None:
        return _Spec(brats, file_ending, CONVENTION_SCHEME[_LABEL_CONVENTION], CANONICAL_CHANNELS)
    try:
        scheme = register_dataset_scheme(scheme_from_dataset_json(content, path.parent.name))
    except SchemeDefinitionError as error:
        raise DataFormatError(f"{path}: {error}") from None
    return _Spec(tuple(range(len(scheme.channels))), file_ending, scheme.name, scheme.channels)


def _case_spec(case: CaseFiles) -> _Spec:
    """The dataset.json spec of the dataset a listed case belongs to (its images' folder's parent)."""
    path = case.images[0].parent.parent / _DATASET_JSON
    return _spec(path, read_json(path))


def _dataset_schemes(cases) -> dict[str, str]:
    """{scheme: convention} of the dataset the cases belong to, as its dataset.json says."""
    spec = _case_spec(cases[0])
    return {spec.scheme: spec.convention}


def _channel_files(folder: Path, spec: _Spec, bad: dict[str, str] | None) -> dict[str, dict[int, Path]]:
    """{case id: {channel number: file}} of the images in ``folder``."""
    by_case: dict[str, dict[int, Path]] = {}
    ending = spec.file_ending
    for path in sorted(folder.iterdir()):
        if not path.is_file() or is_hidden(path.name) or not path.name.endswith(ending) or path.name == ending:
            continue
        stem = path.name[: -len(ending)]
        match = _CHANNEL_FILE.match(stem)
        if match is None:
            error = DataFormatError(
                f"case {stem}: {path} is not named <case>_XXXX{ending}; expected one file per channel, "
                f"{stem}_0000{ending} to {stem}_{len(spec.channels) - 1:04d}{ending}"
            )
            record_bad(bad, stem, error)
            continue
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    return by_case


def _cases_in(
    folder: Path, labels_dir: Path | None, spec: _Spec, require_labels: bool, bad: dict[str, str] | None
) -> list[CaseFiles]:
    by_case = _channel_files(folder, spec, bad)
    ending = spec.file_ending
    if labels_dir is not None and labels_dir.is_dir():
        for path in sorted(labels_dir.iterdir()):
            if path.is_file() and not is_hidden(path.name) and path.name.endswith(ending):
                case_id = path.name[: -len(ending)]
                if case_id and case_id not in by_case:
                    expected = folder / f"{case_id}_0000{ending}"
                    record_bad(
                        bad, case_id, DataFormatError(f"case {case_id}: label {path} has no image; expected {expected}")
                    )
    cases: list[CaseFiles] = []
    for case_id, files in by_case.items():
        if bad is not None and case_id in bad:
            continue
        try:
            unnamed = sorted(set(files) - set(spec.file_index))
            if unnamed:
                raise DataFormatError(
                    f"case {case_id}: {files[unnamed[0]]} is channel {unnamed[0]}, which dataset.json channel_names "
                    f"does not name; expected channels 0 to {len(spec.channels) - 1}"
                )
            images = []
            for channel, index in zip(spec.channels, spec.file_index):
                if index not in files:
                    raise DataFormatError(
                        f"case {case_id}: missing {channel} file {folder / f'{case_id}_{index:04d}{ending}'}; expected "
                        f"{case_id}_0000{ending} to {case_id}_{len(spec.channels) - 1:04d}{ending} (dataset.json channel_names)"
                    )
                images.append(files[index])
            label = None
            if labels_dir is not None:
                candidate = labels_dir / f"{case_id}{ending}"
                if candidate.is_file():
                    label = candidate
                elif require_labels:
                    raise DataFormatError(f"case {case_id}: missing label file {candidate}; {LABELS_NEEDED}")
        except DataFormatError as error:
            record_bad(bad, case_id, error)
            continue
        cases.append(CaseFiles(case_id, NAME, tuple(images), label))
    return cases


def _detect(root: Path) -> bool:
    folders = [root / name for name in (_IMAGES_TR, _IMAGES_TS) if (root / name).is_dir()]
    if not folders:
        return False
    path = root / _DATASET_JSON
    if path.is_file():
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            content = None
        if isinstance(content, dict):
            return "channel_names" in content
    # No readable dataset.json: nnU-Net's file naming decides (listing then names the file).
    stems = [strip_nifti_extension(p.name) for folder in folders for p in nifti_files(folder)]
    return bool(stems) and all(_CHANNEL_FILE.match(stem) for stem in stems)


def _list_cases(root: Path, require_labels: bool, bad: dict[str, str] | None) -> list[CaseFiles]:
    path = root / _DATASET_JSON
    train_dir, test_dir = root / _IMAGES_TR, root / _IMAGES_TS
    if not path.is_file():
        raise DataFormatError(f"{root}: no nnunetv2 cases: missing {path}; expected {DESCRIPTION}")
    spec = _spec(path, read_json(path))
    if not train_dir.is_dir() and not test_dir.is_dir():
        raise DataFormatError(f"{root}: no nnunetv2 cases: missing {train_dir}; expected {DESCRIPTION}")
    cases = _cases_in(train_dir, root / _LABELS_TR, spec, require_labels, bad) if train_dir.is_dir() else []
    if require_labels or not test_dir.is_dir():
        return cases
    test_cases = _cases_in(test_dir, None, spec, False, bad)
    in_both = {case.case_id for case in cases} & {case.case_id for case in test_cases}
    for case_id in sorted(in_both):
        record_bad(
            bad,
            case_id,
            DataFormatError(f"case {case_id}: images in both {train_dir} and {test_dir}; expected one of them"),
        )
    return [case for case in cases + test_cases if case.case_id not in in_both]


def _read(case: CaseFiles, convention: str) -> RawCase:
    return read_channel_files(case, convention, _case_spec(case).channels)


def _training_case_count(images_dir: Path, ending: str) -> int:
    if not images_dir.is_dir():
        return 0
    stems = (
        p.name[: -len(ending)]
        for p in images_dir.iterdir()
        if p.is_file() and not is_hidden(p.name) and p.name.endswith(ending)
    )
    return len({match["case"] for match in map(_CHANNEL_FILE.match, stems) if match})


def _write(
    root: Path, case_id: str, image: np.ndarray, native_label: np.ndarray | None, affine: np.ndarray
) -> CaseFiles:
    path = root / _DATASET_JSON
    if path.is_file():
        content = read_json(path)
    else:
        content = {
            "name": "BraTS",
            "description": "Gliomas: edema, necrotic/non-enhancing tumour core, enhancing tumour",
            "channel_names": dict(_NEW_CHANNEL_NAMES),
            "labels": dict(_NEW_LABELS),
            "regions_class_order": list(_NEW_REGIONS_CLASS_ORDER),
            "numTraining": 0,
            "file_ending": _NEW_FILE_ENDING,
        }
    # Refuse before writing any image into a dataset with other channels or labels.
    spec = _spec(path, content)
    if spec.scheme != CONVENTION_SCHEME[_LABEL_CONVENTION]:
        raise DataFormatError(
            f"{path}: its channels and labels are its own ({', '.join(spec.channels)}); cases are written only "
            f"into an nnU-Net BraTS dataset ({json.dumps(_NAMED_LABELS)})"
        )
    ending = spec.file_ending
    labelled = native_label is not None
    images_dir, other_dir = (
        (root / _IMAGES_TR, root / _IMAGES_TS) if labelled else (root / _IMAGES_TS, root / _IMAGES_TR)
    )
    image_paths = []
    for channel_index, file_index in enumerate(spec.file_index):
        image_path = images_dir / f"{case_id}_{file_index:04d}{ending}"
        save_volume(image_path, image[channel_index], affine)
        image_paths.append(image_path)
    # The case now lives in one images folder only, and an unlabelled one has no stale label.
    stale = [
        other_dir / f"{case_id}_{index:04d}{extension}" for index in spec.file_index for extension in NIFTI_EXTENSIONS
    ]
    label_path = root / _LABELS_TR / f"{case_id}{ending}"
    if labelled:
        save_volume(label_path, native_label, affine)
    else:
        stale += [root / _LABELS_TR / f"{case_id}{extension}" for extension in NIFTI_EXTENSIONS]
    remove_stale(stale)
    content["numTraining"] = _training_case_count(root / _IMAGES_TR, ending)
    atomic_write_text(path, json.dumps(content, indent=4) + "\n")
    return CaseFiles(case_id, NAME, tuple(image_paths), label_path if labelled else None)


NNUNET_V2 = Layout(
    name=NAME,
    description=DESCRIPTION,
    label_convention=_LABEL_CONVENTION,
    detect=_detect,
    list_cases=_list_cases,
    read=_read,
    write=_write,
    refines=("msd",),
    dataset_schemes=_dataset_schemes,
)
