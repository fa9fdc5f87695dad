"""``unet-data synth|prepare ...``: write a synthetic phantom, or prepare a raw dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config.config import SEED
from ..core.runfolder import RunFolderError
from ..data.layouts import DLE_LABEL_CONVENTIONS, FORMAT_CHOICES, FORMATS, DataFormatError
from ..data.phantom import DEFAULT_PHANTOM_SCHEME, DEFAULT_STYLE, PHANTOM_SCHEMES, PHANTOM_STYLES
from ..data.schemes import SCHEMES
from .errors import FAILURE, USAGE_ERROR, ErrorTable, command, fail, guard

# Bad data or an unwritable --out (its OSErrors name --out when they name no file); Ctrl-C keeps its traceback.
ERRORS = ErrorTable(rows=(((DataFormatError, ValueError, RunFolderError), FAILURE),), interrupt=False)


def _add_synth(sub) -> None:
    synth = sub.add_parser("synth", help="write a synthetic BraTS phantom (BraTS 2021 layout, or its --scheme's)")
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
    synth.add_argument(
        "--scheme",
        default=DEFAULT_PHANTOM_SCHEME,
        choices=tuple(PHANTOM_SCHEMES),
        help=f"label scheme of the cases and the layout they are written in (default {DEFAULT_PHANTOM_SCHEME})",
    )


def _add_prepare(sub) -> None:
    prep = sub.add_parser("prepare", help="crop, normalise and store a raw dataset as memory-mappable arrays")
    prep.add_argument("source", type=Path, help=f"raw dataset folder in a supported layout ({', '.join(FORMATS)})")
    prep.add_argument("--out", required=True, type=Path, help="prepared folder")
    prep.add_argument(
        "--format", default=FORMAT_CHOICES[0], choices=FORMAT_CHOICES, help="layout of SOURCE (default: auto, detected)"
    )
    prep.add_argument("--workers", type=int, default=2)
    prep.add_argument(
        "--scheme",
        default="auto",
        choices=("auto", *SCHEMES),
        help="label scheme of SOURCE (default: auto, from the case names and labels)",
    )
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


def make_parser() -> argparse.ArgumentParser:
    # A plain argparse parser: no config overrides here, so argparse's own help and usage errors.
    parser = argparse.ArgumentParser(prog="unet-data", description="Create or prepare BraTS datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_prepare(sub)
    return parser


def _synth(args: argparse.Namespace) -> int:
    if args.cases < 1:
        return fail("--cases must be at least 1", USAGE_ERROR)
    from ..data.phantom import write_phantom_dataset

    if args.workers < 1:
        return fail("--workers must be at least 1", USAGE_ERROR)
    if not SEED["minimum"] <= args.seed <= SEED["maximum"]:
        return fail(f"--seed {args.seed} must be in [{SEED['minimum']}, {SEED['maximum']}]", USAGE_ERROR)
    ids = write_phantom_dataset(
        args.out, args.cases, tuple(args.shape), args.seed, workers=args.workers, style=args.style, scheme=args.scheme
    )
    print(f"Wrote {len(ids)} phantom cases to {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ..data.layouts import open_dataset, scheme_named
    from ..data.prepare import PrepareSettings, prepare_dataset

    if args.target_spacing is not None and min(args.target_spacing) <= 0:
        return fail("--target-spacing takes three positive spacings in mm", USAGE_ERROR)
    settings = PrepareSettings(tuple(args.target_spacing) if args.target_spacing else None, args.dle_labels)
    dataset = open_dataset(
        args.source, args.format, skip_bad=args.skip_bad, scheme=args.scheme, dle_labels=args.dle_labels
    )
    record = prepare_dataset(dataset, args.out, settings, workers=args.workers)
    scheme = scheme_named(record["scheme"], record["scheme_definition"])
    print(
        f"Prepared {len(record['cases'])} {record['format']} cases into {args.out} (label scheme {scheme.name}: {scheme.title})"
    )
    for case_id, error in record["skipped"].items():
        print(f"skipped {case_id}: {error}", file=sys.stderr)
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    """``unet-data synth|prepare ...``; returns the exit status."""
    args = make_parser().parse_args(argv)
    with guard(ERRORS, args.out):
        return _synth(args) if args.command == "synth" else _prepare(args)
