"""Command-line entry points: ``unet-train`` and ``unet-data``.

Every expected failure (a bad config, bad data, an unreadable checkpoint, a diverged loss) ends
with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, dump_config, resolve_config
from .data.formats import DataFormatError
from .trainer import TrainingDiverged

TRAIN_USAGE = """usage: unet-train CONFIG [OVERRIDES...] [--print-config]

Train (or resume) the run described by CONFIG, a YAML file such as configs/demo.yaml.
Overrides take key.sub=value, --key.sub value or --key.sub=value; values are YAML scalars or
lists, e.g.  unet-train configs/brats.yaml --optimizer.radam.lr 2e-3 max_duration=10ep
Precedence: defaults < recipe < config < command line.

  --print-config   print the fully resolved config and exit
  -h, --help       show this help
"""


def _fail(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def _format_summary(summary: dict) -> str:
    final = summary["final_eval"]
    lines = [""]
    if final:
        regions = "  ".join(f"{k} {final.get('dice/' + k, math.nan):.3f}" for k in ("WT", "TC", "ET"))
        lines.append(f"Validation Dice ({final.get('batch')} steps): {regions}  mean {final.get('dice/mean', math.nan):.3f}")
    if summary["stop_reason"]:
        lines.append(f"Stopped early: {summary['stop_reason']}")
    run_dir = Path(summary["run_dir"])
    lines += [
        f"Finished epoch {summary['epoch']}, batch {summary['batch']} in {summary['seconds']:.0f} s",
        f"Run folder:        {run_dir}",
        f"  resolved config  {run_dir / 'config.yaml'}",
        f"  split            {run_dir / 'split.json'}",
        f"  checkpoints      {run_dir / 'checkpoints'} (latest: {summary['checkpoint']})",
        f"  metrics          {run_dir / 'metrics.jsonl'}, train_metrics.csv, eval_metrics.csv, eval_cases.csv",
        f"Prepared data:     {summary['prepared']}",
        "Run the same command again to resume from the latest checkpoint.",
    ]
    if summary["best_checkpoint"]:
        lines.insert(-2, f"  best checkpoint  {summary['best_checkpoint']} (mean Dice {summary['best_dice']:.3f})")
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
    from .builders import run_training  # imported here so --print-config and errors stay fast

    try:
        summary = run_training(cfg)
    except (ConfigError, DataFormatError, CheckpointError, TrainingDiverged) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    print(_format_summary(summary))
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """``unet-data synth|prepare ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="unet-data", description="Create or prepare BraTS datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic BraTS phantom in the BraTS 2021 layout")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    synth.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    synth.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"),
                       help="array shape per case, (Z, Y, X) voxels of 1 mm (default 64 64 64; BraTS is 155 240 240)")
    synth.add_argument("--seed", type=int, default=0)

    prep = sub.add_parser("prepare", help="crop, normalise and store a raw dataset as memory-mappable arrays")
    prep.add_argument("source", type=Path, help="raw dataset folder (MSD Task01, BraTS 2021/2023, DLE npy)")
    prep.add_argument("--out", required=True, type=Path, help="prepared folder")
    prep.add_argument("--format", default="auto", choices=("auto", "msd", "brats2021", "brats2023", "dle"))
    prep.add_argument("--workers", type=int, default=2)
    prep.add_argument("--skip-bad", action="store_true", help="skip invalid cases and list them instead of stopping")

    args = parser.parse_args(argv)
    from .data.prepare import PrepareSettings, prepare_dataset

    try:
        if args.command == "synth":
            if args.cases < 1:
                return _fail("--cases must be at least 1", 2)
            from .data.phantom import write_phantom_dataset

            ids = write_phantom_dataset(args.out, args.cases, tuple(args.shape), args.seed)
            print(f"Wrote {len(ids)} phantom cases to {args.out}")
        else:
            record = prepare_dataset(args.source, args.out, args.format, PrepareSettings(), workers=args.workers,
                                     skip_bad=args.skip_bad)
            print(f"Prepared {len(record['cases'])} {record['format']} cases into {args.out}")
            for case_id, error in record["skipped"].items():
                print(f"skipped {case_id}: {error}", file=sys.stderr)
    except (DataFormatError, FileExistsError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def main() -> int:
    """``python -m unet_trainer.cli train|data ...`` (handy under torchrun)."""
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "data"):
        print("usage: python -m unet_trainer.cli {train,data} ...", file=sys.stderr)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    return train_main(rest) if command == "train" else data_main(rest)


if __name__ == "__main__":
    sys.exit(main())
