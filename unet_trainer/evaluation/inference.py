"""Sliding-window inference over whole prepared volumes, kept on the device.

Windows of the patch size tile the volume with the given overlap (nnU-Net's default 0.5), each
window's logits are weighted by a Gaussian importance map (sigma = 1/8 of the window, so voxels
near a window's border, which see less context, count less) and accumulated; optional mirroring
test-time augmentation averages over every flip of the spatial axes (8 in 3D, 4 in 2D).

A 2D model is run over the volume slice by slice, but never one slice per forward pass: the
in-plane windows of consecutive slices are stacked into window batches of ``sw_batch_size``.

Speed notes (what the loop does and does not do on a GPU):

* the importance map is built once per (window, mode, device) and cached;
* windows are cut by slicing (views) and stacked, one copy per batch; results are accumulated
  with one fused ``addcmul_`` per window into a float32 buffer; nothing in the loop reads a value
  back to the host, so the CPU only queues kernels and never waits for the GPU;
* under AMP the model runs in autocast and the accumulation stays float32;
* every tensor is created on the image's device.

:class:`SlidingWindow` holds the settings of one model's inference (window, overlap, window batch,
weighting, mirroring, autocast) and runs it over a volume, as MONAI's ``SlidingWindowInferer``
holds its own; the evaluator, ``unet-eval`` and ``unet-predict`` (one per model of an ensemble)
all predict through one, built from the config by ``builders.build_sliding_window``.

A model whose output is smaller than its input (unpadded "valid" convolutions) is supported by
``output_window``: the output of a window is its centred ``output_window`` part, and the volume
is zero-padded by the margin so every voxel is covered by some window's output.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

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
        float32 (*window), a new tensor.
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


@functools.lru_cache(maxsize=16)
def _cached_importance(window: tuple[int, ...], gaussian: bool, device: torch.device) -> torch.Tensor:
    # Read-only by convention: the loop below only reads it. A 128^3 map is 8 MiB, so a handful
    # of cached (window, device) pairs cost nothing next to the volumes.
    if gaussian:
        return gaussian_importance(window, device=device)
    return torch.ones(window, dtype=torch.float32, device=device)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _flip_sets(first_dim: int, count: int, mirror: bool) -> list[tuple[int, ...]]:
    """Every subset of the ``count`` spatial dims starting at ``first_dim`` (2^count flips), or
    just the identity without mirroring."""
    if not mirror:
        return [()]
    dims = list(range(first_dim, first_dim + count))
    return [c for r in range(count + 1) for c in itertools.combinations(dims, r)]


def _run_windows(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    flips: list[tuple[int, ...]],
    amp_dtype: torch.dtype | None,
    num_outputs: int,
    output_window: tuple[int, ...],
) -> torch.Tensor:
    """Logits (N, K, *output_window) of a window batch (N, C, *window), averaged over ``flips``.

    The result keeps the model's dtype (bf16 under AMP) without flips; the flip average is float32.

    Raises:
        ValueError: the model's output does not have the expected shape (checked on shapes only,
            no device synchronisation).
    """
    with _autocast(batch.device, amp_dtype):
        out = None
        for flip in flips:
            y = predict(batch.flip(flip) if flip else batch)
            expected = (batch.shape[0], num_outputs) + output_window
            if tuple(y.shape) != expected:
                raise ValueError(
                    f"the model returned {tuple(y.shape)} for windows {tuple(batch.shape)}; expected "
                    f"{expected} (num_outputs / output_window do not match the model)"
                )
            if len(flips) == 1:
                return y
            y = y.flip(flip) if flip else y
            # The first term is copied, never accumulated into in place: under CUDA graphs
            # (torch.compile "reduce-overhead" / "max-autotune") the model returns a static output
            # buffer that its next call overwrites (and marks as unreadable).
            out = y.to(torch.float32, copy=True) if out is None else out.add_(y)
    return out.div_(len(flips))


def _padding(spatial: Sequence[int], window: Sequence[int], output_window: Sequence[int]):
    """Per axis: (fit_before, fit_after) that grow the volume to at least the output window, and
    (margin_before, margin_after) of input context around an output window."""
    fit = [max(o - s, 0) for s, o in zip(spatial, output_window)]
    fit_pairs = [(f // 2, f - f // 2) for f in fit]
    margins = [((w - o) // 2, w - o - (w - o) // 2) for w, o in zip(window, output_window)]
    return fit_pairs, margins


def _pad_last_axes(x: torch.Tensor, before_after: Sequence[tuple[int, int]]) -> torch.Tensor:
    if not any(a or b for a, b in before_after):
        return x
    pad_arg: list[int] = []
    for before, after in reversed(list(before_after)):
        pad_arg += [before, after]
    return F.pad(x, pad_arg)


def _check_windows(window: tuple[int, ...], output_window: tuple[int, ...]) -> None:
    if len(output_window) != len(window) or any(o < 1 or o > w for o, w in zip(output_window, window)):
        raise ValueError(
            f"output_window {list(output_window)} must have one size per axis of window "
            f"{list(window)}, each between 1 and the window size"
        )


class _Tiling(NamedTuple):
    """How an image is tiled by windows: shared by the 3D and the slice-by-slice paths."""

    image: torch.Tensor  # padded by the fit and the context margins
    window: tuple[int, ...]  # input window
    output_window: tuple[int, ...]  # the model's output for one window
    fit: list[tuple[int, int]]  # padding that grows the image to one output window
    acc_shape: tuple[int, ...]  # accumulator extent over the tiled axes
    weight: torch.Tensor  # importance map over the output window
    starts: list[tuple[int, ...]]  # output-window origins in accumulator coordinates

    def crop(self, logits: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """Drop the fit padding from accumulated logits (tiled axes last)."""
        if not any(a or b for a, b in self.fit):
            return logits
        lead = (slice(None),) * (logits.ndim - len(spatial))
        return logits[lead + tuple(slice(a, a + n) for (a, _), n in zip(self.fit, spatial))]


def _tile(
    image: torch.Tensor, window: Sequence[int], output_window: Sequence[int] | None, overlap: float, gaussian: bool
) -> _Tiling:
    """Check the windows, pad the last ``len(window)`` axes of ``image`` and place the windows.

    In accumulator coordinates the image is grown to at least one output window; the input is
    further padded by the context margins, so the window whose output starts at t starts at t in it.
    """
    window = tuple(int(w) for w in window)
    output_window = window if output_window is None else tuple(int(o) for o in output_window)
    _check_windows(window, output_window)
    spatial = tuple(image.shape[-len(window) :])
    fit, margins = _padding(spatial, window, output_window)
    acc_shape = tuple(n + a + b for n, (a, b) in zip(spatial, fit))
    padded = _pad_last_axes(image, [(fa + ma, fb + mb) for (fa, fb), (ma, mb) in zip(fit, margins)])
    starts = list(itertools.product(*[window_starts(n, o, overlap) for n, o in zip(acc_shape, output_window)]))
    return _Tiling(
        padded, window, output_window, fit, acc_shape, _cached_importance(output_window, gaussian, image.device), starts
    )


@torch.no_grad()
def sliding_window_logits(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: Sequence[int],
    num_outputs: int,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    gaussian: bool = True,
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
    output_window: Sequence[int] | None = None,
) -> torch.Tensor:
    """Blend window predictions over a whole image.

    Args:
        predict: maps a batch of windows (N, C, *window) to logits (N, K, *output_window).
        image: (C, *S) on the compute device; S smaller than the window is zero-padded.
        window: spatial window size (len(S) entries).
        num_outputs: K.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per forward pass.
        gaussian: Gaussian importance weighting, else uniform.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
        mirror: average over all 2^d flips of the spatial axes (test-time augmentation).
        output_window: spatial size of the model's output for one window when it is smaller than
            the window (valid convolutions; the output is the window's centred part); None when
            the output has the window's size.

    Returns:
        float32 logits (K, *S) on the image's device.

    Raises:
        ValueError: inconsistent window sizes, or a model output of an unexpected shape.
    """
    spatial = tuple(image.shape[1:])
    tiling = _tile(image, window, output_window, overlap, gaussian)
    image, window, output_window, weight, starts = (
        tiling.image,
        tiling.window,
        tiling.output_window,
        tiling.weight,
        tiling.starts,
    )
    logits = torch.zeros((num_outputs,) + tiling.acc_shape, dtype=torch.float32, device=image.device)
    norm = torch.zeros(tiling.acc_shape, dtype=torch.float32, device=image.device)
    flips = _flip_sets(2, len(window), mirror)
    for first in range(0, len(starts), sw_batch_size):
        chunk = starts[first : first + sw_batch_size]
        batch = torch.stack(
            [image[(slice(None),) + tuple(slice(s, s + w) for s, w in zip(start, window))] for start in chunk]
        )
        out = _run_windows(predict, batch, flips, amp_dtype, num_outputs, output_window)
        for start, pred in zip(chunk, out):
            region = tuple(slice(s, s + o) for s, o in zip(start, output_window))
            logits[(slice(None),) + region].addcmul_(pred, weight)
            norm[region] += weight
    logits /= norm
    return tiling.crop(logits, spatial)


@torch.no_grad()
def sliding_window_slices(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: Sequence[int],
    num_outputs: int,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    gaussian: bool = True,
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
    output_window: Sequence[int] | None = None,
) -> torch.Tensor:
    """A 2D model over a volume, slice by slice along the first spatial axis, windows batched
    across slices.

    Every slice is tiled in-plane exactly as :func:`sliding_window_logits` tiles a 2D image. The
    windows are ordered by in-plane position, then slice, and cut into batches of
    ``sw_batch_size``; within a batch, windows at the same in-plane position on consecutive slices
    are one strided view of the volume, cut and accumulated with one operation.

    Args:
        predict: maps (N, C, wy, wx) to logits (N, K, *output_window).
        image: (C, Z, Y, X) on the compute device.
        window: in-plane window (wy, wx).
        mirror: average over the 4 flips of the two in-plane axes.
        Others: as :func:`sliding_window_logits`.

    Returns:
        float32 logits (K, Z, Y, X) on the image's device; equal (up to float rounding) to running
        :func:`sliding_window_logits` on each slice ``image[:, z]``.

    Raises:
        ValueError: as :func:`sliding_window_logits`.
    """
    depth = image.shape[1]
    plane = tuple(image.shape[2:])
    tiling = _tile(image, window, output_window, overlap, gaussian)
    image, window, output_window, weight, in_plane = (
        tiling.image,
        tiling.window,
        tiling.output_window,
        tiling.weight,
        tiling.starts,
    )
    logits = torch.zeros((num_outputs, depth) + tiling.acc_shape, dtype=torch.float32, device=image.device)
    # Every slice is tiled identically, so the weight sum is one in-plane map for all slices.
    norm = torch.zeros(tiling.acc_shape, dtype=torch.float32, device=image.device)
    for start in in_plane:
        norm[tuple(slice(s, s + o) for s, o in zip(start, output_window))] += weight
    windows = [(start, z) for start in in_plane for z in range(depth)]
    flips = _flip_sets(2, 2, mirror)
    for first in range(0, len(windows), sw_batch_size):
        chunk = windows[first : first + sw_batch_size]
        # Runs of one in-plane position on consecutive slices: (start, z0, z1).
        runs: list[list] = []
        for start, z in chunk:
            if runs and runs[-1][0] == start and runs[-1][2] == z:
                runs[-1][2] = z + 1
            else:
                runs.append([start, z, z + 1])
        parts = [
            image[(slice(None), slice(z0, z1)) + tuple(slice(s, s + w) for s, w in zip(start, window))].transpose(0, 1)
            for start, z0, z1 in runs
        ]
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = _run_windows(predict, batch, flips, amp_dtype, num_outputs, output_window)
        row = 0
        for start, z0, z1 in runs:
            region = (slice(None), slice(z0, z1)) + tuple(slice(s, s + o) for s, o in zip(start, output_window))
            logits[region].addcmul_(out[row : row + z1 - z0].transpose(0, 1), weight)
            row += z1 - z0
    logits /= norm
    return tiling.crop(logits, plane)


def model_output_window(model: Callable, window: Sequence[int]) -> tuple[int, ...] | None:
    """The output size of ``model`` for one window when the model can say (``UNet.output_size``)
    and it is the smaller, centred output of unpadded ("valid") convolutions; None when the
    output has the window's size (or the model cannot say, in which case the same size is assumed).

    Raises:
        ValueError: the window does not fit the model's strides (the model's own one-line message),
            or a padded model whose output is not at the window's resolution (e.g. ``strides[0] > 1``).
    """
    output_size = getattr(model, "output_size", None)
    if not callable(output_size):
        return None
    out = tuple(int(n) for n in output_size(tuple(window)))
    if out == tuple(window):
        return None
    if getattr(model, "padding", None) != "valid":
        raise ValueError(
            f"the model maps a {list(window)} window to {list(out)}: sliding-window inference needs "
            "logits at the input's resolution (strides[0] = 1)"
        )
    return out


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    spatial_dims: int,
    num_outputs: int,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    gaussian: bool = True,
    amp_dtype: torch.dtype | None = None,
    mirror: bool = False,
) -> torch.Tensor:
    """Logits for a whole prepared volume, with a 3D model or slice by slice with a 2D one.

    Args:
        model: in eval mode, returning logits (N, K, *window) (or a centred smaller output for a
            valid-padding :class:`~unet_trainer.models.unet.UNet`, found with ``model.output_size``).
        image: (C, Z, Y, X) on the model's device.
        patch_size: the training patch (Z, Y, X); for 2D models (1, Y, X).
        spatial_dims: 3, or 2 for slice-by-slice prediction (windows batched across slices).
        num_outputs: K, the model's output channels.
        overlap, sw_batch_size, gaussian, amp_dtype, mirror: see :func:`sliding_window_logits`.

    Returns:
        float32 logits (K, Z, Y, X) on the image's device.

    Raises:
        ValueError: a window that does not fit the model, or a model output of the wrong shape.
    """
    if spatial_dims == 3:
        window = tuple(patch_size)
        return sliding_window_logits(
            model,
            image,
            window,
            num_outputs,
            overlap,
            sw_batch_size,
            gaussian,
            amp_dtype,
            mirror,
            model_output_window(model, window),
        )
    window = tuple(patch_size[1:])
    return sliding_window_slices(
        model,
        image,
        window,
        num_outputs,
        overlap,
        sw_batch_size,
        gaussian,
        amp_dtype,
        mirror,
        model_output_window(model, window),
    )


@dataclass(frozen=True)
class SlidingWindow:
    """The sliding-window settings of one model, and its inference over a prepared volume.

    Attributes:
        patch_size: the training patch (Z, Y, X); for 2D models (1, Y, X).
        spatial_dims: 3, or 2 for slice-by-slice prediction (windows batched across slices).
        num_outputs: K, the model's output channels.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        gaussian: Gaussian importance weighting, else uniform.
        mirror: average over every flip of the spatial axes (test-time augmentation).
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for full precision.
    """

    patch_size: tuple[int, ...]
    spatial_dims: int
    num_outputs: int
    overlap: float
    batch_size: int
    gaussian: bool
    mirror: bool
    amp_dtype: torch.dtype | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(n) for n in self.patch_size))

    def __call__(self, model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Logits of a whole prepared volume (:func:`predict_volume` with these settings).

        Args:
            model: in eval mode, on the image's device.
            image: float32 (C, Z, Y, X).

        Returns:
            float32 logits (K, Z, Y, X) on the image's device.

        Raises:
            ValueError: a window that does not fit the model, or a model output of the wrong shape.
        """
        return predict_volume(
            model,
            image,
            self.patch_size,
            self.spatial_dims,
            self.num_outputs,
            self.overlap,
            self.batch_size,
            self.gaussian,
            self.amp_dtype,
            self.mirror,
        )


def speed_up_inference(device: torch.device) -> None:
    """Let cuDNN pick its fastest convolution algorithms on CUDA (nothing elsewhere)."""
    # Every window has the same shape, so cuDNN's per-shape algorithm search pays for itself after
    # the first batch; a process-wide setting, hence only for the commands that predict or score.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
