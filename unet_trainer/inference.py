"""Sliding-window inference over whole prepared volumes, kept on the device.

Windows of the patch size tile the volume with the given overlap (nnU-Net's default 0.5), each
window's logits are weighted by a Gaussian importance map (sigma = 1/8 of the window, so voxels
near a window's border, which see less context, count less) and accumulated; optional mirroring
test-time augmentation averages over every flip of the spatial axes. A 2D model is run slice by
slice over the first spatial axis.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows covering ``size`` voxels, spread evenly, adjacent ones overlapping
    by at least ``overlap`` of the window (requires size >= window)."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((size - window) / step) + 1
    if count == 1:
        return [0]
    stride = (size - window) / (count - 1)
    return [int(round(i * stride)) for i in range(count)]


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """A separable Gaussian importance map over the window, peak 1, floor at a small positive value.

    Returns:
        float32 (*window).
    """
    axes = []
    for n in window:
        sigma = max(n * sigma_scale, 1e-3)
        coords = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weight = axes[0]
    for axis in axes[1:]:
        weight = weight[..., None] * axis
    weight = weight / weight.max()
    # Zero weights would leave voxels seen only by window borders undefined.
    return weight.clamp_min(1e-3)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def sliding_window_logits(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                          window: Sequence[int], num_outputs: int, overlap: float = 0.5,
                          sw_batch_size: int = 4, gaussian: bool = True,
                          amp_dtype: torch.dtype | None = None, mirror: bool = False) -> torch.Tensor:
    """Blend window predictions over a whole image.

    Args:
        predict: maps a batch of windows (N, C, *window) to logits (N, K, *window).
        image: (C, *S) on the compute device; S smaller than the window is zero-padded.
        window: spatial window size (len(S) entries).
        num_outputs: K.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per forward pass.
        gaussian: Gaussian importance weighting, else uniform.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
        mirror: average over all 2^d flips of the spatial axes (test-time augmentation).

    Returns:
        float32 logits (K, *S) on the image's device.
    """
    device = image.device
    spatial = tuple(image.shape[1:])
    window = tuple(int(w) for w in window)
    pads = [max(w - s, 0) for s, w in zip(spatial, window)]
    if any(pads):
        pad_arg = []
        for p in reversed(pads):
            pad_arg += [p // 2, p - p // 2]
        image = F.pad(image, pad_arg)
    padded = tuple(image.shape[1:])
    weight = gaussian_importance(window, device=device) if gaussian else torch.ones(window, device=device)
    logits = torch.zeros((num_outputs,) + padded, dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    starts = list(itertools.product(*[window_starts(s, w, overlap) for s, w in zip(padded, window)]))
    flips = [()]
    if mirror:
        dims = list(range(2, 2 + len(window)))
        flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    for first in range(0, len(starts), sw_batch_size):
        chunk = starts[first:first + sw_batch_size]
        slices = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in chunk]
        batch = torch.stack([image[(slice(None),) + sl] for sl in slices])
        with _autocast(device, amp_dtype):
            out = None
            for flip in flips:
                x = batch.flip(flip) if flip else batch
                y = predict(x)
                y = (y.flip(flip) if flip else y).float()
                out = y if out is None else out + y
        out = out / len(flips)
        for sl, pred in zip(slices, out):
            logits[(slice(None),) + sl] += pred * weight
            norm[sl] += weight
    logits /= norm
    if any(pads):
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
        logits = logits[(slice(None),) + crop]
    return logits


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int], spatial_dims: int,
                   num_outputs: int, overlap: float = 0.5, sw_batch_size: int = 4, gaussian: bool = True,
                   amp_dtype: torch.dtype | None = None, mirror: bool = False) -> torch.Tensor:
    """Logits for a whole prepared volume, with a 3D model or slice by slice with a 2D one.

    Args:
        model: in eval mode, returning logits (N, K, *window).
        image: (C, Z, Y, X) on the model's device.
        patch_size: the training patch (Z, Y, X); for 2D models (1, Y, X).

    Returns:
        float32 logits (K, Z, Y, X).
    """
    if spatial_dims == 3:
        return sliding_window_logits(model, image, patch_size, num_outputs, overlap, sw_batch_size, gaussian,
                                     amp_dtype, mirror)
    window = tuple(patch_size[1:])
    slices = [sliding_window_logits(model, image[:, z], window, num_outputs, overlap, sw_batch_size, gaussian,
                                    amp_dtype, mirror) for z in range(image.shape[1])]
    return torch.stack(slices, dim=1)
