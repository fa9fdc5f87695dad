"""The evaluator's per-case metrics, by name: :data:`METRICS`, which ``eval.metrics`` chooses from.

A metric is one :class:`CaseMetric` subclass and one line in :data:`METRICS`. The evaluator calls
each chosen metric on every case's canonical label maps and puts the keys it returns into the
case's row (the per-case CSV) and their means into its record (``group/name`` keys: the logs, the
``progress.png`` panels and the ``unet-cv`` summary follow). ``unet-eval`` prints one column per
key group, as the metric's :attr:`CaseMetric.columns` describe it (a plain column otherwise).

A metric's settings are its constructor's keyword arguments, filled by name by
:func:`make_metrics` from the settings the builder hands it (the ``eval`` section of the config,
and ``lesion``, the grouped :class:`~unet_trainer.evaluation.lesion_metrics.LesionSettings`, and
``scheme``, the data's :class:`~unet_trainer.data.schemes.LabelScheme`, whose classes and regions
every metric scores).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from .lesion_metrics import LesionSettings, case_lesion_scores, case_region_hd95
from .metrics import case_dice


@dataclass(frozen=True)
class Column:
    """How ``unet-eval`` prints one group of keys: right-aligned in ``width`` characters with
    ``digits`` decimals, optionally followed by a ``cases`` column (how many cases entered each mean).

    ``group`` is the key prefix (``hd95`` for ``hd95/WT``); "" for the plain Dice keys (``WT``).
    """

    group: str
    title: str
    digits: int = 4
    width: int = 10
    counts: bool = True


class CaseMetric:
    """One metric of a case: ``metric(prediction, truth, spacing) -> {key: value}``.

    Subclasses set :attr:`columns` (how ``unet-eval`` prints their key groups) and :attr:`note`
    (a line above the table saying what the numbers mean), both optional.
    """

    columns: ClassVar[tuple[Column, ...]] = ()
    note: ClassVar[str] = ""

    def __call__(
        self, prediction: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float] | None
    ) -> dict[str, float]:
        """Scores of one case.

        Args:
            prediction, truth: class-index maps (*S) uint8 of the metric's scheme, on the evaluator's device.
            spacing: the prepared voxel size per axis of S in mm (None when unknown).

        Returns:
            {key: float}: keys ``group/name`` (NaN is left out of the means).
        """
        raise NotImplementedError


class Dice(CaseMetric):
    """Dice per class and region of the scheme and their region mean (:func:`metrics.case_dice`):
    keys the class short names, the region names and mean (glioma: NCR, ED, EN, WT, TC, ET, mean),
    reported as ``dice/<key>``."""

    columns = (Column("", "Dice", digits=4, width=8),)

    def __init__(self, empty_policy: str, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]) -> None:
        self.empty_policy, self.scheme = empty_policy, scheme

    def __call__(self, prediction, truth, spacing):
        return case_dice(prediction, truth, self.empty_policy, self.scheme)


class HD95(CaseMetric):
    """95th-percentile Hausdorff distance per region of the scheme in mm, as the lesion settings'
    definition computes it (:func:`lesion_metrics.case_region_hd95`): ``hd95/<region>`` (NaN only
    where the panoptica definition finds the region empty on both sides)."""

    columns = (Column("hd95", "HD95 mm", digits=2, width=10),)
    note = "HD95: 95th-percentile Hausdorff distance of each region, as the metric definition below computes it"

    def __init__(self, lesion: LesionSettings, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]) -> None:
        self.lesion, self.scheme = lesion, scheme

    def __call__(self, prediction, truth, spacing):
        lesion = self.lesion
        return case_region_hd95(
            prediction, truth, spacing, lesion.hd95_penalty, lesion.backend, lesion.definition, self.scheme
        )


class LesionWise(CaseMetric):
    """Lesion-wise Dice and HD95 per region of the scheme, as the lesion settings' definition
    computes them (:func:`lesion_metrics.case_lesion_scores`): ``lesion_dice/<region>``,
    ``lesion_hd95/<region>`` in mm (NaN only where the panoptica definition finds no lesion on
    either side)."""

    columns = (
        Column("lesion_dice", "LW Dice", digits=4, width=9),
        Column("lesion_hd95", "LW HD95", digits=2, width=9),
    )
    note = "Lesion-wise: each region's lesions scored as the metric definition below says, averaged over cases"

    def __init__(self, lesion: LesionSettings, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]) -> None:
        self.lesion, self.scheme = lesion, scheme

    def __call__(self, prediction, truth, spacing):
        # LesionSettings' fields are case_lesion_scores' keyword arguments, by name.
        return case_lesion_scores(prediction, truth, spacing, **dataclasses.asdict(self.lesion), scheme=self.scheme)


#: The metrics ``eval.metrics`` may name, in the order of their columns when switched on by flag.
METRICS: dict[str, type[CaseMetric]] = {
    "dice": Dice,
    "hd95": HD95,
    "lesion_wise": LesionWise,
}
#: What the evaluator computes unless the config says otherwise.
DEFAULT_METRICS: tuple[str, ...] = ("dice",)


class UnknownMetric(ValueError):
    """A metric name that :data:`METRICS` does not hold (one line naming the known ones)."""


def metric_names(names: Sequence[str], hd95: bool = False, lesion_wise: bool = False) -> tuple[str, ...]:
    """The metrics to compute: ``names`` in order (repeats dropped), then ``hd95`` and
    ``lesion_wise`` when their flags (``eval.hd95``, ``eval.lesion_wise``) ask for them and the
    list does not already name them."""
    flagged = [name for name, on in (("hd95", hd95), ("lesion_wise", lesion_wise)) if on]
    return tuple(dict.fromkeys([*names, *flagged]))


def make_metrics(names: Sequence[str], settings: Mapping[str, Any]) -> list[CaseMetric]:
    """The named metrics, each built with the constructor arguments ``settings`` holds by name.

    Raises:
        UnknownMetric: a name that is not in :data:`METRICS`.
    """
    metrics = []
    for name in names:
        if name not in METRICS:
            raise UnknownMetric(f"unknown metric {name!r}; the metrics are {', '.join(METRICS)}")
        kind = METRICS[name]
        wanted = inspect.signature(kind).parameters
        metrics.append(kind(**{key: settings[key] for key in wanted if key in settings}))
    return metrics


def table_column(group: str) -> Column:
    """How ``unet-eval`` prints a key group: as its metric's :attr:`CaseMetric.columns` say, else a
    plain column titled by the group."""
    for kind in METRICS.values():
        for column in kind.columns:
            if column.group == group:
                return column
    return Column(group, group, width=max(10, len(group) + 2))


def table_rows(scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]) -> tuple[str, ...]:
    """The row keys of ``unet-eval``'s table for ``scheme``: its regions in reporting order, "mean",
    then the classes that are not also a region (a region of one class already has their row);
    glioma: WT, TC, ET, mean, NCR, ED, EN."""
    classes = [name for name in scheme.classes if name not in scheme.regions]
    return (*scheme.regions, "mean", *classes)


def table_notes(groups: Sequence[str]) -> list[str]:
    """The notes of the metrics whose columns are among ``groups``, in the order of the groups."""
    notes: list[str] = []
    for group in groups:
        for kind in METRICS.values():
            if kind.note and kind.note not in notes and any(c.group == group for c in kind.columns):
                notes.append(kind.note)
    return notes
