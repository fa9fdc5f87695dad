"""Label schemes: what a dataset's channels, labels and evaluation regions are, as data.

A :class:`LabelScheme` names, for one family of BraTS releases:

* its image channels, in the order the model takes them;
* its classes: the class indices ``1..K-1`` the prepared label arrays hold (0 is background),
  each with a short name (the one scores and pictures use) and a description;
* its evaluation regions, as sets of class indices, in the order scores report them;
* the regions a model trained in region mode predicts (one sigmoid channel each) and the class
  each region paints when outputs turn back into labels, in painting order (nnU-Net's
  ``regions_class_order``: a later region paints over an earlier one);
* its lesion-wise metric definition and parameters (the challenge's own);
* where each of these facts comes from.

How a release numbers its label files (its *label convention*, e.g. BraTS 2021's enhancing
tumour 4) is the layouts' business (:mod:`unet_trainer.data.layouts.canonical`); every convention
maps its native values onto one scheme's class indices.

Schemes with the same channels, classes and regions are *compatible*: a model trained on one
predicts for the other (BraTS 2021 and the 2023 sub-challenges share one set of classes).

A leaf: it imports nothing from the package, so the losses, metrics and pictures read a scheme
without loading the dataset layouts. A new scheme is one entry in :data:`SCHEMES`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DATASET_SCHEME_PREFIX",
    "DEFAULT_SCHEME",
    "LABEL_NAMES",
    "REGIONS",
    "REGION_NAMES",
    "SCHEMES",
    "LabelScheme",
    "LesionSettings",
    "SchemeDefinitionError",
    "UnknownScheme",
    "canonical_sequence",
    "get_scheme",
    "name_key",
    "register_scheme",
    "scheme_from_dataset_json",
    "scheme_from_definition",
]


class UnknownScheme(ValueError):
    """A scheme name that is not in :data:`SCHEMES`; the message lists the known ones."""


class SchemeDefinitionError(ValueError):
    """A dataset.json whose channels or labels make no scheme (one line saying what was expected)."""


@dataclass(frozen=True)
class LesionSettings:
    """A challenge's lesion-wise scoring: the metric ``definition`` (a key of the evaluation's
    lesion definitions), the ``dilation`` iterations that merge nearby truth lesions, and the
    ``min_volume`` in mm³ at or below which a truth lesion is dropped (``region_min_volume``: for
    the regions whose threshold differs)."""

    definition: str
    dilation: int
    min_volume: float
    region_min_volume: Mapping[str, float] = field(default_factory=dict)  # regions with their own threshold

    def min_volume_of(self, region: str) -> float:
        """The size threshold in mm³ for ``region``: its own, or the scheme's."""
        return self.region_min_volume.get(region, self.min_volume)


@dataclass(frozen=True)
class LabelScheme:
    """One family's channels, classes and regions; see the module docstring.

    Attributes:
        name: the ``data.scheme`` name.
        title: the family in a few words, for messages and tables.
        channels: the model's input channels in order, by the canonical names of their MRI
            sequences (``flair``, ``t1``, ``t1ce``, ``t2``).
        classes: short name of each class index ``1..K-1``, in index order.
        class_descriptions: what each class is, in index order.
        regions: evaluation region name -> its class indices, in reporting order; the region
            scores' mean is over these.
        trained_regions: the regions a region-mode model predicts, one output channel each, in order.
        regions_class_order: the class index each trained region paints, in the same order; a
            voxel takes the class of the last region that is on there.
        lesion: the challenge's lesion-wise scoring.
        source: where the labels and regions are defined (the challenge's own documents).
        definition: for a scheme a dataset defines (:func:`scheme_from_dataset_json`), the JSON text
            it was built from, which rebuilds it anywhere (a checkpoint's config, ``prepare.json``,
            ``model.json`` carry it); "" for the schemes of :data:`SCHEMES` as shipped.
    """

    name: str
    title: str
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    class_descriptions: tuple[str, ...]
    regions: Mapping[str, tuple[int, ...]]
    trained_regions: tuple[str, ...]
    regions_class_order: tuple[int, ...]
    lesion: LesionSettings
    source: str
    definition: str = ""
    _label_names: Mapping[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A scheme is data written by hand: check it once, here, so no consumer has to.
        count = len(self.classes)
        if len(self.class_descriptions) != count:
            raise ValueError(f"scheme {self.name}: {count} classes but {len(self.class_descriptions)} descriptions")
        for region, members in self.regions.items():
            if not members or any(not 1 <= m <= count for m in members):
                raise ValueError(f"scheme {self.name}: region {region} {members} is not a set of classes 1..{count}")
        unknown = [r for r in self.trained_regions if r not in self.regions]
        if unknown or len(self.regions_class_order) != len(self.trained_regions):
            raise ValueError(
                f"scheme {self.name}: trained regions {self.trained_regions} must be regions, one class each"
            )
        object.__setattr__(self, "_label_names", {index + 1: name for index, name in enumerate(self.classes)})

    @property
    def num_classes(self) -> int:
        """Output channels of a model trained in class mode: background and every class."""
        return len(self.classes) + 1

    @property
    def region_names(self) -> tuple[str, ...]:
        """The evaluation regions, in reporting order."""
        return tuple(self.regions)

    @property
    def label_names(self) -> Mapping[int, str]:
        """Class index -> short name, background left out."""
        return self._label_names

    def num_outputs(self, region_mode: bool) -> int:
        """A model's output channels: one per trained region in region mode, else one per class."""
        return len(self.trained_regions) if region_mode else self.num_classes

    def trained_region_classes(self) -> tuple[tuple[int, ...], ...]:
        """The class indices of each trained region, in output-channel order."""
        return tuple(self.regions[name] for name in self.trained_regions)

    def compatible_with(self, other: LabelScheme) -> bool:
        """Whether a model trained on ``other`` predicts this scheme's classes from its channels."""
        return (self.channels, self.classes, dict(self.regions), self.trained_regions) == (
            other.channels,
            other.classes,
            dict(other.regions),
            other.trained_regions,
        )


# --- The schemes ----------------------------------------------------------------------------------

_GLIOMA_CHANNELS = ("flair", "t1", "t1ce", "t2")
_GLIOMA_CLASSES = ("NCR", "ED", "EN")
_GLIOMA_DESCRIPTIONS = (
    "necrotic / non-enhancing tumour core (NCR/NETC)",
    "peritumoral edema (ED; 2023: surrounding non-enhancing FLAIR hyperintensity, SNFH)",
    "enhancing tumour (ET)",
)
# Whole tumour, tumour core, enhancing tumour: the BraTS regions since 2012.
_GLIOMA_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
# nnU-Net's BraTS region training: WT paints edema, TC necrosis over it, ET enhancing over both
# (nnunetv2/dataset_conversion/Dataset137_BraTS21.py, regions_class_order).
_GLIOMA_TRAINING = {"trained_regions": ("WT", "TC", "ET"), "regions_class_order": (2, 1, 3)}
_BRATS2021_SOURCE = (
    "BraTS 2021 data as NVIDIA DeepLearningExamples nnUNet notebooks/BraTS21.ipynb and MIC-DKFZ/nnUNet "
    "nnunetv2/dataset_conversion/Dataset137_BraTS21.py describe it: labels 1 NCR, 2 ED, 4 ET; regions WT = {1, 2, 4}, "
    "TC = {1, 4}, ET = {4}"
)
_BRATS2023_SOURCE = (
    "BraTS 2023 evaluation code, rachitsaluja/BraTS-2023-Metrics eval.py (get_TissueWiseSeg, get_LesionWiseResults): "
    "labels 1 NETC, 2 SNFH, 3 ET; regions WT = {1, 2, 3}, TC = {1, 3}, ET = {3}; dilation and minimum lesion volume "
    "per sub-challenge"
)


def _glioma(name: str, title: str, dilation: int, min_volume: float, source: str) -> LabelScheme:
    """A scheme of the BraTS glioma classes (2018-2023, every 2023 sub-challenge, MSD Task01, DLE),
    scored with the 2023 definition and its own lesion parameters."""
    return LabelScheme(
        name=name,
        title=title,
        channels=_GLIOMA_CHANNELS,
        classes=_GLIOMA_CLASSES,
        class_descriptions=_GLIOMA_DESCRIPTIONS,
        regions=_GLIOMA_REGIONS,
        lesion=LesionSettings("brats2023", dilation, min_volume),
        source=source,
        **_GLIOMA_TRAINING,
    )


_BRATS2024_GLI = LabelScheme(
    name="brats2024-gli",
    title="BraTS 2024 post-treatment adult glioma, with resection cavity",
    channels=_GLIOMA_CHANNELS,
    classes=("NETC", "SNFH", "ET", "RC"),
    class_descriptions=(
        "non-enhancing tumour core",
        "surrounding non-enhancing FLAIR hyperintensity",
        "enhancing tissue",
        "resection cavity",
    ),
    # The challenge scores each label and two composites; the resection cavity is in none of them.
    regions={"ET": (3,), "NETC": (1,), "SNFH": (2,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3)},
    trained_regions=("WT", "TC", "ET", "RC"),
    regions_class_order=(2, 1, 3, 4),
    # The 2024 scorer keeps 20 mm³ until its loop reaches ET, then 10 for ET and every label after it (RC).
    lesion=LesionSettings("brats2023", 3, 20.0, {"ET": 10.0, "RC": 10.0}),
    source=(
        "BraTS 2024 post-treatment glioma evaluation code, rachitsaluja/BraTS-2024-Metrics metrics_GLI.py "
        "(get_TissueWiseSeg, get_LesionWiseResults): labels 1 NETC, 2 SNFH, 3 ET, 4 RC; regions ET, NETC, SNFH, RC, "
        "TC = {1, 3}, WT = {1, 2, 3}; dilation 3, 20 mm³, 10 mm³ from ET on. That code also merges touching "
        "lesions of different labels before matching, which the brats2023 definition does not"
    ),
)

_BRATS2024_PED = LabelScheme(
    name="brats2024-ped",
    title="BraTS 2024 pediatric tumours (PED), relabelled",
    channels=_GLIOMA_CHANNELS,
    classes=("ET", "NETC", "CC", "ED"),
    class_descriptions=("enhancing tumour", "non-enhancing tumour core", "cystic component", "peritumoral edema"),
    regions={"ET": (1,), "NETC": (2,), "CC": (3,), "ED": (4,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4)},
    # Nested: the whole tumour paints edema, the core non-enhancing tumour, then the cyst and the
    # enhancing tumour inside it.
    trained_regions=("WT", "TC", "CC", "ET"),
    regions_class_order=(4, 2, 3, 1),
    lesion=LesionSettings("brats2023", 5, 10.0),
    source=(
        "BraTS 2024 pediatric evaluation code, rachitsaluja/BraTS-2024-Metrics metrics_PED.py (get_TissueWiseSeg, "
        "get_LesionWiseResults) and the brats-evaluation package's config_ped.yaml: labels 1 ET, 2 NETC, 3 CC, 4 ED; "
        "regions ET, NETC, CC, ED, TC = {1, 2, 3}, WT = {1, 2, 3, 4}; dilation 5, 10 mm³. That code also drops "
        "predicted components of 10 voxels or less before matching, which the brats2023 definition does not"
    ),
)

_BRATS_MEN_RT = LabelScheme(
    name="brats-men-rt",
    title="BraTS 2024 meningioma radiotherapy (MEN-RT), one channel",
    channels=("t1ce",),
    classes=("GTV",),
    class_descriptions=("gross tumour volume",),
    regions={"GTV": (1,)},
    trained_regions=("GTV",),
    regions_class_order=(1,),
    lesion=LesionSettings("brats2023", 1, 50.0),
    source=(
        "BraTS 2024 meningioma radiotherapy evaluation code, rachitsaluja/BraTS-2024-Metrics metrics_MEN_RT.py, "
        "and the brats-evaluation package's config_MenRT.yaml: one T1c image per case (<case>_t1c.nii.gz), label 1 "
        "GTV (<case>_gtv.nii.gz); dilation 1, 50 mm³. That code also leaves false positives out of the lesion-wise "
        "mean, which the brats2023 definition does not"
    ),
)

#: Every scheme by name; ``data.scheme`` and ``--scheme`` choose among them ("auto" detects).
SCHEMES: dict[str, LabelScheme] = {
    scheme.name: scheme
    for scheme in (
        _glioma("brats2021", "BraTS 2018-2021 adult glioma", 3, 50.0, _BRATS2021_SOURCE),
        _glioma("brats2023-gli", "BraTS 2023 adult glioma (GLI)", 3, 50.0, _BRATS2023_SOURCE),
        _glioma("brats2023-ssa", "BraTS 2023 sub-Saharan Africa glioma (SSA)", 3, 50.0, _BRATS2023_SOURCE),
        _glioma("brats2023-ped", "BraTS 2023 pediatric tumours (PED)", 3, 50.0, _BRATS2023_SOURCE),
        _glioma("brats2023-men", "BraTS 2023 meningioma (MEN)", 1, 50.0, _BRATS2023_SOURCE),
        _glioma("brats2023-met", "BraTS 2023 brain metastases (MET)", 1, 2.0, _BRATS2023_SOURCE),
        _glioma(
            "msd",
            "Medical Segmentation Decathlon Task01 BrainTumour (BraTS 2016-2017 cases)",
            3,
            50.0,
            "Antonelli et al., The Medical Segmentation Decathlon, Nat Commun 13, 4128 (2022); Task01 "
            "dataset.json (labels 1 edema, 2 non-enhancing tumour, 3 enhancing tumour)",
        ),
        _BRATS2024_GLI,
        _BRATS2024_PED,
        _BRATS_MEN_RT,
    )
}

#: The scheme of a dataset that says nothing else: today's canonical glioma classes.
DEFAULT_SCHEME = "brats2021"


def get_scheme(name: str) -> LabelScheme:
    """The scheme called ``name``.

    Raises:
        UnknownScheme: no such scheme (the message lists the known ones).
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise UnknownScheme(f"unknown label scheme {name!r}; expected one of {', '.join(SCHEMES)}") from None


# Views of the default scheme, for code that scores only that scheme.
_DEFAULT = SCHEMES[DEFAULT_SCHEME]
#: Short names of the default scheme's classes, as the scores and pictures call them.
LABEL_NAMES: dict[int, str] = dict(_DEFAULT.label_names)
#: The default scheme's evaluation regions in class indices: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = dict(_DEFAULT.regions)
#: Order in which region channels/metrics are reported.
REGION_NAMES: tuple[str, ...] = _DEFAULT.region_names


# --- Schemes a dataset defines (nnU-Net v2's dataset.json) -----------------------------------------

#: The name of every dataset-defined scheme starts with this, then a hash of its definition.
DATASET_SCHEME_PREFIX = "nnunetv2-"
# Canonical MRI sequence -> its names in a dataset.json (lower case, without punctuation).
_SEQUENCE_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "t2flair"),
    "t1": ("t1", "t1w", "t1n"),
    "t1ce": ("t1ce", "t1gd", "t1c"),
    "t2": ("t2", "t2w"),
}
# What a dataset-defined scheme scores lesions with: BraTS glioma's 2023 settings (a dataset.json
# says nothing of it; eval.lesion_* override them).
_DATASET_LESION = LesionSettings("brats2023", 3, 50.0)
# Label maps are uint8, and 255 marks a value outside a convention while reading.
_MAX_LABELS = 254


def name_key(name: object) -> str:
    """A name as dataset.json names are compared: lower case, letters and digits only."""
    return "".join(c for c in str(name).lower() if c.isalnum())


def canonical_sequence(name: object) -> str | None:
    """The canonical name (``flair``, ``t1``, ``t1ce``, ``t2``) of an MRI sequence a dataset.json
    names in any usual way (``T2f``, ``t1-gd``, ...), or None for another channel."""
    return next((c for c, aliases in _SEQUENCE_ALIASES.items() if name_key(name) in aliases), None)


def _short_name(name: str) -> str:
    """A label or region name as a score key: its words joined by "_" (``whole tumor`` -> ``whole_tumor``)."""
    words = "".join(c if c.isalnum() else " " for c in name).split()
    return "_".join(words)


def _channels(channel_names: object) -> tuple[str, ...]:
    """The channels of ``channel_names`` ({"0": name, ...}) in key order, each MRI sequence by its
    canonical name (``t1c`` -> ``t1ce``) and any other channel by its own name."""
    if not isinstance(channel_names, dict) or not channel_names:
        raise SchemeDefinitionError('no channel_names object, e.g. {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}')
    keys = sorted(channel_names, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        raise SchemeDefinitionError(
            f"channel_names keys {json.dumps(sorted(map(str, channel_names)))} are not 0 to {len(keys) - 1}"
        )
    channels = []
    for key in keys:
        name = str(channel_names[key])
        channels.append(canonical_sequence(name) or _short_name(name).lower())
    if len(set(channels)) != len(channels) or not all(channels):
        raise SchemeDefinitionError(f"channel_names {json.dumps(channel_names)} name a channel twice, or not at all")
    return tuple(channels)


def _labels_and_regions(labels: object, order: object) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]], tuple]:
    """(class names, regions, (trained regions, regions_class_order)) of a dataset.json ``labels``."""
    example = '{"background": 0, "edema": 1, "necrosis": 2, "enhancing tumor": 3}'
    if not isinstance(labels, dict) or labels.get("background") != 0 or type(labels.get("background")) is not int:
        raise SchemeDefinitionError(f'labels must be an object with "background": 0, e.g. {example}')
    if "ignore" in labels:
        raise SchemeDefinitionError('labels has an "ignore" label, which unet-trainer does not train with')
    entries = {name: value for name, value in labels.items() if name != "background"}
    regions_given = any(isinstance(v, list) for v in entries.values()) or order is not None
    values: dict[str, tuple[int, ...]] = {}
    for name, value in entries.items():
        members = tuple(value) if isinstance(value, list) else (value,)
        if not members or not all(type(v) is int and v > 0 for v in members):
            raise SchemeDefinitionError(
                f"label {json.dumps(name)}: {json.dumps(value)} is not a positive label value or list of them"
            )
        values[name] = members
    present = sorted({v for members in values.values() for v in members})
    if not present or present != list(range(1, len(present) + 1)):
        raise SchemeDefinitionError(f"labels: values {present} are not consecutive from 1, as nnU-Net requires")
    if len(present) > _MAX_LABELS:
        raise SchemeDefinitionError(f"labels: {len(present)} label values; at most {_MAX_LABELS} (uint8 label maps)")
    short = {name: _short_name(name) for name in values}
    if len(set(short.values())) != len(short) or not all(short.values()):
        raise SchemeDefinitionError(f"label names {list(values)} do not give distinct names")
    if not regions_given:
        if len(set(values.values())) != len(values):
            raise SchemeDefinitionError(f"labels {json.dumps(labels)} give one value two names")
        by_value = sorted(values.items(), key=lambda item: item[1])
        classes = tuple(short[name] for name, _ in by_value)
        regions = {short[name]: members for name, members in by_value}
        return classes, regions, (tuple(regions), tuple(m[0] for m in regions.values()))
    if not isinstance(order, list) or len(order) != len(values) or not all(type(v) is int for v in order):
        raise SchemeDefinitionError(
            f"regions {list(values)} need a regions_class_order, one label value per region, e.g. [1, 2, 3]"
        )
    if not all(v in values[name] for v, name in zip(order, values)):
        raise SchemeDefinitionError(f"regions_class_order {order}: each region must paint one of its own labels")
    classes = tuple(f"L{v}" for v in present)
    regions = {short[name]: tuple(sorted(members)) for name, members in values.items()}
    return classes, regions, (tuple(regions), tuple(order))


def scheme_from_dataset_json(content: Mapping, title: str = "") -> LabelScheme:
    """The label scheme an nnU-Net v2 ``dataset.json`` defines.

    Channels: ``channel_names`` in key order (MRI sequences by their canonical names). Labels,
    nnU-Net's two forms: by name (``{"background": 0, "edema": 1, ...}``: a class and a region per
    label, the region trained per label) or as regions (lists of label values, with
    ``regions_class_order``: the regions are evaluated and trained as given, the classes are the
    label values, named ``L1``, ``L2``, ...). Lesion-wise settings: BraTS glioma's (brats2023, 3,
    50 mm³). The name is ``nnunetv2-`` and a hash of the definition, so equal definitions are one scheme.

    Args:
        content: the parsed dataset.json (only ``channel_names``, ``labels``,
            ``regions_class_order`` and ``name`` are read).
        title: what to call the family when dataset.json has no ``name``.

    Raises:
        SchemeDefinitionError: no channel_names, labels not consecutive from 1 or without a
            background of 0, regions without a regions_class_order, an ignore label (one line).
    """
    definition = {
        "name": str(content.get("name") or title or "nnU-Net v2 dataset"),
        "channel_names": content.get("channel_names"),
        "labels": content.get("labels"),
    }
    if content.get("regions_class_order") is not None:
        definition["regions_class_order"] = content.get("regions_class_order")
    return scheme_from_definition(json.dumps(definition))


def scheme_from_definition(text: str) -> LabelScheme:
    """The scheme a :attr:`LabelScheme.definition` text describes (see :func:`scheme_from_dataset_json`).

    Raises:
        SchemeDefinitionError: text that is no such definition.
    """
    try:
        definition = json.loads(text)
    except ValueError:
        raise SchemeDefinitionError("a scheme definition must be JSON text") from None
    if not isinstance(definition, dict):
        raise SchemeDefinitionError("a scheme definition must be a JSON object")
    channels = _channels(definition.get("channel_names"))
    classes, regions, (trained, order) = _labels_and_regions(
        definition.get("labels"), definition.get("regions_class_order")
    )
    text = json.dumps(definition)
    return LabelScheme(
        name=DATASET_SCHEME_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:8],
        title=str(definition.get("name", "nnU-Net v2 dataset")),
        channels=channels,
        classes=classes,
        class_descriptions=tuple(f"label {i}" for i in range(1, len(classes) + 1)),
        regions=regions,
        trained_regions=trained,
        regions_class_order=order,
        lesion=_DATASET_LESION,
        source="its nnU-Net v2 dataset.json: channel_names, labels and regions_class_order",
        definition=text,
    )


def register_scheme(scheme: LabelScheme) -> LabelScheme:
    """Add a dataset-defined scheme to :data:`SCHEMES` (once; again is a no-op), so that everything
    that looks a scheme up by name finds it. Returns the registered scheme.

    Raises:
        SchemeDefinitionError: another scheme already holds the name.
    """
    known = SCHEMES.get(scheme.name)
    if known is not None and known != scheme:
        raise SchemeDefinitionError(f"label scheme {scheme.name} is already another scheme")
    return SCHEMES.setdefault(scheme.name, scheme)
