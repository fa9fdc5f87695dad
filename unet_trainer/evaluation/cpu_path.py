"""How a model runs on the CPU: the fastest path that is exact enough, chosen from what the CPU can do.

The paths (:data:`CPU_PATH_CHOICES`):

* ``fp32``: float32, the model's weights in the default (contiguous) layout: exactly what ``unet-eval`` runs
  and what a GPU-less ``unet-predict`` ran before; the reference the fast path is judged against.
* ``bf16 autocast + channels-last``: convolutions in bfloat16 under autocast (the accumulation of the
  windows stays float32), weights and windows channels-last (``torch.channels_last_3d``, the layout oneDNN's
  direct convolutions read without reordering). Fast only where the CPU computes bf16 natively, with AMX
  tiles (``amx_bf16``) or AVX-512 BF16 dot products (``avx512_bf16``); elsewhere oneDNN emulates bf16 3D
  convolutions and they run slower than fp32 (on the machine measured, 2.4x slower).

Measured on one Intel Xeon with AMX, 2 threads, one 64^3 window of the ``configs/brats.yaml`` network: fp32
0.89 s, bf16 autocast 0.29 s, bf16 autocast + channels-last 0.19 s. Not kept: fp32 channels-last (0.67 s
there; 0.62 s against 0.74 s with oneDNN capped at AVX512_CORE, 0.85 s against 0.88 s at AVX2), which changes
the summation order, so its labels would no longer be bit-identical to ``unet-eval``'s; and a larger window
batch (0.17 s per window at 2 windows per pass), so the config's ``eval.sw_batch_size`` stays.

The choice (:func:`plan_cpu_path`, :func:`settle_cpu_path`): ``auto`` takes bf16 + channels-last where the CPU
has a native bf16 flag, then checks it on the first volume predicted: the centred window of that volume is
labelled in fp32 and in bf16, and each region (WT, TC, ET) must agree with a Dice of at least
:data:`DICE_FLOOR`; failing that, fp32 is taken, with the reason. Without a native bf16 flag ``auto`` takes
fp32. ``fp32`` and ``bf16`` are taken as asked.

The CPU's flags (:func:`cpu_features`) come from ``/proc/cpuinfo``, or where it cannot be read from torch's own
probe (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``); ``ONEDNN_MAX_CPU_ISA``, which caps
the instructions oneDNN may use, removes the flags above the cap, since bf16 is then emulated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme
from ..models.base import SegmentationModel, optimize_model

#: The CPU flags that make bf16 convolutions fast (native bf16 arithmetic).
NATIVE_BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")

# oneDNN's instruction-set levels in ascending order (ONEDNN_MAX_CPU_ISA's values; aliases share a level), and
# the lowest level that lets oneDNN use each native bf16 flag.
_ONEDNN_LEVELS: dict[str, int] = {
    "SSE41": 1,
    "AVX": 2,
    "AVX2": 3,
    "AVX2_VNNI": 4,
    "AVX2_VNNI_2": 5,
    "AVX512_CORE": 6,
    "AVX512_CORE_VNNI": 7,
    "AVX512_CORE_BF16": 8,
    "AVX10_1_512": 9,
    "AVX512_CORE_FP16": 9,
    "AVX10_1_512_AMX": 10,
    "AVX512_CORE_AMX": 10,
    "AVX10_1_512_AMX_FP16": 11,
    "AVX512_CORE_AMX_FP16": 11,
}
_FLAG_LEVEL: dict[str, int] = {"avx512_bf16": 8, "amx_bf16": 10}

#: The least Dice per region between the fast path's labels and fp32's for the fast path to be taken.
DICE_FLOOR = 0.995
#: A region with fewer voxels than this in both label maps of the check is not judged by its Dice: there one
#: voxel moves the Dice by more than 0.1%. The share of voxels whose label agrees must still reach DICE_FLOOR.
MIN_JUDGED_VOXELS = 1000


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for inference.

    Attributes:
        flags: the CPU's flags (lower case, as /proc/cpuinfo names them), less those an ISA cap disables.
        source: where the flags were read ("/proc/cpuinfo" or "torch.cpu").
        isa_cap: the ``ONEDNN_MAX_CPU_ISA`` in force, or None.
    """

    flags: frozenset[str]
    source: str
    isa_cap: str | None = None

    @property
    def native_bf16(self) -> tuple[str, ...]:
        """The native bf16 flags present, in :data:`NATIVE_BF16_FLAGS` order."""
        return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in self.flags)

    def describe(self) -> str:
        """``CPU has amx_bf16 avx512_bf16``, or ``CPU has no amx_bf16 or avx512_bf16 (...)``."""
        cap = f" under ONEDNN_MAX_CPU_ISA={self.isa_cap}" if self.isa_cap else ""
        if self.native_bf16:
            return f"CPU has {' '.join(self.native_bf16)}{cap}"
        return f"CPU has no {' or '.join(NATIVE_BF16_FLAGS)}{cap}, so bf16 convolutions would be emulated"


def _proc_flags(cpuinfo: Path) -> frozenset[str] | None:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _torch_flags() -> frozenset[str]:
    # torch's cpuinfo probe works where /proc does not (macOS, some containers); private, hence getattr.
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found = set()
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        if callable(probe) and probe():
            found.add(flag)
    return frozenset(found)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo"), environ: Mapping[str, str] | None = None) -> CpuFeatures:
    """The CPU's flags, with those above ``ONEDNN_MAX_CPU_ISA`` (when set to a known level) removed."""
    environ = os.environ if environ is None else environ
    flags = _proc_flags(Path(cpuinfo))
    source = str(cpuinfo)
    if flags is None:
        flags, source = _torch_flags(), "torch.cpu"
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None
    level = _ONEDNN_LEVELS.get(cap) if cap else None
    if level is not None:
        flags = frozenset(f for f in flags if _FLAG_LEVEL.get(f, 0) <= level)
    return CpuFeatures(flags, source, cap if level is not None else None)


@dataclass(frozen=True)
class CpuPath:
    """How a model runs on the CPU: autocast dtype (None: float32) and memory format."""

    name: str
    amp_dtype: torch.dtype | None
    channels_last: bool


FP32 = CpuPath("fp32", None, False)
BF16_CHANNELS_LAST = CpuPath("bf16 autocast + channels-last", torch.bfloat16, True)
#: What ``unet-predict --cpu-path`` takes: auto (the choice below), or a path exactly.
CPU_PATH_CHOICES: dict[str, CpuPath | None] = {"auto": None, "fp32": FP32, "bf16": BF16_CHANNELS_LAST}


@dataclass(frozen=True)
class CpuPlan:
    """A path to take, why, and whether it must first agree with fp32 on the first volume."""

    path: CpuPath
    reason: str
    needs_check: bool


def plan_cpu_path(requested: str, features: CpuFeatures) -> CpuPlan:
    """The path ``requested`` (a key of :data:`CPU_PATH_CHOICES`) stands for on a CPU with ``features``.

    Raises:
        ValueError: an unknown ``requested``.
    """
    if requested not in CPU_PATH_CHOICES:
        raise ValueError(f"cpu path {requested!r} is not one of {', '.join(CPU_PATH_CHOICES)}")
    asked = CPU_PATH_CHOICES[requested]
    if asked is not None:
        slow = asked.amp_dtype is not None and not features.native_bf16
        return CpuPlan(asked, f"as --cpu-path {requested} asks" + (f"; {features.describe()}" if slow else ""), False)
    if features.native_bf16:
        return CpuPlan(BF16_CHANNELS_LAST, features.describe(), True)
    return CpuPlan(FP32, features.describe(), False)


def set_channels_last(model: torch.nn.Module, channels_last: bool) -> None:
    """Put ``model``'s weights (and, for one of our models, its input) in channels-last or back in the
    default layout, in place."""
    if channels_last:
        optimize_model(model, channels_last=True)
        return
    model.to(memory_format=torch.contiguous_format)
    if isinstance(model, SegmentationModel):
        model.input_memory_format = torch.contiguous_format


def centre_crop(image: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """The centred box of one patch (each axis at most the image's) of a (C, Z, Y, X) volume, a view."""
    box = []
    for size, want in zip(image.shape[1:], patch_size):
        take = min(int(size), int(want))
        start = (int(size) - take) // 2
        box.append(slice(start, start + take))
    return image[(slice(None),) + tuple(box)]


def region_agreement(
    reference: torch.Tensor, labels: torch.Tensor, scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]
) -> dict[str, float | None]:
    """Per region of ``scheme`` (glioma: WT, TC, ET), the Dice of ``labels`` against ``reference`` (class-index
    maps of one shape), None where both hold fewer than :data:`MIN_JUDGED_VOXELS` of it; and under ``"voxels"``
    the share of voxels whose label agrees."""
    agreement: dict[str, float | None] = {}
    for name, members in scheme.regions.items():
        values = torch.tensor(members, device=reference.device)
        a, b = torch.isin(reference, values), torch.isin(labels, values)
        count_a, count_b = int(a.sum()), int(b.sum())
        judged = max(count_a, count_b) >= MIN_JUDGED_VOXELS
        agreement[name] = 2.0 * int((a & b).sum()) / (count_a + count_b) if judged else None
    agreement["voxels"] = float((reference == labels).float().mean())
    return agreement


def agreement_text(agreement: Mapping[str, float | None]) -> str:
    """``Dice WT 0.999 TC 0.998 ET n/a, 99.99% of voxels agree`` (n/a: too few voxels to judge)."""
    names = [name for name in agreement if name != "voxels"]
    dice = " ".join(f"{name} {'n/a' if agreement[name] is None else f'{agreement[name]:.3f}'}" for name in names)
    return f"Dice {dice}, {100 * agreement['voxels']:.2f}% of voxels agree"


def agrees(agreement: Mapping[str, float | None]) -> bool:
    """Every judged region's Dice and the voxel agreement reach :data:`DICE_FLOOR`."""
    return all(value is None or value >= DICE_FLOOR for value in agreement.values())


@dataclass(frozen=True)
class CpuChoice:
    """The path taken and the one line that says which and why (``CPU path: ... (...)``)."""

    path: CpuPath
    message: str
    agreement: dict | None = None


def settle_cpu_path(
    plan: CpuPlan, check_labels: Callable[[CpuPath], torch.Tensor], scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME]
) -> CpuChoice:
    """Take ``plan``'s path, after checking it against fp32 where the plan asks for a check.

    Args:
        plan: from :func:`plan_cpu_path`.
        check_labels: the canonical labels (*S) of the check volume with the model switched to the given path
            (called with :data:`FP32`, then the plan's path); it may leave the model in either path, the
            caller switches it to the path chosen afterwards.
        scheme: the label scheme whose regions are compared.

    Returns:
        The :class:`CpuChoice`: the plan's path, or :data:`FP32` when it disagrees with fp32.
    """
    if not plan.needs_check:
        return CpuChoice(plan.path, f"CPU path: {plan.path.name} ({plan.reason})")
    reference = check_labels(FP32)
    agreement = region_agreement(reference, check_labels(plan.path), scheme)
    where = "the centred window of the first volume"
    if agrees(agreement):
        return CpuChoice(
            plan.path,
            f"CPU path: {plan.path.name} ({plan.reason}; {where} agrees with fp32: {agreement_text(agreement)})",
            agreement,
        )
    return CpuChoice(
        FP32,
        f"CPU path: {FP32.name} ({plan.path.name} disagrees with fp32 on {where}: "
        f"{agreement_text(agreement)}, below {DICE_FLOOR})",
        agreement,
    )
