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

The UNet's keyword arguments are its settings: the config's ``model: {unet: {...}}`` schema is
derived from them. Its layers are in :mod:`unet_trainer.models.blocks`, its argument checks in
:mod:`unet_trainer.models.checks`, what it shares with the residual-encoder net in
:mod:`unet_trainer.models.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.schema import NonNegative, PositiveInt, Probability
from .base import EncoderDecoderNet, PerStage, SpatialDims
from .blocks import ConvBlock, ResidualBlock, _LayerFactory
from .checks import (
    Activation,
    DownsampleMode,
    Norm,
    PaddingMode,
    UpsampleMode,
    check_unet_arguments,
)

__all__ = ["UNet"]


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

        layers = _LayerFactory(
            spatial_dims=spatial_dims,
            norm=norm,
            norm_groups=norm_groups,
            activation=activation,
            negative_slope=negative_slope,
            dropout=dropout,
            padding=padding,
        )
        self.encoder = self._build_encoder(layers, ResidualBlock if residual else ConvBlock, downsample)
        self._build_decoder(layers, upsample=upsample, convs_per_stage=2)
        self._initialise_weights(layers.init_slope)

    def _build_encoder(
        self, layers: _LayerFactory, block: type[ConvBlock] | type[ResidualBlock], downsample: str
    ) -> nn.ModuleList:
        """One ``block`` per stage, shallowest first; each takes the previous stage's channels (the
        image's for the first) to its ``filters`` entry, with that stage's kernel and stride."""
        stage_inputs = (self.in_channels,) + self.filters[:-1]
        return nn.ModuleList(
            block(layers, in_ch, out_ch, kernel, stride, downsample)
            for in_ch, out_ch, kernel, stride in zip(stage_inputs, self.filters, self.kernel_sizes, self.strides)
        )
