"""Command-line entry points: ``unet-train``, ``unet-data``, ``unet-eval``, ``unet-predict`` and ``unet-cv``.

Every expected failure (a bad config, bad data, an unreadable checkpoint, a diverged loss) ends
with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..config.config import resolve_config
from ..config.engine import ConfigError, dump_config
from ..config.tree import SEED
from ..core.checkpoint import CheckpointError
from ..core.fileio import os_error_line
from ..core.guard import OutputPathError
from ..core.runfolder import RunFolderError
from ..data.layouts import (
    DLE_LABEL_CONVENTIONS,
    FORMAT_CHOICES,
    FORMAT_LABEL_CONVENTION,
    FORMATS,
    LABEL_CONVENTIONS,
    DataFormatError,
)
from ..data.loader import SharedMemoryExhausted
from ..data.phantom import DEFAULT_STYLE, PHANTOM_STYLES
from ..evaluation.metrics import LABEL_NAMES
from ..evaluation.postprocessing import DEFAULT_METRIC, METRICS, PostprocessingError
from ..training.trainer import TrainingDiverged

# The layouts the --format flags accept, for the usage texts: "auto (default), msd, ...".
_FORMAT_LIST = ", ".join(f"{name} (default)" if name == "auto" else name for name in FORMAT_CHOICES)


def _label_numbering_text(indent: str = "    ") -> str:
    """Each layout's native label values, one line per numbering, from the layout registry:
    "    brats2021: NCR 1, ED 2, EN 4" ... "    msd, dle, nnunetv2: NCR 2, ED 1, EN 3"."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for layout, convention in FORMAT_LABEL_CONVENTION.items():
        native_of = {canonical: native for native, canonical in LABEL_CONVENTIONS[convention].items()}
        groups.setdefault(tuple(native_of[canonical] for canonical in LABEL_NAMES), []).append(layout)
    return "\n".join(
        f"{indent}{', '.join(layouts)}: "
        + ", ".join(f"{name} {value}" for name, value in zip(LABEL_NAMES.values(), values))
        for values, layouts in groups.items()
    )


TRAIN_USAGE = """usage: unet-train CONFIG [OVERRIDES...] [--print-config]

Train (or resume) the run described by CONFIG, a YAML file such as configs/demo.yaml.
Overrides take key.sub=value, --key.sub value or --key.sub=value; values are YAML scalars or
lists, e.g.  unet-train configs/brats.yaml --optimizer.radam.lr 2e-3 max_duration=10ep
Precedence: defaults < recipe < config < command line.

  --print-config   print the fully resolved config and exit
  -h, --help       show this help
"""


def _fail(message: str, status: int = 1) -> int:
    # A progress bar left open by the failure would otherwise carry the error on its line.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    return status


def _lost_peer_exit(exc: RuntimeError) -> int:
    """Under torchrun, a collective that failed because a peer rank went away: one line (from
    one rank per machine) instead of each rank's traceback, before the launcher's own report.

    Raises:
        RuntimeError: ``exc`` again, when it is no such failure (a bug shows its traceback).
    """
    from ..core.distributed import lost_peer

    lost = lost_peer(exc)
    if lost is None:
        raise exc
    return _fail(lost.line) if lost.reporter else 1


def _format_summary(summary: dict) -> str:
    final = summary["final_eval"]
    lines = [""]
    if final:
        regions = "  ".join(f"{k} {final.get('dice/' + k, math.nan):.3f}" for k in ("WT", "TC", "ET"))
        lines.append(
            f"Validation Dice ({final.get('batch')} steps): {regions}  mean {final.get('dice/mean', math.nan):.3f}"
        )
    if summary["stop_reason"]:
        lines.append(f"Stopped early: {summary['stop_reason']}")
    run_dir = Path(summary["run_dir"])
    # Only the files this run has written (no eval_*.csv when evaluation is off).
    metrics = [name for name in ("train_metrics.csv", "eval_metrics.csv") if (run_dir / name).is_file()]
    lines += [
        f"Finished epoch {summary['epoch']}, batch {summary['batch']} in {summary['seconds']:.0f} s",
        f"Run folder:        {run_dir}",
        f"  resolved config  {run_dir / 'config.yaml'}",
        f"  split            {run_dir / 'split.json'}",
        f"  checkpoints      {run_dir / 'checkpoints'} (latest: {summary['checkpoint']})",
        f"  metrics          {', '.join([str(run_dir / 'metrics.jsonl'), *metrics])}",
        *[
            f"  {title:<16} {path}"
            for title, path in (
                ("curves", run_dir / "progress.png"),
                ("overlays", run_dir / "overlays" / "summary.png"),
            )
            if path.is_file()
        ],
        f"Prepared data:     {summary['prepared']}",
        "Run the same command again to resume from the latest checkpoint.",
    ]
    if final:
        lines.insert(
            -2, f"  per-case Dice    {run_dir / 'eval_cases.csv'} (the latest evaluation, step {final.get('batch')})"
        )
    if summary["best_checkpoint"]:
        lines.insert(
            -2,
            f"  best checkpoint  {summary['best_checkpoint']} (mean Dice {summary['best_dice']:.3f}, "
            f"step {summary['best_batch']})",
        )
        lines.insert(
            -2, f"  its per-case     {run_dir / 'eval_cases_best.csv'} (the evaluation best-rank0.pt was saved at)"
        )
    return "\n".join(lines)


def train_main(argv: list[str] | None = None) -> int:
    """``unet-train CONFIG [OVERRIDES...] [--print-config]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0 if args else 2
    print_config = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    config_path, overrides = args[0], args[1:]
    if config_path.startswith("-") or "=" in config_path:
        return _fail(f"the first argument must be a config file, got '{config_path}'", 2)
    try:
        cfg = resolve_config(config_path, overrides)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    if print_config:
        print(dump_config(cfg), end="")
        return 0
    from ..commands.builders import run_training  # imported here so --print-config and errors stay fast

    try:
        summary = run_training(cfg)
    except (ConfigError, DataFormatError, CheckpointError, RunFolderError, OutputPathError, TrainingDiverged) as exc:
        return _fail(str(exc))
    except SharedMemoryExhausted as exc:  # a loader worker's, re-raised here
        return _fail(str(exc))
    except RuntimeError as exc:  # under torchrun: a peer rank went away
        return _lost_peer_exit(exc)
    except OSError as exc:  # e.g. an unwritable save_folder or a full disk
        return _fail(os_error_line(exc, Path(cfg["save_folder"])))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if summary["is_main"]:  # under torchrun, one summary, from rank 0
        print(_format_summary(summary))
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """``unet-data synth|prepare ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="unet-data", description="Create or prepare BraTS datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic BraTS phantom in the BraTS 2021 layout")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    synth.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    synth.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[64, 64, 64],
        metavar=("D", "H", "W"),
        help="array shape per case, (Z, Y, X) voxels of 1 mm (default 64 64 64; BraTS is 155 240 240)",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=2, help="processes writing cases in parallel (default 2)")
    synth.add_argument(
        "--style",
        default=DEFAULT_STYLE,
        choices=PHANTOM_STYLES,
        help=f"tumour style (default {DEFAULT_STYLE}; see unet_trainer/data/phantom.py)",
    )

    prep = sub.add_parser("prepare", help="crop, normalise and store a raw dataset as memory-mappable arrays")
    prep.add_argument("source", type=Path, help=f"raw dataset folder in a supported layout ({', '.join(FORMATS)})")
    prep.add_argument("--out", required=True, type=Path, help="prepared folder")
    prep.add_argument(
        "--format", default=FORMAT_CHOICES[0], choices=FORMAT_CHOICES, help="layout of SOURCE (default: auto, detected)"
    )
    prep.add_argument("--workers", type=int, default=2)
    prep.add_argument("--skip-bad", action="store_true", help="skip invalid cases and list them instead of stopping")
    prep.add_argument(
        "--dle-labels",
        default=DLE_LABEL_CONVENTIONS[0],
        choices=DLE_LABEL_CONVENTIONS,
        help="label numbering of DLE .npy arrays: msd (from MSD Task01, default) or brats2023 "
        "(from BraTS 2021, enhancing 4 -> 3)",
    )
    prep.add_argument(
        "--target-spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="resample cases whose spacing differs to this one, in mm (default: keep each case's)",
    )

    args = parser.parse_args(argv)
    from ..data.prepare import PrepareSettings, prepare_dataset

    try:
        if args.command == "synth":
            if args.cases < 1:
                return _fail("--cases must be at least 1", 2)
            from ..data.phantom import write_phantom_dataset

            if args.workers < 1:
                return _fail("--workers must be at least 1", 2)
            if not SEED["minimum"] <= args.seed <= SEED["maximum"]:
                return _fail(f"--seed {args.seed} must be in [{SEED['minimum']}, {SEED['maximum']}]", 2)
            ids = write_phantom_dataset(
                args.out, args.cases, tuple(args.shape), args.seed, workers=args.workers, style=args.style
            )
            print(f"Wrote {len(ids)} phantom cases to {args.out}")
        else:
            if args.target_spacing is not None and min(args.target_spacing) <= 0:
                return _fail("--target-spacing takes three positive spacings in mm", 2)
            settings = PrepareSettings(tuple(args.target_spacing) if args.target_spacing else None, args.dle_labels)
            record = prepare_dataset(
                args.source, args.out, args.format, settings, workers=args.workers, skip_bad=args.skip_bad
            )
            print(f"Prepared {len(record['cases'])} {record['format']} cases into {args.out}")
            for case_id, error in record["skipped"].items():
                print(f"skipped {case_id}: {error}", file=sys.stderr)
    except (DataFormatError, ValueError, RunFolderError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # unwritable --out, full disk
        return _fail(os_error_line(exc, args.out))
    return 0


EVAL_USAGE = f"""usage: unet-eval CHECKPOINT [OVERRIDES...] [--dataset PATH] [--format FMT] [--out CSV] [--no-overlays]
                 [--lesion-wise] [--choose-postprocessing [--postprocessing-metric M]] [--no-progress]

Score a checkpoint of unet-train: Dice per BraTS region (WT, TC, ET) and their mean, Dice per label
(NCR, ED, EN), HD95 per region with eval.hd95=true, and the BraTS 2023 lesion-wise Dice and HD95
per region with --lesion-wise (or eval.lesion_wise=true). Prints a table and writes one row per case
to a CSV (default: <run folder>/eval_<checkpoint>_<cases>.csv), and one overlay PNG per case
(contours of truth and prediction on three slices) plus summary.png into <CSV name>_overlays/.

  CHECKPOINT         a checkpoint, e.g. runs/demo/checkpoints/best-rank0.pt
  OVERRIDES          config overrides on the checkpoint's own config, e.g. eval.empty_policy=ignore
                     eval.hd95=true eval.mirror_tta=true data.fold=1 device=cpu precision=fp32
  --dataset PATH     every labelled case of this raw dataset (any layout) instead of the
                     validation fold of the checkpoint's config
  --format FMT       layout of --dataset: {_FORMAT_LIST}
  --out CSV          where to write the per-case scores
  --no-overlays      draw no overlays
  --lesion-wise      also the lesion-wise Dice and HD95 (settings eval.lesion_dilation,
                     eval.lesion_min_voxels, eval.lesion_hd95_penalty)
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

PREDICT_USAGE = f"""usage: unet-predict CHECKPOINT [CHECKPOINT...] INPUT OUTPUT [OVERRIDES...] [--format FMT]
                    [--probabilities] [--overlays] [--postprocessing FILE | --no-postprocessing] [--no-progress]

Segment every case of INPUT (raw cases in any supported layout, labels not needed) with a
checkpoint of unet-train and write OUTPUT/<case>.nii.gz: uint8 labels with the case's original
shape and affine, in the input's own label numbering (DLE arrays: the one data.dle_labels names):
{_label_numbering_text()}
A case that cannot be read or does not fit the model is reported in one line and skipped; the
exit status is then 1.

  CHECKPOINT         a checkpoint file, or a unet-cv folder (each fold's best-rank0.pt, else its
                     newest checkpoint) or a run folder; several (every argument without '=' but
                     the last two) make an ensemble: their softmax (sigmoid in region mode)
                     probabilities are averaged, one pass per model over each volume. Their
                     outputs and inputs must agree (loss region mode, model.num_classes,
                     data.dle_labels, model.in_channels, data.target_spacing); architectures may differ
  OVERRIDES          config overrides (every model's), e.g. eval.mirror_tta=true eval.overlap=0.5 device=cpu precision=fp32
  --format FMT       layout of INPUT: {_FORMAT_LIST}
  --probabilities    also write OUTPUT/<case>_probabilities.nii.gz (float32, x, y, z, class)
  --overlays         also write OUTPUT/<case>_overlay.png: the prediction's contours on three
                     FLAIR slices through the tumour, region volumes in the title
  --postprocessing FILE
                     postprocess the labels with this postprocessing.json (default: the one
                     unet-eval --choose-postprocessing wrote into the checkpoint's run folder,
                     or the one in a given run or unet-cv folder, when there is one; none by
                     default for several checkpoints)
  --no-postprocessing
                     write the model's labels as they are
  --no-progress      no progress bar
  -h, --help         show this help
"""

_FORMAT_CHOICES = FORMAT_CHOICES
_EMPTY_POLICY_TEXT = {
    "one_if_both_empty": "a structure absent from the ground truth scores 1 if the prediction is empty too, "
    "else 0 (Composer/DLE); every case counts",
    "ignore": "a structure absent from the ground truth scores NaN and is left out of its mean "
    "(MONAI ignore_empty=True)",
}


def _split_command_line(
    args: list[str],
    positional: int,
    value_flags: tuple[str, ...],
    switch_flags: tuple[str, ...],
    more_positionals: bool = False,
) -> tuple[list[str], dict, list[str]]:
    """Split arguments into positionals (the first ``positional`` plain words; with
    ``more_positionals`` every plain word without '=', at least ``positional``), our flags and
    config overrides (``key=value``, ``--key value``, ``--key=value``).

    Raises:
        ConfigError: a flag without its value, or missing positionals.
    """
    positionals: list[str] = []
    flags: dict = {name: False for name in switch_flags}
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in value_flags:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"command line: {name} needs a value")
                value = args[i + 1]
                i += 1
            flags[name] = value
        elif arg in switch_flags:
            flags[arg] = True
        elif (len(positionals) < positional or (more_positionals and not eq)) and not arg.startswith("-"):
            positionals.append(arg)
        elif arg.startswith("--") and not eq and i + 1 < len(args):
            overrides += [arg, args[i + 1]]  # --key value
            i += 1
        else:
            overrides.append(arg)
        i += 1
    if len(positionals) < positional:
        expected = f"{positional} path argument(s){' or more' if more_positionals else ''}"
        raise ConfigError(f"command line: expected {expected} first, got {len(positionals)}")
    return positionals, flags, overrides


def _native_label_values(convention: str) -> dict[str, str]:
    """{label name: its value in the input's own convention}, e.g. EN: "4" for BraTS 2021 and "3"
    for BraTS 2023 and MSD; for cases of mixed conventions, every value ("4 / 3")."""
    conventions = [convention] if convention in LABEL_CONVENTIONS else list(LABEL_CONVENTIONS)
    values = {}
    for canonical, name in LABEL_NAMES.items():
        natives = [str(n) for c in conventions for n, k in LABEL_CONVENTIONS[c].items() if k == canonical]
        values[name] = " / ".join(dict.fromkeys(natives))
    return values


def _format_eval(report) -> str:
    means, counts = report.means, report.counts
    hd95 = any(k.startswith("hd95/") for k in means)
    lesion_wise = any(k.startswith("lesion_dice/") for k in means)
    loaded = report.loaded

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else ("nan" if math.isnan(value) else f"{value:.{digits}f}")

    lines = [
        f"Checkpoint: {loaded.checkpoint} ({loaded.weights} weights)",
        f"Scored:     {report.source}",
        f"Empty ground truth ({report.empty_policy}): {_EMPTY_POLICY_TEXT[report.empty_policy]}",
    ]
    if hd95:
        lines.append(
            "HD95: 95th-percentile Hausdorff distance in mm (prepared spacing); NaN and left out of the "
            "mean where a region is empty in the prediction or the ground truth"
        )
    if lesion_wise:
        lines.append(
            "Lesion-wise (BraTS 2023): per region, mean over truth lesions and false positives of each "
            "lesion's Dice and HD95 mm, averaged over cases"
        )
    header = (
        f"{'':<10}{'Dice':>8}{'cases':>7}"
        + (f"{'HD95 mm':>10}{'cases':>7}" if hd95 else "")
        + (f"{'LW Dice':>9}{'LW HD95':>9}" if lesion_wise else "")
    )
    lines += ["", header]
    titles = [("WT", "WT"), ("TC", "TC"), ("ET", "ET"), ("mean", "mean")]
    titles += [(name, f"{name} ({value})") for name, value in _native_label_values(report.label_convention).items()]
    for key, title in titles:
        row = f"{title:<10}{number(means.get(key), 4):>8}{counts.get(key, 0):>7}"
        if hd95:
            hd_key = f"hd95/{key}"
            row += f"{number(means.get(hd_key), 2):>10}{counts[hd_key] if hd_key in counts else '-':>7}"
        if lesion_wise:
            row += f"{number(means.get(f'lesion_dice/{key}'), 4):>9}{number(means.get(f'lesion_hd95/{key}'), 2):>9}"
        lines.append(row)
    lines += ["", f"Per-case scores: {report.csv_path}"]
    if report.overlays is not None:
        lines.append(f"Overlays:        {report.overlays}")
    return "\n".join(lines)


def _format_flag(flags: dict) -> str:
    """The ``--format`` flag's layout ("auto" when absent).

    Raises:
        ConfigError: a layout that does not exist.
    """
    fmt = flags.get("--format") or "auto"
    if fmt not in _FORMAT_CHOICES:
        raise ConfigError(f"command line: --format {fmt!r} is not one of {', '.join(_FORMAT_CHOICES)}")
    return fmt


def eval_main(argv: list[str] | None = None) -> int:
    """``unet-eval CHECKPOINT [OVERRIDES...] [--dataset PATH] [--format FMT] [--out CSV]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "-h" in args or "--help" in args:
        print(EVAL_USAGE)
        return 0 if args else 2
    try:
        (checkpoint,), flags, overrides = _split_command_line(
            args,
            1,
            ("--dataset", "--format", "--out", "--postprocessing-metric"),
            ("--no-progress", "--no-overlays", "--lesion-wise", "--choose-postprocessing"),
        )
        if flags["--lesion-wise"]:
            overrides.append("eval.lesion_wise=true")
        fmt = _format_flag(flags)
        from ..commands.predict import evaluate_checkpoint  # imported here so --help and usage errors stay fast

        dataset = flags.get("--dataset")
        out = flags.get("--out")
        if flags["--choose-postprocessing"] or flags.get("--postprocessing-metric"):
            return _choose_postprocessing_main(Path(checkpoint), flags, overrides)
        report = evaluate_checkpoint(
            Path(checkpoint),
            overrides,
            Path(dataset) if dataset else None,
            fmt,
            Path(out) if out else None,
            progress=not flags["--no-progress"],
            overlays=not flags["--no-overlays"],
        )
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except (DataFormatError, CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # e.g. --out names a folder; the file written or read, else the checkpoint
        return _fail(os_error_line(exc, Path(out or checkpoint)))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    print(_format_eval(report))
    return 0


def _choose_postprocessing_main(checkpoint: Path, flags: dict, overrides: list[str]) -> int:
    """``unet-eval CHECKPOINT --choose-postprocessing [--postprocessing-metric M]``: the evaluation
    table, then the postprocessing table; returns the exit status."""
    from ..commands.predict import choose_for_checkpoint
    from ..evaluation.postprocessing import format_choice

    try:
        if not flags["--choose-postprocessing"]:
            raise ConfigError("command line: --postprocessing-metric goes with --choose-postprocessing")
        if flags.get("--dataset"):
            raise ConfigError(
                "command line: --choose-postprocessing chooses on the checkpoint's own validation fold; drop --dataset"
            )
        out = flags.get("--out")
        report, choice, written = choose_for_checkpoint(
            checkpoint,
            overrides,
            flags.get("--postprocessing-metric") or DEFAULT_METRIC,
            Path(out) if out else None,
            progress=not flags["--no-progress"],
            overlays=not flags["--no-overlays"],
        )
    except (ConfigError, PostprocessingError) as exc:
        return _fail(str(exc), 2)
    except (DataFormatError, CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(os_error_line(exc, Path(out or checkpoint)))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    print(_format_eval(report))
    print("\n" + format_choice(choice, written))
    return 0


def predict_main(argv: list[str] | None = None) -> int:
    """``unet-predict CHECKPOINT [CHECKPOINT...] INPUT OUTPUT [OVERRIDES...] [--format FMT] [--probabilities]``;
    returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "-h" in args or "--help" in args:
        print(PREDICT_USAGE)
        return 0 if args else 2
    try:
        positionals, flags, overrides = _split_command_line(
            args,
            3,
            ("--format", "--postprocessing"),
            ("--probabilities", "--overlays", "--no-progress", "--no-postprocessing"),
            more_positionals=True,
        )
        *checkpoints, source, output = positionals
        fmt = _format_flag(flags)
        if flags.get("--postprocessing") and flags["--no-postprocessing"]:
            raise ConfigError("command line: --postprocessing FILE and --no-postprocessing exclude each other")
        from ..commands.predict import predict_dataset
        from ..evaluation.postprocessing import postprocessing_for

        explicit = flags.get("--postprocessing")
        # One checkpoint (or one run or unet-cv folder): its folder's postprocessing.json by default.
        # Several: only the one named, since each model's folder may hold its own rules.
        single = Path(checkpoints[0]) if len(checkpoints) == 1 else None
        postprocess = postprocessing_for(
            single, Path(explicit) if explicit else None, enabled=not flags["--no-postprocessing"]
        )
        if postprocess is not None:
            other = (
                single is not None
                and single.is_file()
                and postprocess.checkpoint
                and Path(postprocess.checkpoint) != single.expanduser().resolve()
            )
            note = f" (chosen on another checkpoint, {Path(postprocess.checkpoint).name})" if other else ""
            print(f"Postprocessing from {postprocess.path}{note}: {postprocess.describe()}")
        summary = predict_dataset(
            [Path(c) for c in checkpoints],
            Path(source),
            Path(output),
            fmt,
            overrides,
            probabilities=flags["--probabilities"],
            progress=not flags["--no-progress"],
            overlays=flags["--overlays"],
            postprocess=postprocess,
        )
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except (DataFormatError, CheckpointError, RunFolderError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # e.g. OUTPUT is a file; the file written or read, else OUTPUT
        return _fail(os_error_line(exc, Path(output)))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    files = sum(len(paths) for paths in summary.written.values())
    line = f"Wrote {len(summary.written)} segmentation(s) ({files} files) to {output}"
    if summary.failed:
        print(f"{line}; {len(summary.failed)} case(s) failed: {', '.join(sorted(summary.failed))}", file=sys.stderr)
        return 1
    print(line)
    return 0


CV_USAGE = f"""usage: unet-cv CONFIG [OVERRIDES...] [--folds 0,2] [--aggregate-only] [--lesion-wise]
               [--checkpoint best|latest] [--choose-postprocessing [--postprocessing-metric M]]
               [--no-progress] [--print-config]

Cross-validation in one command: train folds 0..data.num_folds-1 of CONFIG one after another, each
in its own run folder <save_folder>/fold_<k>/ (data.fold=k), then score every fold's chosen
checkpoint on its own validation cases and write <save_folder>/cv_summary.csv: one row per case,
one per fold (mean) and the overall mean and standard deviation over all cases. Run the same
command again to go on where it stopped: finished folds are skipped, an interrupted one resumes.
A different config for the same folder is refused (keys a resume may change, like max_duration,
excepted). Overrides as for unet-train.

  --folds 0,2        train only these folds (one per GPU or node in parallel); the summary is
                     written once every fold is finished
  --aggregate-only   train nothing: score the folds and write the summary (every fold must be
                     finished)
  --lesion-wise      also the BraTS 2023 lesion-wise Dice and HD95 (as eval.lesion_wise=true)
  --checkpoint WHICH best (default: best-rank0.pt, the best validation mean Dice, when the fold
                     saved one, else its newest checkpoint) or latest (the newest)
  --choose-postprocessing
                     then choose postprocessing rules on the out-of-fold predictions of all folds
                     (as unet-eval --choose-postprocessing does on one fold) and write
                     <save_folder>/postprocessing.json, which unet-predict <save_folder> applies
  --postprocessing-metric M
                     the metric the rules must raise: {" or ".join(METRICS)}; default {DEFAULT_METRIC}
  --no-progress      no progress bars
  --print-config     print the fully resolved config and exit
  -h, --help         show this help
"""


def cv_main(argv: list[str] | None = None) -> int:
    """``unet-cv CONFIG [OVERRIDES...] [--folds ...] [--aggregate-only]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or "-h" in args or "--help" in args:
        print(CV_USAGE)
        return 0 if args else 2
    try:
        (config_path,), flags, overrides = _split_command_line(
            args,
            1,
            ("--folds", "--checkpoint", "--postprocessing-metric"),
            ("--aggregate-only", "--lesion-wise", "--choose-postprocessing", "--no-progress", "--print-config"),
        )
        if flags.get("--postprocessing-metric") and not flags["--choose-postprocessing"]:
            raise ConfigError("command line: --postprocessing-metric goes with --choose-postprocessing")
        if "=" in config_path:
            raise ConfigError(f"the first argument must be a config file, got '{config_path}'")
        cfg = resolve_config(config_path, overrides)
        if flags["--print-config"]:
            print(dump_config(cfg), end="")
            return 0
        from ..commands.cv import (
            CrossValidationError,
            format_summary,
            parse_folds,
            run_cross_validation,
        )
        from ..commands.folders import CHECKPOINT_CHOICES

        choice = flags.get("--checkpoint") or CHECKPOINT_CHOICES[0]
        if choice not in CHECKPOINT_CHOICES:
            raise ConfigError(f"command line: --checkpoint {choice!r} is not one of {', '.join(CHECKPOINT_CHOICES)}")
        folds = parse_folds(flags["--folds"], cfg["data"]["num_folds"]) if flags.get("--folds") else None
    except ConfigError as exc:
        return _fail(str(exc), 2)
    try:
        outcome = run_cross_validation(
            cfg,
            folds,
            aggregate_only=flags["--aggregate-only"],
            choice=choice,
            lesion_wise=flags["--lesion-wise"],
            progress=not flags["--no-progress"],
            postprocessing_metric=(flags.get("--postprocessing-metric") or DEFAULT_METRIC)
            if flags["--choose-postprocessing"]
            else None,
        )
    except (ConfigError, PostprocessingError) as exc:
        return _fail(str(exc), 2)
    except (
        CrossValidationError,
        DataFormatError,
        CheckpointError,
        RunFolderError,
        TrainingDiverged,
        ValueError,
        SharedMemoryExhausted,
    ) as exc:
        return _fail(str(exc))
    except RuntimeError as exc:  # under torchrun: a peer rank went away
        return _lost_peer_exit(exc)
    except OSError as exc:
        return _fail(os_error_line(exc, Path(cfg["save_folder"])))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if outcome.stopped:
        return _fail(outcome.stopped, 130)
    if outcome.summary is not None:
        print(format_summary(outcome.summary))
        if outcome.summary.postprocessing is not None:
            from ..evaluation.postprocessing import format_choice

            print("\n" + format_choice(outcome.summary.postprocessing, outcome.summary.postprocessing_path))
    elif outcome.pending:
        pending = ",".join(map(str, outcome.pending))
        print(
            f"Fold(s) {pending} of {outcome.cv_dir} not finished yet: train them (unet-cv CONFIG --folds "
            f"{pending}), then write the summary with unet-cv CONFIG --aggregate-only"
        )
    return 0


def main() -> int:
    """``python -m unet_trainer.cli train|data|eval|predict|cv ...`` (handy under torchrun)."""
    commands = {"train": train_main, "data": data_main, "eval": eval_main, "predict": predict_main, "cv": cv_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print("usage: python -m unet_trainer.cli {train,data,eval,predict,cv} ...", file=sys.stderr)
        return 2
    return commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
