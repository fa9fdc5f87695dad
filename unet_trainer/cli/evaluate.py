"""``unet-eval CHECKPOINT [OVERRIDES...] ...``: score a checkpoint, and choose postprocessing rules; or
``unet-eval --predictions DIR --dataset PATH``: score a folder of predictions from any tool."""

from __future__ import annotations

import math
from pathlib import Path

from ..config.config import ConfigError
from ..core.checkpoint import CheckpointError
from ..data.layouts import CONVENTION_SCHEME, LABEL_CONVENTIONS, DataFormatError, native_of_class
from ..data.schemes import SCHEMES, LabelScheme
from ..evaluation.case_metrics import table_column, table_notes, table_rows
from ..evaluation.lesion_metrics import LESION_DEFINITIONS
from ..evaluation.postprocessing import DEFAULT_METRIC, METRICS, PostprocessingError
from .errors import FAILURE, USAGE_ERROR, ErrorTable, command, guard
from .parsing import FORMAT_LIST, command_arguments, command_parser, format_flag, parse_command_line

USAGE = f"""usage: unet-eval CHECKPOINT [OVERRIDES...] [--dataset PATH] [--format FMT] [--out CSV] [--no-overlays]
                 [--lesion-wise] [--choose-postprocessing [--postprocessing-metric M]] [--no-progress]
       unet-eval --predictions DIR --dataset PATH [OVERRIDES...] [--format FMT] [--out CSV] [--lesion-wise]

Score a checkpoint of unet-train: Dice per BraTS region (WT, TC, ET) and their mean, Dice per label
(NCR, ED, EN), HD95 per region with eval.hd95=true, and the BraTS 2023 lesion-wise Dice and HD95
per region with --lesion-wise (or eval.lesion_wise=true). Prints a table and writes one row per case
to a CSV (default: <run folder>/eval_<checkpoint>_<cases>.csv), and one overlay PNG per case
(contours of truth and prediction on three slices) plus summary.png into <CSV name>_overlays/.
With --predictions, scores a folder of label maps from any tool (<case id>.nii.gz in the dataset's own
labels, on each case's grid, as unet-predict writes them) against the ground truth of --dataset, with
the same metrics, table and CSV (default: DIR/eval_<dataset>.csv).

  CHECKPOINT         a checkpoint, e.g. runs/demo/checkpoints/best-rank0.pt
  OVERRIDES          config overrides on the checkpoint's own config, e.g. eval.empty_policy=ignore
                     eval.hd95=true eval.mirror_tta=true data.fold=1 device=cpu precision=fp32
  --dataset PATH     every labelled case of this raw dataset (any layout) instead of the
                     validation fold of the checkpoint's config
  --predictions DIR  score this folder of predictions instead of a checkpoint (OVERRIDES: eval.*, device)
  --format FMT       layout of --dataset: {FORMAT_LIST}
  --out CSV          where to write the per-case scores
  --no-overlays      draw no overlays
  --lesion-wise      also the lesion-wise Dice and HD95 (settings eval.lesion_definition:
                     brats2023 or panoptica, default the label scheme's; eval.lesion_dilation,
                     eval.lesion_min_volume (mm³), eval.lesion_hd95_penalty)
  --choose-postprocessing
                     then choose postprocessing rules on the validation predictions (largest WT
                     component, small components per region, ET -> NCR below a volume; each kept
                     only if it raises the metric) and write <run folder>/postprocessing.json,
                     which unet-predict applies
  --postprocessing-metric M
                     the metric the rules must raise, mean over WT, TC, ET: {" or ".join(METRICS)}
                     ({", ".join(METRICS.values())}); default {DEFAULT_METRIC}
  --no-progress      no progress bars
  -h, --help         show this help
"""

# A scoring that failed; its OSErrors (e.g. --out names a folder) name the file written or read, else
# the CSV or the checkpoint.
ERRORS = ErrorTable(rows=(((ConfigError,), USAGE_ERROR), ((DataFormatError, CheckpointError, ValueError), FAILURE)))
# The same with --choose-postprocessing, whose rules' errors are usage errors.
CHOOSE_ERRORS = ErrorTable(
    rows=(((ConfigError, PostprocessingError), USAGE_ERROR), ((DataFormatError, CheckpointError, ValueError), FAILURE))
)

_EMPTY_POLICY_TEXT = {
    "one_if_both_empty": "a structure absent from the ground truth scores 1 if the prediction is empty too, "
    "else 0 (Composer/DLE); every case counts",
    "ignore": "a structure absent from the ground truth scores NaN and is left out of its mean "
    "(MONAI ignore_empty=True)",
}


def _native_label_values(convention: str, scheme: LabelScheme) -> dict[str, str]:
    """{class name: its value in the input's own convention}, e.g. EN: "4" for BraTS 2021 and "3"
    for BraTS 2023 and MSD; for cases of mixed conventions, every value of the scheme's family ("4 / 3")."""
    family = [c for c, name in CONVENTION_SCHEME.items() if SCHEMES[name].compatible_with(scheme)]
    conventions = [convention] if convention in LABEL_CONVENTIONS else family
    values = {}
    for index, name in scheme.label_names.items():
        natives = [str(native_of_class(c)[index]) for c in conventions if index in native_of_class(c)]
        values[name] = " / ".join(dict.fromkeys(natives))
    return values


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else ("nan" if math.isnan(value) else f"{value:.{digits}f}")


def _eval_table(means: dict, counts: dict, label_convention: str, scheme: LabelScheme) -> list[str]:
    """The ``unet-eval`` table: a row per region of the label scheme, the mean and each class that is
    no region of its own, with its value in the input's files (then any other name the metrics
    returned), a column per key group the metrics returned (``case_metrics.table_column``)."""
    columns = [table_column(group) for group in dict.fromkeys(k.rpartition("/")[0] for k in means)]
    values = _native_label_values(label_convention, scheme)
    titles = [(key, f"{key} ({values[key]})" if key in values else key) for key in table_rows(scheme)]
    known = {key for key, _ in titles}
    titles += [(name, name) for name in dict.fromkeys(k.rpartition("/")[2] for k in means) if name not in known]
    width = max(10, *(len(title) + 1 for _, title in titles))  # a dataset.json's region names may be long
    header = f"{'':<{width}}" + "".join(
        f"{c.title:>{c.width}}" + (f"{'cases':>7}" if c.counts else "") for c in columns
    )
    lines = [header]
    for key, title in titles:
        row = f"{title:<{width}}"
        for column in columns:
            full = f"{column.group}/{key}" if column.group else key
            row += f"{_number(means.get(full), column.digits):>{column.width}}"
            if column.counts:
                row += f"{counts[full] if full in counts else '-':>7}"
        lines.append(row)
    return lines


def format_report(report) -> str:
    loaded = report.loaded
    lines = [
        f"Checkpoint: {loaded.checkpoint} ({loaded.weights} weights)"
        if loaded is not None
        else f"Predictions: {report.predictions}",
        f"Scored:     {report.source}",
        f"Empty ground truth ({report.empty_policy}): {_EMPTY_POLICY_TEXT[report.empty_policy]}",
    ]
    groups = list(dict.fromkeys(k.rpartition("/")[0] for k in report.means))
    lines += table_notes(groups)
    if {"hd95", "lesion_dice"} & set(groups):
        lines.append(f"Metric definition {LESION_DEFINITIONS[report.lesion_definition].summary}")
    lines += ["", *_eval_table(report.means, report.counts, report.label_convention, SCHEMES[report.scheme])]
    lines += ["", f"Per-case scores: {report.csv_path}"]
    if report.overlays is not None:
        lines.append(f"Overlays:        {report.overlays}")
    return "\n".join(lines)


def make_parser():
    parser = command_parser("unet-eval")
    for flag in ("--dataset", "--format", "--out", "--postprocessing-metric", "--predictions"):
        parser.add_argument(flag)
    for flag in ("--no-progress", "--no-overlays", "--lesion-wise", "--choose-postprocessing"):
        parser.add_argument(flag, action="store_true")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-eval CHECKPOINT [OVERRIDES...] [--dataset PATH] [--format FMT] [--out CSV]``; returns the exit status."""
    args = command_arguments(argv, USAGE)
    with guard(ERRORS):
        scores_folder = any(arg == "--predictions" or arg.startswith("--predictions=") for arg in args)
        positionals, flags, overrides = parse_command_line(make_parser(), args, 0 if scores_folder else 1)
        if flags["--lesion-wise"]:
            overrides.append("eval.lesion_wise=true")
        fmt = format_flag(flags)
    if scores_folder:
        return _score_folder(flags, overrides, fmt)
    (checkpoint,) = positionals
    if flags["--choose-postprocessing"] or flags["--postprocessing-metric"]:
        return _choose_postprocessing(Path(checkpoint), flags, overrides)
    # Imported here so --help and usage errors stay fast.
    from ..commands.evaluate import evaluate_model
    from ..commands.loading import load_model

    dataset, out = flags["--dataset"], flags["--out"]
    with guard(ERRORS, Path(out or checkpoint)):
        report = evaluate_model(
            load_model(Path(checkpoint), overrides),
            Path(dataset) if dataset else None,
            fmt,
            Path(out) if out else None,
            progress=not flags["--no-progress"],
            overlays=not flags["--no-overlays"],
        )
    print(format_report(report))
    return 0


def _choose_postprocessing(checkpoint: Path, flags: dict, overrides: list[str]) -> int:
    """``unet-eval CHECKPOINT --choose-postprocessing [--postprocessing-metric M]``: the evaluation
    table, then the postprocessing table; returns the exit status."""
    from ..commands.evaluate import choose_postprocessing_for
    from ..commands.loading import load_model
    from ..evaluation.postprocessing import check_metric, format_choice

    out = flags["--out"]
    metric = flags["--postprocessing-metric"] or DEFAULT_METRIC
    with guard(CHOOSE_ERRORS, Path(out or checkpoint)):
        if not flags["--choose-postprocessing"]:
            raise ConfigError("command line: --postprocessing-metric goes with --choose-postprocessing")
        if flags["--dataset"]:
            raise ConfigError(
                "command line: --choose-postprocessing chooses on the checkpoint's own validation fold; drop --dataset"
            )
        check_metric(metric)  # before the checkpoint is loaded
        report, choice, written = choose_postprocessing_for(
            load_model(checkpoint, overrides),
            metric,
            Path(out) if out else None,
            progress=not flags["--no-progress"],
            overlays=not flags["--no-overlays"],
        )
    print(format_report(report))
    print("\n" + format_choice(choice, written))
    return 0


def _score_folder(flags: dict, overrides: list[str], fmt: str) -> int:
    """``unet-eval --predictions DIR --dataset PATH [OVERRIDES...]``: the table of a folder of
    predictions; returns the exit status."""
    from ..commands.evaluate import evaluate_folder
    from ..config.config import resolve_config

    predictions, dataset, out = flags["--predictions"], flags["--dataset"], flags["--out"]
    with guard(ERRORS, Path(out or predictions)):
        if not dataset:
            raise ConfigError("command line: --predictions needs --dataset PATH, the raw dataset holding the truth")
        used = [f for f in ("--choose-postprocessing", "--postprocessing-metric") if flags[f]]
        if used:
            raise ConfigError(
                f"command line: {used[0]} chooses on a checkpoint's predictions; drop it with --predictions"
            )
        report = evaluate_folder(
            Path(predictions),
            Path(dataset),
            resolve_config(None, overrides),
            fmt,
            Path(out) if out else None,
            progress=not flags["--no-progress"],
        )
    print(format_report(report))
    return 0
