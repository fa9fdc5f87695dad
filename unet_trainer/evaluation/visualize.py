"""Pictures of a run: ``progress.png`` (the curves) and segmentation overlays (contours on slices).

Everything is drawn on matplotlib's Agg canvas directly, never through pyplot: no window and no
process-wide backend switch, so a headless machine works and a user's own interactive session
is left alone.

Overlays show three orthogonal slices through the tumour (:func:`case_views.extract_case_view`
picks them and keeps only those slices, so views are small enough to gather from every rank), the first
channel (FLAIR) in grey, and per class of the label scheme (glioma: 1 NCR, 2 ED, 3 EN) one colour:
ground truth as solid, prediction as dashed contours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter

from ..core.fileio import atomic_write
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from .case_views import CaseView, evaluator_case_view, extract_case_view, tumour_centre  # noqa: F401 (re-exported)

_DEFAULT = SCHEMES[DEFAULT_SCHEME]
_DPI = 80

# One colour per class index (1, 2, ...; repeated past the end), readable on a grey MR slice and told
# apart with the common colour-vision deficiencies (magenta/sky blue/orange, then bluish green and
# yellow, rather than the red/green of many figures).
CLASS_PALETTE = ("#ff2da0", "#3fb8ff", "#ffb000", "#00d68f", "#f0e442", "#d55e00")


def label_colours(scheme: LabelScheme = _DEFAULT) -> dict[int, str]:
    """Class index -> its contour colour, for each class of ``scheme``."""
    return {index: CLASS_PALETTE[(index - 1) % len(CLASS_PALETTE)] for index in scheme.label_names}


def _figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (``_DPI`` pixels per inch)."""
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> np.ndarray:
    """Render once, write the PNG atomically (never a half-written file), return the RGB pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    atomic_write(path, lambda temporary: imsave(temporary, rgba, format="png"))
    return rgba[..., :3].copy()


# Classes 1-3 drawn in this order so that where two meet, the inner class's colour is the one on top
# (every BraTS glioma scheme: edema, then the enhancing rim inside it, then the necrotic core inside
# that); classes 4 and up (a resection cavity) after them, in index order.
DRAW_ORDER = (2, 3, 1)


def label_legend(scheme: LabelScheme = _DEFAULT) -> dict[int, str]:
    """Class index -> its legend text: the short name and the description's words before any
    parenthesis (glioma: ``ED peritumoral edema``)."""
    return {
        index: f"{name} {description.split(' (')[0]}"
        for (index, name), description in zip(scheme.label_names.items(), scheme.class_descriptions)
    }


def _draw_order(scheme: LabelScheme) -> list[int]:
    rank = {label: position for position, label in enumerate(DRAW_ORDER)}
    return sorted(scheme.label_names, key=lambda index: (rank.get(index, len(DRAW_ORDER)), index))


#: The default scheme's colours (glioma: 1 NCR, 2 ED, 3 EN).
LABEL_COLOURS = label_colours()
VIEWS = ("axial", "coronal", "sagittal")


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def _aspect(view: CaseView, index: int) -> float:
    """Height/width of a pixel for imshow: axial (y over x), coronal (z over x), sagittal (z over y)."""
    z, y, x = view.spacing
    return (y / x, z / x, z / y)[index]


# Ground truth solid and a little translucent, so that a prediction dashed on top of it stays visible.
TRUTH_STYLE = {"linestyles": "solid", "alpha": 0.8}
PREDICTION_STYLE = {"linestyles": [(0, (2.5, 1.5))]}


def _contours(ax, labels: np.ndarray, linewidth: float, style: Mapping[str, Any], scheme: LabelScheme) -> None:
    colours = label_colours(scheme)
    for label in _draw_order(scheme):
        mask = labels == label
        # contour needs at least a 2x2 grid and a level that is crossed
        if mask.any() and not mask.all() and min(mask.shape) >= 2:
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colours[label]], linewidths=linewidth, **style)


def _draw_slice(
    ax, view: CaseView, index: int, scheme: LabelScheme, truth_width: float = 2.6, prediction_width: float = 1.6
) -> None:
    ax.imshow(
        view.image[index].astype(np.float32),
        cmap="gray",
        vmin=0.0,
        vmax=1.0,
        origin="lower",
        aspect=_aspect(view, index),
        interpolation="nearest",
    )
    if view.truth is not None:
        _contours(ax, view.truth[index], truth_width, TRUTH_STYLE, scheme)
        _contours(ax, view.prediction[index], prediction_width, PREDICTION_STYLE, scheme)
    else:
        _contours(ax, view.prediction[index], prediction_width + 0.4, {"linestyles": "solid"}, scheme)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_handles(with_truth: bool, scheme: LabelScheme) -> list[Line2D]:
    colours, legend = label_colours(scheme), label_legend(scheme)
    handles = [Line2D([], [], color=colours[k], lw=3, label=legend[k]) for k in sorted(colours)]
    if with_truth:
        handles += [
            Line2D([], [], color="black", lw=2.6, ls="solid", alpha=0.8, label="ground truth"),
            Line2D([], [], color="black", lw=1.6, ls=(0, (2.5, 1.5)), label="prediction"),
        ]
    return handles


def _legend_columns(handles: Sequence[Line2D], most: int) -> int:
    """Columns of a legend: ``most``, or half the entries (two rows) when its text would not fit one row."""
    wide = sum(len(h.get_label()) for h in handles) > 100
    return min(most, math.ceil(len(handles) / 2)) if wide else most


def scores_text(row: Mapping[str, float], scheme: LabelScheme = _DEFAULT) -> str:
    """``WT 0.912  TC 0.870  ET 0.801`` (the scheme's regions) from a per-case score row (missing or
    NaN shown as nan)."""
    return "  ".join(f"{r} {row.get(r, math.nan):.3f}" for r in scheme.regions)


def draw_case_overlay(path: Path, view: CaseView, title: str, scheme: LabelScheme = _DEFAULT) -> None:
    """One case: axial, coronal and sagittal slice side by side with the contours of the scheme's
    classes and a legend.

    Writes a PNG of 960 x 400 pixels atomically.
    """
    fig = _figure(12, 5)
    axes = fig.subplots(1, 3)
    z, y, x = view.centre
    for index, (ax, name, where) in enumerate(zip(axes, VIEWS, (f"z={z}", f"y={y}", f"x={x}"))):
        _draw_slice(ax, view, index, scheme)
        ax.set_title(f"{name} ({where})", fontsize=10)
    fig.suptitle(title, fontsize=12)
    handles = _legend_handles(view.truth is not None, scheme)
    columns = _legend_columns(handles, 5)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=10, frameon=False)
    bottom = 0.1 if columns >= len(handles) else 0.16  # room for one legend row, or two
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=bottom, wspace=0.03)
    _save(fig, path)


def mean_dice(row: Mapping[str, float]) -> float:
    """A row's mean Dice (``mean``), NaN when absent."""
    value = row.get("mean", math.nan)
    return math.nan if value is None else float(value)


def pick_worst_and_best(
    cases: Sequence[tuple[CaseView, Mapping[str, float]]], per_group: int = 4
) -> list[tuple[str, list]]:
    """The rows of the summary grid: ``[("worst", the lowest per_group by mean Dice), ("best", the
    highest per_group)]``; with ``2 * per_group`` cases or fewer each case once, split in two halves
    (or one row "all" when they fit in one). NaN means count as worst."""

    def rank(case):
        value = mean_dice(case[1])
        return (1, value, case[0].case_id) if not math.isnan(value) else (0, 0.0, case[0].case_id)

    ranked = sorted(cases, key=rank)
    if len(ranked) > 2 * per_group:
        return [("worst", ranked[:per_group]), ("best", ranked[-per_group:])]
    if len(ranked) <= per_group:
        return [("all", ranked)]
    half = math.ceil(len(ranked) / 2)
    return [("worst", ranked[:half]), ("best", ranked[half:])]


def draw_summary(
    path: Path,
    cases: Sequence[tuple[CaseView, Mapping[str, float]]],
    title: str,
    per_group: int = 4,
    scheme: LabelScheme = _DEFAULT,
) -> np.ndarray:
    """The worst and the best ``per_group`` cases by mean Dice in one grid of axial slices (see
    :func:`pick_worst_and_best`), each titled with its case id and scores.

    Args:
        path: the PNG to write (atomically).
        cases: (view, score row) per case; rows need ``mean`` and the region keys.
        title: the figure's title.
        per_group: cases per row.
        scheme: the classes drawn and the regions scored.

    Returns:
        The picture as uint8 RGB (H, W, 3), e.g. for TensorBoard.

    Raises:
        ValueError: no cases.
    """
    if not cases:
        raise ValueError("draw_summary needs at least one case")
    rows = pick_worst_and_best(cases, per_group)
    columns = max(len(row) for _, row in rows)
    fig = _figure(3.2 * columns, 3.5 * len(rows) + 0.9)
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, (group, row) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            if c >= len(row):
                ax.axis("off")
                continue
            view, scores = row[c]
            _draw_slice(ax, view, 0, scheme, truth_width=2.2, prediction_width=1.4)
            ax.set_title(f"{view.case_id}\nmean {mean_dice(scores):.3f} | {scores_text(scores, scheme)}", fontsize=7.5)
            if c == 0:
                ax.set_ylabel(group, fontsize=11)
    fig.suptitle(title, fontsize=11)
    handles = _legend_handles(any(v.truth is not None for v, _ in cases), scheme)
    legend_columns = _legend_columns(handles, 5 if columns > 2 else 3)
    fig.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=9, frameon=False)
    legend_height = 0.2 + 0.25 * math.ceil(len(handles) / legend_columns)  # inches: 0.25 per legend row
    fig.subplots_adjust(
        left=0.04,
        right=0.99,
        top=1 - 0.75 / fig.get_figheight(),
        bottom=legend_height / fig.get_figheight(),
        wspace=0.05,
        hspace=0.25,
    )
    return _save(fig, path)


def overlay_title(
    case_id: str, scores: Mapping[str, float], epoch: int | None, batch: int | None, scheme: LabelScheme = _DEFAULT
) -> str:
    """``BraTS_001 | epoch 25 (step 125) | Dice WT 0.912  TC 0.870  ET 0.801`` (the scheme's regions)."""
    when = f" | epoch {epoch} (step {batch})" if epoch is not None else ""
    return f"{case_id}{when} | Dice {scores_text(scores, scheme)}"


def summary_title(cases: int, epoch: int | None, batch: int | None, per_group: int = 4) -> str:
    when = f" at epoch {epoch} (step {batch})" if epoch is not None else ""
    which = (
        f"worst and best {per_group} of {cases} cases by mean Dice"
        if cases > 2 * per_group
        else f"all {cases} cases, worst first, by mean Dice"
    )
    return f"Validation{when}: {which} (axial slices)"


def write_overlays(
    folder: Path,
    views: Mapping[str, Any],
    rows: Mapping[str, Mapping[str, float]],
    cases: int | None,
    epoch: int | None,
    batch: int | None,
    scheme: LabelScheme = _DEFAULT,
) -> np.ndarray | None:
    """One PNG per case (the first ``cases`` by id; None = all) and ``summary.png`` over every case.

    Args:
        folder: the overlays folder (created; files in it are overwritten).
        views: case id -> CaseView.
        rows: case id -> its score row (Dice per region and ``mean``).
        cases: how many per-case PNGs (None: all).
        epoch, batch: shown in the titles (None: left out).
        scheme: the classes drawn and the regions scored.

    Returns:
        The summary picture (H, W, 3) uint8, or None when there are no views.
    """
    if not views:
        return None
    folder = Path(folder)
    ids = sorted(views)
    for case_id in ids[:cases] if cases is not None else ids:
        title = overlay_title(case_id, rows[case_id], epoch, batch, scheme)
        draw_case_overlay(folder / f"{case_id}.png", views[case_id], title, scheme)
    cases = [(views[c], rows[c]) for c in ids]
    return draw_summary(folder / "summary.png", cases, summary_title(len(ids), epoch, batch), scheme=scheme)


# --------------------------------------------------------------------------------------------
# progress.png
# --------------------------------------------------------------------------------------------


@dataclass
class Series:
    """A curve: x (steps) and y values."""

    steps: list[int]
    values: list[float]


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eval_metric_groups(evals: Sequence[Mapping]) -> dict[str, dict[str, Series]]:
    """Evaluation records -> {group: {name: Series}}: a key ``a/b/name`` goes to group ``a/b``,
    so ``dice/WT`` to "dice" and, say, ``lesion_dice/WT`` to "lesion_dice". Keys without a slash
    (epoch, batch) and the ``time`` group (bookkeeping) are left out; non-finite values are skipped."""
    groups: dict[str, dict[str, Series]] = {}
    for record in evals:
        for key, value in record.items():
            if "/" not in key or not _numeric(value):
                continue
            group, name = key.rsplit("/", 1)
            if group == "time":
                continue
            series = groups.setdefault(group, {}).setdefault(name, Series([], []))
            series.steps.append(int(record["batch"]))
            series.values.append(float(value))
    return groups


def best_evaluation(evals: Sequence[Mapping], key: str = "dice/mean") -> Mapping | None:
    """The first evaluation with the highest ``key`` (as the best checkpoint is chosen), or None."""
    best = None
    for record in evals:
        value = record.get(key)
        if _numeric(value) and (best is None or value > best[key]):
            best = record
    return best


def _moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)  # the first points average what exists
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _region_order(scheme: LabelScheme) -> Callable[[str], tuple[int, str]]:
    """Sort key of curve names: the scheme's regions in reporting order, "mean", then the rest by name."""
    order = [*scheme.regions, "mean"]
    return lambda name: (order.index(name), name) if name in order else (len(order), name)


def _draw_loss(ax, train: Mapping[str, Series]) -> None:
    """The training loss per step and its moving average (log scale where it spreads)."""
    loss = train.get("loss/train")
    if loss and loss.steps:
        window = max(1, len(loss.values) // 50)
        if window > 1:
            ax.plot(loss.steps, loss.values, lw=0.6, color="#9ab6d6", label="per step")
        ax.plot(
            loss.steps,
            _moving_average(loss.values, window),
            lw=1.8,
            color="#1f5fa8",
            label=f"mean of {window} steps" if window > 1 else "per step",
        )
        if min(loss.values) > 0 and max(loss.values) > 10 * min(loss.values):  # log only where it spreads
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set(title="training loss")


# The validation Dice of each region, in the scheme's reporting order (glioma: WT blue, TC red, ET
# green); repeated past the end; matplotlib's own cycle beyond.
REGION_PALETTE = ("#1f63b4", "#c8322d", "#2a9a48", "#7b3fa0", "#b07a1e", "#1e9aa0")


def _draw_dice(ax, dice: Mapping[str, Series], scheme: LabelScheme) -> None:
    """Validation Dice: regions solid, the mean black; the classes dotted in their overlay colours."""
    colours = {scheme.label_names[k]: colour for k, colour in label_colours(scheme).items()}
    colours.update({name: REGION_PALETTE[i % len(REGION_PALETTE)] for i, name in enumerate(scheme.regions)})
    colours["mean"] = "black"
    for name in sorted(dice, key=_region_order(scheme)):
        series = dice[name]
        region = name in scheme.regions or name == "mean"
        ax.plot(
            series.steps,
            series.values,
            marker="o" if region else None,
            ms=3,
            lw=2.4 if name == "mean" else (1.3 if region else 0.9),
            ls="solid" if region else "dotted",
            color=colours.get(name),
            label=name,
        )
    ax.set(title="validation Dice", ylim=(0, 1.02))


def _draw_learning_rate(ax, train: Mapping[str, Series]) -> None:
    for key in sorted(k for k in train if k.startswith("lr/")):
        ax.plot(train[key].steps, train[key].values, label=key.split("/", 1)[1])
    if sum(k.startswith("lr/") for k in train) > 1:
        ax.legend(fontsize=8)
    ax.set(title="learning rate")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))  # no offset text to collide with the epoch axis


def _draw_speed(ax, train: Mapping[str, Series]) -> None:
    speed = train.get("throughput/samples_per_sec")
    if speed and speed.steps:
        ax.plot(speed.steps, speed.values, lw=0.8, color="#2a8a4a")
        ax.set_ylim(bottom=0)
    ax.set(title="training samples/s")


def _draw_group(ax, group: str, members: Mapping[str, Series], scheme: LabelScheme) -> None:
    """One other group of evaluation metrics (HD95, lesion-wise Dice...), a curve per name."""
    values = [v for s in members.values() for v in s.values]
    for name in sorted(members, key=_region_order(scheme)):
        ax.plot(
            members[name].steps,
            members[name].values,
            marker="o",
            ms=3,
            lw=2.4 if name == "mean" else 1.3,
            label=name,
        )
    ax.set(title=f"validation {group}")
    if values and 0.0 <= min(values) and max(values) <= 1.0 and "dice" in group.lower():
        ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, ncol=2)


def _step_axes(axes: Sequence, last_step: int, best: Mapping | None, batches_per_epoch: int | None) -> None:
    """Every panel on the same steps, with a grid, the epoch axis on top and the best evaluation marked."""
    for ax in axes:
        ax.set_xlim(0, last_step)  # every panel on the same steps
        ax.grid(alpha=0.3)
        ax.set_xlabel("step (top: epoch)" if batches_per_epoch else "step", fontsize=9)
        if batches_per_epoch:
            top = ax.secondary_xaxis(
                "top", functions=(lambda s: s / batches_per_epoch, lambda e: e * batches_per_epoch)
            )
            top.tick_params(labelsize=7)
        if best is not None:
            ax.axvline(best["batch"], color="#c03030", ls="--", lw=1)


def _mark_best(ax, best: Mapping | None, dice: Mapping[str, Series]) -> None:
    """The best evaluation as a star on the Dice panel, and that panel's legend."""
    if best is not None:
        ax.plot(
            [best["batch"]],
            [best["dice/mean"]],
            marker="*",
            ms=14,
            color="#c03030",
            ls="none",
            label=f"best: epoch {best['epoch']}, step {best['batch']}, mean {best['dice/mean']:.3f}",
        )
    if dice:
        ax.legend(loc="best", fontsize=8, ncol=2)


def draw_progress(
    path: Path,
    train: Mapping[str, Series],
    evals: Sequence[Mapping],
    batches_per_epoch: int | None = None,
    scheme: LabelScheme = _DEFAULT,
) -> None:
    """``progress.png``: training loss, validation Dice per region, learning rate, samples/s, and one
    panel per other group of evaluation metrics (HD95, lesion-wise Dice...), against steps, with the
    best evaluation (highest mean Dice) marked in every panel.

    Args:
        path: the PNG (written atomically).
        train: per-step series by metric key (``loss/train``, ``lr/group0``...,
            ``throughput/samples_per_sec``); absent keys leave their panel empty.
        evals: the evaluation records (``epoch``, ``batch`` and metric keys).
        batches_per_epoch: draws an epoch axis on top of each panel when given.
        scheme: which curves are regions (solid, in reporting order) and which classes (dotted).
    """
    groups = eval_metric_groups(evals)
    dice = groups.pop("dice", {})
    extra = sorted(groups.items())
    panels = 4 + len(extra)
    columns = 2 if panels == 4 else 3
    rows = math.ceil(panels / columns)
    fig = _figure(6.2 * columns, 3.9 * rows)
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    best = best_evaluation(evals)
    _draw_loss(axes[0], train)
    _draw_dice(axes[1], dice, scheme)
    _draw_learning_rate(axes[2], train)
    _draw_speed(axes[3], train)
    for ax, (group, members) in zip(axes[4:], extra):
        _draw_group(ax, group, members, scheme)
    for ax in axes[panels:]:
        ax.axis("off")
    last_step = max(
        [s for series in train.values() for s in series.steps[-1:]] + [int(r["batch"]) for r in evals] + [1]
    )
    _step_axes(axes[:panels], last_step, best, batches_per_epoch)
    _mark_best(axes[1], best, dice)
    fig.tight_layout()
    _save(fig, path)
