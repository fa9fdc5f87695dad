"""``unet-train CONFIG [OVERRIDES...] [--print-config]``: train (or resume) one run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..config.config import ConfigError, resolve_config
from ..config.engine import dump_config
from ..core.checkpoint import CheckpointError
from ..core.guard import OutputPathError
from ..core.runfolder import RunFolderError
from ..data.layouts import DataFormatError
from ..data.loader import SharedMemoryExhausted
from ..data.schemes import SCHEMES
from ..training.trainer import TrainingDiverged
from .errors import CONFIG_ONLY, FAILURE, USAGE_ERROR, ErrorTable, command, fail, guard
from .parsing import command_parser

USAGE = """usage: unet-train CONFIG [OVERRIDES...] [--print-config]

Train (or resume) the run described by CONFIG, a YAML file such as configs/demo.yaml.
Overrides take key.sub=value, --key.sub value or --key.sub=value; values are YAML scalars or
lists, e.g.  unet-train configs/brats.yaml --optimizer.radam.lr 2e-3 max_duration=10ep
Precedence: defaults < recipe < config < command line.

  --print-config   print the fully resolved config and exit
  -h, --help       show this help
"""

# A failed run; its OSErrors (an unwritable save_folder, a full disk) name the save_folder when they name no file.
RUN_ERRORS = ErrorTable(
    rows=(
        (
            (
                ConfigError,
                DataFormatError,
                CheckpointError,
                RunFolderError,
                OutputPathError,
                TrainingDiverged,
                SharedMemoryExhausted,  # a loader worker's, re-raised here
            ),
            FAILURE,
        ),
    ),
    lost_peer=True,  # under torchrun: a peer rank went away
)


def format_summary(summary: dict) -> str:
    final = summary["final_eval"]
    lines = [""]
    if final:
        names = SCHEMES[summary["scheme"]].region_names
        regions = "  ".join(f"{k} {final.get('dice/' + k, math.nan):.3f}" for k in names)
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
        f"Prepared data:     {summary['prepared']} (label scheme {summary['scheme']})",
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


def make_parser():
    parser = command_parser("unet-train")
    parser.add_argument("--print-config", action="store_true")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-train CONFIG [OVERRIDES...] [--print-config]``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else USAGE_ERROR
    with guard(CONFIG_ONLY):
        namespace, args = make_parser().parse_known_args(args)
    if not args or args[0].startswith("-") or "=" in args[0]:
        return fail(f"the first argument must be a config file, got '{args[0] if args else ''}'", USAGE_ERROR)
    with guard(CONFIG_ONLY):
        cfg = resolve_config(args[0], args[1:])
    if namespace.print_config:
        print(dump_config(cfg), end="")
        return 0
    from ..commands.builders import save_folder  # imported here so --print-config and errors stay fast
    from ..commands.train import run_training

    with guard(RUN_ERRORS, save_folder(cfg)):
        summary = run_training(cfg)
    if summary["is_main"]:  # under torchrun, one summary, from rank 0
        print(format_summary(summary))
    return 0
