#!/usr/bin/env python
"""End-to-end training throughput: the real trainer against a pipeline built from MONAI parts.

Ours (``unet_trainer.commands.train.run_training`` on ``configs/brats.yaml``, or ``--recipe``) and its
peer, the MONAI-built pipeline of scripts/monai_pipeline.py (CacheDataset, MONAI transforms in
DataLoader workers, DynUNet, DiceCELoss), train on the same synthetic BraTS-layout phantom with the
same patch, batch, microbatch, optimizer, precision and loader workers, timed the same way. Printed
per pipeline: samples/s (median step and whole epochs), the data-wait share, peak CUDA memory, one
sliding-window evaluation of a BraTS-sized case, the projected wall time of the full recipe, the
ratio ours/MONAI and the end-to-end targets (checked only on an H200 at the full setting). Without CUDA
it runs a small CPU smoke size that only proves the benchmark runs. scripts/bench_ablation.py
runs this script once per speed switch. The method (data, timing, projection, targets) and the
recorded figures are in BENCHMARKS.md.

Examples:
    python scripts/bench_train.py                                        # CUDA: the full setting
    python scripts/bench_train.py --recipe fast                          # a recipe of recipes/
    python scripts/bench_train.py --override algorithms.channels_last={} --cudnn-benchmark
    python scripts/bench_train.py --device cpu                           # CPU smoke run, ~1-2 minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import (  # noqa: E402
    Measurement,
    StepTimer,
    case_ids,
    centre_crop_box,
    device_description,
    median_seconds,
    release_memory,
)
from monai_pipeline import run_monai  # noqa: E402

from unet_trainer.commands.builders import AMP_DTYPES  # noqa: E402
from unet_trainer.commands.train import run_training  # noqa: E402
from unet_trainer.config.config import resolve_config  # noqa: E402
from unet_trainer.config.engine import ConfigError  # noqa: E402
from unet_trainer.core.schema import Duration  # noqa: E402
from unet_trainer.data.loader import PreparedCase  # noqa: E402
from unet_trainer.data.phantom import write_phantom_dataset  # noqa: E402
from unet_trainer.evaluation.evaluation import logits_to_labels  # noqa: E402
from unet_trainer.training.trainer import State, duration_in_batches  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Fold 0 of the 484 MSD cases with split_seed 0 (Composer's split): 387 training, 97 validation.
RECIPE_TRAIN_CASES = 387
RECIPE_VAL_CASES = 97
# Keys the benchmark itself sets for timing; an --override of one would silently change what is measured.
RESERVED_KEYS = (
    "max_duration",
    "eval_interval",
    "save_interval",
    "autoresume",
    "load_path",
    "save_folder",
    "data.path",
    "data.split_file",
    "data.prepared_path",
    "data.format",
)
# The end-to-end targets, for one H200 at the full setting.
TARGET_RATIO = 2.0
TARGET_SAMPLES_PER_S = 60.0
TARGET_DATA_WAIT = 0.05
TARGET_RECIPE_S = 30 * 60
# About the nonzero box of a skull-stripped BraTS brain in its 155 x 240 x 240 volume (Z, Y, X): what
# preparation crops a real case to. The phantom draws a whole head, whose box is larger, so the
# evaluation is also timed on a centre box of this size, which the projection uses.
BRATS_BRAIN_BOX = (140, 170, 140)
FULL_SETTING = {
    "shape": (155, 240, 240),
    "patch": 128,
    "batch": 64,
    "precision": "amp_bf16",
    "width_divisor": 1,
    "depth": 6,
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def ensure_phantom(work: Path, cases: int, shape: tuple[int, int, int], seed: int, workers: int) -> tuple[Path, float]:
    """The raw phantom folder in ``work`` (generated on first use, by ``workers`` processes) and the
    seconds spent generating it."""
    folder = work / f"phantom-{cases}cases-{'x'.join(map(str, shape))}-seed{seed}"
    started = time.perf_counter()
    if not (folder / "phantom.json").is_file():
        print(
            f"Generating {cases} phantom cases of {'x'.join(map(str, shape))} into {folder} "
            f"(once; about 8-12 s per full-size case and process, {workers} processes)",
            file=sys.stderr,
        )
        write_phantom_dataset(folder, cases, shape, seed, progress=sys.stderr.isatty(), workers=workers)
    return folder, time.perf_counter() - started


def write_split(work: Path, phantom: Path, cases: int, epoch_cases: int) -> tuple[Path, list[str], str]:
    """An explicit split: the first ``cases - 1`` ids repeated to ``epoch_cases`` training entries and
    the last id as the only validation case. Returns (file, training entries, validation id)."""
    ids = case_ids(cases)
    pool, val_id = ids[:-1], ids[-1]
    train = [pool[i % len(pool)] for i in range(epoch_cases)]
    path = work / f"split-{phantom.name}-{epoch_cases}.json"
    path.write_text(json.dumps({"train": train, "val": [val_id]}))
    return path, train, val_id


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


def run_ours(cfg: dict, warmup_steps: int, eval_repeats: int, eval_crop: tuple[int, int, int] | None) -> Measurement:
    """Train with ``run_training`` under a :class:`StepTimer`, then time the evaluator on the validation case."""
    m = Measurement("ours")
    if isinstance(cfg["device_train_microbatch_size"], int):
        m.microbatch = cfg["device_train_microbatch_size"]
    run_dir = Path(cfg["save_folder"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: nothing to resume, no stale logs
    started = time.perf_counter()
    summary = run_training(cfg, progress=False, extra_callbacks=[StepTimer(m, warmup_steps)])
    m.setup_s["run_training wall time (incl. one-time preparation, untimed warm-up and final checkpoint)"] = (
        time.perf_counter() - started
    )
    state: State = summary.pop("state")
    # Stop the persistent loader workers now, so they do not compete with what is timed next.
    state.train_loader = None
    gc.collect()
    device = state.device
    if eval_crop is None:  # --skip-eval
        del state, summary
        release_memory(device)
        return m
    state.model.eval()
    # Evaluations during a real run happen inside fit, where the cudnn_benchmark algorithm has
    # the flag on; it puts the previous value back at fit end.
    if "cudnn_benchmark" in cfg["algorithms"]:
        torch.backends.cudnn.benchmark = True
    # Untimed: a compiled model compiles its no-grad graph here, cuDNN picks its plans.
    state.evaluator(state)
    m.eval_case_s = median_seconds(lambda: state.evaluator(state), device, 0, eval_repeats)
    # The same scoring (sliding window, labels, Dice) on the case's centre cut to a BraTS brain box.
    evaluator = state.evaluator
    case = PreparedCase(evaluator.folder, evaluator.case_ids[0])
    box = centre_crop_box(case.image.shape[1:], eval_crop)
    image = torch.from_numpy(np.array(case.image[(slice(None),) + box])).to(device)
    label = torch.from_numpy(np.array(case.label[box])).to(device)
    m.eval_crop_shape = list(image.shape[1:])

    def score_crop() -> None:
        labels = logits_to_labels(evaluator.window(state.model, image), evaluator.region_mode)
        for metric in evaluator.metrics:
            metric(labels, label, None)

    score_crop()  # untimed: the crop's last window batch may be a new shape
    m.eval_crop_s = median_seconds(score_crop, device, 0, eval_repeats)
    shape = tuple(case.image.shape[1:])
    m.notes.append(
        f"validation case {evaluator.case_ids[0]} prepared (foreground-cropped) to "
        f"{'x'.join(map(str, shape))} voxels (Z, Y, X)"
    )
    del state, summary, image, label
    release_memory(device)
    return m


# --------------------------------------------------------------------------------------------
# Projection and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipePlan:
    """The full recipe's size: training samples, optimizer steps and evaluations (counts)."""

    epochs: float
    samples: int
    steps: int
    evaluations: int
    eval_interval: str
    max_duration: str


def epoch_steps(entries: int, batch: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of ``entries`` samples, as the trainer's loader cuts it (a partial
    last batch trained, or dropped with ``drop_last``)."""
    return entries // batch if drop_last else math.ceil(entries / batch)


def recipe_plan(recipe_cfg: dict, train_cases: int) -> RecipePlan:
    """Samples, steps and evaluations of the recipe on ``train_cases`` cases per epoch, counted as the
    fit loop counts them: an evaluation every ``eval_interval`` and one more at the end unless the
    last step was just evaluated."""
    batch = recipe_cfg["train_batch_size"]
    steps_per_epoch = epoch_steps(train_cases, batch, recipe_cfg["drop_last"])
    epoch_samples = steps_per_epoch * batch if recipe_cfg["drop_last"] else train_cases
    duration = Duration.parse(recipe_cfg["max_duration"])
    steps = duration_in_batches(duration, steps_per_epoch, batch)
    if duration.unit == "ep":
        samples = duration.value * epoch_samples
    else:  # whole epochs, then full batches
        samples = (steps // steps_per_epoch) * epoch_samples + (steps % steps_per_epoch) * batch
    interval = Duration.parse(recipe_cfg["eval_interval"])
    interval_steps = duration_in_batches(interval, steps_per_epoch, batch) if interval.value else 0
    evaluations = steps // interval_steps if interval_steps else 0
    if not interval_steps or steps % interval_steps:
        evaluations += 1
    return RecipePlan(samples / train_cases, samples, steps, evaluations, str(interval), str(duration))


def projected_seconds(m: Measurement, plan: RecipePlan, val_cases: int) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of the full recipe at this pipeline's whole-epoch rate."""
    per_case = m.eval_crop_s if m.eval_crop_s is not None else (m.eval_case_s or 0.0)
    return plan.samples / m.epoch_rate, plan.evaluations * val_cases * per_case


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def fmt_seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f}"


def verdict(value: float, target: float, higher_is_better: bool, measurable: str | None) -> str:
    ok = value >= target if higher_is_better else value <= target
    if measurable is not None:
        return f"not-measured-on-this-device ({measurable})"
    return "PASS" if ok else "FAIL"


def print_targets(
    ours: Measurement | None,
    monai: Measurement | None,
    ratio: float | None,
    plan: RecipePlan,
    val_cases: int,
    setting_ok: str | None,
) -> None:
    """The four end-to-end targets for ``ours``, each PASS/FAIL, or why it is not measured here."""
    print("targets (on one H200 at the full setting):")
    if ours is None:
        print("  not checked: ours was not run (--only monai)")
        return
    train_s, eval_s = projected_seconds(ours, plan, val_cases)
    checks = [
        (f"ours/MONAI end to end >= {TARGET_RATIO:g}x", ratio, TARGET_RATIO, True, "x"),
        (f"ours >= {TARGET_SAMPLES_PER_S:g} samples/s", ours.median_rate, TARGET_SAMPLES_PER_S, True, " samples/s"),
        (f"ours data wait < {100 * TARGET_DATA_WAIT:g}%", 100 * ours.wait_fraction, 100 * TARGET_DATA_WAIT, False, "%"),
        (
            f"ours full recipe <= {TARGET_RECIPE_S / 60:g} min",
            (train_s + eval_s) / 60,
            TARGET_RECIPE_S / 60,
            False,
            " min",
        ),
    ]
    for label, value, target, higher, unit in checks:
        if value is None:
            print(f"  {label:<34} not measured (the MONAI reference was not run)")
            continue
        print(f"  {label:<34} {value:9.2f}{unit:<10} {verdict(value, target, higher, setting_ok)}")


def print_report(
    args,
    cfg: dict,
    overrides: list[str],
    plan: RecipePlan,
    ours: Measurement | None,
    monai: Measurement | None,
    device: str,
    setting_ok: str | None,
) -> None:
    import monai as monai_pkg

    print()
    print("=" * 100)
    print("bench_train: end-to-end training throughput, ours vs a MONAI-parts reference")
    print(f"command:  {shlex.join(['python', *sys.argv])}")
    print(f"device:   {device_description(device)}")
    print(f"versions: torch {torch.__version__}, MONAI {monai_pkg.__version__}, Python {platform.python_version()}")
    model = cfg["model"]["unet"]
    micro = (ours or monai).microbatch if (ours or monai) else None
    print(
        f"setting:  phantom {args.cases} cases of {'x'.join(map(str, args.shape))} (Z,Y,X), "
        f"{args.epoch_cases} training entries/epoch, patch {args.patch}^3, batch {cfg['train_batch_size']} "
        f"(microbatch {cfg['device_train_microbatch_size']}, used {micro}), {cfg['precision']}, "
        f"{cfg['data']['num_workers']} loader workers, filters {model['filters']}, strides {model['strides']}, "
        f"cudnn.benchmark {'on' if args.cudnn_benchmark else 'off (as unet-train)'}"
    )
    steps_per_epoch = epoch_steps(args.epoch_cases, cfg["train_batch_size"], cfg["drop_last"])
    print(
        f"timing:   {args.warmup_epochs} warm-up epoch(s) then {args.timed_epochs} timed epoch(s) of "
        f"{steps_per_epoch} steps; step time between consecutive step ends"
        f"{' (CUDA-synchronized)' if device == 'cuda' else ''}"
    )
    print(f"ours:     resolve_config({args.config}, [{', '.join(overrides)}])")
    print(
        f"monai:    {'CacheDataset (deterministic prefix cached, copy_cache=False)' if args.monai_dataset == 'cache' else 'Dataset (no cache: every sample loads and normalizes its NIfTI files)'}"
        f" + RandCropByPosNegLabeld/RandFlipd x3/RandGaussianNoised/RandGaussianSmoothd/RandScaleIntensityd/"
        f"RandScaleIntensityFixedMeand(contrast) in DataLoader workers, DynUNet, DiceCELoss(batch=True)"
    )
    for m in (ours, monai):
        if m is None:
            continue
        for name, seconds in m.setup_s.items():
            print(f"  setup {m.name}: {name}: {seconds:.1f} s (not timed)")
        for note in m.notes:
            print(f"  note {m.name}: {note}")
    print()
    header = (
        f"{'pipeline':<10}{'steps':>6}{'samples/step':>14}{'samples/s':>11}{'samples/s':>11}{'data wait':>11}"
        f"{'peak mem':>10}{'eval/case':>11}{'projected full recipe':>34}"
    )
    sub = f"{'':<10}{'':>6}{'':>14}{'(median)':>11}{'(epochs)':>11}{'':>11}{'(GiB)':>10}{'(s, box)':>11}{'(train + eval = total)':>34}"
    print(header)
    print(sub)
    for m in (ours, monai):
        if m is None:
            continue
        train_s, eval_s = projected_seconds(m, plan, args.recipe_val_cases)
        peak = f"{m.peak_bytes / 2**30:.2f}" if m.peak_bytes is not None else "n/a"
        per_step = f"{min(m.samples)}-{max(m.samples)}" if min(m.samples) != max(m.samples) else str(m.samples[0])
        projection = f"{fmt_duration(train_s)} + {fmt_duration(eval_s)} = {fmt_duration(train_s + eval_s)}"
        print(
            f"{m.name:<10}{len(m.step_s):>6}{per_step:>14}{m.median_rate:>11.2f}{m.epoch_rate:>11.2f}"
            f"{100 * m.wait_fraction:>10.1f}%{peak:>10}{fmt_seconds(m.eval_crop_s):>11}{projection:>34}"
        )
    ratio = None
    if ours is not None and monai is not None:
        ratio = ours.median_rate / monai.median_rate
        print(f"ratio ours/MONAI samples/s: {ratio:.2f}x (median), {ours.epoch_rate / monai.epoch_rate:.2f}x (epochs)")
    for m in (ours, monai):
        if m is not None and m.eval_crop_s is not None:
            print(
                f"eval/case {m.name}: {m.eval_crop_s:.2f} s on the validation case's centre "
                f"{'x'.join(map(str, m.eval_crop_shape))} (Z,Y,X; a BraTS brain box, used below), "
                f"{m.eval_case_s:.2f} s on the whole phantom case"
            )
    print(
        f"projection: {plan.max_duration} = {plan.epochs:g} epochs x {args.recipe_train_cases} cases = {plan.samples} "
        f"samples ({plan.steps} steps) at the whole-epoch samples/s, plus {plan.evaluations} evaluations "
        f"(eval_interval {plan.eval_interval}) x {args.recipe_val_cases} cases x eval/case on the BraTS-sized box. "
        f"Assumes the phantom's speed holds for real BraTS cases."
    )
    print()
    print_targets(ours, monai, ratio, plan, args.recipe_val_cases, setting_ok)
    if device != "cuda":
        print()
        print("NOTE: CPU run at a reduced size. These numbers only prove that the benchmark runs end to end;")
        print("      they say nothing about GPU throughput, and the targets are not checked.")
    print("=" * 100)


def setting_of(args: argparse.Namespace, cfg: dict) -> dict:
    """What a measurement depends on besides the device, as JSON (a resumed ablation must match it)."""
    return {
        "shape": list(args.shape),
        "patch": args.patch,
        "depth": args.depth,
        "width_divisor": args.width_divisor,
        "batch": cfg["train_batch_size"],
        "microbatch": cfg["device_train_microbatch_size"],
        "precision": cfg["precision"],
        "workers": cfg["data"]["num_workers"],
        "epoch_cases": args.epoch_cases,
        "warmup_epochs": args.warmup_epochs,
        "timed_epochs": args.timed_epochs,
        "eval_crop": list(args.eval_crop),
        "algorithms": cfg["algorithms"],
        "prefetch_to_device": cfg["data"]["prefetch_to_device"],
        "overrides": list(args.override),
        "recipe": args.recipe,
        "cudnn_benchmark_flag": args.cudnn_benchmark,
    }


def write_json(
    path: Path,
    args: argparse.Namespace,
    cfg: dict,
    ours: Measurement | dict[str, Measurement | None] | None,
    monai: Measurement | None,
    extra: dict | None = None,
) -> None:
    """Every measurement of this invocation, with the device and the resolved setting, as JSON:
    ``ours`` is one measurement, or one per ablation variant label."""
    if isinstance(ours, dict):
        ours_json = {label: m.to_json() if m is not None else None for label, m in ours.items()}
    else:
        ours_json = ours.to_json() if ours is not None else None
    document = {
        "command": shlex.join(["python", *sys.argv]),
        "device": device_description(args.device),
        "torch": torch.__version__,
        "setting": setting_of(args, cfg),
        "ours": ours_json,
        "monai": monai.to_json() if monai is not None else None,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_microbatch(raw: str) -> int | str:
    if raw == "auto":
        return raw
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 'auto' or a positive integer")
    return value


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """The options that fix what is measured (device, config, sizes, timing, output), shared with
    scripts/bench_ablation.py, which passes them on to each run of this script."""
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="auto = cuda when available; the size defaults below depend on it",
    )
    p.add_argument(
        "--config", default=str(REPO / "configs" / "brats.yaml"), help="run config (default configs/brats.yaml)"
    )
    p.add_argument("--recipe", default=None, help="recipe name or path, passed as recipe=NAME (e.g. fast)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for ours (repeatable), e.g. algorithms.channels_last={}; "
        "the MONAI reference follows the resolved batch, patch, model, optimizer, augmentation",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/unet-bench-train"),
        help="phantom, prepared data, split file and run folder (default /tmp/unet-bench-train)",
    )
    p.add_argument(
        "--cases", type=int, default=16, help="distinct phantom volumes, one kept for validation (default 16)"
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="phantom volume in voxels (default 155 240 240 on CUDA, 64 64 64 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument(
        "--epoch-cases",
        type=int,
        default=None,
        help="training entries per epoch (default 387 on CUDA, fold 0's count; 8 on CPU)",
    )
    p.add_argument("--patch", type=int, default=None, help="cubic patch edge in voxels (default 128 CUDA, 32 CPU)")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        help="U-Net levels taken from the config's lists (default 6 CUDA, 4 CPU); the patch must "
        "leave at least 2 voxels per axis at the bottleneck",
    )
    p.add_argument("--width-divisor", type=int, default=None, help="divide every filter count (default 1 CUDA, 4 CPU)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch in samples (default on CUDA: the config's and recipe's, 64; 4 on CPU)",
    )
    p.add_argument(
        "--microbatch",
        type=parse_microbatch,
        default=None,
        help="device_train_microbatch_size, samples or 'auto' (default on CUDA: the config's, auto; "
        "2 on CPU); with auto, MONAI uses the size ours settled on",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=tuple(AMP_DTYPES),
        help="default on CUDA: the config's, amp_bf16; fp32 on CPU (bf16 3D convolutions are emulated there)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers for both pipelines (default: the config's, 8; 1 on CPU)",
    )
    p.add_argument(
        "--prepare-workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="processes for the one-time phantom generation and preparation and the MONAI cache fill",
    )
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed whole epochs first (default 1)")
    p.add_argument("--timed-epochs", type=int, default=2, help="timed whole epochs (default 2)")
    p.add_argument("--eval-repeats", type=int, default=1, help="timed evaluations of the validation case (median)")
    p.add_argument(
        "--eval-crop",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="the BraTS-sized centre box of the validation case whose evaluation time the projection "
        "uses (default 140 170 140, scaled by --shape / 155 240 240)",
    )
    p.add_argument(
        "--monai-dataset",
        default="cache",
        choices=("cache", "dataset"),
        help="monai.data.CacheDataset (deterministic prefix cached in RAM) or monai.data.Dataset",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="set torch.backends.cudnn.benchmark for both pipelines (unet-train does not)",
    )
    p.add_argument(
        "--skip-eval", action="store_true", help="do not time the evaluation (the projection is then training only)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    p.add_argument(
        "--recipe-train-cases",
        type=int,
        default=RECIPE_TRAIN_CASES,
        help="training cases per epoch of the projected full recipe (default 387)",
    )
    p.add_argument(
        "--recipe-val-cases",
        type=int,
        default=RECIPE_VAL_CASES,
        help="validation cases per evaluation of the projected full recipe (default 97)",
    )


def finish_setting(
    p: argparse.ArgumentParser, args: argparse.Namespace, extra_overrides: list[str]
) -> argparse.Namespace:
    """Fill the device-dependent defaults of :func:`add_setting_arguments`'s options and check them;
    ``extra_overrides`` (the ablation's candidates) are checked as ``--override`` is.

    Raises:
        SystemExit: through ``p.error``, one line naming the option.
    """
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    defaults = {
        "shape": [155, 240, 240] if cuda else [64, 64, 64],
        "epoch_cases": 387 if cuda else 8,
        "patch": 128 if cuda else 32,
        "depth": 6 if cuda else 4,
        "width_divisor": 1 if cuda else 4,
    }
    if not cuda:  # on CUDA these stay None and set_up() takes them from the resolved config and recipe
        defaults.update({"batch": 4, "microbatch": 2, "precision": "fp32"})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_crop is None:
        args.eval_crop = [
            max(1, round(box * size / full))
            for box, size, full in zip(BRATS_BRAIN_BOX, args.shape, FULL_SETTING["shape"])
        ]
    if args.workers is None and not cuda:
        args.workers = 1
    if args.cases < 2:
        p.error("--cases must be at least 2 (one validation case and at least one training case)")
    if args.warmup_epochs < 0 or args.timed_epochs < 1 or args.epoch_cases < 1 or args.eval_repeats < 1:
        p.error("--warmup-epochs >= 0, --timed-epochs >= 1, --epoch-cases >= 1 and --eval-repeats >= 1")
    for token in [*args.override, *extra_overrides]:
        key = token.lstrip("-").split("=", 1)[0]
        if key in RESERVED_KEYS or key.startswith("data.phantom"):
            p.error(f"--override {key}: set by the benchmark for timing (see the options instead)")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_setting_arguments(p)
    p.add_argument("--only", default=None, choices=("ours", "monai"), help="run one pipeline only")
    # Moved: named here only so that an old command gets a pointer instead of "unrecognized arguments".
    p.add_argument("--ablate", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ablate:
        p.error("--ablate: the ablation is scripts/bench_ablation.py now, with the same options minus --ablate")
    return finish_setting(p, args, [])


@dataclass
class Setup:
    """What both pipelines run on: the resolved config of ours and the overrides that made it, the
    full recipe's plan, why the targets cannot be checked here (None when they can), the phantom
    (its folder, the seconds generating it took, training entries and validation case) and the
    untimed and timed step counts."""

    cfg: dict
    overrides: list[str]
    plan: RecipePlan
    measurable: str | None
    phantom: Path
    phantom_s: float
    train_ids: list[str]
    val_id: str
    warmup_steps: int
    timed_steps: int


class SetupError(Exception):
    """A setting that cannot be benchmarked; the message is one line naming the option."""


def set_up(args: argparse.Namespace) -> Setup:
    """Resolve the config for ``args`` (filling ``args.batch``, ``args.precision`` and ``args.microbatch``
    from it where not given, and ``args.work`` made absolute), make the phantom and the split.

    Raises:
        SetupError: no CUDA for ``--device cuda``, a config error, or sizes that cannot train.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda but no CUDA GPU is available")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    work = args.work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)

    user = ([f"recipe={args.recipe}"] if args.recipe else []) + list(args.override)
    try:
        base = resolve_config(args.config, user)
    except ConfigError as exc:
        raise SetupError(str(exc)) from exc
    # On CUDA the recipe's own batch, microbatch and precision are benchmarked unless given.
    args.batch = args.batch if args.batch is not None else base["train_batch_size"]
    args.precision = args.precision or base["precision"]
    if args.microbatch is None:
        args.microbatch = base["device_train_microbatch_size"]
        args.microbatch = "null" if args.microbatch is None else args.microbatch  # null = the whole batch at once
    depth = args.depth
    levels = len(base["model"]["unet"]["filters"])
    if not 2 <= depth <= levels:
        raise SetupError(f"--depth {depth}: the config has {levels} levels")
    strides = base["model"]["unet"]["strides"][:depth]
    reduction = math.prod(strides)
    if args.patch % reduction or args.patch // reduction < 2:
        raise SetupError(
            f"--patch {args.patch} with {depth} levels (total stride {reduction}) leaves "
            f"{args.patch / reduction:g} voxels at the bottleneck; instance norm needs at least 2 per axis"
        )
    filters = [max(1, f // args.width_divisor) for f in base["model"]["unet"]["filters"][:depth]]

    phantom, phantom_s = ensure_phantom(work, args.cases, tuple(args.shape), args.seed, args.prepare_workers)
    split_file, train_ids, val_id = write_split(work, phantom, args.cases, args.epoch_cases)
    if base["drop_last"] and args.epoch_cases < args.batch:
        raise SetupError(
            f"drop_last with --epoch-cases {args.epoch_cases} below the batch of {args.batch}: "
            "every batch would be dropped"
        )
    steps_per_epoch = epoch_steps(args.epoch_cases, args.batch, base["drop_last"])
    warmup_steps = args.warmup_epochs * steps_per_epoch
    timed_steps = args.timed_epochs * steps_per_epoch
    ours_overrides = [
        f"data.path={phantom}",
        f"data.prepared_path={work / ('prepared-' + phantom.name)}",
        f"data.split_file={split_file}",
        f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
        f"data.prepare_workers={args.prepare_workers}",
        f"save_folder={work / 'runs' / 'ours'}",
        "autoresume=false",
        f"max_duration={warmup_steps + timed_steps}ba",
        "eval_interval=0ep",
        "save_interval=0ep",
        f"device={args.device}",
        f"precision={args.precision}",
        f"train_batch_size={args.batch}",
        f"device_train_microbatch_size={args.microbatch}",
        f"model.unet.filters=[{','.join(map(str, filters))}]",
        f"model.unet.kernel_sizes=[{','.join(map(str, base['model']['unet']['kernel_sizes'][:depth]))}]",
        f"model.unet.strides=[{','.join(map(str, strides))}]",
    ] + ([f"data.num_workers={args.workers}"] if args.workers is not None else [])
    # The user's recipe and overrides come last, as on the unet-train command line.
    overrides = ours_overrides + user
    try:
        cfg = resolve_config(args.config, overrides)
    except ConfigError as exc:
        raise SetupError(str(exc)) from exc

    measurable = None
    if args.device != "cuda":
        measurable = "CPU"
    elif "H200" not in torch.cuda.get_device_name(0):
        measurable = f"targets are for an H200, this is {torch.cuda.get_device_name(0)}"
    else:
        current = {
            "shape": tuple(args.shape),
            "patch": args.patch,
            "batch": cfg["train_batch_size"],
            "precision": cfg["precision"],
            "width_divisor": args.width_divisor,
            "depth": depth,
        }
        changed = [k for k, v in FULL_SETTING.items() if current[k] != v]
        if changed:
            measurable = f"setting differs from the full setting in: {', '.join(changed)}"

    plan = recipe_plan(base, args.recipe_train_cases)  # the recipe as it would run, without the timing overrides
    return Setup(cfg, overrides, plan, measurable, phantom, phantom_s, train_ids, val_id, warmup_steps, timed_steps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup = set_up(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg, overrides, plan, measurable = setup.cfg, setup.overrides, setup.plan, setup.measurable
    phantom, phantom_s, warmup_steps, timed_steps = (
        setup.phantom,
        setup.phantom_s,
        setup.warmup_steps,
        setup.timed_steps,
    )
    ours = monai = None
    if args.only != "monai":
        print(f"[ours] training {warmup_steps} warm-up + {timed_steps} timed steps", file=sys.stderr)
        ours = run_ours(cfg, warmup_steps, args.eval_repeats, None if args.skip_eval else tuple(args.eval_crop))
        if phantom_s > 1:
            ours.setup_s["phantom generation"] = phantom_s
        if args.json:  # now too, so a command stopped during the MONAI run keeps ours
            write_json(args.json, args, cfg, ours, None)
    if args.only != "ours":
        microbatch = cfg["device_train_microbatch_size"]
        if microbatch == "auto":
            microbatch = ours.microbatch if ours is not None else None
        print(f"[monai] training {warmup_steps} warm-up + {timed_steps} timed steps", file=sys.stderr)
        monai = run_monai(
            cfg,
            phantom,
            setup.train_ids,
            setup.val_id,
            args.monai_dataset,
            args.prepare_workers,
            microbatch,
            warmup_steps,
            timed_steps,
            args.eval_repeats,
            None if args.skip_eval else tuple(args.eval_crop),
        )

    print_report(args, cfg, overrides, plan, ours, monai, args.device, measurable)
    if args.json:
        write_json(args.json, args, cfg, ours, monai)
    return 0


if __name__ == "__main__":
    sys.exit(main())
