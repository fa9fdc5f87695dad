#!/usr/bin/env python
"""What the overlays cost an evaluation: drawing time against the evaluation's own time, same run.

Runs the validation evaluation of a config (default ``configs/demo.yaml``: sliding-window Dice
over its validation fold) three ways, as a training run would:

    evaluate   DiceEvaluator.score_model with the overlay hook off
    + slices   the same with the hook on (each case's three slices cut on the device)
    draw       write_overlays: the per-case PNGs (``callbacks.overlays.cases`` of the config) and
               summary.png, from the slices of the second pass (rank 0's work after an evaluation)

and prints each wall time, the drawing's share of the evaluation (draw / evaluate) and the device.
The model is the config's, untrained unless ``--checkpoint`` is given: an untrained model's
noisy predictions have more contours to draw, so its drawing time is the higher one.

Examples:
    python scripts/bench_overlays.py                                   # the demo, on this machine
    python scripts/bench_overlays.py --checkpoint runs/demo/checkpoints/best-rank0.pt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchutil import device_description  # noqa: E402

from unet_trainer.commands.builders import build_device, build_model, build_sliding_window  # noqa: E402
from unet_trainer.commands.datasets import build_split, ensure_prepared  # noqa: E402
from unet_trainer.config.components import output_mode  # noqa: E402
from unet_trainer.config.config import (  # noqa: E402
    CALLBACKS,  # noqa: E402
    repo_root,
    resolve_config,
)
from unet_trainer.core.distributed import DistInfo  # noqa: E402
from unet_trainer.evaluation.case_metrics import Dice  # noqa: E402
from unet_trainer.evaluation.evaluation import DiceEvaluator  # noqa: E402
from unet_trainer.evaluation.visualize import evaluator_case_view, write_overlays  # noqa: E402
from unet_trainer.training.losses import OutputMode  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--config", default=str(repo_root() / "configs" / "demo.yaml"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="score this checkpoint's weights")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. device=cpu")
    args = parser.parse_args(argv)

    cfg = resolve_config(args.config, args.overrides)
    if args.checkpoint is not None:
        from unet_trainer.commands.loading import load_model

        loaded = load_model(args.checkpoint, args.overrides, channels_last=False)
        model, cfg, device = loaded.model, loaded.cfg, loaded.device
    else:
        device = build_device(cfg["device"])
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg["model"]).to(device).eval()
    prepared, index = ensure_prepared(cfg, DistInfo(), progress=False)
    val = build_split(cfg, list(index["cases"]))["val"]
    evaluator = DiceEvaluator(
        prepared,
        val,
        build_sliding_window(cfg),
        [Dice(cfg["eval"]["empty_policy"])],
        output_mode(cfg["loss"]) is OutputMode.REGIONS,
        device,
    )
    # The run's setting, or the default when the config switches overlays off.
    cases = (cfg["callbacks"].get("overlays") or {"cases": CALLBACKS["overlays"]["cases"].default})["cases"]
    cases = None if cases == "all" else cases

    def timed(function):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, result

    with torch.no_grad():
        evaluator.score_model(model)  # untimed: warm-up (first-call allocations, cuDNN search)
        evaluate_s, _ = timed(lambda: evaluator.score_model(model))
        evaluator.case_view = evaluator_case_view
        sliced_s, (_, per_case) = timed(lambda: evaluator.score_model(model))
    rows = {row["case_id"]: row for row in per_case}
    with tempfile.TemporaryDirectory() as folder:
        draw_s, _ = timed(lambda: write_overlays(Path(folder), evaluator.last_views, rows, cases, 0, 0))
        files = len(list(Path(folder).iterdir()))
    drawn = min(len(val), cases) if cases is not None else len(val)
    print(f"device: {device_description(device)}")
    print(
        f"config: {args.config} ({len(val)} validation cases, weights: "
        f"{args.checkpoint if args.checkpoint else 'untrained'})"
    )
    print(f"evaluate            {evaluate_s:8.2f} s")
    print(f"evaluate + slices   {sliced_s:8.2f} s  (slices: {sliced_s - evaluate_s:+.2f} s)")
    print(
        f"draw                {draw_s:8.2f} s  ({files} PNGs: {drawn} cases + summary; "
        f"{draw_s / max(drawn, 1):.2f} s per case)"
    )
    print(f"ratio draw / evaluate: {draw_s / evaluate_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
