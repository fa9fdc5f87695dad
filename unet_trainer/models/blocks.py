"""The layers and blocks the networks are built from, 2D or 3D.

:class:`InstanceNorm` and :class:`GroupNorm` (normalisations that keep the activation dtype under
autocast), :class:`_LayerFactory` (one network's conv / norm / activation / dropout layers, made
consistently), and the blocks: :class:`ConvNormAct`, :class:`ConvBlock`, :class:`ResidualBlock`,
:class:`LinearUpsample` and :class:`DecoderStage`.

Convolutions that feed a normalisation have no bias: the norm subtracts the per-channel mean, so a
bias would be cancelled and only cost a kernel launch and a parameter. With ``norm="none"`` every
conv has a bias (the 2015 design).

Imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBlock",
    "ConvNormAct",
    "DecoderStage",
    "GroupNorm",
    "InstanceNorm",
    "LinearUpsample",
    "ResidualBlock",
]

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
    def init_slope(self) -> float:
        """The ``a`` of the kaiming initialisation: the leaky ReLU's slope, 0 for ReLU."""
        return self.negative_slope if self.activation == "leaky_relu" else 0.0

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

    The usual order is "interpolate, then a conv to halve the channels"; a 1x1 conv is a
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
