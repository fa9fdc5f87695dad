"""The CPU row of ``scripts/bench_infer.py`` (``--cpu-row``): one full-size case through the ``configs/brats.yaml``
network on the CPU, ours in the path ``unet-predict`` chooses there against MONAI's sliding window in fp32.

The case: a phantom case of ``data.phantom`` (``make_phantom_case``, style ``brats``, seed ``--seed``) at
4 x 155 x 240 x 240 (``--size``; smaller, with ``--width-divisor``, only to try the script), z-scored over the head's voxels per channel as preparation does (``prepare_case``), and put
back on the full 155 x 240 x 240 grid (0 outside the head's bounding box), so both loops see the full-size volume.

The model: random weights give near-tie logits whose labels mean nothing, so the network is first given
meaning. With ``--checkpoint`` the weights of a ``unet-train`` checkpoint of that network (its EMA weights when
it holds them) are used; by default the network is fitted for ``--fit-steps`` steps (Adam, lr ``--fit-lr``, the Dice +
cross-entropy loss of our recipes) on ``--fit-patch``^3 patches of that same case, every other patch centred on
the tumour, in bf16 autocast where the CPU computes bf16 natively (else fp32): a few minutes, enough for
confident outputs on this case. The script prints the Dice of the fitted network's fp32 labels against the
phantom's truth, to show what was fitted.

The windows: 128^3, 4 per pass, overlap 0.5, Gaussian weighting (sigma 1/8), no mirroring, for both. One window
runs through the model before anything is timed (oneDNN's first-call setup).

    ours    ``unet_trainer.evaluation.inference.predict_volume`` in the path ``unet-predict`` takes on this CPU
            (``unet_trainer.evaluation.cpu_path``: bf16 autocast + channels-last where the CPU has amx_bf16 or
            avx512_bf16 and the centred window agrees with fp32, else fp32 + channels-last). The check runs once
            per ``unet-predict`` (on its first case), not per case: its time is reported on its own line.
    monai   ``monai.inferers.sliding_window_inference(roi_size=(128,)*3, sw_batch_size=4, overlap=0.5,
            mode="gaussian", sigma_scale=0.125)`` in fp32, the model as built.

Reported: seconds per case (median of ``--iters`` after ``--warmup``), the peak resident memory of the
process while each loop ran (Linux: ``VmHWM`` of /proc/self/status, reset before each loop by writing 5 to
/proc/self/clear_refs; elsewhere ``ru_maxrss``, which only grows, said so in the output), the ratio of the
times, and the Dice per region (WT, TC, ET) between the two label maps (argmax of each's logits).

"A CPU without AMX" is emulated in a child process run with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` (oneDNN may use
AVX-512 but neither AVX512_BF16 nor AMX, so bf16 convolutions are emulated): the path choice reads the cap
(``cpu_features``), and the child times ours in what it takes there, on the same weights and volume, against the
parent's MONAI labels (MONAI's fp32 convolutions do not use AMX, whose tiles compute bf16 and int8 only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchutil import brats_3d_model, cpu_model_name, peak_rss

from unet_trainer.data.layouts.canonical import RawCase
from unet_trainer.data.phantom import make_phantom_case
from unet_trainer.data.prepare import PrepareSettings, prepare_case
from unet_trainer.data.schemes import REGION_NAMES
from unet_trainer.evaluation.cpu_path import (
    CpuChoice,
    CpuPath,
    centre_crop,
    cpu_features,
    plan_cpu_path,
    set_channels_last,
    settle_cpu_path,
)
from unet_trainer.evaluation.cpu_path import region_agreement as label_agreement
from unet_trainer.evaluation.inference import predict_volume
from unet_trainer.models.unet import UNet
from unet_trainer.training.losses import DiceCELoss

FULL_SIZE = (155, 240, 240)
NO_AMX_ISA = "AVX512_CORE"


def phantom_volume(seed: int, shape=FULL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Phantom case ``seed``, prepared as ``unet-predict`` prepares a case and put back on the full grid:
    (image float32 (4, *shape), canonical labels uint8 (*shape))."""
    image, label = make_phantom_case(tuple(shape), np.random.default_rng(seed))
    raw = RawCase("bench", image, label, np.eye(4), (1.0, 1.0, 1.0), "brats2021", preprocessed=False)
    prepared, prepared_label, meta = prepare_case(raw, PrepareSettings())
    box = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in meta["crop_box"])
    full = np.zeros_like(image)
    full[box] = prepared
    return torch.from_numpy(full), torch.from_numpy(label)


def _patch_origin(label: torch.Tensor, patch: int, on_tumour: bool, rng: np.random.Generator) -> list[int]:
    if on_tumour and bool((label > 0).any()):
        centre = torch.nonzero(label > 0)[rng.integers(int((label > 0).sum()))].tolist()
    else:
        centre = [int(rng.integers(n)) for n in label.shape]
    return [min(max(c - patch // 2, 0), n - patch) for c, n in zip(centre, label.shape)]


def fit(model: UNet, image: torch.Tensor, label: torch.Tensor, steps: int, patch: int, lr: float, bf16: bool) -> None:
    """Fit ``model`` on patches of one case, in place (ends in eval mode)."""
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss()
    model.train()
    for step in range(steps):
        origins = [_patch_origin(label, patch, i % 2 == 0, rng) for i in range(2)]
        boxes = [tuple(slice(o, o + patch) for o in origin) for origin in origins]
        x = torch.stack([image[(slice(None),) + box] for box in boxes])
        y = torch.stack([label[box] for box in boxes])[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  fit step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()


def load_weights(model: UNet, checkpoint: Path) -> None:
    """A ``unet-train`` checkpoint's weights (its EMA weights when it holds them) into ``model``."""
    from unet_trainer.core.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    ema = (state.get("extra_state") or {}).get("ema")
    model.load_state_dict(ema if isinstance(ema, dict) and ema else state["model"])
    model.eval()


def ours(model: UNet, image: torch.Tensor, path: CpuPath, window: int) -> torch.Tensor:
    """Our sliding window in ``path`` (the model switched to its memory format): float32 logits (4, *S)."""
    set_channels_last(model, path.channels_last)
    return predict_volume(model, image, (window,) * 3, 3, 4, 0.5, 4, True, path.amp_dtype)


def choose(model: UNet, image: torch.Tensor, window: int) -> CpuChoice:
    """The path unet-predict takes on this CPU, checked on the volume's centred window as it checks its first case."""
    crop = centre_crop(image, (window,) * 3)
    plan = plan_cpu_path("auto", cpu_features())
    return settle_cpu_path(plan, lambda path: ours(model, crop, path, window).argmax(0).to(torch.uint8))


def monai_fp32(model: UNet, image: torch.Tensor, window: int) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    set_channels_last(model, False)
    with torch.no_grad():
        return sliding_window_inference(
            image[None], (window,) * 3, 4, model, overlap=0.5, mode="gaussian", sigma_scale=0.125
        )[0]


def timed(run: Callable[[], torch.Tensor], warmup: int, iters: int) -> tuple[float, torch.Tensor, float, str]:
    """(median seconds per call, the last output, peak resident GiB while timing, how it was measured)."""
    out = None
    for _ in range(warmup):
        out = run()
    with peak_rss() as peak:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
    return float(np.median(times)), out, peak.gib, peak.method


def dice_text(agreement: dict) -> str:
    return " ".join(f"{r} {agreement[r]:.4f}" if agreement[r] is not None else f"{r} n/a" for r in REGION_NAMES)


def _ours_row(model, image, reference_labels, window, warmup, iters) -> dict:
    """Choose the path (timed: once per run), time ours in it, compare its labels with ``reference_labels``."""
    start = time.perf_counter()
    choice = choose(model, image, window)
    check_s = time.perf_counter() - start
    print(f"  {choice.message}", flush=True)
    seconds, logits, peak, method = timed(lambda: ours(model, image, choice.path, window), warmup, iters)
    agreement = label_agreement(reference_labels, logits.argmax(0).to(torch.uint8))
    return {
        "path": choice.path.name,
        "path_line": choice.message,
        "check_s": check_s,
        "seconds": seconds,
        "peak_gib": peak,
        "peak_method": method,
        "dice": {k: agreement[k] for k in REGION_NAMES},
        "voxels_agree": agreement["voxels"],
    }


def no_amx_child(state_file: Path, warmup: int, iters: int) -> dict:
    """Run ours under ``ONEDNN_MAX_CPU_ISA=NO_AMX_ISA`` in a child process on the saved weights and volume."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=NO_AMX_ISA)
    command = [sys.executable, str(Path(__file__).resolve().parent / "bench_infer.py"), "--cpu-row"]
    command += ["--cpu-child", str(state_file), "--warmup", str(warmup), "--iters", str(iters)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(state_file: Path, warmup: int, iters: int) -> int:
    """The no-AMX child: one JSON line with ours' row."""
    state = torch.load(state_file, weights_only=True)
    model = UNet(**brats_3d_model(state["width_divisor"])).eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        row = _ours_row(model, state["image"], state["monai_labels"], state["window"], warmup, iters)
    row["features"] = cpu_features().describe()
    print(json.dumps(row))
    return 0


def cpu_row(args, save: Callable[..., None]) -> int:
    """The CPU row: fit or load, time MONAI fp32 and ours, then ours with no AMX; figures through ``save``."""
    torch.manual_seed(0)
    features = cpu_features()
    window = args.window
    model = UNet(**brats_3d_model(args.width_divisor)).eval()
    image, truth = phantom_volume(args.seed, tuple(args.size))
    print(
        f"CPU {cpu_model_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; flags: {' '.join(sorted(f for f in features.flags if 'bf16' in f or 'amx' in f))}"
        f" ({features.describe()})",
        flush=True,
    )
    if args.checkpoint:
        load_weights(model, args.checkpoint)
        meaning = f"weights of {args.checkpoint}"
    else:
        start = time.perf_counter()
        fit(model, image, truth, args.fit_steps, args.fit_patch, args.fit_lr, bool(features.native_bf16))
        meaning = f"fitted {args.fit_steps} steps (lr {args.fit_lr}) on {args.fit_patch}^3 patches of the case ({time.perf_counter() - start:.0f} s)"
    print(f"model: configs/brats.yaml network, {meaning}", flush=True)
    save(cpu_device=f"CPU {cpu_model_name()}", cpu_flags=sorted(features.flags), model=meaning, window=window)

    with torch.no_grad():
        # oneDNN sets up its kernels on a shape's first call: done here, so no loop timed pays for it (the check
        # runs the path's precision before ours is timed).
        model(torch.zeros((1, 4) + (window,) * 3))
        monai_s, monai_logits, monai_peak, method = timed(
            lambda: monai_fp32(model, image, window), args.warmup, args.iters
        )
        monai_labels = monai_logits.argmax(0).to(torch.uint8)
        truth_dice = label_agreement(truth, monai_labels)
        print(f"  monai fp32: {monai_s:.1f} s/case, peak {monai_peak:.2f} GiB ({method})", flush=True)
        print(f"  the fitted network's fp32 labels against the phantom's truth: Dice {dice_text(truth_dice)}")
        save(monai_s=monai_s, monai_peak_gib=monai_peak, peak_method=method, truth_dice=truth_dice)
        row = _ours_row(model, image, monai_labels, window, args.warmup, args.iters)
    ratio = monai_s / row["seconds"]
    save(ours=row, speedup=ratio)
    print(
        f"  ours ({row['path']}): {row['seconds']:.1f} s/case, peak {row['peak_gib']:.2f} GiB; check {row['check_s']:.1f} s once per run"
    )
    print(f"  speed-up monai / ours: {ratio:.2f}x (target >= 4x); Dice ours vs monai: {dice_text(row['dice'])}")

    with tempfile.TemporaryDirectory() as folder:
        state_file = Path(folder) / "state.pt"
        set_channels_last(model, False)
        torch.save(
            {
                "model": model.state_dict(),
                "image": image,
                "monai_labels": monai_labels,
                "window": window,
                "width_divisor": args.width_divisor,
            },
            state_file,
        )
        print(f"  a CPU without AMX (child process, ONEDNN_MAX_CPU_ISA={NO_AMX_ISA}):", flush=True)
        child = no_amx_child(state_file, args.warmup, args.iters)
    if "error" in child:
        print(f"    failed: {child['error']}")
    else:
        child["speedup"] = monai_s / child["seconds"]
        print(f"    {child['path_line']}")
        print(
            f"    ours ({child['path']}): {child['seconds']:.1f} s/case, peak {child['peak_gib']:.2f} GiB; speed-up "
            f"monai / ours {child['speedup']:.2f}x; Dice vs monai: {dice_text(child['dice'])}"
        )
    save(no_amx=child)
    return 0
