#!/usr/bin/env python
"""Lesion-wise metrics: ours (unet_trainer.evaluation.lesion_metrics) on each backend against the official package, same cases.

Each case is a BraTS-sized phantom label volume (default 155 x 240 x 240, style "brats") as truth
and a corrupted copy as prediction (shifted by one voxel, with a few small false-positive specks
and one of the truth's regions partly erased), so both sides find lesions, misses and false
positives. Times, per case:

    scipy      case_lesion_scores(backend="scipy"): lesion-wise Dice and HD95 of WT, TC, ET with
               SciPy on the host (the CPU default), under --definition (brats2023 or panoptica)
    torch      case_lesion_scores(backend="torch") on --device, the label maps already there (as
               the evaluator holds them); one untimed call first (CUDA's start-up, kernel loading)
    official   brats-evaluation's Panoptica evaluator with its bundled "gli" config, as the
               challenge runs it (it also scores the single labels and NSD, which ours does not);
               measured when the package is installed (``pip install -e ".[oracle]"``) and not
               --skip-official

and prints the mean wall seconds per case of each (and the process's CPU seconds, which a machine
shared with other work inflates less), the ratios official / ours and scipy / torch, the largest
difference between the backends' scores (they must agree to 1e-6), under ``--definition panoptica``
the largest difference from the official package's lesion-wise Dice and HD95 (the same definition:
they must agree to 1e-6 too), and the device.

Example:
    python scripts/bench_metrics.py --cases 3
    python scripts/bench_metrics.py --cases 2 --device cuda --skip-official --json metrics.json
    python scripts/bench_metrics.py --cases 2 --definition panoptica
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchutil import device_description  # noqa: E402

from unet_trainer.data.phantom import make_phantom_case  # noqa: E402
from unet_trainer.evaluation.lesion_metrics import LESION_DEFINITIONS, PANOPTICA_HD95_PENALTY, case_lesion_scores  # noqa: E402

BACKENDS = ("scipy", "torch")


def corrupted(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible bad prediction of ``truth`` (Z, Y, X) uint8: shifted a voxel, specks, part of ET erased."""
    pred = np.roll(truth, shift=(1, -1, 0), axis=(0, 1, 2)).copy()
    for _ in range(8):
        z, y, x = (int(rng.integers(10, n - 10)) for n in truth.shape)
        pred[z : z + 2, y : y + 3, x : x + 3] = rng.integers(1, 4)
    et = np.argwhere(pred == 3)
    if len(et):
        z = int(np.median(et[:, 0]))
        pred[z:][pred[z:] == 3] = 1
    return pred


def _official_difference(ours: dict[str, float], result) -> float:
    """The largest difference between our panoptica scores and the package's (its infinite HD95 is
    the penalty, as its parser and ours have it; NaN on both sides is no difference)."""
    largest = 0.0
    for region in ("WT", "TC", "ET"):
        group = result[region.lower()]
        for key, theirs in ((f"lesion_dice/{region}", group.sq_dsc), (f"lesion_hd95/{region}", group.sq_hd95)):
            theirs = math.nan if theirs is None else PANOPTICA_HD95_PENALTY if math.isinf(theirs) else theirs
            if math.isnan(theirs) and math.isnan(ours[key]):
                continue
            largest = max(largest, abs(ours[key] - theirs)) if not math.isnan(ours[key] - theirs) else math.inf
    return largest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(155, 240, 240))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="the torch backend's device (auto: cuda if any)",
    )
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--definition", default="brats2023", choices=tuple(LESION_DEFINITIONS))
    parser.add_argument("--skip-official", action="store_true", help="do not time the official package")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def load_official():
    """The official package's evaluator, or None when it is not installed."""
    try:
        from brats_evaluation import config_path
        from panoptica import Panoptica_Evaluator
    except ImportError:
        return None
    return Panoptica_Evaluator.load_from_config(str(config_path("gli")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    official = None if args.skip_official else load_official()
    if official is None and not args.skip_official:
        print("the official package is not installed (pip install -e '.[oracle]'): not timed", file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    seconds = {name: 0.0 for name in args.backends}
    if official is not None:
        seconds["official"] = 0.0
    cpu_seconds = dict.fromkeys(seconds, 0.0)
    largest_difference = official_difference = 0.0
    for index in range(args.cases):
        _, truth = make_phantom_case(tuple(args.shape), rng, style="brats")
        pred = corrupted(truth, rng)
        scores = {}
        for name in args.backends:
            inputs = (pred, truth)
            if name == "torch":
                inputs = tuple(torch.from_numpy(a).to(device) for a in inputs)
                if index == 0:
                    case_lesion_scores(*inputs, backend="torch", definition=args.definition)  # untimed: start-up
            start, cpu_start = time.perf_counter(), time.process_time()
            scores[name] = case_lesion_scores(*inputs, backend=name, definition=args.definition)
            seconds[name] += time.perf_counter() - start
            cpu_seconds[name] += time.process_time() - cpu_start
        if len(scores) == 2:
            largest_difference = max(
                largest_difference, *(abs(scores["scipy"][k] - scores["torch"][k]) for k in scores["scipy"])
            )
        ours = scores[args.backends[0]]
        line = "  ".join(f"{r}: Dice {ours[f'lesion_dice/{r}']:.3f}" for r in ("WT", "TC", "ET"))
        if official is not None:
            start, cpu_start = time.perf_counter(), time.process_time()
            result = official.evaluate(pred, truth)
            seconds["official"] += time.perf_counter() - start
            cpu_seconds["official"] += time.process_time() - cpu_start
            line = "  ".join(
                f"{r}: Dice {ours[f'lesion_dice/{r}']:.3f} (official {result[r.lower()].sq_dsc:.3f})"
                for r in ("WT", "TC", "ET")
            )
            if args.definition == "panoptica":
                official_difference = max(official_difference, _official_difference(ours, result))
        print(f"case {index}: {line}")
    per_case = {name: value / args.cases for name, value in seconds.items()}
    cpu_per_case = {name: value / args.cases for name, value in cpu_seconds.items()}
    ratios = {}
    if "official" in per_case:
        ratios.update({f"official / {name}": per_case["official"] / per_case[name] for name in args.backends})
    if "scipy" in per_case and "torch" in per_case:
        ratios["scipy / torch"] = per_case["scipy"] / per_case["torch"]
    times = ", ".join(f"{name} {value:.3f} s/case (CPU {cpu_per_case[name]:.3f} s)" for name, value in per_case.items())
    print(f"shape {tuple(args.shape)}, {args.cases} cases: {times}")
    if ratios:
        print("  ".join(f"{name} = {value:.1f}x" for name, value in ratios.items()))
    if len(args.backends) == 2:
        print(f"largest difference between the backends' scores: {largest_difference:.2e}")
    compared = official is not None and args.definition == "panoptica"
    if compared:
        print(f"largest difference from the official package's lesion-wise Dice and HD95: {official_difference:.2e}")
    described = device_description(device)
    print(f"device: {described} (scipy on the host CPU)")
    if args.json:
        figures = {
            "shape": list(args.shape),
            "cases": args.cases,
            "device": described,
            "seconds_per_case": per_case,
            "cpu_seconds_per_case": cpu_per_case,
            "ratios": ratios,
            "largest_difference": largest_difference if len(args.backends) == 2 else None,
            "definition": args.definition,
            "official_difference": official_difference if compared else None,
        }
        temporary = args.json.with_name(args.json.name + ".tmp")
        temporary.write_text(json.dumps(figures, indent=1))
        temporary.replace(args.json)
    return 0 if max(largest_difference, official_difference) <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
