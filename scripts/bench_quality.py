#!/usr/bin/env python
"""Learning quality at equal budget: the real trainer against a pipeline built from MONAI parts.

Both pipelines train on the same phantom cases (``--style``, default the BraTS-like one) with the
same split, model configuration, optimizer, learning rate and schedule, batch, patch and number
of steps, each with ``--seeds`` seeds, and both are scored by the SAME evaluator (ours:
``unet_trainer.evaluation.evaluation.DiceEvaluator``, sliding window over the whole prepared validation
volumes, Dice per label NCR/ED/EN and per region WT/TC/ET) at ``--points`` evenly spaced points
of the budget.

    ours    ``unet_trainer.commands.train.run_training`` on ``resolve_config(configs/demo.yaml, ...)``
            (the demo's recipe: RAdam, constant lr, Dice + CE, batched augmentation, oversampling),
            evaluating every ``steps / points`` batches.
    monai   the parts scripts/monai_pipeline.py builds (imported, not copied): its MONAI transforms
            (LoadImaged, MapLabelValued, CropForegroundd, NormalizeIntensityd(nonzero,
            channel_wise), RandCropByPosNegLabeld with the config's oversampling, flips, noise,
            blur, brightness and contrast with the config's probabilities and ranges) over a
            CacheDataset in a MONAI DataLoader, DynUNet with the config's levels, and
            ``monai.losses.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
            batch=True)``; the optimizer and schedule are built by our builders from the same config.
            Its (C, X, Y, Z) network is scored on our prepared (C, Z, Y, X) cases through a
            wrapper that reverses the spatial axes on the way in and out.

Noise rule. For each key (label or region) and point, each pipeline's mean over its seeds and its
spread (max - min over seeds; with two seeds the gap between them) are computed. The noise is the
larger of the two pipelines' spreads, and at least ``--min-noise`` (default 0.02 Dice): a
difference of means (ours - monai) above the noise reads "ahead", below minus the noise
"behind", otherwise "level". The per-region verdict applies the same rule to each seed's
learning-curve mean (the average over all points, i.e. the normalised area under the curve) and,
separately, to the last point.

Sizes: ``--device cpu`` (the default without CUDA) runs the demo's own setting (24 cases of 64^3,
patch 32^3, batch 4, filters 16-128) for 300 steps with 5 points and 2 seeds: 11 minutes in all on
a fairly quiet 2-core machine (BENCHMARKS.md). ``--device cuda`` runs a full setting (40 cases of 128^3, patch 64^3,
batch 2, filters 32-320, 1000 steps, 8 points, 3 seeds). Any size can be changed by its flag.

Recipes (``--compare recipes``, scripts/pose_shift.py): instead of ours against MONAI, three runs of ours
that differ only in their augmentation (Composer's recipe, the demo's; the same plus nnU-Net's rotation
and scaling alone; nnU-Net's whole set as configs/brats-nnunet.yaml has it), each read against
Composer's recipe by the same noise rule. ``--pose-shift`` scores every run (either comparison) also on
the validation cases rotated up to 20 degrees about each axis and scaled 0.85-1.15 (``--pose-seed``),
written once as their own prepared cases, by the same evaluator; the verdicts are given for both
validation sets.

``--override KEY=VALUE`` changes the config of both pipelines (the MONAI side reads the model,
optimizer, schedule, oversampling and augmentation from it); ``--ours-override`` changes ours only
(for an ablation; with ``--compare recipes`` every recipe). ``--json`` is rewritten after every run; ``--resume`` keeps the runs a JSON of
the same setting already holds, so a long comparison can span commands.

Examples:
    python scripts/bench_quality.py --json quality.json                 # CPU: ~11 min quiet
    python scripts/bench_quality.py --device cuda --json quality-gpu.json
    python scripts/bench_quality.py --ours-override augmentation.noise.std=[0,0.1] --json abl-noise.json
    python scripts/bench_quality.py --steps 40 --points 2 --cases 8 --shape 32 --patch 16   # smoke
    python scripts/bench_quality.py --compare recipes --pose-shift --seeds 3 --json recipes.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))
sys.path.insert(0, str(SCRIPTS))

import monai_pipeline  # noqa: E402  (the MONAI-built pipeline's parts)
import pose_shift  # noqa: E402  (the recipe comparison and the shifted validation set)
from benchutil import case_ids, device_description  # noqa: E402

from unet_trainer.commands.builders import (  # noqa: E402
    AMP_DTYPES,
    build_optimizer,
    build_scheduler,
    build_sliding_window,
)
from unet_trainer.commands.datasets import build_split, ensure_prepared, with_dataset  # noqa: E402
from unet_trainer.commands.train import run_training  # noqa: E402
from unet_trainer.config.config import resolve_config  # noqa: E402
from unet_trainer.core.distributed import init_distributed  # noqa: E402
from unet_trainer.data.phantom import PHANTOM_STYLES, write_phantom_dataset  # noqa: E402
from unet_trainer.evaluation.case_metrics import Dice  # noqa: E402
from unet_trainer.evaluation.evaluation import DiceEvaluator  # noqa: E402

REPO = SCRIPTS.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
KEYS = ("NCR", "ED", "EN", "WT", "TC", "ET", "mean")
REGIONS = ("WT", "TC", "ET")
PIPELINES = ("ours", "monai")
COMPARISONS = {"monai": PIPELINES, "recipes": pose_shift.RECIPES}  # the first of each is trained first
# The validation sets a run is scored on: name and the prefix of its keys in a run's history.
VALIDATION_SETS = {"unshifted": "", "shifted": pose_shift.SHIFTED_PREFIX}
SIZES = {
    "cpu": {
        "shape": 64,
        "cases": 24,
        "patch": 32,
        "batch": 4,
        "filters": [16, 32, 64, 128],
        "steps": 300,
        "points": 5,
        "seeds": 2,
    },
    "cuda": {
        "shape": 128,
        "cases": 40,
        "patch": 64,
        "batch": 2,
        "filters": [32, 64, 128, 256, 320],
        "steps": 1000,
        "points": 8,
        "seeds": 3,
    },
}


# --------------------------------------------------------------------------------------------
# Setting
# --------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace, phantom: Path, split_file: Path, seed: int, pipeline: str) -> dict:
    """The resolved demo config at the benchmark's size for one run of ``pipeline`` (a name of
    :data:`COMPARISONS`; ``--ours-override`` for every run of our trainer, not MONAI's)."""
    levels = len(args.filters)
    overrides = [
        f"data.path={phantom}",
        "data.format=brats2021",
        f"data.split_file={split_file}",
        f"data.cache_dir={args.work / 'cache'}",
        f"data.patch_size=[{args.patch}, {args.patch}, {args.patch}]",
        f"model.unet.filters={list(args.filters)}",
        f"model.unet.kernel_sizes={[3] * levels}",
        f"model.unet.strides={[1] + [2] * (levels - 1)}",
        f"train_batch_size={args.batch}",
        f"max_duration={args.steps}ba",
        f"eval_interval={args.steps // args.points}ba",
        "save_interval=0ep",
        f"seed={seed}",
        f"device={args.device}",
        f"save_folder={args.work / 'runs' / f'{pipeline}-seed{seed}'}",
        "callbacks.progress_plot=null",
        "autoresume=false",
    ]
    if pipeline in pose_shift.RECIPES:
        overrides += pose_shift.recipe_overrides(pipeline)
    overrides += list(args.override)
    if pipeline != "monai":
        overrides += list(args.ours_override)
    return resolve_config(DEMO_CONFIG, overrides)


def write_split(args: argparse.Namespace, phantom: Path) -> tuple[Path, dict]:
    """The demo's k-fold split (fold 0) of the phantom's ids, written as an explicit split file so
    both pipelines use exactly the same training and validation cases."""
    ids = case_ids(args.cases)
    cfg = resolve_config(DEMO_CONFIG, [f"data.path={phantom}"])
    split = build_split(cfg, ids)
    path = args.work / f"split-{phantom.name}.json"
    path.write_text(json.dumps(split, indent=1))
    return path, split


def scores_of(record: dict) -> dict[str, float]:
    """{key: Dice} from an evaluator result (``dice/<key>`` entries)."""
    return {k: float(record[f"dice/{k}"]) for k in KEYS}


# --------------------------------------------------------------------------------------------
# The two pipelines
# --------------------------------------------------------------------------------------------


def run_ours(cfg: dict, shifted: DiceEvaluator | None) -> list[dict]:
    """Train ours; one ``{"step", scores}`` per evaluation (the trainer evaluates every interval),
    with the ``pose/<key>`` scores on the shifted validation set where ``shifted`` is given."""
    import shutil

    shutil.rmtree(cfg["save_folder"], ignore_errors=True)  # a fresh run: nothing to resume
    extra = [pose_shift.ShiftedScores(shifted)] if shifted is not None else []
    summary = run_training(cfg, progress=False, extra_callbacks=extra)
    state = summary.pop("state")
    history = [{"step": int(r["batch"]), **scores_of(r)} for r in state.eval_history]
    state.train_loader = None  # stop its loader workers before the next run
    for callback in extra:
        if [r["step"] for r in callback.history] != [r["step"] for r in history]:
            raise RuntimeError("the shifted validation set was not scored at every evaluation")
        for row, scores in zip(history, callback.history):
            row.update({k: v for k, v in scores.items() if k != "step"})
    return history


class ReversedAxes(torch.nn.Module):
    """A (C, X, Y, Z) network (MONAI's layout, as NIfTI stores arrays) seen as a (C, Z, Y, X) one:
    (N, C, Z, Y, X) in, the same out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.transpose(2, 4)).transpose(2, 4)


def build_evaluator(cfg: dict, case_ids: list[str]) -> DiceEvaluator:
    """Our evaluator on the config's dataset's prepared ``case_ids`` (prepared here when missing),
    with the config's sliding-window settings (the same one ``run_training`` builds for ours)."""
    prepared, _ = ensure_prepared(cfg, init_distributed("cpu"), progress=False)
    device = torch.device("cuda" if cfg["device"] == "cuda" else "cpu")
    return DiceEvaluator(
        prepared,
        case_ids,
        build_sliding_window(cfg),
        [Dice(cfg["eval"]["empty_policy"])],
        region_mode=False,
        device=device,
    )


def run_monai(
    cfg: dict,
    phantom: Path,
    split: dict,
    evaluators: tuple[DiceEvaluator, DiceEvaluator | None],
    steps: int,
    every: int,
) -> list[dict]:
    """Train the MONAI-built pipeline for ``steps`` steps, scoring it every ``every`` with the first
    of ``evaluators`` and, where given, the second (the shifted validation set, as ``pose/<key>``)."""
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss

    seed = cfg["seed"]
    device = torch.device("cuda" if cfg["device"] == "cuda" else "cpu")
    torch.manual_seed(seed)
    np.random.seed(seed)
    train_tf, _ = monai_pipeline.monai_transforms(cfg)
    train_tf.set_random_state(seed=seed)
    pool = list(dict.fromkeys(split["train"]))
    cache = CacheDataset(
        [monai_pipeline.monai_item(phantom, c) for c in pool], train_tf, num_workers=1, progress=False, copy_cache=False
    )
    position = {c: i for i, c in enumerate(pool)}
    dataset = cache[[position[c] for c in split["train"]]]
    workers = cfg["data"]["num_workers"]
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg["train_batch_size"],
        shuffle=True,
        num_workers=workers,
        drop_last=False,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
    )
    notes: list[str] = []
    model = monai_pipeline.build_dynunet(cfg["model"]["unet"], notes).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, len(loader), steps)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    amp_dtype = AMP_DTYPES[cfg["precision"]]
    wrapped = ReversedAxes(model)
    history = []
    model.train()
    iterator = iter(loader)
    for step in range(1, steps + 1):
        try:
            batch = next(iterator)
        except StopIteration:  # a new epoch, a new shuffle
            iterator = iter(loader)
            batch = next(iterator)
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"MONAI pipeline: loss became {loss.item()} at step {step}")
        if step % every == 0 or step == steps:
            model.eval()
            means, _ = evaluators[0].score_model(wrapped)
            history.append({"step": step, **{k: float(means[k]) for k in KEYS}})
            if evaluators[1] is not None:
                history[-1].update(pose_shift.shifted_keys(evaluators[1].score_model(wrapped)[0]))
            model.train()
            print(
                f"  [{time.strftime('%H:%M:%S')}] monai step {step}: " + "  ".join(f"{k} {means[k]:.3f}" for k in KEYS),
                file=sys.stderr,
                flush=True,
            )
    del iterator, loader
    return history


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def verdict(diff: float, noise: float) -> str:
    """The noise rule: ahead / level / behind beyond the noise."""
    if diff > noise:
        return "ahead"
    if diff < -noise:
        return "behind"
    return "level"


def spread(values: list[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else math.nan


def compare(runs: dict[str, dict[int, list[dict]]], min_noise: float, prefix: str = "") -> dict:
    """Per point and key: each pipeline's seed mean and spread, the difference and the verdict;
    per region: the verdicts on the learning-curve mean and on the last point.

    ``runs`` holds two pipelines, the one read first, then the one it is read against (the
    difference is first - second); ``runs[pipeline][seed]`` is that run's history (one score dict
    per point, same steps in all). ``prefix`` picks the validation set (:data:`VALIDATION_SETS`):
    the scores of ``key`` are read from ``prefix + key``; the result's keys stay plain.
    """
    pipelines = list(runs)
    first, second = pipelines
    steps = [h["step"] for h in next(iter(runs[first].values()))]
    table = []
    for i, step in enumerate(steps):
        for key in KEYS:
            row = {"step": step, "key": key}
            for p in pipelines:
                values = [history[i][prefix + key] for history in runs[p].values()]
                row[p] = statistics.fmean(values)
                row[f"{p}_spread"] = spread(values)
            row["diff"] = row[first] - row[second]
            # With one seed there is no spread: the floor alone is the noise.
            row["noise"] = max(
                [min_noise] + [row[f"{p}_spread"] for p in pipelines if not math.isnan(row[f"{p}_spread"])]
            )
            row["verdict"] = verdict(row["diff"], row["noise"])
            table.append(row)
    summary = {}
    for key in KEYS:
        entry = {}
        for what, pick in (
            ("curve", lambda h, key=prefix + key: statistics.fmean(r[key] for r in h)),
            ("final", lambda h, key=prefix + key: h[-1][key]),
        ):
            per = {p: [pick(h) for h in runs[p].values()] for p in pipelines}
            diff = statistics.fmean(per[first]) - statistics.fmean(per[second])
            noise = max([min_noise] + [spread(v) for v in per.values() if len(v) > 1])
            entry[what] = {
                **{p: statistics.fmean(per[p]) for p in pipelines},
                "diff": diff,
                "noise": noise,
                "verdict": verdict(diff, noise),
            }
        summary[key] = entry
    return {"pipelines": pipelines, "steps": steps, "table": table, "summary": summary}


def compare_all(runs: dict[str, dict[int, list[dict]]], min_noise: float, sets: list[str]) -> dict:
    """``{set: {"<first> - <second>": compare(...)}}`` for each validation set in ``sets`` (names of
    :data:`VALIDATION_SETS`) and each pair: ours - monai, or every recipe - the first (Composer's)."""
    names = list(runs)
    pairs = [("ours", "monai")] if names == list(PIPELINES) else [(name, names[0]) for name in names[1:]]
    return {
        name: {
            f"{first} - {second}": compare({first: runs[first], second: runs[second]}, min_noise, VALIDATION_SETS[name])
            for first, second in pairs
        }
        for name in sets
    }


def print_comparison(result: dict, min_noise: float) -> None:
    """One pair's table per point and its verdict per key (a :func:`compare` result)."""
    first, second = result["pipelines"]
    print(
        f"Dice (mean over seeds, ± = seed spread max-min); diff = {first} - {second}; noise = max(spreads, "
        f"{min_noise}); verdict: ahead / level / behind beyond noise"
    )
    print(f"{'step':>5} {'key':>4}  {first:>13}  {second:>13}  {'diff':>6}  {'noise':>5}  verdict")
    for row in result["table"]:
        cell = {p: f"{row[p]:.3f} ±{row[p + '_spread']:.3f}" for p in (first, second)}
        print(
            f"{row['step']:>5} {row['key']:>4}  {cell[first]:>13}  {cell[second]:>13}  {row['diff']:+.3f}  "
            f"{row['noise']:.3f}  {row['verdict']}"
        )
    print("Verdict per key (curve = each seed's mean over all points; final = the last point):")
    pair = f"{first}/{second}"
    print(
        f"{'key':>4}  {'curve ' + pair:>24}  {'diff':>6}  {'noise':>5}  {'verdict':8}  "
        f"{'final ' + pair:>24}  {'diff':>6}  {'noise':>5}  verdict"
    )
    for key, entry in result["summary"].items():
        c, f = entry["curve"], entry["final"]
        print(
            f"{key:>4}  {c[first]:>11.3f} / {c[second]:.3f}  {c['diff']:+.3f}  {c['noise']:.3f}  {c['verdict']:8}  "
            f"{f[first]:>11.3f} / {f[second]:.3f}  {f['diff']:+.3f}  {f['noise']:.3f}  {f['verdict']}"
        )


def print_report(args: argparse.Namespace, result: dict, walls: dict[str, list[float]]) -> None:
    """Every pair's tables on every validation set, then the verdicts per region side by side."""
    seeds = ", ".join(map(str, range(args.seed0, args.seed0 + args.seeds)))
    print(
        f"\nLearning quality at equal budget: {args.style} phantom, {args.cases} cases of {args.shape}^3, "
        f"patch {args.patch}^3, batch {args.batch}, filters {args.filters}, {args.steps} steps, seeds {seeds}; "
        f"device {device_description(torch.device(args.device))}"
    )
    for p, times in walls.items():
        print(f"  {p:12s} wall time per run: " + ", ".join(f"{w:.0f} s" for w in times))
    for name, pairs in result.items():
        for pair, comparison in pairs.items():
            print(f"\n== {pair}, {name} validation ==")
            print_comparison(comparison, args.min_noise)
    print("\nVerdict per region, curve / final (curve = each seed's mean over all points; final = the last point):")
    print(f"{'validation':10}  {'pair':28}  " + "  ".join(f"{region:>17}" for region in REGIONS))
    for name, pairs in result.items():
        for pair, comparison in pairs.items():
            cells = [comparison["summary"][region] for region in REGIONS]
            print(
                f"{name:10}  {pair:28}  "
                + "  ".join(f"{c['curve']['verdict']:>8}/{c['final']['verdict']:<8}" for c in cells)
            )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def setting_of(args: argparse.Namespace) -> dict:
    """What a JSON's runs were measured under (``--resume`` refuses another setting)."""
    keys = (
        "style",
        "cases",
        "shape",
        "patch",
        "batch",
        "filters",
        "steps",
        "points",
        "device",
        "override",
        "ours_override",
        "compare",
        "pose_shift",
        "pose_seed",
    )
    return {k: getattr(args, k) for k in keys}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--style", choices=PHANTOM_STYLES, default=PHANTOM_STYLES[0], help="phantom style")
    parser.add_argument("--cases", type=int, help="phantom cases (split by the demo's 5-fold, fold 0)")
    parser.add_argument("--shape", type=int, help="phantom volume edge in voxels (cubic)")
    parser.add_argument("--patch", type=int, help="training patch edge (also the sliding window)")
    parser.add_argument("--batch", type=int, help="global batch")
    parser.add_argument("--filters", type=int, nargs="+", help="model filters per level (strides 1, 2, 2, ...)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--points", type=int, help="evaluations per run, evenly spaced (4-8 recommended)")
    parser.add_argument("--seeds", type=int, help="seeds per pipeline (at least 2 to read the noise)")
    parser.add_argument("--seed0", type=int, default=0, help="first seed")
    parser.add_argument("--min-noise", type=float, default=0.02, help="smallest Dice difference read as real")
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="monai", help="ours against MONAI, or recipes")
    parser.add_argument(
        "--pose-shift", action="store_true", help="also score every run on the pose-shifted validation cases"
    )
    parser.add_argument("--pose-seed", type=int, default=0, help="the seed of the validation cases' poses")
    every_name = tuple(dict.fromkeys(name for names in COMPARISONS.values() for name in names))
    parser.add_argument(
        "--only", choices=every_name, help="run one pipeline or recipe (the comparison needs all in --json)"
    )
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="both pipelines")
    parser.add_argument(
        "--ours-override", action="append", default=[], metavar="KEY=VALUE", help="our trainer's runs only"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/unet-bench-quality"), help="phantom, prepared data and run folders"
    )
    parser.add_argument("--json", type=Path, help="write settings, every run's history and the comparison here")
    parser.add_argument("--resume", action="store_true", help="keep the runs --json already holds (same setting)")
    args = parser.parse_args(argv)
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seeds < 1 or args.points < 1 or args.steps < args.points:
        parser.error("need --seeds >= 1 and --steps >= --points >= 1")
    if args.steps % args.points:
        parser.error(f"--steps {args.steps} is not a multiple of --points {args.points}")
    if args.resume and args.json is None:
        parser.error("--resume needs --json")
    if args.only and args.only not in COMPARISONS[args.compare]:
        parser.error(f"--only {args.only} is not one of --compare {args.compare}'s {COMPARISONS[args.compare]}")
    return args


def prepare_phantom(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The phantom (generated on first use), its split file and split."""
    phantom = args.work / f"phantom-{args.style}-{args.cases}cases-{args.shape}-seed0"
    if not (phantom / "phantom.json").is_file():
        print(f"Generating {args.cases} {args.style} phantom cases of {args.shape}^3 into {phantom}", file=sys.stderr)
        write_phantom_dataset(phantom, args.cases, (args.shape,) * 3, 0, progress=False, workers=2, style=args.style)
    split_file, split = write_split(args, phantom)
    print(
        f"split: {len(split['train'])} training, {len(split['val'])} validation cases ({split_file})", file=sys.stderr
    )
    return phantom, split_file, split


def shifted_evaluator(args: argparse.Namespace, phantom: Path, split_file: Path, split: dict) -> DiceEvaluator | None:
    """The evaluator of the pose-shifted validation cases (written and prepared on first use), or
    None without ``--pose-shift``."""
    if not args.pose_shift:
        return None
    shifted = args.work / f"{phantom.name}-pose-seed{args.pose_seed}"
    pose_shift.write_pose_shifted(phantom, split["val"], shifted, args.pose_seed)
    print(f"pose-shifted validation: {len(split['val'])} cases ({shifted})", file=sys.stderr)
    cfg = build_config(args, phantom, split_file, args.seed0, COMPARISONS[args.compare][0])
    return build_evaluator(with_dataset(cfg, shifted, "brats2021"), split["val"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    phantom, split_file, split = prepare_phantom(args)
    names = COMPARISONS[args.compare]
    runs: dict[str, dict[int, list[dict]]] = {p: {} for p in names}
    walls: dict[str, list[float]] = {p: [] for p in names}
    if args.resume and args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("setting") != setting_of(args):
            print(
                f"error: {args.json} holds runs of another setting; drop --resume or choose another --json",
                file=sys.stderr,
            )
            return 2
        for p in names:
            runs[p] = {int(s): h for s, h in old["runs"][p].items()}
            walls[p] = old["walls"][p]

    def save(result: dict | None = None) -> None:
        if args.json is None:
            return
        payload = {
            "setting": setting_of(args),
            "device": device_description(torch.device(args.device)),
            "torch": torch.__version__,
            "host": platform.node(),
            "split": split,
            "runs": {p: {str(s): h for s, h in runs[p].items()} for p in names},
            "walls": walls,
            "comparison": result,
        }
        args.json.write_text(json.dumps(payload, indent=1))

    every = args.steps // args.points
    shifted = shifted_evaluator(args, phantom, split_file, split)
    evaluator = None
    # Interleaved (ours seed 0, monai seed 0, ours seed 1, ...): a machine that slows down part-way
    # affects all alike (only wall time, never the scores, depends on it).
    for seed in range(args.seed0, args.seed0 + args.seeds):
        for p in names:
            if (args.only and p != args.only) or seed in runs[p]:
                continue
            cfg = build_config(args, phantom, split_file, seed, p)
            print(f"[{time.strftime('%H:%M:%S')}] {p} seed {seed}: {args.steps} steps", file=sys.stderr)
            started = time.perf_counter()
            if p == "monai":
                evaluator = evaluator or build_evaluator(cfg, split["val"])
                runs[p][seed] = run_monai(cfg, phantom, split, (evaluator, shifted), args.steps, every)
            else:
                runs[p][seed] = run_ours(cfg, shifted)
            walls[p].append(time.perf_counter() - started)
            last = runs[p][seed][-1]
            print(
                f"  {time.perf_counter() - started:.0f} s; last point: "
                + "  ".join(f"{k} {last[k]:.3f}" for k in KEYS),
                file=sys.stderr,
            )
            save()
    if not all(runs[p] for p in names):
        print("some pipelines have no runs yet: no comparison (run them, with --resume and the same --json)")
        return 0
    steps = {tuple(r["step"] for r in h) for p in names for h in runs[p].values()}
    if len(steps) != 1:
        print(f"error: the runs were evaluated at different steps {sorted(steps)}", file=sys.stderr)
        return 1
    result = compare_all(runs, args.min_noise, list(VALIDATION_SETS) if args.pose_shift else ["unshifted"])
    print_report(args, result, walls)
    save(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
