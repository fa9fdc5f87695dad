"""The models' settings checked and their sizes traced, before any layer is built.

The choices of the models' string settings (once: as ``Literal`` types for the signatures, and so
the config schema, and as tuples for the checks), :class:`ModelArgumentError` (a bad argument,
named), :class:`StageLayout` (the checked per-stage geometry), the checks
(:func:`check_stage_layout`, :func:`check_layer_arguments`, :func:`check_unet_arguments`) and the
size arithmetic of one spatial axis (:func:`trace_stage_sizes`, :func:`stage_size_error`).

Imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "ModelArgumentError",
    "StageLayout",
    "check_layer_arguments",
    "check_stage_layout",
    "check_unet_arguments",
    "stage_size_error",
    "trace_stage_sizes",
]

# The choices, once: as types for the signatures (and so the config schema) and as tuples.
Norm = Literal["instance", "batch", "group", "none"]
Activation = Literal["leaky_relu", "relu"]
UpsampleMode = Literal["transposed", "linear"]
DownsampleMode = Literal["strided_conv", "max_pool"]
PaddingMode = Literal["same", "valid"]
NORMS: tuple[str, ...] = get_args(Norm)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
UPSAMPLE_MODES: tuple[str, ...] = get_args(UpsampleMode)
DOWNSAMPLE_MODES: tuple[str, ...] = get_args(DownsampleMode)
PADDING_MODES: tuple[str, ...] = get_args(PaddingMode)


class ModelArgumentError(ValueError):
    """A model argument that is out of range or inconsistent with another.

    ``argument`` names it, and the message starts with that name, so that a config check can
    write the argument's config path in its place (:meth:`at`).
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument

    def at(self, path: str) -> str:
        """The message with its leading argument name replaced by ``'path'``."""
        text = str(self)
        if text.startswith(self.argument):
            return f"'{path}'{text[len(self.argument) :]}"
        return f"'{path}': {text}"


@dataclass(frozen=True)
class StageLayout:
    """The checked geometry of an encoder-decoder's stages, shallowest first.

    ``filters``: output channels per stage; ``kernel_sizes`` and ``strides``: one tuple per stage
    with one int per spatial axis.
    """

    filters: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]


def _per_axis(value: int | Sequence[int], spatial_dims: int, what: str, stage: int) -> tuple[int, ...]:
    """One stage's kernel or stride as one int per spatial axis (an int means isotropic)."""
    values = (value,) * spatial_dims if isinstance(value, numbers.Integral) else tuple(value)
    if len(values) != spatial_dims:
        raise ModelArgumentError(
            what,
            f"{what}[{stage}] = {list(values)} has {len(values)} entries; "
            f"expected one per spatial axis ({spatial_dims})",
        )
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ModelArgumentError(what, f"{what}[{stage}] = {value!r} must be positive integers")
    return tuple(int(v) for v in values)


def check_stage_layout(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    filters: Sequence[int],
    kernel_sizes: Sequence[int | Sequence[int]],
    strides: Sequence[int | Sequence[int]],
) -> StageLayout:
    """Check the arguments every encoder-decoder here shares and return them per stage and axis.

    Raises:
        ModelArgumentError: a dimension other than 2 or 3, a channel count below 1, fewer than 2
            stages, kernel sizes or strides not one per stage (or not one per axis).
    """
    if spatial_dims not in (2, 3):
        raise ModelArgumentError("spatial_dims", f"spatial_dims must be 2 or 3, got {spatial_dims}")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ModelArgumentError(name, f"{name} must be >= 1, got {value}")
    channels = tuple(int(f) for f in filters)
    if len(channels) < 2 or any(f < 1 for f in channels):
        raise ModelArgumentError(
            "filters", f"filters must list at least 2 positive channel counts, got {list(filters)}"
        )
    for name, value in (("kernel_sizes", kernel_sizes), ("strides", strides)):
        if len(value) != len(channels):
            raise ModelArgumentError(
                name, f"{name} has {len(value)} entries but filters has {len(channels)}; give one entry per stage"
            )
    return StageLayout(
        channels,
        tuple(_per_axis(k, spatial_dims, "kernel_sizes", i) for i, k in enumerate(kernel_sizes)),
        tuple(_per_axis(s, spatial_dims, "strides", i) for i, s in enumerate(strides)),
    )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ModelArgumentError(name, f"{name} must be one of {allowed}, got {value!r}")


def check_layer_arguments(
    filters: Sequence[int], norm: str, norm_groups: int, activation: str, negative_slope: float, dropout: float
) -> None:
    """Check the settings of the conv / norm / activation / dropout layers (see :class:`_LayerFactory`).

    Raises:
        ModelArgumentError: an unknown norm or activation, a dropout outside [0, 1), a negative
            slope, or group norm with a filter count its groups do not divide.
    """
    _check_choice("norm", norm, NORMS)
    _check_choice("activation", activation, ACTIVATIONS)
    if not 0.0 <= dropout < 1.0:
        raise ModelArgumentError("dropout", f"dropout must be in [0, 1), got {dropout}")
    if negative_slope < 0:
        raise ModelArgumentError("negative_slope", f"negative_slope must be >= 0, got {negative_slope}")
    if norm == "group":
        for f in filters:
            if norm_groups < 1 or f % norm_groups:
                raise ModelArgumentError(
                    "norm_groups",
                    f"norm_groups ({norm_groups}, for norm='group') must divide every filter count; "
                    f"{f} is not divisible by it",
                )


def check_unet_arguments(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    filters: Sequence[int],
    kernel_sizes: Sequence[int | Sequence[int]],
    strides: Sequence[int | Sequence[int]],
    norm: str,
    norm_groups: int,
    activation: str,
    negative_slope: float,
    upsample: str,
    downsample: str,
    residual: bool,
    deep_supervision: bool,
    deep_supervision_heads: int,
    dropout: float,
    padding: str,
) -> StageLayout:
    """Check :class:`UNet`'s arguments (all but ``gradient_checkpointing``); returns its stage layout.

    Raises:
        ModelArgumentError: the first inconsistent or unknown argument, named.
    """
    layout = check_stage_layout(spatial_dims, in_channels, num_classes, filters, kernel_sizes, strides)
    _check_choice("upsample", upsample, UPSAMPLE_MODES)
    _check_choice("downsample", downsample, DOWNSAMPLE_MODES)
    _check_choice("padding", padding, PADDING_MODES)
    check_layer_arguments(layout.filters, norm, norm_groups, activation, negative_slope, dropout)
    if padding == "same" and any(k % 2 == 0 for kernel in layout.kernel_sizes for k in kernel):
        raise ModelArgumentError(
            "kernel_sizes",
            f"kernel_sizes: padding='same' needs odd kernel sizes, got {[list(k) for k in layout.kernel_sizes]}",
        )
    if padding == "valid" and residual:
        raise ModelArgumentError(
            "residual", "residual blocks need padding='same': an unpadded block shrinks, its shortcut does not"
        )
    num_stages = len(layout.filters)
    if deep_supervision and not 1 <= deep_supervision_heads <= num_stages - 2:
        raise ModelArgumentError(
            "deep_supervision_heads",
            f"deep_supervision_heads must be between 1 and {num_stages - 2} (decoder levels below full "
            f"resolution for {num_stages} stages), got {deep_supervision_heads}",
        )
    return layout


def trace_stage_sizes(
    n: int, strides: Sequence[int], kernels: Sequence[int], padding: str, downsample: str
) -> tuple[list[int], list[int]] | None:
    """Sizes along one spatial axis of input size ``n``: (the encoder stages' outputs, the decoder
    levels' outputs from the deepest to full resolution), or None if some stage would drop or lack
    voxels. ``strides`` and ``kernels`` are that axis' entries, one per stage."""
    if n < 1:
        return None
    encoder_sizes: list[int] = []
    if padding == "same":
        for s in strides:
            if n % s:
                return None
            n //= s
            encoder_sizes.append(n)
        decoder_sizes = encoder_sizes[-2::-1]
        return encoder_sizes, decoder_sizes
    for s, k in zip(strides, kernels):
        if s > 1 and downsample == "max_pool":
            if n % s:
                return None
            n //= s
            n -= k - 1
        elif s > 1:
            if n < k or (n - k) % s:
                return None
            n = (n - k) // s + 1
        else:
            n -= k - 1
        n -= k - 1
        if n < 1:
            return None
        encoder_sizes.append(n)
    decoder_sizes = []
    for level in reversed(range(len(strides) - 1)):
        up = n * strides[level + 1]
        if up > encoder_sizes[level]:
            return None
        n = up - 2 * (kernels[level] - 1)
        if n < 1:
            return None
        decoder_sizes.append(n)
    return encoder_sizes, decoder_sizes


def stage_size_error(
    n: int, axis: int, strides: Sequence[int], kernels: Sequence[int], padding: str, downsample: str
) -> str:
    """The one-line message for an input size ``n`` on spatial ``axis`` that
    :func:`trace_stage_sizes` rejects, with admissible sizes either side of it."""
    stride_text = f"strides ({','.join(map(str, strides))})"
    where = f"input size {n} on axis {axis + 2}"
    if padding == "same":
        multiple = math.prod(strides)
        below = (n // multiple) * multiple
        nearby = [m for m in (below, below + multiple) if m > 0]
        examples = " or ".join(map(str, nearby))
        return f"{where} does not fit {stride_text}: use a multiple of {multiple}, e.g. {examples}"
    period = math.prod(strides)

    def fits(m: int) -> bool:
        return trace_stage_sizes(m, strides, kernels, padding, downsample) is not None

    below_fit = next((m for m in range(n - 1, 0, -1) if fits(m)), None)
    search_end = n + 2 * period + 2 * sum(kernels) * period + 1
    above_fit = next((m for m in range(n + 1, search_end) if fits(m)), None)
    nearby = [m for m in (below_fit, above_fit) if m is not None]
    return (
        f"{where} does not fit {stride_text} with valid padding and kernel sizes "
        f"({','.join(map(str, kernels))}) ({downsample}): use e.g. {' or '.join(map(str, nearby))}"
    )
