"""``unet-cv CONFIG [OVERRIDES...] ...``: cross-validation, every fold trained and scored together."""

from __future__ import annotations

from ..config.config import ConfigError, resolve_config
from ..config.engine import dump_config
from ..core.checkpoint import CheckpointError
from ..core.runfolder import RunFolderError
from ..data.layouts import DataFormatError
from ..data.loader import SharedMemoryExhausted
from ..evaluation.postprocessing import DEFAULT_METRIC, METRICS, PostprocessingError
from ..training.trainer import TrainingDiverged
from .errors import CONFIG_ONLY, FAILURE, INTERRUPTED, USAGE_ERROR, ErrorTable, command, fail, guard
from .parsing import command_arguments, command_parser, parse_command_line

USAGE = f"""usage: unet-cv CONFIG [OVERRIDES...] [--folds 0,2] [--aggregate-only] [--lesion-wise]
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


def run_errors() -> ErrorTable:
    """A cross-validation that failed; its OSErrors name the save_folder when they name no file. (A
    function: the cross-validation's own error comes with its module, imported only to run.)"""
    from ..commands.cv import CrossValidationError

    failures = (
        CrossValidationError,
        DataFormatError,
        CheckpointError,
        RunFolderError,
        TrainingDiverged,
        ValueError,
        SharedMemoryExhausted,
    )
    return ErrorTable(rows=(((ConfigError, PostprocessingError), USAGE_ERROR), (failures, FAILURE)), lost_peer=True)


def make_parser():
    parser = command_parser("unet-cv")
    for flag in ("--folds", "--checkpoint", "--postprocessing-metric"):
        parser.add_argument(flag)
    for flag in ("--aggregate-only", "--lesion-wise", "--choose-postprocessing", "--no-progress", "--print-config"):
        parser.add_argument(flag, action="store_true")
    return parser


def _folds_and_choice(cfg: dict, flags: dict) -> tuple[list[int] | None, str]:
    """The folds to train (None: all) and the checkpoint choice of the command line.

    Raises:
        ConfigError: bad --folds or --checkpoint.
    """
    from ..commands.builders import build_split_settings
    from ..commands.cv import parse_folds
    from ..commands.folders import CHECKPOINT_CHOICES

    choice = flags["--checkpoint"] or CHECKPOINT_CHOICES[0]
    if choice not in CHECKPOINT_CHOICES:
        raise ConfigError(f"command line: --checkpoint {choice!r} is not one of {', '.join(CHECKPOINT_CHOICES)}")
    folds = parse_folds(flags["--folds"], build_split_settings(cfg).num_folds) if flags["--folds"] else None
    return folds, choice


def _report(outcome) -> int:
    """Print what the cross-validation did: its summary, or the folds still to train; returns the exit status."""
    if outcome.stopped:
        return fail(outcome.stopped, INTERRUPTED)  # the fold was stopped (a signal, a stop rule)
    if outcome.summary is not None:
        from ..commands.cv import format_summary

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


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-cv CONFIG [OVERRIDES...] [--folds ...] [--aggregate-only]``; returns the exit status."""
    args = command_arguments(argv, USAGE)
    with guard(CONFIG_ONLY):
        (config_path,), flags, overrides = parse_command_line(make_parser(), args, 1)
        if flags["--postprocessing-metric"] and not flags["--choose-postprocessing"]:
            raise ConfigError("command line: --postprocessing-metric goes with --choose-postprocessing")
        if "=" in config_path:
            raise ConfigError(f"the first argument must be a config file, got '{config_path}'")
        cfg = resolve_config(config_path, overrides)
        if flags["--print-config"]:
            print(dump_config(cfg), end="")
            return 0
        folds, choice = _folds_and_choice(cfg, flags)
    from ..commands.builders import save_folder
    from ..commands.cv import run_cross_validation

    with guard(run_errors(), save_folder(cfg)):
        outcome = run_cross_validation(
            cfg,
            folds,
            aggregate_only=flags["--aggregate-only"],
            choice=choice,
            lesion_wise=flags["--lesion-wise"],
            progress=not flags["--no-progress"],
            postprocessing_metric=(flags["--postprocessing-metric"] or DEFAULT_METRIC)
            if flags["--choose-postprocessing"]
            else None,
        )
    return _report(outcome)
