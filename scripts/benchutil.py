"""Shared by the benchmarks in this folder: naming the device a figure was measured on."""

from __future__ import annotations

import os
import platform

import torch


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


def brats_3d_model(width_divisor: int = 1) -> dict:
    """The BraTS 3D preset's UNet arguments, read from ``configs/brats.yaml`` (its one definition),
    with every filter count divided by ``width_divisor`` (at least 1) for quick CPU runs."""
    from unet_trainer.config import repo_root, resolve_config

    model = resolve_config(repo_root() / "configs" / "brats.yaml")["model"]["unet"]
    model["filters"] = [max(1, f // width_divisor) for f in model["filters"]]
    return model
