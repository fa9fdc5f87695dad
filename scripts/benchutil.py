"""Shared by the benchmarks in this folder: naming the device a figure was measured on, timing
(synchronized medians, the timed steps of a training run) and the phantom's case ids."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unet_trainer.training.trainer import Callback, State


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device | str) -> str:
    """One line naming the device: the GPU and CUDA version, or the CPU, its cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {cpu_model_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


@dataclass
class PeakMemory:
    """The peak resident memory of a block, filled in when it ends: GiB, and how it was measured."""

    gib: float = 0.0
    method: str = ""


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def peak_rss():
    """Measure the peak resident memory (RSS) of this process during the block (a :class:`PeakMemory`).

    On Linux the kernel's high-water mark ``VmHWM`` (/proc/self/status) is reset to the current RSS first, by
    writing 5 to /proc/self/clear_refs, so the figure is the block's own; where that cannot be done
    ``ru_maxrss`` is read instead, the peak of the whole process so far (the method says which).
    """
    peak = PeakMemory()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        reset = _vm_hwm_kib() is not None
    except OSError:
        reset = False
    try:
        yield peak
    finally:
        if reset:
            peak.gib, peak.method = _vm_hwm_kib() / 2**20, "VmHWM, reset before the loop"
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            peak.gib, peak.method = kib / 2**20, "ru_maxrss, the process's peak so far"


def brats_3d_model(width_divisor: int = 1) -> dict:
    """The BraTS 3D preset's UNet arguments, read from ``configs/brats.yaml`` (its one definition),
    with every filter count divided by ``width_divisor`` (at least 1) for quick CPU runs."""
    from unet_trainer.config.config import repo_root, resolve_config

    model = resolve_config(repo_root() / "configs" / "brats.yaml")["model"]["unet"]
    model["filters"] = [max(1, f // width_divisor) for f in model["filters"]]
    return model


def case_ids(cases: int) -> list[str]:
    """The phantom's case ids (write_phantom_dataset names them BraTS2021_00000 onwards)."""
    return [f"BraTS2021_{i:05d}" for i in range(cases)]


def centre_crop_box(shape: tuple[int, ...], crop: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices of the centred box of ``crop`` voxels (per axis, at most the shape's) in ``shape``."""
    box = []
    for size, want in zip(shape, crop):
        take = min(size, want)
        start = (size - take) // 2
        box.append(slice(start, start + take))
    return tuple(box)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued kernels (a no-op off CUDA), so that the host
    clock read after it includes the device work."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_seconds(run: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``iters`` calls of ``run`` in seconds, after ``warmup`` untimed calls,
    synchronising the device around each timed call."""
    sync = synchronizer(device)
    for _ in range(warmup):
        run()
    durations = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        run()
        sync()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def release_memory(device: torch.device) -> None:
    """Collect what the caller has just dropped and, on CUDA, hand the cached blocks back, so the
    next measurement's peak memory starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Measurement:
    """One training pipeline's timed steps and side measurements (bench_train, bench_ablation).

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
    """Times the trainer's steps between consecutive ``BATCH_END`` events into a :class:`Measurement`.

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
