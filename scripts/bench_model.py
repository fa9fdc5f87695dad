#!/usr/bin/env python
"""Training-step throughput and peak memory of the BraTS 3D U-Net against MONAI's DynUNet
(and nnU-Net's PlainConvUNet when ``dynamic_network_architectures`` is importable), all built
with the same architecture: 4 -> 4 channels, filters 32,64,128,256,320,320, 3^3 kernels,
strides 1,2,2,2,2,2, affine instance norm, leaky ReLU 0.01, transposed-conv upsampling.

One step is forward + cross-entropy against a fixed random target + backward (no optimizer step;
gradients are dropped with ``zero_grad(set_to_none=True)``, as a training loop would).

Modes, each run separately for every model:
    eager             the module as built
    channels_last     weights and input in channels_last_3d (optimize_model(channels_last=True))
    compiled          torch.compile of the module
    compiled_channels_last   both (not in the default list)

Timing: ``--warmup`` untimed steps, then ``--iters`` timed steps; on CUDA each step is bracketed
by CUDA events (read after a synchronize), on CPU by ``time.perf_counter``; the median step time
is reported as samples/s = batch / median.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights and
gradients included). On CPU there is no allocator counter, so the script samples the process RSS
from /proc/self/statm every millisecond during one extra step and reports peak minus the RSS
before that step. glibc is told (mallopt) to unmap freed tensor memory at once, so the RSS follows
the live tensors rather than the allocator's cache; without glibc the number is a lower bound.
Weights are allocated before that step, so unlike the CUDA number it counts activations,
gradients and workspace only.

Examples:
    python scripts/bench_model.py                      # CUDA if present: patch 128, batches 2 8, bf16
    python scripts/bench_model.py --device cpu --patch 64 --width-divisor 8 --batches 1 2 --iters 2 \
        --warmup 1 --modes eager channels_last          # CPU smoke run, well under a minute

The patch must be at least 64: with five stride-2 stages a 32^3 patch leaves a single bottleneck
voxel, and instance norm cannot normalise one voxel in training (DynUNet fails the same way).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import brats_3d_model, device_description, release_memory

from unet_trainer.models.base import optimize_model  # noqa: E402
from unet_trainer.models.unet import UNet  # noqa: E402

PRESET = brats_3d_model()  # configs/brats.yaml's model section; the peers are built to match it
FULL_WIDTH_FILTERS = tuple(PRESET["filters"])
FILTERS = list(FULL_WIDTH_FILTERS)  # narrowed by --width-divisor before any model is built
STRIDES = PRESET["strides"]
IN_CHANNELS = PRESET["in_channels"]
NUM_CLASSES = PRESET["num_classes"]
MODES = ("eager", "channels_last", "compiled", "compiled_channels_last")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_ours() -> nn.Module:
    return UNet(**{**PRESET, "filters": FILTERS})


def build_dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        3,
        IN_CHANNELS,
        NUM_CLASSES,
        kernel_size=[3] * len(FILTERS),
        strides=STRIDES,
        upsample_kernel_size=STRIDES[1:],
        filters=FILTERS,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01}),
    )


def build_plain_conv_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    # conv_bias=False like the other two (nnU-Net's own plans use a bias before the norm).
    return PlainConvUNet(
        input_channels=IN_CHANNELS,
        n_stages=len(FILTERS),
        features_per_stage=FILTERS,
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * len(FILTERS),
        strides=[[s, s, s] for s in STRIDES],
        n_conv_per_stage=[2] * len(FILTERS),
        num_classes=NUM_CLASSES,
        n_conv_per_stage_decoder=[2] * (len(FILTERS) - 1),
        conv_bias=False,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 0.01, "inplace": True},
        deep_supervision=False,
    )


def available_models() -> dict[str, Callable[[], nn.Module]]:
    models: dict[str, Callable[[], nn.Module]] = {"ours": build_ours, "DynUNet": build_dynunet}
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        pass
    else:
        models["PlainConvUNet"] = build_plain_conv_unet
    return models


@dataclass
class Result:
    model: str
    mode: str
    batch: int
    samples_per_s: float | None = None
    peak_bytes: int | None = None
    note: str = ""


class RssSampler:
    """Peak resident set size of this process, sampled from /proc/self/statm in a thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.baseline = self.rss()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def increase(self) -> int:
        return self.peak - self.baseline


def return_freed_memory_to_the_os() -> bool:
    """Make glibc serve every allocation above 64 KiB with its own mmap and unmap it on free.

    By default glibc keeps freed tensor memory in its heap and raises its mmap threshold as it
    goes, so the RSS of a process that has already run a step barely moves during the next one,
    and an RSS-based peak would measure the allocator, not the model. Returns False where this is
    not glibc (the RSS numbers are then lower bounds only).
    """
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        mallopt = ctypes.CDLL(library).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 64 * 1024)) and bool(mallopt(m_trim_threshold, 64 * 1024))


def measure(
    name: str,
    build: Callable[[], nn.Module],
    mode: str,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    amp_dtype: torch.dtype,
) -> Result:
    result = Result(name, mode, batch)
    torch.manual_seed(0)
    model = build().to(device).train()
    memory_format = torch.channels_last_3d if "channels_last" in mode else torch.contiguous_format
    model = optimize_model(model, channels_last="channels_last" in mode, compile=mode.startswith("compiled"))
    size = (args.patch,) * 3
    x = torch.randn(batch, IN_CHANNELS, *size, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, NUM_CLASSES, (batch, *size), device=device)
    use_autocast = amp_dtype != torch.float32

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_autocast):
            logits = model(x)
        F.cross_entropy(logits.float(), target).backward()
        model.zero_grad(set_to_none=True)

    try:
        for _ in range(args.warmup):
            step()
        times: list[float] = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            events = []
            for _ in range(args.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) / 1000.0 for start, end in events]
            result.peak_bytes = torch.cuda.max_memory_allocated(device)
        else:
            for _ in range(args.iters):
                began = time.perf_counter()
                step()
                times.append(time.perf_counter() - began)
            gc.collect()
            with RssSampler() as sampler:
                step()
            result.peak_bytes = sampler.increase
        result.samples_per_s = batch / statistics.median(times)
    except torch.cuda.OutOfMemoryError:
        result.note = "out of memory"
    except Exception as error:  # a backend that cannot run one mode must not hide the others
        result.note = f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
    finally:
        del model, x, target
        release_memory(device)
    return result


def format_table(results: list[Result], memory_label: str) -> str:
    reference = {(r.mode, r.batch): r for r in results if r.model == "DynUNet"}
    header = ["model", "mode", "batch", "samples/s", memory_label, "speed vs DynUNet", "memory vs DynUNet", "note"]
    rows = [header]
    for r in results:
        base = reference.get((r.mode, r.batch))
        speed_ratio = memory_ratio = ""
        if base is not None and base.samples_per_s and r.samples_per_s:
            speed_ratio = f"{r.samples_per_s / base.samples_per_s:.2f}x"
        if base is not None and base.peak_bytes and r.peak_bytes is not None:
            memory_ratio = f"{r.peak_bytes / base.peak_bytes:.2f}x"
        rows.append(
            [
                r.model,
                r.mode,
                str(r.batch),
                f"{r.samples_per_s:.2f}" if r.samples_per_s else "-",
                f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "-",
                speed_ratio,
                memory_ratio,
                r.note,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(
    path: Path,
    args: argparse.Namespace,
    device: torch.device,
    dtype_name: str,
    memory_label: str,
    results: list[Result],
) -> None:
    document = {
        "device": device_description(device),
        "torch": torch.__version__,
        "dtype": dtype_name,
        "patch": args.patch,
        "filters": FILTERS,
        "memory": memory_label,
        "results": [dataclasses.asdict(r) for r in results],
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1))
    temporary.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--patch", type=int, default=128, help="cubic patch edge in voxels: a multiple of 32 and at least 64"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--iters", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager", "channels_last", "compiled"])
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="autocast dtype; default bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--models", nargs="+", default=None, help="subset of: ours DynUNet PlainConvUNet")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--width-divisor",
        type=int,
        default=1,
        help="divide every filter count by this for all models (CPU smoke runs; 1 = the real preset)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write every result to this JSON file, rewritten after each measurement",
    )
    args = parser.parse_args(argv)
    if args.patch % 32 or args.patch < 64:
        parser.error(
            f"--patch {args.patch}: use a multiple of 32 (five stride-2 stages) and at least 64; at 32 the "
            "bottleneck is a single voxel, which instance norm cannot normalise in training (every model fails)"
        )
    if args.width_divisor < 1:
        parser.error("--width-divisor must be >= 1")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    FILTERS[:] = [max(1, f // args.width_divisor) for f in FULL_WIDTH_FILTERS]
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = DTYPES[dtype_name]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    models = available_models()
    if args.models:
        unknown = [m for m in args.models if m not in models]
        if unknown:
            print(f"unknown or unavailable models {unknown}; available: {list(models)}", file=sys.stderr)
            return 2
        models = {name: models[name] for name in args.models}

    memory_label = "peak alloc MiB" if device.type == "cuda" else "peak RSS +MiB"
    print(f"device: {device_description(device)}")
    print(
        f"torch {torch.__version__}; autocast {dtype_name if amp_dtype != torch.float32 else 'off (fp32)'}; "
        f"patch {args.patch}^3; filters {FILTERS}; warmup {args.warmup}, timed {args.iters} (median)"
    )
    if device.type == "cuda":
        print("memory: torch.cuda.max_memory_allocated over the timed steps (weights and gradients included)")
    else:
        exact_rss = return_freed_memory_to_the_os()
        print(
            "memory: process RSS sampled every 1 ms during one extra step, peak minus the RSS before it "
            + (
                "(glibc set to unmap freed tensors, so RSS follows live memory)"
                if exact_rss
                else "(allocator caching not controlled: a lower bound)"
            )
        )
    for name, build in models.items():
        with torch.device("meta"):
            parameters = sum(p.numel() for p in build().parameters())
        print(f"  {name}: {parameters:,} parameters")
    if "PlainConvUNet" not in models and not args.models:
        print("  (PlainConvUNet skipped: dynamic_network_architectures is not importable)")

    results = []
    for mode in args.modes:
        for batch in args.batches:
            for name, build in models.items():
                result = measure(name, build, mode, batch, args, device, amp_dtype)
                results.append(result)
                if args.json:  # after every measurement, so a run stopped at a time limit keeps the rest
                    write_json(args.json, args, device, dtype_name, memory_label, results)
                print(
                    f"  measured {name:13s} {mode:22s} batch {batch}: "
                    f"{f'{result.samples_per_s:.2f} samples/s' if result.samples_per_s else result.note}",
                    flush=True,
                )
    print()
    print(format_table(results, memory_label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
