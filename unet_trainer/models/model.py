"""The nnU-Net-style U-Net family, 2D or 3D, built from plain typed arguments.

One class, :class:`UNet`, covers the presets this project trains or compares against:

* the DLE / nnU-Net BraTS 3D net (instance norm, leaky ReLU, strided convs, transposed-conv
  upsampling; parameter-for-parameter the same as MONAI's ``DynUNet`` with the same settings),
* Composer's residual 2D BraTS net (batch norm, residual encoder),
* the 2015 Ronneberger original (max-pool, no norm, ReLU, unpadded "valid" convs with
  copy-and-crop skips: a 572x572 tile gives a 388x388 map),
* a small bilinear U-Net with gradient checkpointing.

Layout of the network (``L = len(filters)`` stages)::

    encoder stage i (i = 0 .. L-1):  [max-pool] conv(k_i, stride s_i)-norm-act, conv(k_i)-norm-act
                                     (stage L-1 is the bottleneck; with max-pool the pool carries
                                     the stride and both convs have stride 1)
    decoder stage for level i (i = L-2 .. 0):
                                     upsample x s_{i+1} to filters[i] channels, [crop skip],
                                     concat(upsampled, skip_i), conv(k_i)-norm-act, conv(k_i)-norm-act
    output head:                     1x1 conv with bias to num_classes

The decoder at level ``i`` uses the kernel of encoder level ``i`` (the level whose resolution it
works at), as nnU-Net does. MONAI's DynUNet uses the kernel of level ``i+1`` instead; the two only
differ for anisotropic kernel lists and have identical parameter counts for isotropic ones.

Weight initialisation: every (transposed) convolution weight is drawn with
``kaiming_normal_(a=negative_slope)`` (fan-in mode; ``a=0`` for ReLU), as nnU-Net does for its
leaky-ReLU networks, and every bias is zero. Norm layers start as the identity (weight 1, bias 0).

Convolutions that feed a normalisation have no bias: the norm subtracts the per-channel mean, so a
bias would be cancelled and only cost a kernel launch and a parameter. With ``norm="none"`` every
conv has a bias (the 2015 design).

Also here, shared with nnU-Net's residual-encoder net (:mod:`unet_trainer.models.resenc`): the layers
and blocks, :class:`SegmentationModel` (what the rest of the code asks of any model),
:class:`EncoderDecoderNet` (the forward pass, deep supervision and size arithmetic both nets
share), the argument checks (:func:`check_unet_arguments` and its parts, raising
:class:`ModelArgumentError`) and the size tracing (:func:`trace_stage_sizes`). The UNet's keyword
arguments are its settings: the config's ``model: {unet: {...}}`` schema is derived from them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.schema import NonNegative, PositiveInt, Probability, Setting

__all__ = [
    "EncoderDecoderNet",
    "ModelArgumentError",
    "SegmentationModel",
    "UNet",
    "check_unet_arguments",
    "optimize_model",
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

SpatialDims = Annotated[int, Setting(minimum=2, maximum=3)]
# One entry per stage: an int (isotropic) or one int per spatial axis; a config gives ints.
PerStage = Annotated[Sequence[int | Sequence[int]], Setting(kind="int_list")]

_NORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Normalisation layers
# ----------------------------------------------------------------------------------------------
def _group_norm_in_activation_dtype(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Group norm that returns ``x.dtype`` even under autocast.

    Autocast lists ``group_norm`` as an fp32 op: with bf16 activations it would first write an
    fp32 copy of the input, return an fp32 output (twice the bytes of the bf16 tensor), and the
    next convolution would cast it back to bf16. The native kernel accumulates its statistics in
    fp32 for bf16/fp16 input anyway, so running it in the activation dtype only loses the final
    rounding, which the next bf16 convolution would do regardless. The affine parameters are cast
    to the activation dtype because the kernel wants one dtype (they stay fp32 in the module and
    receive fp32 gradients through the cast).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)


class InstanceNorm(nn.Module):
    """Instance normalisation with a learnt per-channel affine (weight 1, bias 0 at start).

    Shapes: ``(B, C, *S) -> (B, C, *S)``, same dtype as the input (and memory format, but see below).

    Why not ``nn.InstanceNormNd``: for an input in the default (contiguous) layout this calls the
    same ``F.instance_norm`` kernel, which autocast leaves in the activation dtype (bf16 stays bf16;
    statistics are accumulated in fp32 inside the kernel), unlike ``group_norm`` which autocast
    promotes to fp32. For a channels-last input, however, ``F.instance_norm`` folds the batch into
    the channels with ``.contiguous()`` and returns a contiguous tensor, so a channels-last model
    would pay a layout conversion before and after every norm. Instance norm is group norm with one
    group per channel, and on the CPU ``group_norm`` keeps the channels-last layout, so that path
    is used for channels-last inputs (in the activation dtype, see
    :func:`_group_norm_in_activation_dtype`). On CUDA, ATen's ``group_norm`` (torch 2.11-2.13) also
    makes its input contiguous and returns a contiguous tensor, so eager channels-last pays the
    conversions there either way; under ``torch.compile`` the generated norm kernels take any
    layout. Whether channels-last pays on a GPU is for ``scripts/bench_ablation.py`` to say.
    """

    def __init__(self, num_channels: int, eps: float = _NORM_EPS) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous():
            return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)
        return _group_norm_in_activation_dtype(x, self.num_channels, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine=True"


class GroupNorm(nn.Module):
    """Group normalisation that keeps the activation dtype under autocast (see
    :func:`_group_norm_in_activation_dtype` for why). Shapes: ``(B, C, *S) -> (B, C, *S)``.

    Raises:
        ValueError: if ``num_channels`` is not divisible by ``num_groups``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = _NORM_EPS) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"group norm: {num_channels} channels cannot be split into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _group_norm_in_activation_dtype(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine=True"


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class _LayerFactory:
    """Makes the conv / norm / activation / dropout layers of one network consistently."""

    def __init__(
        self,
        *,
        spatial_dims: int,
        norm: str,
        norm_groups: int,
        activation: str,
        negative_slope: float,
        dropout: float,
        padding: str,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.norm = norm
        self.norm_groups = norm_groups
        self.activation = activation
        self.negative_slope = negative_slope
        self.dropout = dropout
        self.padding = padding
        self.conv_type: type[nn.Module] = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.transposed_conv_type: type[nn.Module] = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.max_pool_type: type[nn.Module] = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d

    @property
    def conv_bias(self) -> bool:
        # A bias in front of a normalisation is removed again by its mean subtraction.
        return self.norm == "none"

    def conv(self, in_channels: int, out_channels: int, kernel: tuple[int, ...], stride: tuple[int, ...]) -> nn.Module:
        if self.padding == "same":
            pad = tuple((k - 1) // 2 for k in kernel)
        else:
            pad = (0,) * len(kernel)
        return self.conv_type(in_channels, out_channels, kernel, stride=stride, padding=pad, bias=self.conv_bias)

    def norm_layer(self, channels: int) -> nn.Module | None:
        if self.norm == "instance":
            return InstanceNorm(channels)
        if self.norm == "batch":
            return (nn.BatchNorm2d if self.spatial_dims == 2 else nn.BatchNorm3d)(channels, eps=_NORM_EPS)
        if self.norm == "group":
            return GroupNorm(self.norm_groups, channels)
        return None

    def activation_layer(self) -> nn.Module:
        # In place: the tensor it overwrites is a norm's or conv's output, which neither needs for
        # its backward (both keep their input), and (leaky) ReLU's backward can use its own output.
        # That saves one activation-sized tensor per conv compared with an out-of-place activation.
        if self.activation == "relu":
            return nn.ReLU(inplace=True)
        return nn.LeakyReLU(self.negative_slope, inplace=True)

    def dropout_layer(self) -> nn.Module | None:
        # Out of place on purpose: the activation's backward reads the tensor dropout would overwrite.
        return nn.Dropout(self.dropout) if self.dropout > 0 else None


class ConvNormAct(nn.Sequential):
    """conv -> [norm] -> activation -> [dropout]. Shapes: ``(B, C_in, *S) -> (B, C_out, *S')``
    where ``S'`` is ``S / stride`` ("same" padding) or the unpadded conv size ("valid")."""

    def __init__(
        self,
        layers: _LayerFactory,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        modules: list[nn.Module] = [layers.conv(in_channels, out_channels, kernel, stride)]
        norm = layers.norm_layer(out_channels)
        if norm is not None:
            modules.append(norm)
        modules.append(layers.activation_layer())
        dropout = layers.dropout_layer()
        if dropout is not None:
            modules.append(dropout)
        super().__init__(*modules)


class ConvBlock(nn.Sequential):
    """[max-pool] -> conv-norm-act (carries the stride) -> ``num_convs - 1`` more conv-norm-act.

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S')``; with "same" padding ``S' = S / stride``.
    """

    def __init__(
        self,
        layers: _LayerFactory,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        downsample: str,
        num_convs: int = 2,
    ) -> None:
        modules: list[nn.Module] = []
        conv_stride = stride
        if downsample == "max_pool" and any(s > 1 for s in stride):
            modules.append(layers.max_pool_type(kernel_size=stride, stride=stride))
            conv_stride = (1,) * len(stride)
        modules.append(ConvNormAct(layers, in_channels, out_channels, kernel, conv_stride))
        for _ in range(num_convs - 1):
            modules.append(ConvNormAct(layers, out_channels, out_channels, kernel, (1,) * len(kernel)))
        super().__init__(*modules)


class ResidualBlock(nn.Module):
    """[max-pool] -> conv-norm-act -> conv-norm, plus the input (through a strided 1x1 conv + norm
    when the stride is > 1 or the channel count changes), then the activation.

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S / stride)`` ("same" padding only).
    """

    def __init__(
        self,
        layers: _LayerFactory,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
        downsample: str,
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel)
        conv_stride = stride
        self.pool: nn.Module | None = None
        if downsample == "max_pool" and any(s > 1 for s in stride):
            self.pool = layers.max_pool_type(kernel_size=stride, stride=stride)
            conv_stride = ones
        self.conv1 = ConvNormAct(layers, in_channels, out_channels, kernel, conv_stride)
        self.conv2 = layers.conv(out_channels, out_channels, kernel, ones)
        self.norm2 = layers.norm_layer(out_channels)
        self.projection: nn.Sequential | None = None
        if in_channels != out_channels or any(s > 1 for s in conv_stride):
            projection: list[nn.Module] = [layers.conv(in_channels, out_channels, ones, conv_stride)]
            norm = layers.norm_layer(out_channels)
            if norm is not None:
                projection.append(norm)
            self.projection = nn.Sequential(*projection)
        self.activation = layers.activation_layer()
        self.dropout = layers.dropout_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        out = self.conv2(self.conv1(x))
        if self.norm2 is not None:
            out = self.norm2(out)
        residual = x if self.projection is None else self.projection(x)
        # In place: ``out`` is a fresh norm/conv output that no backward needs.
        out += residual
        out = self.activation(out)
        if self.dropout is not None:
            out = self.dropout(out)
        return out


class LinearUpsample(nn.Module):
    """1x1 conv to ``out_channels``, then (bi/tri)linear interpolation by ``scale``.

    The brief's order is "interpolate, then a conv to halve the channels"; a 1x1 conv is a
    per-voxel linear map over channels and linear interpolation a per-channel linear map over
    space, so the two commute exactly, and doing the conv first runs it on ``prod(scale)`` times
    fewer voxels and interpolates half the channels.

    Shapes: ``(B, C_in, *S) -> (B, C_out, *(S * scale))``.
    """

    def __init__(self, layers: _LayerFactory, in_channels: int, out_channels: int, scale: tuple[int, ...]) -> None:
        super().__init__()
        ones = (1,) * len(scale)
        self.conv = layers.conv_type(in_channels, out_channels, ones, bias=layers.conv_bias)
        self.scale = scale
        self.mode = "bilinear" if layers.spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        size = tuple(n * s for n, s in zip(x.shape[2:], self.scale))
        # Autocast runs upsample_(bi|tri)linear in fp32; the result would then make torch.cat with
        # the bf16 skip promote the whole concatenation to fp32. The kernel accumulates in fp32
        # for bf16 input anyway, so stay in the activation dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.interpolate(x, size=size, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode}"


class DecoderStage(nn.Module):
    """Upsample the deeper features, [centre-crop the skip], concatenate, ``num_convs``
    conv-norm-act (two in the U-Net, one in nnU-Net's residual-encoder net).

    Shapes: ``x (B, C_deep, *S_deep)``, ``skip (B, C_out, *S_skip) -> (B, C_out, *S_out)`` with
    ``S_out = S_skip`` for "same" padding.
    """

    def __init__(
        self,
        layers: _LayerFactory,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        upsample_stride: tuple[int, ...],
        upsample: str,
        num_convs: int = 2,
    ) -> None:
        super().__init__()
        if upsample == "transposed":
            # kernel = stride: every output voxel comes from exactly one input voxel, no overlap,
            # no padding arithmetic; no bias when a norm follows (as in DynUNet).
            self.upsample: nn.Module = layers.transposed_conv_type(
                in_channels, out_channels, upsample_stride, stride=upsample_stride, bias=layers.conv_bias
            )
        else:
            self.upsample = LinearUpsample(layers, in_channels, out_channels, upsample_stride)
        self.crop_skip = layers.padding == "valid"
        self.block = ConvBlock(
            layers, 2 * out_channels, out_channels, kernel, (1,) * len(kernel), "strided_conv", num_convs
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(x)
        if self.crop_skip:
            skip = _centre_crop(skip, up.shape[2:])
        return self.block(torch.cat((up, skip), dim=1))


def _centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre crop of the spatial axes of ``x (B, C, *S)`` to ``size``; a view, no copy."""
    slices: list[slice] = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


# ----------------------------------------------------------------------------------------------
# Checking the arguments, tracing sizes
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# What every model offers
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class SegmentationModel(Protocol):
    """What the loss builder, the config checks, the speed helpers and inference ask of a model
    (every entry of :data:`unet_trainer.config.components.MODELS` implements it).

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image.
        num_classes: channels of the logits.
        deep_supervision_heads: extra lower-resolution outputs in training mode (0 for none).
        input_memory_format: the memory format ``forward`` puts its input in.
    """

    spatial_dims: int
    in_channels: int
    num_classes: int
    deep_supervision_heads: int
    input_memory_format: torch.memory_format

    def deep_supervision_weights(self) -> list[float]:
        """Loss weights of the training-mode outputs, full resolution first (sum 1)."""
        ...

    def total_stride(self) -> tuple[int, ...]:
        """The product of the strides, per spatial axis."""
        ...

    def check_input_size(self, input_size: Sequence[int]) -> None:
        """Raise ValueError (one line) if a spatial input size does not pass through the network."""
        ...

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """The spatial size of the logits for a spatial input size."""
        ...


class EncoderDecoderNet(nn.Module):
    """What :class:`UNet` and the residual-encoder U-Net share: the forward pass (encoder stages
    with skips, decoder stages from the deepest up, a 1x1 head and the deep-supervision heads),
    gradient checkpointing, the weight initialisation and the size arithmetic.

    A subclass calls ``super().__init__(...)`` with its checked geometry, then sets ``encoder``
    (one module per stage, shallowest first), ``decoder`` (deepest first: ``decoder[j]`` produces
    encoder level ``num_stages - 2 - j`` from the deeper features and that level's skip),
    ``output_head`` and ``deep_supervision_outputs`` (``[k - 1]`` reads decoder level ``k``), and
    calls :meth:`_initialise_weights`.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        layout: StageLayout,
        padding: str,
        downsample: str,
        deep_supervision: bool,
        deep_supervision_heads: int,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.filters = layout.filters
        self.kernel_sizes = layout.kernel_sizes
        self.strides = layout.strides
        self.padding = padding
        self.downsample = downsample
        self.deep_supervision = deep_supervision
        self.deep_supervision_heads = deep_supervision_heads if deep_supervision else 0
        self.gradient_checkpointing = gradient_checkpointing
        self.input_memory_format: torch.memory_format = torch.contiguous_format

    # -- construction helpers ------------------------------------------------------------------
    def _initialise_weights(self, slope: float) -> None:
        """Kaiming-normal (``a=slope``) conv weights and zero biases, as nnU-Net initialises.

        Nothing to draw on the meta device (a model built only to be asked its geometry), where
        torch's random fill would also import its compiler stack (seconds)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                if module.weight.is_meta:
                    continue
                nn.init.kaiming_normal_(module.weight, a=slope)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- public API ----------------------------------------------------------------------------
    def use_checkpointing(self, enabled: bool = True) -> EncoderDecoderNet:
        """Turn gradient checkpointing of every encoder block and decoder stage on or off.

        With it on, a block's inner activations are not kept for the backward; the block is run
        again (``torch.utils.checkpoint``, ``use_reentrant=False``, RNG state restored so dropout
        draws the same mask) when its gradient is needed: less memory, about one more forward.
        Gradients are unchanged. Caveat: with ``norm="batch"`` the recomputation updates the
        running statistics a second time. Returns ``self``.
        """
        self.gradient_checkpointing = bool(enabled)
        return self

    def deep_supervision_weights(self) -> list[float]:
        """Loss weights for the outputs of :meth:`forward` in training mode, full resolution first:
        1, 1/2, 1/4, ... normalised to sum 1 (``[1.0]`` without deep supervision)."""
        raw = [0.5**i for i in range(1 + self.deep_supervision_heads)]
        total = sum(raw)
        return [w / total for w in raw]

    def total_stride(self) -> tuple[int, ...]:
        """The product of the strides per spatial axis: with "same" padding every input size must
        be a multiple of it."""
        return tuple(math.prod(s[axis] for s in self.strides) for axis in range(self.spatial_dims))

    def check_input_size(self, input_size: Sequence[int]) -> None:
        """Check that a spatial size ``S`` (``len(S) == spatial_dims``) passes through the network.

        Raises:
            ValueError: one line naming the first axis that does not fit (as the tensor axis,
                i.e. counting batch and channel) and admissible sizes either side of it.
        """
        size = tuple(int(n) for n in input_size)
        if len(size) != self.spatial_dims:
            raise ValueError(
                f"input size {list(size)} has {len(size)} spatial axes; "
                f"this {self.spatial_dims}D net needs {self.spatial_dims}"
            )
        for axis, n in enumerate(size):
            if self._trace_axis(n, axis) is None:
                raise ValueError(self._size_error(n, axis))

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the logits for spatial input size ``input_size``.

        Equal to the input for "same" padding (and ``strides[0] == 1``); smaller for "valid"
        padding (572 -> 388 for the 2015 net).

        Raises:
            ValueError: as :meth:`check_input_size`.
        """
        self.check_input_size(input_size)
        return tuple(self._trace_axis(int(n), axis)[1][-1] for axis, n in enumerate(input_size))  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: ``(B, in_channels, *S)``, float; ``S`` must pass :meth:`check_input_size`.

        Returns:
            Logits ``(B, num_classes, *output_size(S))``. With deep supervision in training mode,
            a list of ``1 + deep_supervision_heads`` logit tensors, full resolution first, each at
            its own decoder level's size (for "same" padding ``S / prod(strides[1..k])`` for the
            k-th extra output); in eval mode always the single full-resolution tensor.

        Raises:
            ValueError: wrong rank, channel count or a spatial size that does not fit the strides.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        self.check_input_size(x.shape[2:])
        if self.input_memory_format != torch.contiguous_format:
            # A no-op when the caller already converted the batch.
            x = x.contiguous(memory_format=self.input_memory_format)

        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is the decoder's input, not a skip

        with_deep_supervision = self.deep_supervision and self.training
        decoder_outputs: list[torch.Tensor] = []
        for stage in self.decoder:
            skip = skips.pop()
            x = checkpoint(stage, x, skip, use_reentrant=False) if checkpointed else stage(x, skip)
            if with_deep_supervision:
                decoder_outputs.append(x)
        logits = self.output_head(x)
        if not with_deep_supervision:
            return logits
        outputs = [logits]
        for level, head in enumerate(self.deep_supervision_outputs, start=1):
            outputs.append(head(decoder_outputs[-1 - level]))
        return outputs

    # -- size arithmetic -----------------------------------------------------------------------
    def _trace_axis(self, n: int, axis: int) -> tuple[list[int], list[int]] | None:
        return trace_stage_sizes(
            n, [s[axis] for s in self.strides], [k[axis] for k in self.kernel_sizes], self.padding, self.downsample
        )

    def _size_error(self, n: int, axis: int) -> str:
        return stage_size_error(
            n,
            axis,
            [s[axis] for s in self.strides],
            [k[axis] for k in self.kernel_sizes],
            self.padding,
            self.downsample,
        )


# ----------------------------------------------------------------------------------------------
# The U-Net
# ----------------------------------------------------------------------------------------------
class UNet(EncoderDecoderNet):
    """nnU-Net-style U-Net for 2D or 3D segmentation.

    Its keyword arguments are its settings: the config's ``model: {unet: {...}}`` section is
    derived from this signature (types, choices, bounds and defaults; see
    :func:`unet_trainer.core.schema.fields_of`), and the defaults are DLE's BraTS 3D net.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image (4 for BraTS: T1, T1ce, T2, FLAIR).
        num_classes: channels of the logits.
        filters: output channels of each encoder stage, shallowest first; ``len(filters)`` stages.
        kernel_sizes: conv kernel per stage; an int, or one int per spatial axis (anisotropic).
        strides: downsampling factor per stage (``strides[0]`` is the input stage, usually 1);
            an int or one int per axis.
        norm: ``"instance"`` (affine), ``"batch"``, ``"group"`` (``norm_groups`` groups) or ``"none"``.
        norm_groups: groups for ``norm="group"``; every filter count must be divisible by it.
        activation: ``"leaky_relu"`` (slope ``negative_slope``) or ``"relu"``.
        negative_slope: leaky ReLU slope; also the ``a`` of the kaiming init.
        upsample: ``"transposed"`` (kernel = stride, no bias when normed) or ``"linear"``
            (bilinear/trilinear interpolation with a 1x1 conv that halves the channels).
        downsample: ``"strided_conv"`` (the first conv of a stage carries the stride) or
            ``"max_pool"`` (pool by the stride, then stride-1 convs, as in 2015).
        residual: residual encoder blocks (input, down and bottleneck stages) with a strided 1x1
            projection when the stride is > 1 or the channels change; the decoder stays plain, as in
            DynUNet's ``res_block`` and the DLE/Composer nets.
        deep_supervision: in training mode also return logits from lower decoder levels.
        deep_supervision_heads: how many decoder levels below full resolution get a head
            (1 .. ``len(filters) - 2``).
        dropout: element-wise dropout probability after every activation (0 disables it).
        padding: ``"same"`` (size-preserving convs) or ``"valid"`` (unpadded convs, centre-cropped
            skips, as in 2015; not with ``residual``).
        gradient_checkpointing: recompute each encoder block and decoder stage in the backward
            instead of storing its activations (see :meth:`use_checkpointing`).

    Raises:
        ModelArgumentError (a ValueError): for any inconsistent or unknown argument, with the
            argument named (:func:`check_unet_arguments`).

    Shapes: ``forward`` takes ``(B, in_channels, *S)`` with ``len(S) == spatial_dims`` and returns
    ``(B, num_classes, *output_size(S))``.

    Attributes:
        input_memory_format: memory format ``forward`` puts its input in
            (``torch.contiguous_format`` leaves it alone); :func:`optimize_model` sets it.
    """

    def __init__(
        self,
        *,
        spatial_dims: SpatialDims = 3,
        in_channels: PositiveInt = 4,
        num_classes: PositiveInt = 4,
        filters: Sequence[int] = (32, 64, 128, 256, 320, 320),
        kernel_sizes: PerStage = (3, 3, 3, 3, 3, 3),
        strides: PerStage = (1, 2, 2, 2, 2, 2),
        norm: Norm = "instance",
        norm_groups: PositiveInt = 8,
        activation: Activation = "leaky_relu",
        negative_slope: NonNegative = 0.01,
        upsample: UpsampleMode = "transposed",
        downsample: DownsampleMode = "strided_conv",
        residual: bool = False,
        deep_supervision: bool = False,
        deep_supervision_heads: PositiveInt = 2,
        dropout: Probability = 0.0,
        padding: PaddingMode = "same",
        gradient_checkpointing: bool = False,
    ) -> None:
        layout = check_unet_arguments(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            filters=filters,
            kernel_sizes=kernel_sizes,
            strides=strides,
            norm=norm,
            norm_groups=norm_groups,
            activation=activation,
            negative_slope=negative_slope,
            upsample=upsample,
            downsample=downsample,
            residual=residual,
            deep_supervision=deep_supervision,
            deep_supervision_heads=deep_supervision_heads,
            dropout=dropout,
            padding=padding,
        )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            layout=layout,
            padding=padding,
            downsample=downsample,
            deep_supervision=deep_supervision,
            deep_supervision_heads=deep_supervision_heads,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.norm = norm
        self.activation = activation
        self.negative_slope = negative_slope
        self.upsample = upsample
        self.residual = residual

        filters, kernels, stride_list = layout.filters, layout.kernel_sizes, layout.strides
        layers = _LayerFactory(
            spatial_dims=spatial_dims,
            norm=norm,
            norm_groups=norm_groups,
            activation=activation,
            negative_slope=negative_slope,
            dropout=dropout,
            padding=padding,
        )
        encoder_block = ResidualBlock if residual else ConvBlock
        self.encoder = nn.ModuleList(
            encoder_block(layers, in_ch, out_ch, kernel, stride, downsample)
            for in_ch, out_ch, kernel, stride in zip((in_channels,) + filters[:-1], filters, kernels, stride_list)
        )
        # Deepest first: decoder[j] produces encoder level num_stages - 2 - j.
        self.decoder = nn.ModuleList(
            DecoderStage(layers, filters[level + 1], filters[level], kernels[level], stride_list[level + 1], upsample)
            for level in reversed(range(len(filters) - 1))
        )
        self.output_head = layers.conv_type(filters[0], num_classes, (1,) * spatial_dims, bias=True)
        # deep_supervision_outputs[k - 1] reads decoder level k (k = 1 is one level below full res).
        self.deep_supervision_outputs = nn.ModuleList(
            layers.conv_type(filters[level], num_classes, (1,) * spatial_dims, bias=True)
            for level in range(1, self.deep_supervision_heads + 1)
        )
        self._initialise_weights(negative_slope if activation == "leaky_relu" else 0.0)


# ----------------------------------------------------------------------------------------------
# Training-speed helpers
# ----------------------------------------------------------------------------------------------
def _spatial_dims_of(model: nn.Module) -> int:
    if isinstance(model, SegmentationModel):
        return model.spatial_dims
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2
    raise ValueError("optimize_model(channels_last=True) found no 2D or 3D convolution in the model")


def optimize_model(model: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Prepare a model for fast training and return the module to train.

    Args:
        model: one of our models (a :class:`SegmentationModel`) or any conv net.
        channels_last: convert the conv weights to ``torch.channels_last`` (2D) or
            ``torch.channels_last_3d`` (3D), the layout tensor-core convolutions run natively.
            One of our models then also converts its input in ``forward`` (one copy of the small
            ``in_channels``-channel batch, a no-op if it is already channels-last). For other
            models the caller must convert the input with ``x.contiguous(memory_format=...)``.
        compile: wrap the model in ``torch.compile`` (done last, so it sees the new layout). The
            returned object shares parameters with ``model``; save ``model.state_dict()``.

    Returns:
        The (converted, possibly compiled) model. The conversion happens in place on ``model``.

    Raises:
        ValueError: ``channels_last`` for a model without 2D/3D convolutions.
    """
    if channels_last:
        memory_format = torch.channels_last if _spatial_dims_of(model) == 2 else torch.channels_last_3d
        model = model.to(memory_format=memory_format)
        # Pointwise kernels (every spatial size 1) hold the same bytes in both layouts, but the
        # conversion gives their size-1 axes unusual strides that their gradients do not share;
        # DDP compares strides exactly and would copy those gradients in and out of its buckets.
        for param in model.parameters():
            if param.ndim >= 4 and all(size == 1 for size in param.shape[2:]):
                param.data = torch.empty_like(param.data, memory_format=torch.contiguous_format).copy_(param.data)
        if isinstance(model, SegmentationModel):
            model.input_memory_format = memory_format
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model
