#!/usr/bin/env python
"""Sliding-window inference time per BraTS volume: ours against MONAI's, same model, same run.

Both infer one random 4 x 155 x 240 x 240 volume (channels, Z, Y, X) with the BraTS 3D preset
(UNet: 4 -> 4 channels, filters 32,64,128,256,320,320, 3^3 kernels, strides 1,2,2,2,2,2, instance
norm, leaky ReLU, transposed-conv upsampling) in eval mode, windows of 128^3, 4 windows per
forward, overlap 0.5, Gaussian importance weighting with sigma = 1/8 of the window, under the
same autocast (bf16 by default on CUDA):

    ours    unet_trainer.evaluation.inference.predict_volume; on CUDA the model runs in channels-last memory
            format, as ``unet-eval`` / ``unet-predict`` run it (a copy of the same weights)
    monai   monai.inferers.sliding_window_inference(roi_size=(128,)*3, sw_batch_size=4,
            predictor=model, overlap=0.5, mode="gaussian", sigma_scale=0.125), the model as built

Timing: ``--warmup`` untimed volumes, then ``--iters`` timed ones, each bracketed by
``torch.cuda.synchronize()`` (on CUDA) and ``time.perf_counter``; the median is reported in ms per
volume, with the ratio ours / monai (the target on an H200 is <= 0.7). cuDNN's algorithm search
(``cudnn.benchmark``) is on for both. So that the ratio can be attributed, two more rows run each
loop with the other memory format: MONAI given the channels-last copy, ours given the model as
built.

The outputs are not identical, and the script prints the largest absolute difference of the two
logit volumes. Both run the same number of windows (2 x 3 x 3 = 18 at 155 x 240 x 240), so the
model does the same work, but they place them differently where the step does not divide the
size: ours spreads the windows evenly as nnU-Net does (0, 56, 112 along 240), MONAI steps by 64
and pulls the last window back inside (0, 64, 112). Where the placements coincide they agree to
float rounding in constant mode (tests/test_losses_metrics.py checks that). The Gaussian maps also
differ in detail (ours is the continuous Gaussian centred at (n - 1) / 2 voxels, MONAI's a sampled
Gaussian kernel centred on voxel n // 2, each with its own floor), and under bf16 each window's
logits round.

The CPU row (``--cpu-row``, :mod:`bench_infer_cpu`): one full-size phantom case through the same network, given
meaning first (``--checkpoint``, else a short fit on the case), ours in the path ``unet-predict`` takes on this
CPU against MONAI's fp32, with seconds per case, peak resident memory, the Dice per region between the two
label maps, and the same for a CPU without AMX (emulated with ``ONEDNN_MAX_CPU_ISA``).

Examples:
    python scripts/bench_infer.py                                   # CUDA: the full setting
    python scripts/bench_infer.py --cpu-row --warmup 0 --iters 1 --json cpu.json   # the CPU row (minutes)
    python scripts/bench_infer.py --device cpu --size 64 80 80 --window 64 --width-divisor 8 \\
        --iters 2 --warmup 1                                        # CPU smoke run (fp32), well under a minute

The window must be at least 64 for the 6-stage preset: five stride-2 stages leave 128 / 32 = 4
bottleneck voxels per axis at 128, one at 32, and instance norm cannot normalise a single voxel.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import brats_3d_model

from unet_trainer.evaluation.inference import predict_volume  # noqa: E402
from unet_trainer.models.base import optimize_model  # noqa: E402
from unet_trainer.models.unet import UNet  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def build_model(width_divisor: int) -> UNet:
    return UNet(**brats_3d_model(width_divisor))


def time_volume(
    run: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[float, torch.Tensor, float | None]:
    """Median ms per call, the last output, and the peak CUDA memory in GiB (None on CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = None
    for _ in range(warmup):
        out = run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        out = run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), out, peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=[155, 240, 240],
        metavar=("Z", "Y", "X"),
        help="spatial size of the volume (default 155 240 240)",
    )
    parser.add_argument("--window", type=int, default=128, help="cubic window edge (default 128)")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto",) + tuple(DTYPES),
        help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU (where bf16 3D convolutions "
        "are emulated and some 15x slower)",
    )
    parser.add_argument("--width-divisor", type=int, default=1, help="divide every filter count (quick CPU runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="memory format of our model (auto: on for CUDA, as unet-predict runs it)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures to this JSON file, rewritten after each timing"
    )
    parser.add_argument("--cpu-row", action="store_true", help="the CPU row: a full-size phantom case, see above")
    parser.add_argument("--checkpoint", type=Path, default=None, help="CPU row: a checkpoint of the brats.yaml network")
    parser.add_argument("--fit-steps", type=int, default=100, help="CPU row without --checkpoint: fitting steps")
    parser.add_argument("--fit-lr", type=float, default=2e-3, help="CPU row without --checkpoint: Adam's lr")
    parser.add_argument("--fit-patch", type=int, default=64, help="CPU row: fitting patch edge")
    parser.add_argument("--seed", type=int, default=0, help="CPU row: the phantom case's seed")
    parser.add_argument("--cpu-child", type=Path, default=None, help=argparse.SUPPRESS)  # the no-AMX child's input
    return parser.parse_args(argv)


def json_saver(path: Path | None, figures: dict) -> Callable[..., None]:
    """A function adding figures to ``figures`` and rewriting ``path`` with them (atomically), when given."""

    def save(**measured) -> None:
        # After each timing, so a run stopped at a time limit keeps what it measured.
        figures.update(measured)
        if path:
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(figures, indent=1))
            temporary.replace(path)

    return save


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_row or args.cpu_child:
        import bench_infer_cpu

        if args.cpu_child:
            return bench_infer_cpu.child_main(args.cpu_child, args.warmup, args.iters)
        return bench_infer_cpu.cpu_row(args, json_saver(args.json, {"torch": torch.__version__}))

    from monai.inferers import sliding_window_inference

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    amp_dtype = DTYPES[args.precision]
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"

    torch.manual_seed(0)
    model = build_model(args.width_divisor).to(device).eval()
    other = optimize_model(copy.deepcopy(model), channels_last=True) if channels_last else model
    ours_model, monai_model = other, model
    image = torch.randn((4,) + tuple(args.size), device=device)
    window = (args.window,) * 3

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def ours(net=ours_model):
        return predict_volume(
            net,
            image,
            window,
            3,
            4,
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            gaussian=True,
            amp_dtype=amp_dtype,
        )

    def monai(net=monai_model):
        with torch.no_grad(), autocast():
            return sliding_window_inference(
                image[None], window, args.sw_batch_size, net, overlap=args.overlap, mode="gaussian", sigma_scale=0.125
            )[0]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    filters = brats_3d_model(args.width_divisor)["filters"]
    print(
        f"device {name}, torch {torch.__version__}, volume 4x{'x'.join(map(str, args.size))}, window {args.window}^3, "
        f"sw batch {args.sw_batch_size}, overlap {args.overlap}, gaussian sigma 1/8, {args.precision}, "
        f"filters {filters}, warmup {args.warmup}, median of {args.iters}"
    )
    figures = {
        "device": name,
        "torch": torch.__version__,
        "size": list(args.size),
        "window": args.window,
        "sw_batch_size": args.sw_batch_size,
        "overlap": args.overlap,
        "precision": args.precision,
        "filters": filters,
        "channels_last": channels_last,
    }

    save = json_saver(args.json, figures)

    monai_ms, monai_out, monai_peak = time_volume(monai, device, args.warmup, args.iters)
    save(monai_ms=monai_ms, monai_peak_gib=monai_peak)
    ours_ms, ours_out, ours_peak = time_volume(ours, device, args.warmup, args.iters)
    save(ours_ms=ours_ms, ours_peak_gib=ours_peak, ratio=ours_ms / monai_ms)

    def row(label: str, ms: float, peak: float | None) -> str:
        return f"  {label:<58}{ms:10.1f} ms/volume" + (f"   peak {peak:.2f} GiB" if peak is not None else "")

    layout = "channels-last" if channels_last else "model as built"
    print(row("monai.inferers.sliding_window_inference (model as built)", monai_ms, monai_peak))
    print(row(f"unet_trainer predict_volume ({layout})", ours_ms, ours_peak))
    print(f"  ratio ours / monai: {ours_ms / monai_ms:.3f}  (target on an H200: <= 0.7)")
    if channels_last:
        # The same two loops with the memory formats swapped, to separate layout from loop.
        swapped_monai, _, _ = time_volume(lambda: monai(ours_model), device, args.warmup, args.iters)
        swapped_ours, _, _ = time_volume(lambda: ours(monai_model), device, args.warmup, args.iters)
        print(row("  attribution: monai with the channels-last copy", swapped_monai, None))
        print(row("  attribution: ours with the model as built", swapped_ours, None))
        save(monai_channels_last_ms=swapped_monai, ours_as_built_ms=swapped_ours)
    difference = (ours_out - monai_out).abs().max().item()
    scale = monai_out.abs().max().item()
    save(max_abs_difference=difference, max_abs_logit=scale)
    print(
        f"  max |ours - monai| = {difference:.4g} (logits up to {scale:.4g}); expected to differ a little: "
        f"same window count but evenly spread (nnU-Net) vs stepped-and-clamped (MONAI) placement, Gaussian "
        f"maps that differ in detail, {args.precision} rounding per window"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
