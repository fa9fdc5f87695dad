#!/usr/bin/env python
"""Lesion-wise metrics: ours (unet_trainer.lesion_metrics) against the official package, same cases.

Each case is a BraTS-sized phantom label volume (default 155 x 240 x 240, style "brats") as truth
and a corrupted copy as prediction (shifted by one voxel, with a few small false-positive specks
and one of the truth's regions partly erased), so both sides find lesions, misses and false
positives. Times, per case:

    ours       case_lesion_scores: lesion-wise Dice and HD95 of WT, TC, ET
    official   brats-evaluation's Panoptica evaluator with its bundled "gli" config, as the
               challenge runs it (it also scores the single labels and NSD, which ours does not)

and prints the mean seconds per case of each, the ratio official / ours and the device. Needs the
test-only extra: ``pip install -e ".[oracle]"``.

Example:
    python scripts/bench_metrics.py --cases 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchutil import device_description  # noqa: E402

from unet_trainer.data.phantom import make_phantom_case  # noqa: E402
from unet_trainer.lesion_metrics import case_lesion_scores  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(155, 240, 240))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from brats_evaluation import config_path
        from panoptica import Panoptica_Evaluator
    except ImportError:
        print("bench_metrics needs the official package: pip install -e '.[oracle]'", file=sys.stderr)
        return 1
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    rng = np.random.default_rng(args.seed)
    ours_s = official_s = 0.0
    for index in range(args.cases):
        _, truth = make_phantom_case(tuple(args.shape), rng, style="brats")
        pred = corrupted(truth, rng)
        start = time.perf_counter()
        scores = case_lesion_scores(pred, truth)
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        official = evaluator.evaluate(pred, truth)
        official_s += time.perf_counter() - start
        line = "  ".join(
            f"{r}: Dice {scores[f'lesion_dice/{r}']:.3f} (official {official[r.lower()].sq_dsc:.3f})"
            for r in ("WT", "TC", "ET")
        )
        print(f"case {index}: {line}")
    ours_s, official_s = ours_s / args.cases, official_s / args.cases
    print(
        f"shape {tuple(args.shape)}, {args.cases} cases: ours {ours_s:.3f} s/case, "
        f"official {official_s:.3f} s/case, official / ours = {official_s / ours_s:.1f}x"
    )
    print(f"device: {device_description('cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
