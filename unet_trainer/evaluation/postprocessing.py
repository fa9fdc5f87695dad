"""Postprocessing chosen on validation, as nnU-Net's ``determine_postprocessing`` chooses it.

Rules act on class-index maps (Z, Y, X) of a label scheme (:class:`unet_trainer.data.schemes.LabelScheme`;
glioma: 0 background, 1 NCR, 2 ED, 3 ET, regions WT, TC, ET), components 26-connected:

* ``largest_component`` (``region``): keep only the region's largest connected component;
* ``remove_small_components`` (``region``, ``min_voxels``): remove the region's components of fewer
  than ``min_voxels`` voxels;
* ``enhancing_to_necrosis`` (``max_voxels``): relabel the ET region as the class enclosing it
  (necrosis) in a case whose ET volume is below ``max_voxels`` voxels (DLE's rule for BraTS 2021);
  only for schemes with an ET region inside a larger one (every BraTS glioma scheme).

A removed voxel takes the class of the region enclosing its own (:func:`removal_class`: the regions
nest, ET in TC in WT): a WT voxel becomes background, a TC voxel oedema, an ET voxel necrosis. So
removing small ET specks leaves the tumour core whole, and the largest WT component with nothing
outside it. A region no other one encloses (WT; BraTS 2024's resection cavity RC) becomes
background, and so does one whose enclosing region adds several classes (BraTS 2024's SNFH).

Selection (:func:`choose_postprocessing`): on a run's validation predictions, the stages of
:func:`candidate_stages` are tried in a fixed order, each on top of the rules already kept: the
largest component of the widest region (WT); small components of each region of the scheme, each
region's threshold searched on a grid; ET to necrosis, its threshold searched on a grid. A stage's
best candidate is kept only if it raises the chosen metric (mean over cases): "lesion" (the
default), the BraTS 2023 lesion-wise Dice averaged over the scheme's regions; or "dice", the
plain mean Dice of the regions.

The choice is written as ``postprocessing.json`` in the run folder (:func:`write_postprocessing`):
every stage's scores before and after (and per grid value), the kept rules, the metric, the
checkpoint. Reading one (:func:`load_postprocessing`) validates it as data: known rule names,
their parameters and nothing else, each problem one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..core.checkpoints import checkpoint_run_folder
from ..core.documents import DocumentError, load_json_text, read_utf8
from ..core.fileio import atomic_write_text, os_error_line
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from .lesion_metrics import (
    DEFAULT_DILATION_ITERATIONS,
    DEFAULT_LESION_DEFINITION,
    DEFAULT_MIN_LESION_VOLUME,
    case_lesion_scores,
)
from .metrics import case_dice
from .prediction_store import DEFAULT_MEMORY_BYTES, PredictionStore

__all__ = ["DEFAULT_MEMORY_BYTES", "PredictionStore"]  # re-exported: unet-eval and unet-cv keep them here

POSTPROCESSING_FILE = "postprocessing.json"
FILE_FORMAT = "unet-trainer postprocessing"
FILE_VERSION = 1

#: metric name -> what it is, in words (each averaged over the scheme's regions, then over cases).
METRICS: dict[str, str] = {"lesion": "lesion-wise Dice (BraTS 2023)", "dice": "plain Dice"}
DEFAULT_METRIC = "lesion"

#: The threshold grids, in voxels of the prepared grid.
SMALL_COMPONENT_GRID: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000)
ENHANCING_VOLUME_GRID: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000)

_DEFAULT = SCHEMES[DEFAULT_SCHEME]
_COMPONENTS_26 = ndimage.generate_binary_structure(3, 3)


class PostprocessingError(ValueError):
    """A postprocessing file or setting that cannot be used; one line naming the file and key."""


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------


def removal_class(scheme: LabelScheme, region: str) -> int:
    """The class a removed voxel of ``region`` takes: the one class that the smallest region
    strictly enclosing it (the first in reporting order of equal size) adds to it; background (0)
    when no region encloses it or the enclosing one adds several classes. Glioma: WT 0, TC 2 (ED),
    ET 1 (NCR)."""
    members = set(scheme.regions[region])
    enclosing = [set(classes) for classes in scheme.regions.values() if members < set(classes)]
    if not enclosing:
        return 0
    added = min(enclosing, key=len) - members
    return added.pop() if len(added) == 1 else 0


def _components(labels: np.ndarray, region: str, scheme: LabelScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(region mask, component ids (Z, Y, X), voxel count per id with id 0 = background)."""
    mask = np.isin(labels, scheme.regions[region])
    ids, count = ndimage.label(mask, structure=_COMPONENTS_26)
    return mask, ids, np.bincount(ids.ravel(), minlength=count + 1)


def keep_largest_component(labels: np.ndarray, region: str, scheme: LabelScheme = _DEFAULT) -> np.ndarray:
    """Only the largest connected component of ``region`` stays (the first in raster order on a
    tie); the region's other voxels take the enclosing region's class (:func:`removal_class`).
    Returns a new uint8 map, or ``labels`` itself when nothing changes."""
    mask, ids, sizes = _components(labels, region, scheme)
    if len(sizes) <= 2:  # no component or one
        return labels
    largest = int(np.argmax(sizes[1:])) + 1
    out = labels.copy()
    out[mask & (ids != largest)] = removal_class(scheme, region)
    return out


def remove_small_components(
    labels: np.ndarray, region: str, min_voxels: int, scheme: LabelScheme = _DEFAULT
) -> np.ndarray:
    """Components of ``region`` with fewer than ``min_voxels`` voxels take the enclosing region's
    class (:func:`removal_class`). Returns a new uint8 map, or ``labels`` itself when nothing changes."""
    mask, ids, sizes = _components(labels, region, scheme)
    small = sizes < min_voxels
    small[0] = False
    if not small.any():
        return labels
    out = labels.copy()
    out[small[ids]] = removal_class(scheme, region)
    return out


def _without_enhancing(scheme: LabelScheme) -> str | None:
    """Why ``enhancing_to_necrosis`` does not apply to ``scheme`` (None when it does)."""
    if "ET" in scheme.regions and removal_class(scheme, "ET"):
        return None
    return f"scheme {scheme.name} has no ET region inside a larger one (its regions: {', '.join(scheme.regions)})"


def enhancing_to_necrosis(labels: np.ndarray, max_voxels: int, scheme: LabelScheme = _DEFAULT) -> np.ndarray:
    """The ET region becomes the class enclosing it (necrosis; :func:`removal_class`) when the case
    holds fewer than ``max_voxels`` ET voxels (and at least one). Returns a new uint8 map, or
    ``labels`` itself when nothing changes.

    Raises:
        PostprocessingError: a scheme without an ET region inside a larger one.
    """
    refusal = _without_enhancing(scheme)
    if refusal is not None:
        raise PostprocessingError(f"rule enhancing_to_necrosis: {refusal}")
    enhancing = np.isin(labels, scheme.regions["ET"])
    volume = int(enhancing.sum())
    if volume == 0 or volume >= max_voxels:
        return labels
    out = labels.copy()
    out[enhancing] = removal_class(scheme, "ET")
    return out


def _region(value: Any, scheme: LabelScheme) -> str | None:
    return None if isinstance(value, str) and value in scheme.regions else f"one of {', '.join(scheme.regions)}"


def _positive_int(value: Any, scheme: LabelScheme) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else "an integer of at least 1"


@dataclass(frozen=True)
class RuleSpec:
    """A rule: its function ``apply(labels, **params, scheme=scheme)``, each parameter's check
    ``check(value, scheme)`` (None when the value is fine, else what was expected), its description
    in words, and why a scheme cannot take it (``refusal(scheme)``, None when it can)."""

    apply: Callable[..., np.ndarray]
    params: Mapping[str, Callable[[Any, LabelScheme], str | None]]
    describe: Callable[[Mapping[str, Any]], str]
    refusal: Callable[[LabelScheme], str | None] = lambda scheme: None


RULES: dict[str, RuleSpec] = {
    "largest_component": RuleSpec(
        keep_largest_component, {"region": _region}, lambda p: f"keep the largest {p['region']} component"
    ),
    "remove_small_components": RuleSpec(
        remove_small_components,
        {"region": _region, "min_voxels": _positive_int},
        lambda p: f"remove {p['region']} components < {p['min_voxels']} voxels",
    ),
    "enhancing_to_necrosis": RuleSpec(
        enhancing_to_necrosis,
        {"max_voxels": _positive_int},
        lambda p: f"ET -> NCR when ET < {p['max_voxels']} voxels",
        _without_enhancing,
    ),
}


def describe_rule(rule: Mapping[str, Any]) -> str:
    """A rule ({"rule": name, params...}) in words, e.g. ``remove WT components < 50 voxels``."""
    return RULES[rule["rule"]].describe(rule)


def apply_rules(labels: np.ndarray, rules: Sequence[Mapping[str, Any]], scheme: LabelScheme = _DEFAULT) -> np.ndarray:
    """Apply rules ({"rule": name, params...}, checked against ``scheme``) in order to a class-index
    map (Z, Y, X) of ``scheme``.

    Returns a uint8 map (``labels`` itself when no rule changes anything; never modified in place).
    """
    out = labels
    for rule in rules:
        spec = RULES[rule["rule"]]
        out = spec.apply(out, **{name: rule[name] for name in spec.params}, scheme=scheme)
    return out


def candidate_stages(
    small_grid: Sequence[int] = SMALL_COMPONENT_GRID,
    enhancing_grid: Sequence[int] = ENHANCING_VOLUME_GRID,
    scheme: LabelScheme = _DEFAULT,
) -> list[list[dict]]:
    """The selection's stages in their fixed order, each a list of candidate rules of which the
    best is kept if it helps: the largest component of the scheme's widest region (most classes,
    the first of equal width: WT); small components of each region in reporting order (a stage per
    region, a candidate per grid value); ET to necrosis where the scheme takes it (a candidate per
    grid value)."""
    widest = max(scheme.regions, key=lambda region: len(scheme.regions[region]))
    stages = [[{"rule": "largest_component", "region": widest}]]
    for region in scheme.regions:
        stages.append([{"rule": "remove_small_components", "region": region, "min_voxels": n} for n in small_grid])
    if _without_enhancing(scheme) is None:
        stages.append([{"rule": "enhancing_to_necrosis", "max_voxels": t} for t in enhancing_grid])
    return stages


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSettings:
    """How a case is scored: ``metric`` (a key of :data:`METRICS`), the lesion-wise settings (see
    :mod:`unet_trainer.evaluation.lesion_metrics`), the plain Dice's empty-ground-truth policy, and
    the label scheme whose regions are scored (and which the rules speak)."""

    metric: str = DEFAULT_METRIC
    lesion_dilation: int = DEFAULT_DILATION_ITERATIONS
    lesion_min_volume: float = DEFAULT_MIN_LESION_VOLUME
    empty_policy: str = "one_if_both_empty"
    scheme: LabelScheme = _DEFAULT
    lesion_region_min_volume: Mapping[str, float] = field(default_factory=dict)  # regions with their own threshold
    lesion_definition: str = DEFAULT_LESION_DEFINITION

    def score(self, prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
        """The case's score (higher is better; NaN only for plain Dice with ``ignore`` and no
        region in the truth); lesion sizes in mm³ at the voxel ``spacing`` (z, y, x) mm, 1 mm if None."""
        if self.metric == "dice":
            import torch

            return case_dice(torch.from_numpy(prediction), torch.from_numpy(truth), self.empty_policy, self.scheme)[
                "mean"
            ]
        scores = case_lesion_scores(
            prediction,
            truth,
            spacing,
            dilation_iterations=self.lesion_dilation,
            min_lesion_volume=self.lesion_min_volume,
            backend="scipy",
            distances=False,  # the Dice alone decides: skip the surface distances
            definition=self.lesion_definition,
            scheme=self.scheme,
            region_min_volume=self.lesion_region_min_volume,
        )
        # A region without lesions on either side scores NaN under panoptica: left out, as the challenge does.
        return _mean(scores[f"lesion_dice/{r}"] for r in self.scheme.regions)


def check_metric(metric: str) -> str:
    """``metric`` if it is a key of :data:`METRICS`. Raises PostprocessingError (one line) otherwise."""
    if metric not in METRICS:
        raise PostprocessingError(f"unknown postprocessing metric {metric!r}; expected {' or '.join(METRICS)}")
    return metric


def _foreground_box(truth: np.ndarray, prediction: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The box of both maps' tumour voxels grown by ``margin`` (the whole volume when both are empty)."""
    foreground = (truth > 0) | (prediction > 0)
    box = []
    for axis in range(foreground.ndim):
        hits = np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != axis)))
        low, high = (int(hits[0]), int(hits[-1]) + 1) if len(hits) else (0, foreground.shape[axis])
        box.append(slice(max(low - margin, 0), min(high + margin, foreground.shape[axis])))
    return tuple(box)


def _mean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


@dataclass
class PostprocessingChoice:
    """What :func:`choose_postprocessing` found.

    Attributes:
        metric: the metric's name; cases: how many cases it was chosen on.
        score_before, score_after: the mean metric without postprocessing and with the kept rules.
        stages: per stage {"rule", fixed params, "before", "after", "kept", "changed_cases"} for
            its best candidate, plus, for a grid, the best threshold (e.g. "min_voxels") and
            "grid": every candidate's {threshold: value, "score", "changed_cases"}.
        kept: the kept rules in order, as {"rule": name, params...}.
        regions: the regions the metric averages (the scheme's).
    """

    metric: str
    cases: int
    score_before: float
    score_after: float
    stages: list[dict] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)
    regions: tuple[str, ...] = _DEFAULT.region_names


def choose_postprocessing(
    store: PredictionStore,
    settings: MetricSettings | None = None,
    stages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
) -> PostprocessingChoice:
    """Choose the rules that raise the mean metric over the store's cases (see the module docstring).

    Each stage is evaluated on top of the rules already kept; its best candidate (the first of
    equal scores: grids run from the mildest value) is kept only if it beats the current mean.
    Only cases a candidate changes are scored again. The store's predictions end postprocessed
    with the kept rules.

    Args:
        store: the truths and predictions (at least one case).
        settings: the metric (default: :class:`MetricSettings`'s defaults).
        stages: candidate stages (default :func:`candidate_stages` of the settings' scheme).

    Raises:
        PostprocessingError: an empty store or an unknown metric.
    """
    settings = MetricSettings() if settings is None else settings
    check_metric(settings.metric)
    case_ids = store.case_ids
    if not case_ids:
        raise PostprocessingError("no predictions to choose postprocessing on")
    scheme = settings.scheme
    stages = candidate_stages(scheme=scheme) if stages is None else stages
    # The rules only ever shrink the foreground and the metrics look no further than the
    # dilation beyond it, so each case is scored on the box of its foreground (a few percent of a
    # brain volume) grown by the dilation, as the lesion-wise metric crops anyway.
    boxes, current = {}, {}
    for case_id in case_ids:
        truth, prediction = store.get(case_id)
        boxes[case_id] = _foreground_box(truth, prediction, settings.lesion_dilation + 1)
        current[case_id] = settings.score(prediction[boxes[case_id]], truth[boxes[case_id]], store.spacing(case_id))
    choice = PostprocessingChoice(
        settings.metric, len(case_ids), _mean(current.values()), math.nan, regions=scheme.region_names
    )
    for stage in stages:
        stage = [dict(candidate) for candidate in stage]
        scores: list[dict[str, float]] = [{} for _ in stage]
        changed = [0] * len(stage)
        for case_id in case_ids:
            truth, prediction = (labels[boxes[case_id]] for labels in store.get(case_id))
            # Consecutive grid values often give the same labels: score a map once.
            last_labels, last_score = prediction, current[case_id]
            for index, candidate in enumerate(stage):
                labels = apply_rules(prediction, [candidate], scheme)
                if labels is not prediction and not np.array_equal(labels, prediction):
                    changed[index] += 1
                if labels is not last_labels and not np.array_equal(labels, last_labels):
                    last_labels, last_score = labels, settings.score(labels, truth, store.spacing(case_id))
                scores[index][case_id] = last_score
        means = [_mean(s.values()) for s in scores]
        best = max(range(len(stage)), key=lambda i: (means[i], -i))  # the first of the best
        before = _mean(current.values())
        kept = means[best] > before
        spec = RULES[stage[best]["rule"]]
        record = {"rule": stage[best]["rule"]}
        varying = [name for name in spec.params if len({c[name] for c in stage}) > 1]
        record.update({name: stage[best][name] for name in spec.params if name not in varying})
        record.update(before=before, after=means[best], kept=kept, changed_cases=changed[best])
        if varying:
            record.update({name: stage[best][name] for name in varying})
            record["grid"] = [
                {**{name: c[name] for name in varying}, "score": means[i], "changed_cases": changed[i]}
                for i, c in enumerate(stage)
            ]
        choice.stages.append(record)
        if kept:
            choice.kept.append(stage[best])
            current = scores[best]
            for case_id in case_ids:
                store.set_prediction(case_id, apply_rules(store.get(case_id)[1], [stage[best]], scheme))
    choice.score_after = _mean(current.values())
    return choice


# --------------------------------------------------------------------------------------------
# postprocessing.json
# --------------------------------------------------------------------------------------------


def _listed(names: Sequence[str]) -> str:
    """``WT, TC and ET``."""
    *first, last = names
    return f"{', '.join(first)} and {last}" if first else last


def write_postprocessing(
    path: Path, choice: PostprocessingChoice, checkpoint: Path, chosen_on: str, settings: MetricSettings
) -> Path:
    """Write the choice as JSON, atomically (a reader never sees half a file). Returns ``path``."""
    document = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "metric": choice.metric,
        "metric_description": f"{METRICS[choice.metric]}, mean over {_listed(choice.regions)}, then over cases",
        "scheme": settings.scheme.name,
        "settings": {
            "lesion_dilation": settings.lesion_dilation,
            "lesion_min_volume": settings.lesion_min_volume,
            "lesion_definition": settings.lesion_definition,
            "empty_policy": settings.empty_policy,
        },
        "checkpoint": str(checkpoint),
        "chosen_on": chosen_on,
        "cases": choice.cases,
        "score_before": choice.score_before,
        "score_after": choice.score_after,
        "stages": choice.stages,
        "kept": choice.kept,
    }
    atomic_write_text(Path(path), json.dumps(document, indent=1) + "\n")
    return Path(path)


@dataclass(frozen=True)
class Postprocessing:
    """Rules read from a postprocessing file, ready to apply.

    Attributes:
        path: the file; rules: the kept rules in order ({"rule": name, params...}, checked);
        checkpoint: the checkpoint they were chosen on, as the file says ("" if it does not);
        scheme: the label scheme the rules were checked against and act in.
    """

    path: Path
    rules: tuple[dict, ...]
    checkpoint: str = ""
    scheme: LabelScheme = _DEFAULT

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """Postprocess a class-index map (Z, Y, X) uint8 of the scheme; never in place."""
        return apply_rules(labels, self.rules, self.scheme)

    def describe(self) -> str:
        """The rules in words, ``none`` when the file keeps none."""
        return "; ".join(describe_rule(r) for r in self.rules) or "none (no rule helped on validation)"


def _check_rule(path: Path, index: int, rule: Any, scheme: LabelScheme) -> dict:
    where = f"{path}: kept[{index}]"
    if not isinstance(rule, dict) or "rule" not in rule:
        raise PostprocessingError(f'{where} must be an object with a "rule", got {json.dumps(rule)[:60]}')
    name = rule["rule"]
    if not isinstance(name, str) or name not in RULES:
        raise PostprocessingError(f"{where}.rule {name!r} is not one of {', '.join(RULES)}")
    spec = RULES[name]
    unknown = sorted(set(rule) - {"rule", *spec.params})
    if unknown:
        raise PostprocessingError(f"{where}: unknown key(s) {', '.join(unknown)} for rule {name}")
    for key, check in spec.params.items():
        if key not in rule:
            raise PostprocessingError(f"{where}.{key} is missing (rule {name} takes {', '.join(spec.params)})")
        expected = check(rule[key], scheme)
        if expected is not None:
            raise PostprocessingError(f"{where}.{key}: expected {expected}, got {json.dumps(rule[key])[:60]}")
    refusal = spec.refusal(scheme)
    if refusal is not None:
        raise PostprocessingError(f"{where}: rule {name} does not apply: {refusal}")
    return {"rule": name, **{key: rule[key] for key in spec.params}}


def load_postprocessing(path: Path, scheme: LabelScheme | None = None) -> Postprocessing:
    """Read and check a postprocessing file (of :func:`write_postprocessing`, or anyone's) against
    the label scheme its rules are to act in: ``scheme``, else the one the file records, else the
    default scheme.

    Raises:
        PostprocessingError: unreadable, not JSON, not such a file, another version, a recorded scheme
            that is unknown or has other classes than ``scheme``, or a kept rule with an unknown name,
            a missing, unknown or ill-typed parameter, a region that is not the scheme's or a rule the
            scheme cannot take; one line.
    """
    path = Path(path)
    try:
        document = load_json_text(read_utf8(path))
    except OSError as exc:
        raise PostprocessingError(f"{os_error_line(exc, path)}; cannot read the postprocessing file") from None
    except DocumentError as exc:
        raise PostprocessingError(f"{path}: {exc}; expected a postprocessing file") from None
    except json.JSONDecodeError as exc:
        raise PostprocessingError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise PostprocessingError(
            f'{path}: not a postprocessing file (expected an object with "format": "{FILE_FORMAT}", '
            "as unet-eval --choose-postprocessing writes)"
        )
    if document.get("version") != FILE_VERSION:
        raise PostprocessingError(f"{path}: version {document.get('version')!r} is not supported (expected 1)")
    kept = document.get("kept")
    if not isinstance(kept, list):
        raise PostprocessingError(f'{path}: "kept" must be a list of rules, got {json.dumps(kept)[:60]}')
    recorded = document.get("scheme", _DEFAULT.name)
    if recorded not in SCHEMES:
        raise PostprocessingError(f"{path}: unknown label scheme {json.dumps(recorded)[:40]}")
    if scheme is not None and not SCHEMES[recorded].compatible_with(scheme):
        raise PostprocessingError(f"{path}: its rules were chosen for label scheme {recorded}, not {scheme.name}")
    checkpoint = document.get("checkpoint", "")
    checkpoint = checkpoint if isinstance(checkpoint, str) else ""
    return postprocessing_from_rules(path, kept, checkpoint, scheme or SCHEMES[recorded])


def postprocessing_from_rules(
    path: Path, rules: Any, checkpoint: str = "", scheme: LabelScheme = _DEFAULT
) -> Postprocessing:
    """Rules kept elsewhere (e.g. an exported model's ``model.json``), checked as a file's ``kept`` list.

    Raises:
        PostprocessingError: not a list, or a rule as :func:`load_postprocessing` refuses it (naming ``path``).
    """
    if not isinstance(rules, list):
        raise PostprocessingError(f"{path}: the postprocessing rules must be a list, got {json.dumps(rules)[:60]}")
    checked = tuple(_check_rule(Path(path), i, rule, scheme) for i, rule in enumerate(rules))
    return Postprocessing(Path(path), checked, checkpoint, scheme)


def format_choice(choice: PostprocessingChoice, path: Path | None = None) -> str:
    """The choice as one table: a row per stage (its best candidate) with the scores before and
    after, how many cases it changed and whether it was kept, then the totals and the file."""
    lines = [
        f"Postprocessing chosen on {choice.cases} case(s), metric: {METRICS[choice.metric]}, "
        f"mean over {', '.join(choice.regions)}",
        "",
        f"{'rule':<44}{'before':>9}{'after':>9}{'changed':>9}  kept",
    ]
    for stage in choice.stages:
        rule = {k: v for k, v in stage.items() if k in RULES[stage["rule"]].params or k == "rule"}
        lines.append(
            f"{describe_rule(rule):<44}{stage['before']:>9.4f}{stage['after']:>9.4f}{stage['changed_cases']:>9}"
            f"  {'yes' if stage['kept'] else 'no'}"
        )
    kept = "; ".join(describe_rule(r) for r in choice.kept) or "none"
    lines += ["", f"Kept: {kept} ({choice.score_before:.4f} -> {choice.score_after:.4f})"]
    if path is not None:
        lines.append(f"Written: {path} (unet-predict applies it; --no-postprocessing skips it)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# unet-predict
# --------------------------------------------------------------------------------------------


def postprocessing_for(
    checkpoint: Path | None, explicit: Path | None = None, enabled: bool = True, scheme: LabelScheme | None = None
) -> Postprocessing | None:
    """The postprocessing unet-predict applies: ``explicit`` when given (it must exist), else the
    ``postprocessing.json`` of the checkpoint's run folder (of the folder itself when ``checkpoint``
    is a run or unet-cv folder) when present, else none; none when not ``enabled``, and no default
    without a ``checkpoint`` (an ensemble of several). Its rules are checked against and act in ``scheme``
    (None: the scheme the file records).

    Raises:
        PostprocessingError: the file cannot be used (see :func:`load_postprocessing`).
    """
    if not enabled:
        return None
    if explicit is not None:
        return load_postprocessing(Path(explicit).expanduser(), scheme)
    if checkpoint is None:
        return None
    folder = Path(checkpoint).expanduser()
    default = (folder if folder.is_dir() else checkpoint_run_folder(folder)) / POSTPROCESSING_FILE
    return load_postprocessing(default, scheme) if default.is_file() else None
