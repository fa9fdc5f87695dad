#!/usr/bin/env python
"""End-to-end training throughput: the real trainer against a pipeline built from MONAI parts.

Both pipelines train on the same synthetic BraTS-2021-layout phantom, with the same patch, global
batch, microbatch, optimizer, precision and number of loader workers, and are timed the same way.

    ours    ``unet_trainer.builders.run_training`` on ``resolve_config(configs/brats.yaml, ...)``:
            prepared memory-mapped cases, workers that only crop, batched augmentation on the
            training device, the trainer's microbatch loop and its always-on callbacks (metrics
            logger, progress plot, monitors). The timing overrides are listed in the output.
    monai   ``monai.data.CacheDataset`` (default; ``--monai-dataset dataset`` for
            ``monai.data.Dataset``) over the raw NIfTI phantom files with LoadImaged (4 modalities
            stacked as channels), MapLabelValued (BraTS 2021 label 4 -> 3), CropForegroundd,
            FgBgToIndicesd and NormalizeIntensityd(nonzero, channel_wise) as the cached deterministic
            prefix, then RandCropByPosNegLabeld, RandFlipd x3, RandGaussianNoised,
            RandGaussianSmoothd, RandScaleIntensityd (brightness) and RandScaleIntensityFixedMeand
            (fixed_mean=False, preserve_range=True: multiply then clamp to the sample's range, which
            is the contrast step of ours; RandAdjustContrastd would be a gamma, not a multiply) in
            ``monai.data.DataLoader`` workers on the CPU; ``monai.networks.nets.DynUNet`` with the
            config's filters, kernels, strides, affine instance norm and leaky ReLU;
            ``monai.losses.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
            batch=True)``; the config's optimizer (RAdam lr 1e-3, betas (0.9, 0.999), eps 1e-8,
            weight decay 1e-4 for configs/brats.yaml); the same autocast and microbatch
            accumulation. Probabilities and ranges come from the resolved config's augmentation
            section, so ``--override augmentation.*`` changes both pipelines.

Data: ``--cases`` distinct phantom volumes are written once into ``--work``; one is the
validation case and the others are repeated to ``--epoch-cases`` training entries through an
explicit split file (ours) or an index list over the cache (MONAI), so an epoch has the recipe's
number of steps (387 cases / batch 64 = 7 steps, the last one of 3 samples) without generating
and preparing 387 volumes. The validation fold is that one case, so the evaluation the trainer
runs at the end of fit stays short.

Timing: wall time per optimizer step between consecutive step ends (``BATCH_END`` for ours,
measured by a callback passed to ``run_training(extra_callbacks=...)``; with
``torch.cuda.synchronize()`` there on CUDA, so the host clock includes the device work), samples
per step, the time blocked in ``next(loader)`` (ours: ``state.step_metrics["time/data_wait_s"]``)
and ``torch.cuda.max_memory_allocated`` reset after warm-up. ``--warmup-epochs`` whole epochs are
not timed (worker start-up, cuDNN autotuning when ``--cudnn-benchmark`` is given, the search of
``device_train_microbatch_size: auto``); then ``--timed-epochs`` whole epochs are. Checkpoints and
evaluation are off during training (save/eval interval 0ep; with interval 0 the trainer runs no
final evaluation); its final checkpoint is written after the last timed step, outside the timing.

Reported per pipeline: samples/s as the median over steps of samples/step time (steady state) and
over the whole timed epochs (sum of samples / sum of step time: includes each epoch's loader
restart and short last batch), the data-wait fraction (sum of waits / sum of step times), the
peak CUDA memory, and the projected wall time of the full recipe:

    train = recipe epochs (200 for configs/brats.yaml) x 387 cases / whole-epoch samples/s
    eval  = evaluations in the recipe (eval_interval 10ep over 200 epochs: 20) x 97 cases
            x seconds for one sliding-window evaluation of a BraTS-sized case

One evaluation (the median of ``--eval-repeats``) is timed, after an untimed one that pays the
one-off costs (compilation of the eval-mode graph, cuDNN plans, the allocator), with our
evaluator's scoring (sliding window, labels, Dice per label and region) and, for MONAI, with
``monai.inferers.sliding_window_inference`` plus argmax and ``monai.metrics.DiceMetric`` on the
already loaded case. The phantom draws a whole head, whose nonzero box is larger than a
skull-stripped BraTS brain's (about 140 x 170 x 140 of 155 x 240 x 240), and the number of
windows grows with the box (at 128^3 windows and overlap 0.5: 8 for the brain box, 18 for the
phantom's), so both are timed on the whole phantom case and on its centre cut to ``--eval-crop``
(the brain box, scaled with ``--shape``); the projection uses the latter.

Targets (issues 8 and 12, on one H200 at the full setting): ours >= 2x MONAI end to end, >= 60
samples/s (the first milestone), data wait < 5%, full recipe <= 30 minutes. On any other device or size they are reported as not
measured. On CUDA the batch, microbatch and precision default to the resolved config's (with
``--recipe``, the recipe's: a recipe is benchmarked as it would run). On a machine without CUDA the defaults shrink to a CPU smoke size (64^3 volumes, 32^3
patches, filters / 4, 4 levels, batch 4 in microbatches of 2, fp32): those numbers only prove that
the benchmark runs.

Ablation (``--ablate``): which of the resolved config's speed switches pay. Ours runs once with all
of them (the reference), once without each (``algorithms.NAME=null``, ``data.prefetch_to_device=false``),
once without any, and once with each ``--candidate`` override added; each run is a separate process
of this script (``--only ours --json``), so compile caches, cuDNN flags, the CUDA context and the
memory statistics start fresh; MONAI runs once, at the microbatch the reference settled on. With
``--repeats R`` every variant runs R times, interleaved (all variants, then all again), and its rate
is the median of its runs'; the spread of those runs ((max - min) / median) is the run-to-run
noise. A switch's gain is the reference's rate over the rate without it; it is kept when the gain
is at least ``1 + --min-gain`` and above the noise of the two variants. The usual report is
printed for the median reference run, then the ablation table. Only the reference runs time the
evaluation (``--skip-eval`` for the others). ``--json`` is rewritten after every run, and
``--resume`` with the same ``--json`` keeps the runs it holds (same setting and device, checked)
and runs only the rest: an ablation longer than one command's time limit goes on in the next.
EMA is not ablated: it changes the weights, not only the speed.

Examples:
    python scripts/bench_train.py                                        # CUDA: the issue's setting
    python scripts/bench_train.py --recipe fast                          # a recipe of recipes/
    python scripts/bench_train.py --recipe fast --ablate --candidate algorithms.compile.mode=reduce-overhead
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
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import device_description

from unet_trainer.builders import AMP_DTYPES, build_optimizer, run_training  # noqa: E402
from unet_trainer.config import ConfigError, Duration, resolve_config  # noqa: E402
from unet_trainer.data.loader import PreparedCase, prefetch_batches  # noqa: E402
from unet_trainer.data.phantom import write_phantom_dataset  # noqa: E402
from unet_trainer.evaluation import logits_to_labels  # noqa: E402
from unet_trainer.inference import predict_volume  # noqa: E402
from unet_trainer.metrics import case_dice  # noqa: E402
from unet_trainer.trainer import Callback, State, duration_in_batches  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Fold 0 of the 484 MSD cases with split_seed 0 (Composer's split): 387 training, 97 validation.
RECIPE_TRAIN_CASES = 387
RECIPE_VAL_CASES = 97
MODALITIES = ("flair", "t1", "t1ce", "t2")
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
# Issue 8's targets, as issue 12 restates them for one H200 at the full setting.
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
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One pipeline's timed steps and side measurements.

    ``step_s``/``wait_s`` are seconds per timed step, ``samples`` samples per timed step;
    ``peak_bytes`` is the peak CUDA memory allocated after warm-up (None on CPU); ``eval_case_s``
    the seconds for one evaluation of the whole validation case, ``eval_crop_s`` of its centre
    cropped to a BraTS-sized brain box (``eval_crop_shape``, Z Y X), which the projection uses; ``setup_s`` named setup costs outside
    the timing, in seconds.
    """

    name: str
    step_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    peak_bytes: int | None = None
    microbatch: int | None = None
    eval_case_s: float | None = None
    eval_crop_s: float | None = None
    eval_crop_shape: list[int] | None = None
    setup_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self, step_s: float, wait_s: float, samples: int) -> None:
        self.step_s.append(step_s)
        self.wait_s.append(wait_s)
        self.samples.append(samples)

    @property
    def median_rate(self) -> float:
        """Median over timed steps of samples / step time (samples/s)."""
        return statistics.median(n / t for n, t in zip(self.samples, self.step_s))

    @property
    def epoch_rate(self) -> float:
        """Sum of samples / sum of step times over the timed whole epochs (samples/s)."""
        return sum(self.samples) / sum(self.step_s)

    @property
    def wait_fraction(self) -> float:
        """Share of the timed wall time spent blocked on the loader (0..1)."""
        return sum(self.wait_s) / sum(self.step_s)

    def to_json(self) -> dict:
        """The raw per-step lists, the derived rates and the side measurements, JSON-serializable."""
        return {
            "name": self.name,
            "median_rate": self.median_rate,
            "epoch_rate": self.epoch_rate,
            "wait_fraction": self.wait_fraction,
            "peak_bytes": self.peak_bytes,
            "microbatch": self.microbatch,
            "eval_case_s": self.eval_case_s,
            "eval_crop_s": self.eval_crop_s,
            "eval_crop_shape": self.eval_crop_shape,
            "step_s": self.step_s,
            "wait_s": self.wait_s,
            "samples": self.samples,
            "setup_s": self.setup_s,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        return cls(
            data["name"],
            list(data["step_s"]),
            list(data["wait_s"]),
            list(data["samples"]),
            data["peak_bytes"],
            data["microbatch"],
            data["eval_case_s"],
            data.get("eval_crop_s"),
            data.get("eval_crop_shape"),
            dict(data["setup_s"]),
            list(data["notes"]),
        )


class StepTimer(Callback):
    """Times the trainer's steps between consecutive ``BATCH_END`` events.

    Runs first among the callbacks (``run_training`` puts extra callbacks before its own), so the
    time of step k includes the built-in callbacks' work at the end of step k - 1, as a real run
    pays it. On CUDA the device is synchronized at each ``BATCH_END`` so the host clock covers the
    kernels of the step; the trainer already synchronizes at every microbatch (``loss.item()``),
    so this costs no overlap that the trainer would otherwise have had.
    """

    def __init__(self, measurement: Measurement, warmup_steps: int):
        self.m = measurement
        self.warmup_steps = warmup_steps
        self._last_time = 0.0
        self._last_sample = 0

    def _sync(self, state: State) -> None:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)

    def fit_start(self, state: State) -> None:
        self._sync(state)
        if state.device.type == "cuda" and self.warmup_steps == 0:
            torch.cuda.reset_peak_memory_stats(state.device)
        self._last_time = time.perf_counter()
        self._last_sample = state.timestamp.sample

    def batch_end(self, state: State) -> None:
        self._sync(state)
        now = time.perf_counter()
        step, sample = state.timestamp.batch, state.timestamp.sample
        if step > self.warmup_steps:
            self.m.record(
                now - self._last_time,
                float(state.step_metrics.get("time/data_wait_s", 0.0)),
                sample - self._last_sample,
            )
            if state.device.type == "cuda":
                # Read at every timed step, as a running maximum: the memory monitor (after this
                # callback) resets the counter each step, and the final evaluation must not count.
                self.m.peak_bytes = max(self.m.peak_bytes or 0, torch.cuda.max_memory_allocated(state.device))
        elif step == self.warmup_steps and state.device.type == "cuda":
            # The auto-microbatch search may have hit out-of-memory during warm-up: not the steady state.
            torch.cuda.reset_peak_memory_stats(state.device)
        auto = state.extra_state.get("auto_microbatch")
        self.m.microbatch = auto if auto is not None else self.m.microbatch
        self._last_time, self._last_sample = now, sample


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


def centre_crop_box(shape: tuple[int, ...], crop: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the centred box of ``crop`` voxels (per axis, at most the shape's) in ``shape``."""
    box = []
    for size, want in zip(shape, crop):
        take = min(size, want)
        start = (size - take) // 2
        box.append(slice(start, start + take))
    return tuple(box)


def release_memory(device: torch.device) -> None:
    """Collect what the caller has just dropped and, on CUDA, hand the cached blocks back, so the
    next pipeline's peak memory starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_median(function, repeats: int, sync) -> float:
    """Median seconds of ``repeats`` calls of ``function`` (each between device synchronizations)."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case_ids(cases: int) -> list[str]:
    """The phantom's case ids (write_phantom_dataset names them BraTS2021_00000 onwards)."""
    return [f"BraTS2021_{i:05d}" for i in range(cases)]


def write_split(work: Path, phantom: Path, cases: int, epoch_cases: int) -> tuple[Path, list[str], str]:
    """An explicit split: the first ``cases - 1`` ids repeated to ``epoch_cases`` training entries and
    the last id as the only validation case. Returns (file, training entries, validation id)."""
    ids = case_ids(cases)
    pool, val_id = ids[:-1], ids[-1]
    train = [pool[i % len(pool)] for i in range(epoch_cases)]
    path = work / f"split-{phantom.name}-{epoch_cases}.json"
    path.write_text(json.dumps({"train": train, "val": [val_id]}))
    return path, train, val_id


def monai_item(phantom: Path, case_id: str) -> dict:
    """A MONAI data dict: the 4 modality files (stacked as channels by LoadImaged) and the label file."""
    folder = phantom / case_id
    return {
        "image": [str(folder / f"{case_id}_{m}.nii.gz") for m in MODALITIES],
        "label": str(folder / f"{case_id}_seg.nii.gz"),
    }


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
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
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
    m.eval_case_s = time_median(lambda: state.evaluator(state), eval_repeats, sync)
    # The same scoring (sliding window, labels, Dice) on the case's centre cut to a BraTS brain box.
    evaluator = state.evaluator
    case = PreparedCase(evaluator.folder, evaluator.case_ids[0])
    box = centre_crop_box(case.image.shape[1:], eval_crop)
    image = torch.from_numpy(np.array(case.image[(slice(None),) + box])).to(device)
    label = torch.from_numpy(np.array(case.label[box])).to(device)
    m.eval_crop_shape = list(image.shape[1:])

    def score_crop() -> None:
        logits = predict_volume(
            state.model,
            image,
            evaluator.patch_size,
            evaluator.spatial_dims,
            evaluator.num_outputs,
            evaluator.overlap,
            evaluator.sw_batch_size,
            evaluator.gaussian,
            evaluator.amp_dtype,
            evaluator.mirror,
        )
        case_dice(logits_to_labels(logits, evaluator.region_mode), label, evaluator.empty_policy)

    score_crop()  # untimed: the crop's last window batch may be a new shape
    m.eval_crop_s = time_median(score_crop, eval_repeats, sync)
    shape = tuple(case.image.shape[1:])
    m.notes.append(
        f"validation case {evaluator.case_ids[0]} prepared (foreground-cropped) to "
        f"{'x'.join(map(str, shape))} voxels (Z, Y, X)"
    )
    del state, summary, image, label
    release_memory(device)
    return m


# --------------------------------------------------------------------------------------------
# MONAI reference
# --------------------------------------------------------------------------------------------


def monai_transforms(cfg: dict):
    """(training Compose, validation Compose) of MONAI transforms matching the config.

    MONAI arrays are (C, X, Y, Z) as NIfTI stores them; ours are (C, Z, Y, X), so the patch is
    reversed. The training Compose's deterministic prefix (up to NormalizeIntensityd) is what
    CacheDataset caches; FgBgToIndicesd is in it so the crop does not search the volume each draw,
    and runs before the z-score, while "inside the head" is still "> 0".
    """
    from monai import transforms as T

    data, aug = cfg["data"], cfg["augmentation"]
    patch = tuple(reversed(data["patch_size"]))
    keys = ["image", "label"]
    load = [
        T.LoadImaged(keys="image"),  # a list of 4 files -> stacked along a new first (channel) axis
        T.LoadImaged(keys="label", dtype=np.uint8, ensure_channel_first=True),
        T.MapLabelValued(keys="label", orig_labels=[0, 1, 2, 4], target_labels=[0, 1, 2, 3], dtype=np.uint8),
        T.CropForegroundd(keys=keys, source_key="image"),
    ]
    normalize = T.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    random: list = [
        T.RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            pos=data["oversampling"],
            neg=1.0 - data["oversampling"],
            num_samples=1,
            fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
        ),
    ]
    if aug["enabled"]:
        flip_p = aug["flip"]["p"]
        blur = tuple(aug["blur"]["sigma"])
        brightness, contrast = aug["brightness"]["scale"], aug["contrast"]["scale"]
        random += [
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=flip_p, spatial_axis=2),
            # std ~ U(0, std) per draw (sample_std=True); ours draws U(noise.std).
            T.RandGaussianNoised(keys="image", prob=aug["noise"]["p"], mean=0.0, std=aug["noise"]["std"][1]),
            T.RandGaussianSmoothd(keys="image", prob=aug["blur"]["p"], sigma_x=blur, sigma_y=blur, sigma_z=blur),
            T.RandScaleIntensityd(
                keys="image", prob=aug["brightness"]["p"], factors=(brightness[0] - 1.0, brightness[1] - 1.0)
            ),
            T.RandScaleIntensityFixedMeand(
                keys="image",
                prob=aug["contrast"]["p"],
                factors=(contrast[0] - 1.0, contrast[1] - 1.0),
                fixed_mean=False,
                preserve_range=True,
            ),
        ]
    # Plain tensors to the network, as MONAI recommends for speed (no meta tracking in the model).
    random.append(T.EnsureTyped(keys=keys, track_meta=False))
    train = T.Compose(
        load + [T.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0), normalize] + random
    )
    val = T.Compose(load + [normalize, T.EnsureTyped(keys=keys, track_meta=False)])
    return train, val


def build_dynunet(model_cfg: dict, notes: list[str]) -> torch.nn.Module:
    """DynUNet with the config's levels; mismatches it cannot express are added to ``notes``."""
    from monai.networks.nets import DynUNet

    norms = {
        "instance": ("INSTANCE", {"affine": True}),
        "batch": ("BATCH", {"affine": True}),
        "group": ("GROUP", {"num_groups": model_cfg["norm_groups"], "affine": True}),
    }
    if model_cfg["norm"] not in norms:
        notes.append(f"model.unet.norm={model_cfg['norm']} has no DynUNet equivalent; DynUNet uses instance norm")
    if model_cfg["upsample"] != "transposed" or model_cfg["downsample"] != "strided_conv":
        notes.append("DynUNet always uses strided-conv downsampling and transposed-conv upsampling")
    if model_cfg["deep_supervision"]:
        notes.append("model.unet.deep_supervision is on for ours; the MONAI reference trains without it")
    act = (
        ("leakyrelu", {"inplace": True, "negative_slope": model_cfg["negative_slope"]})
        if model_cfg["activation"] == "leaky_relu"
        else ("relu", {"inplace": True})
    )
    strides = model_cfg["strides"]
    return DynUNet(
        spatial_dims=model_cfg["spatial_dims"],
        in_channels=model_cfg["in_channels"],
        out_channels=model_cfg["num_classes"],
        kernel_size=model_cfg["kernel_sizes"],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=model_cfg["filters"],
        norm_name=norms.get(model_cfg["norm"], norms["instance"]),
        act_name=act,
        dropout=model_cfg["dropout"] or None,
        deep_supervision=False,
        res_block=model_cfg["residual"],
        trans_bias=False,
    )


def run_monai(
    cfg: dict,
    phantom: Path,
    train_ids: list[str],
    val_id: str,
    dataset_kind: str,
    cache_workers: int,
    microbatch: int | None,
    warmup_steps: int,
    timed_steps: int,
    eval_repeats: int,
    eval_crop: tuple[int, int, int] | None,
) -> Measurement:
    """Train the MONAI reference for ``warmup_steps + timed_steps`` steps, timing the latter, then
    time one sliding-window evaluation of the validation case."""
    from monai.data import CacheDataset, DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    m = Measurement("monai")
    device = torch.device("cuda" if cfg["device"] == "cuda" else "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    amp_dtype = AMP_DTYPES[cfg["precision"]]
    batch_size = cfg["train_batch_size"]
    auto = cfg["device_train_microbatch_size"] == "auto"
    micro = microbatch if microbatch is not None else batch_size
    torch.manual_seed(cfg["seed"])

    train_tf, val_tf = monai_transforms(cfg)
    train_tf.set_random_state(seed=cfg["seed"])
    started = time.perf_counter()
    if dataset_kind == "cache":
        pool = list(dict.fromkeys(train_ids))  # the distinct cases, cached once each
        # copy_cache=False: no transform after the cache modifies its input in place (the crop
        # returns a region that the flips, noise, blur and scaling replace rather than overwrite).
        cache = CacheDataset(
            [monai_item(phantom, c) for c in pool],
            train_tf,
            num_workers=cache_workers,
            progress=False,
            copy_cache=False,
        )
        position = {c: i for i, c in enumerate(pool)}
        dataset = cache[[position[c] for c in train_ids]]  # a Subset: one entry per training entry
        m.setup_s[f"CacheDataset fill ({len(pool)} cases)"] = time.perf_counter() - started
    else:
        dataset = Dataset([monai_item(phantom, c) for c in train_ids], train_tf)
    workers = cfg["data"]["num_workers"]
    # The same worker settings as our loader (persistent workers, its batches prefetched per worker,
    # pinned memory on CUDA), so the loaders differ only in what the workers do.
    patch_voxels = math.prod(cfg["data"]["patch_size"])
    batch_bytes = batch_size * patch_voxels * (4 * cfg["model"]["unet"]["in_channels"] + 1)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=cfg["drop_last"],
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_batches(workers, batch_bytes) if workers > 0 else None,
    )

    model = build_dynunet(cfg["model"]["unet"], m.notes).to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "amp_fp16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext

    def train_step(image: torch.Tensor, label: torch.Tensor, micro: int) -> torch.Tensor:
        size = image.shape[0]
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for lo in range(0, size, micro):
            hi = min(lo + micro, size)
            with autocast():
                loss = loss_fn(model(image[lo:hi]), label[lo:hi])
            scaled = loss * ((hi - lo) / size)  # the accumulated gradient equals the whole batch's
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.detach() * ((hi - lo) / size)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return total

    model.train()
    iterator = iter(loader)
    if device.type == "cuda" and warmup_steps == 0:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    last = time.perf_counter()
    for step in range(1, warmup_steps + timed_steps + 1):
        wait_start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:  # a new epoch: a new shuffle, as DataLoader epochs go
            iterator = iter(loader)
            batch = next(iterator)
        wait = time.perf_counter() - wait_start
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        while True:
            try:
                loss = train_step(image, label, micro)
                break
            except torch.cuda.OutOfMemoryError:
                # The same policy as ours' "auto": halve the microbatch and retry the same batch.
                if not auto or micro <= 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                micro = max(1, micro // 2)
        # One host read of the loss per step, as a MONAI training loop logs it.
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"MONAI reference: loss became {value} at step {step}")
        sync()
        now = time.perf_counter()
        if step > warmup_steps:
            m.record(now - last, wait, image.shape[0])
            if device.type == "cuda":
                m.peak_bytes = torch.cuda.max_memory_allocated(device)
        elif step == warmup_steps and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        last = now
    m.microbatch = micro
    del iterator, loader, dataset, batch, image, label
    gc.collect()
    if eval_crop is None:  # --skip-eval
        del model, optimizer
        release_memory(device)
        return m

    # One sliding-window evaluation of the validation case (loaded beforehand: MONAI validation
    # loops keep it in a CacheDataset), with argmax and Dice per tumour label.
    item = val_tf(monai_item(phantom, val_id))
    val_image = item["image"][None].to(device)
    val_label = item["label"][None].to(device)
    classes = cfg["model"]["unet"]["num_classes"]
    roi = tuple(reversed(cfg["data"]["patch_size"]))
    mode = "gaussian" if cfg["eval"]["gaussian"] else "constant"
    model.eval()

    def evaluate() -> None:
        with torch.no_grad(), autocast():
            logits = sliding_window_inference(
                val_image,
                roi,
                cfg["eval"]["sw_batch_size"],
                model,
                overlap=cfg["eval"]["overlap"],
                mode=mode,
                sigma_scale=0.125,
            )
        pred = one_hot(logits.float().argmax(1, keepdim=True), classes, dim=1)
        DiceMetric(include_background=False, reduction="mean_batch")(pred, one_hot(val_label, classes, dim=1))

    evaluate()  # warm-up: cuDNN plans and allocator for the evaluation shapes
    m.eval_case_s = time_median(evaluate, eval_repeats, sync)
    # The same BraTS-sized centre box as ours; MONAI's arrays are (C, X, Y, Z), so the box is reversed.
    box = centre_crop_box(tuple(val_image.shape[2:]), tuple(reversed(eval_crop)))
    val_image = val_image[(slice(None), slice(None)) + box].contiguous()
    val_label = val_label[(slice(None), slice(None)) + box].contiguous()
    m.eval_crop_shape = list(reversed(val_image.shape[2:]))
    evaluate()
    m.eval_crop_s = time_median(evaluate, eval_repeats, sync)
    del model, optimizer, val_image, val_label
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
    """Issue 8's four targets for ``ours``, each PASS/FAIL, or why it is not measured here."""
    print("targets (issues 8 and 12, on one H200 at the full setting):")
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


# --------------------------------------------------------------------------------------------
# Ablation: which switches of a recipe pay for themselves
# --------------------------------------------------------------------------------------------

# Algorithms that change what is learned, not only how fast: never ablated as speed switches.
NOT_SPEED_SWITCHES = ("ema",)


@dataclass(frozen=True)
class Variant:
    """One ablation run of ours: a label, the overrides it adds after the user's, and the switch
    it turns off (None for the all / none / candidate runs)."""

    label: str
    overrides: tuple[str, ...]
    switch: str | None = None


def speed_switches(cfg: dict) -> list[tuple[str, str]]:
    """(name, the override that turns it off) for each speed switch on in the resolved ``cfg``:
    its algorithms except those that change the result (EMA), then the prefetch to the device."""
    switches = [(name, f"algorithms.{name}=null") for name in cfg["algorithms"] if name not in NOT_SPEED_SWITCHES]
    if cfg["data"]["prefetch_to_device"]:
        switches.append(("data.prefetch_to_device", "data.prefetch_to_device=false"))
    return switches


def ablation_variants(cfg: dict, candidates: list[str]) -> list[Variant]:
    """All switches on (the reference), each switch off in turn, all off (when there are two or
    more), then each candidate override added to the reference."""
    switches = speed_switches(cfg)
    variants = [Variant("all switches", ())]
    variants += [Variant(f"without {name}", (off,), name) for name, off in switches]
    if len(switches) > 1:
        variants.append(Variant("no switches", tuple(off for _, off in switches)))
    variants += [Variant(f"with {candidate}", (candidate,)) for candidate in candidates]
    return variants


def switch_verdict(gain: float, min_gain: float, noise: float | None) -> str:
    """Keep a switch only when turning it off costs at least ``min_gain`` (a fraction) of the rate and
    more than the run-to-run ``noise`` (a fraction; None with one repeat, when it is unknown)."""
    threshold = max(min_gain, noise or 0.0)
    if gain >= 1.0 + threshold:
        return "keep"
    if gain <= 1.0 - threshold:
        return f"drop: it costs {100 * (1.0 - gain):.0f}%"
    return f"drop: no measurable gain (within {100 * threshold:.0f}%)"


@dataclass
class Repeats:
    """One variant's runs (None for a failed run) and its summary across them."""

    runs: list[Measurement | None] = field(default_factory=list)

    @property
    def measured(self) -> list[Measurement]:
        return [m for m in self.runs if m is not None]

    @property
    def rate(self) -> float:
        """Median over the runs of each run's median samples/s."""
        return statistics.median(m.median_rate for m in self.measured)

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the runs' rates: the run-to-run noise; None with fewer than 2 runs."""
        rates = [m.median_rate for m in self.measured]
        return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None

    @property
    def representative(self) -> Measurement | None:
        """The run with the median rate (the lower middle one for an even count)."""
        ranked = sorted(self.measured, key=lambda m: m.median_rate)
        return ranked[(len(ranked) - 1) // 2] if ranked else None


def pair_noise(a: Repeats, b: Repeats) -> float | None:
    """The larger spread of two variants, or None when either ran once."""
    spreads = [a.spread, b.spread]
    return None if None in spreads else max(spreads)


def child_command(
    args: argparse.Namespace,
    extra_overrides: tuple[str, ...],
    only: str,
    json_path: Path,
    microbatch: int | str | None = None,
    skip_eval: bool = False,
) -> list[str]:
    """The command line of one ablation run: this script, the parent's settings as resolved, one
    pipeline, the extra overrides last."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        args.device,
        "--config",
        args.config,
        "--work",
        str(args.work),
        "--cases",
        str(args.cases),
        "--shape",
        *map(str, args.shape),
        "--seed",
        str(args.seed),
        "--epoch-cases",
        str(args.epoch_cases),
        "--patch",
        str(args.patch),
        "--depth",
        str(args.depth),
        "--width-divisor",
        str(args.width_divisor),
        "--batch",
        str(args.batch),
        "--precision",
        args.precision,
        "--prepare-workers",
        str(args.prepare_workers),
        "--warmup-epochs",
        str(args.warmup_epochs),
        "--timed-epochs",
        str(args.timed_epochs),
        "--eval-repeats",
        str(args.eval_repeats),
        "--eval-crop",
        *map(str, args.eval_crop),
        "--monai-dataset",
        args.monai_dataset,
        "--recipe-train-cases",
        str(args.recipe_train_cases),
        "--recipe-val-cases",
        str(args.recipe_val_cases),
        "--only",
        only,
        "--json",
        str(json_path),
    ]
    microbatch = microbatch if microbatch is not None else args.microbatch
    if microbatch != "null":  # "null" (the whole batch) is what the child resolves to when none is given
        command += ["--microbatch", str(microbatch)]
    if args.recipe:
        command += ["--recipe", args.recipe]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.cudnn_benchmark:
        command.append("--cudnn-benchmark")
    if skip_eval or args.skip_eval:
        command.append("--skip-eval")
    for override in [*args.override, *extra_overrides]:
        command += ["--override", override]
    return command


def run_child(command: list[str], log: Path) -> tuple[dict | None, float]:
    """Run one ablation run in its own process (fresh CUDA context, compile caches, cuDNN flags and
    memory statistics), its report into ``log``; returns (its JSON or None on failure, wall seconds)."""
    json_path = Path(command[command.index("--json") + 1])
    json_path.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(shlex.join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - started
    if code != 0 or not json_path.is_file():
        lines = log.read_text().splitlines()
        print(f"  FAILED (exit {code}); the last lines of {log}:", file=sys.stderr)
        for line in lines[-15:]:
            print(f"    {line}", file=sys.stderr)
        return None, wall
    return json.loads(json_path.read_text()), wall


def run_ablation(
    args: argparse.Namespace, cfg: dict, overrides: list[str], plan: RecipePlan, measurable: str | None
) -> int:
    """Run every variant of ours ``--repeats`` times, interleaved so that a drift of the machine
    touches all of them alike, each run in its own process; then the MONAI reference once. Prints
    the usual report for the median all-switches run, then what each switch gains."""
    variants = ablation_variants(cfg, args.candidate)
    folder = args.work / "ablation"
    folder.mkdir(parents=True, exist_ok=True)
    results = {variant.label: Repeats() for variant in variants}
    walls: dict[str, list[float]] = {variant.label: [] for variant in variants}
    total = args.repeats * len(variants)
    monai = None
    if args.resume and args.json and args.json.is_file():
        runs, earlier_walls, monai = earlier_runs(args.json, args, cfg, variants)
        for label, measured in runs.items():
            # Failed runs are tried again; measured ones are kept.
            kept = [(m, w) for m, w in zip(measured, earlier_walls[label]) if m is not None][: args.repeats]
            results[label].runs = [m for m, _ in kept]
            walls[label] = [w for _, w in kept]
        done = sum(len(r.runs) for r in results.values())
        print(
            f"[ablation] --resume: {done} run(s) taken from {args.json}"
            f"{' and the MONAI reference' if monai is not None else ''}",
            file=sys.stderr,
        )

    def save() -> None:
        # After every run, so a command stopped at a time limit still leaves what it measured.
        if args.json:
            write_json(
                args.json,
                args,
                cfg,
                {f"{v.label} #{r}": m for v in variants for r, m in enumerate(results[v.label].runs)},
                monai,
                {
                    "variants": [
                        {"label": v.label, "overrides": list(v.overrides), "switch": v.switch, "wall_s": walls[v.label]}
                        for v in variants
                    ]
                },
            )

    for repeat in range(args.repeats):
        for index, variant in enumerate(variants):
            if len(results[variant.label].runs) > repeat:
                continue  # measured by an earlier, resumed command
            number = repeat * len(variants) + index + 1
            print(
                f"[ablation {number}/{total}] ours, {variant.label}"
                f"{' (' + ', '.join(variant.overrides) + ')' if variant.overrides else ''}",
                file=sys.stderr,
            )
            stem = f"{index}-r{repeat}"
            # Evaluation is timed for the reference only: the projection needs it once, and a
            # compiled variant would compile its eval graph for nothing.
            data, wall = run_child(
                child_command(args, variant.overrides, "ours", folder / f"{stem}.json", skip_eval=index > 0),
                folder / f"{stem}.log",
            )
            results[variant.label].runs.append(Measurement.from_json(data["ours"]) if data else None)
            walls[variant.label].append(wall)
            save()
    reference = results[variants[0].label].representative
    if args.only != "ours" and monai is None:
        microbatch = args.microbatch
        if microbatch == "auto" and reference is not None:
            microbatch = reference.microbatch  # MONAI trains at the microbatch ours settled on, as without --ablate
        print(f"[ablation] MONAI reference (microbatch {microbatch})", file=sys.stderr)
        data, wall = run_child(
            child_command(args, (), "monai", folder / "monai.json", microbatch), folder / "monai.log"
        )
        monai = Measurement.from_json(data["monai"]) if data else None
        walls["MONAI reference"] = [wall]
        save()
    if reference is None:
        print("error: every all-switches run failed; see the log above", file=sys.stderr)
        return 1
    print_report(args, cfg, overrides, plan, reference, monai, args.device, measurable)
    print_ablation(variants, results, walls, monai, args, folder)
    return 0


def print_ablation(
    variants: list[Variant],
    results: dict[str, Repeats],
    walls: dict[str, list[float]],
    monai: Measurement | None,
    args: argparse.Namespace,
    folder: Path,
) -> None:
    reference = results[variants[0].label]
    print()
    print(
        f"ablation: {args.repeats} run(s) per variant, interleaved, each in its own process, on the same phantom, "
        f"setting and timing; per-run reports in {folder}"
    )
    print(
        f"{'variant':<52}{'runs':>5}{'samples/s':>11}{'spread':>8}{'data wait':>11}{'peak mem':>10}{'vs all':>9}"
        f"{'run wall':>10}"
    )
    print(f"{'':<52}{'':>5}{'(median)':>11}{'':>8}{'':>11}{'(GiB)':>10}{'':>9}{'(s)':>10}")
    rows = [(v.label, results[v.label]) for v in variants]
    if monai is not None:
        rows.append(("MONAI reference", Repeats([monai])))
    for label, repeats in rows:
        m = repeats.representative
        if m is None:
            print(f"{label:<52}{'failed: see its logs':>41}")
            continue
        peak = f"{m.peak_bytes / 2**30:.2f}" if m.peak_bytes is not None else "n/a"
        spread = f"{100 * repeats.spread:.0f}%" if repeats.spread is not None else "-"
        print(
            f"{label:<52}{len(repeats.measured):>5}{repeats.rate:>11.2f}{spread:>8}{100 * m.wait_fraction:>10.1f}%"
            f"{peak:>10}{repeats.rate / reference.rate:>8.2f}x{statistics.median(walls[label]):>10.0f}"
        )
    print()
    print(
        f"switches (gain = all switches / without it, median samples/s; kept at >= {1 + args.min_gain:.2f}x and "
        "above the spread of the two variants):"
    )
    for variant in variants:
        if variant.switch is None:
            continue
        without = results[variant.label]
        if not without.measured:
            print(f"  {variant.switch:<28} not measured: the runs without it failed")
            continue
        gain = reference.rate / without.rate
        print(
            f"  {variant.switch:<28} {gain:6.2f}x   {switch_verdict(gain, args.min_gain, pair_noise(reference, without))}"
        )
    candidates = [v for v in variants if v.label.startswith("with ")]
    if candidates:
        print("candidates (gain = with it / all switches; adopted on the same rule):")
        for variant in candidates:
            added = results[variant.label]
            if not added.measured:
                print(f"  {variant.overrides[0]:<50} not measured: its runs failed")
                continue
            gain = added.rate / reference.rate
            verdict = switch_verdict(gain, args.min_gain, pair_noise(reference, added))
            print(f"  {variant.overrides[0]:<50} {gain:6.2f}x   {'adopt' if verdict == 'keep' else 'leave out'}")
    if args.repeats == 1:
        print("NOTE: one run per variant: the run-to-run noise is unknown; --repeats 3 measures it.")
    if args.device != "cuda":
        print("NOTE: CPU verdicts. cudnn_benchmark and the prefetch to the device do nothing without CUDA, and")
        print("      CPU kernels rank channels-last and compile differently from a GPU: these verdicts do not")
        print("      decide recipes/fast.yaml, which is for GPUs.")
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


def earlier_runs(
    path: Path, args: argparse.Namespace, cfg: dict, variants: list[Variant]
) -> tuple[dict[str, list], dict[str, list[float]], Measurement | None]:
    """The runs an earlier ``--ablate --json PATH`` of the same setting on this device measured:
    (label -> runs by repeat, label -> wall seconds, the MONAI reference or None).

    Raises:
        SystemExit: the file was written for another setting or device (names what differs).
    """
    document = json.loads(path.read_text())
    mine = {"device": device_description(args.device), "setting": setting_of(args, cfg)}
    differing = [key for key in mine if document.get(key) != mine[key]]
    if differing:
        raise SystemExit(
            f"error: --resume: {path} was measured with another {' and '.join(differing)}; "
            "remove it or name another --json"
        )
    known = {v["label"]: v for v in document.get("variants", [])}
    runs: dict[str, list] = {}
    walls: dict[str, list[float]] = {}
    for variant in variants:
        entry = known.get(variant.label)
        if entry is None or entry["overrides"] != list(variant.overrides):
            continue
        runs[variant.label] = [
            Measurement.from_json(data) if data else None
            for key, data in document["ours"].items()
            if key.rsplit(" #", 1)[0] == variant.label
        ]
        walls[variant.label] = list(entry["wall_s"])
    monai = Measurement.from_json(document["monai"]) if document.get("monai") else None
    return runs, walls, monai


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument("--only", default=None, choices=("ours", "monai"), help="run one pipeline only")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="set torch.backends.cudnn.benchmark for both pipelines (unet-train does not)",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="measure what each speed switch of the resolved config gains: ours with all of them, "
        "without each in turn and without any, each in its own process, then MONAI once",
    )
    p.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --ablate, also measure the all-switches run plus this override (repeatable), "
        "e.g. algorithms.compile.mode=reduce-overhead (CUDA graphs)",
    )
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.03,
        help="with --ablate, the fraction a switch must gain to be kept (default 0.03)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --ablate, runs per variant, interleaved; 2 or more measure the run-to-run noise, "
        "which a switch must beat to be kept (default 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --ablate and --json: keep the runs that file already holds (an earlier command of "
        "the same setting on this device, stopped at a time limit say) and run only the rest",
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
    args = p.parse_args(argv)

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
    if not cuda:  # on CUDA these stay None and main() takes them from the resolved config and recipe
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
    if args.ablate and args.only == "monai":
        p.error("--ablate measures ours; it cannot be combined with --only monai")
    if (args.candidate or args.repeats != 1) and not args.ablate:
        p.error("--candidate and --repeats need --ablate")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.resume and not (args.ablate and args.json):
        p.error("--resume needs --ablate and --json")
    for token in [*args.override, *args.candidate]:
        key = token.lstrip("-").split("=", 1)[0]
        if key in RESERVED_KEYS or key.startswith("data.phantom"):
            p.error(f"--override {key}: set by the benchmark for timing (see the options instead)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    work = args.work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)

    user = ([f"recipe={args.recipe}"] if args.recipe else []) + list(args.override)
    try:
        base = resolve_config(args.config, user)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # On CUDA the recipe's own batch, microbatch and precision are benchmarked unless given.
    args.batch = args.batch if args.batch is not None else base["train_batch_size"]
    args.precision = args.precision or base["precision"]
    if args.microbatch is None:
        args.microbatch = base["device_train_microbatch_size"]
        args.microbatch = "null" if args.microbatch is None else args.microbatch  # null = the whole batch at once
    depth = args.depth
    levels = len(base["model"]["unet"]["filters"])
    if not 2 <= depth <= levels:
        print(f"error: --depth {depth}: the config has {levels} levels", file=sys.stderr)
        return 2
    strides = base["model"]["unet"]["strides"][:depth]
    reduction = math.prod(strides)
    if args.patch % reduction or args.patch // reduction < 2:
        print(
            f"error: --patch {args.patch} with {depth} levels (total stride {reduction}) leaves "
            f"{args.patch / reduction:g} voxels at the bottleneck; instance norm needs at least 2 per axis",
            file=sys.stderr,
        )
        return 2
    filters = [max(1, f // args.width_divisor) for f in base["model"]["unet"]["filters"][:depth]]

    phantom, phantom_s = ensure_phantom(work, args.cases, tuple(args.shape), args.seed, args.prepare_workers)
    split_file, train_ids, val_id = write_split(work, phantom, args.cases, args.epoch_cases)
    if base["drop_last"] and args.epoch_cases < args.batch:
        print(
            f"error: drop_last with --epoch-cases {args.epoch_cases} below the batch of {args.batch}: "
            "every batch would be dropped",
            file=sys.stderr,
        )
        return 2
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
        print(f"error: {exc}", file=sys.stderr)
        return 2

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
            measurable = f"setting differs from the issue's in: {', '.join(changed)}"

    plan = recipe_plan(base, args.recipe_train_cases)  # the recipe as it would run, without the timing overrides
    if args.ablate:
        return run_ablation(args, cfg, overrides, plan, measurable)
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
            train_ids,
            val_id,
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
