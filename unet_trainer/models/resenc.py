"""nnU-Net's residual-encoder U-Net (ResEnc, the default network of nnU-Net v2's presets), 2D or 3D.

The same network as ``ResidualEncoderUNet`` of MIC-DKFZ's dynamic-network-architectures (DNA),
built from this project's layers (``L = len(filters)`` stages)::

    stem:                        conv(k_0)-norm-act to filters[0] (stride 1)
    encoder stage i (0 .. L-1):  blocks_per_stage[i] residual blocks; the first carries the stride
                                 s_i and the change of channels, the others keep both
    residual block (BasicBlockD):
                                 conv(k_i, stride)-norm-act, conv(k_i)-norm, + shortcut, act;
                                 shortcut = [avg-pool by the stride] [1x1 conv-norm if the channels
                                 change] (ResNet-D: pool, then project; no strided 1x1 conv)
    decoder stage for level i (i = L-2 .. 0):
                                 transposed conv x s_{i+1} to filters[i], concat(up, skip_i),
                                 decoder_convs x conv(k_i)-norm-act
    heads:                       1x1 conv with bias at full resolution; with deep supervision one
                                 more per decoder level below it (L - 1 heads in all, as DNA builds)

ResEnc M, nnU-Net's preset for BraTS-sized 3D input and the defaults here: 6 stages, filters
(32, 64, 128, 256, 320, 320), blocks (1, 3, 4, 6, 6, 6), one conv per decoder stage, 3x3x3
kernels, strides (1, 2, 2, 2, 2, 2), instance norm with affine (eps 1e-5), leaky ReLU 0.01 and
deep supervision: 102,340,116 parameters for 4 input channels and 4 classes, exactly DNA's with
``conv_bias=False`` (a test pins both). nnU-Net's plans set ``conv_bias=True``, which adds a bias
to every conv in front of a norm (13,856 for ResEnc M, 800 of them on the transposed convs): the
norm's mean subtraction cancels it (for the transposed convs, which reach a norm through a padded
conv, except at the border), so here, as in :class:`unet_trainer.models.unet.UNet`, those convs have none.

Initialisation, as nnU-Net's: kaiming-normal conv weights (``a = negative_slope``), zero biases,
and the last norm of every residual block starts at zero (weight and bias), so each block starts
as its shortcut followed by the activation.

Deep supervision, as nnU-Net v2 trains it: in training mode the logits of every decoder level
(full resolution first) with loss weights 1, 1/2, 1/4, ... normalised to sum 1, the lowest level
weighted 0 (its head is still built and evaluated, so every parameter takes part in the graph and
DDP needs no unused-parameter search; nnU-Net uses 1e-6 under DDP for the same reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import nn

from ..core.schema import NonNegative, PositiveInt, Setting
from .base import EncoderDecoderNet, PerStage, SpatialDims
from .blocks import ConvNormAct, _LayerFactory
from .checks import (
    Activation,
    ModelArgumentError,
    Norm,
    StageLayout,
    check_layer_arguments,
    check_stage_layout,
)

__all__ = ["ResidualBlockD", "ResidualEncoderUNet", "check_resenc_arguments"]


class ResidualBlockD(nn.Module):
    """nnU-Net's BasicBlockD: conv(k, stride)-norm-act -> conv(k)-norm, plus the shortcut, then the
    activation. The shortcut average-pools by the stride when it is > 1 and projects with a 1x1
    conv + norm when the channel count changes (ResNet-D).

    Shapes: ``(B, C_in, *S) -> (B, C_out, *S / stride)`` ("same" padding).
    """

    def __init__(
        self,
        layers: _LayerFactory,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        ones = (1,) * len(kernel)
        self.conv1 = ConvNormAct(layers, in_channels, out_channels, kernel, stride)
        self.conv2 = layers.conv(out_channels, out_channels, kernel, ones)
        self.norm2 = layers.norm_layer(out_channels)
        shortcut: list[nn.Module] = []
        if any(s > 1 for s in stride):
            pool = nn.AvgPool2d if layers.spatial_dims == 2 else nn.AvgPool3d
            shortcut.append(pool(kernel_size=stride, stride=stride))
        if in_channels != out_channels:
            shortcut.append(layers.conv(in_channels, out_channels, ones, ones))
            norm = layers.norm_layer(out_channels)
            if norm is not None:
                shortcut.append(norm)
        self.shortcut: nn.Sequential | None = nn.Sequential(*shortcut) if shortcut else None
        self.activation = layers.activation_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.norm2 is not None:
            out = self.norm2(out)
        # In place: ``out`` is a fresh norm/conv output that no backward needs.
        out += x if self.shortcut is None else self.shortcut(x)
        return self.activation(out)


def check_resenc_arguments(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    filters: Sequence[int],
    kernel_sizes: Sequence[int | Sequence[int]],
    strides: Sequence[int | Sequence[int]],
    blocks_per_stage: Sequence[int],
    decoder_convs: int,
    norm: str,
    norm_groups: int,
    activation: str,
    negative_slope: float,
    deep_supervision: bool,
) -> StageLayout:
    """Check :class:`ResidualEncoderUNet`'s arguments; returns its stage layout.

    Raises:
        ModelArgumentError: the first inconsistent or unknown argument, named.
    """
    layout = check_stage_layout(spatial_dims, in_channels, num_classes, filters, kernel_sizes, strides)
    check_layer_arguments(layout.filters, norm, norm_groups, activation, negative_slope, 0.0)
    num_stages = len(layout.filters)
    if len(blocks_per_stage) != num_stages or any(n < 1 for n in blocks_per_stage):
        raise ModelArgumentError(
            "blocks_per_stage",
            f"blocks_per_stage must give at least 1 block for each of the {num_stages} stages, got {list(blocks_per_stage)}",
        )
    if decoder_convs < 1:
        raise ModelArgumentError("decoder_convs", f"decoder_convs must be >= 1, got {decoder_convs}")
    if any(k % 2 == 0 for kernel in layout.kernel_sizes for k in kernel):
        raise ModelArgumentError(
            "kernel_sizes", f"kernel_sizes: size-preserving convs need odd kernel sizes, got {list(kernel_sizes)}"
        )
    if deep_supervision and num_stages < 3:
        raise ModelArgumentError(
            "deep_supervision",
            f"deep_supervision needs at least 3 stages (a decoder level below full resolution), got {num_stages}",
        )
    return layout


class ResidualEncoderUNet(EncoderDecoderNet):
    """nnU-Net's residual-encoder U-Net; the defaults are ResEnc M (see the module docstring).

    Its keyword arguments are its settings: the config's ``model: {resenc_unet: {...}}`` section is
    derived from this signature.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image (4 for BraTS).
        num_classes: channels of the logits.
        filters: output channels of each stage, shallowest first; ``len(filters)`` stages.
        kernel_sizes: conv kernel per stage (odd); an int or one int per spatial axis.
        strides: downsampling factor per stage (``strides[0]`` is the input stage, usually 1).
        blocks_per_stage: residual blocks per encoder stage.
        decoder_convs: conv-norm-act layers per decoder stage.
        norm: ``"instance"`` (affine), ``"batch"``, ``"group"`` (``norm_groups`` groups) or ``"none"``.
        norm_groups: groups for ``norm="group"``.
        activation: ``"leaky_relu"`` (slope ``negative_slope``) or ``"relu"``.
        negative_slope: leaky ReLU slope; also the ``a`` of the kaiming init.
        deep_supervision: in training mode also return the logits of every decoder level below
            full resolution (``len(filters) - 2`` more outputs).
        gradient_checkpointing: recompute each encoder stage and decoder stage in the backward.

    Raises:
        ModelArgumentError (a ValueError): any inconsistent or unknown argument, named.

    Shapes: ``forward`` takes ``(B, in_channels, *S)``, every entry of ``S`` a multiple of the
    total stride, and returns ``(B, num_classes, *S)`` (a list, full resolution first, with deep
    supervision in training mode).
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
        blocks_per_stage: Annotated[Sequence[int], Setting(minimum=1)] = (1, 3, 4, 6, 6, 6),
        decoder_convs: PositiveInt = 1,
        norm: Norm = "instance",
        norm_groups: PositiveInt = 8,
        activation: Activation = "leaky_relu",
        negative_slope: NonNegative = 0.01,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        layout = check_resenc_arguments(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            filters=filters,
            kernel_sizes=kernel_sizes,
            strides=strides,
            blocks_per_stage=blocks_per_stage,
            decoder_convs=decoder_convs,
            norm=norm,
            norm_groups=norm_groups,
            activation=activation,
            negative_slope=negative_slope,
            deep_supervision=deep_supervision,
        )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            layout=layout,
            padding="same",
            downsample="strided_conv",
            deep_supervision=deep_supervision,
            deep_supervision_heads=len(layout.filters) - 2,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.blocks_per_stage = tuple(int(n) for n in blocks_per_stage)
        self.norm = norm
        self.activation = activation
        self.negative_slope = negative_slope

        layers = _LayerFactory(
            spatial_dims=spatial_dims,
            norm=norm,
            norm_groups=norm_groups,
            activation=activation,
            negative_slope=negative_slope,
            dropout=0.0,
            padding="same",
        )
        self.encoder = self._build_encoder(layers)
        self._build_decoder(layers, upsample="transposed", convs_per_stage=decoder_convs)
        self._initialise_weights(layers.init_slope)
        self._zero_last_block_norms()

    def _build_encoder(self, layers: _LayerFactory) -> nn.ModuleList:
        """One ``nn.Sequential`` per stage, shallowest first: ``blocks_per_stage[i]`` residual blocks,
        the first carrying the stride and the change of channels; stage 0 starts with the stem (a
        stride-1 conv-norm-act from the image's channels to ``filters[0]``)."""
        ones = (1,) * self.spatial_dims
        stages: list[nn.Module] = []
        in_ch = self.filters[0]
        for level, (out_ch, kernel, stride, blocks) in enumerate(
            zip(self.filters, self.kernel_sizes, self.strides, self.blocks_per_stage)
        ):
            modules: list[nn.Module] = []
            if level == 0:
                modules.append(ConvNormAct(layers, self.in_channels, self.filters[0], kernel, ones))  # the stem
            modules.append(ResidualBlockD(layers, in_ch, out_ch, kernel, stride))
            modules.extend(ResidualBlockD(layers, out_ch, out_ch, kernel, ones) for _ in range(blocks - 1))
            stages.append(nn.Sequential(*modules))
            in_ch = out_ch
        return nn.ModuleList(stages)

    def _zero_last_block_norms(self) -> None:
        """Start every residual block as its shortcut followed by the activation, as nnU-Net does:
        the block's last norm at weight 0 and bias 0 (nothing to set on the meta device)."""
        for module in self.modules():
            if isinstance(module, ResidualBlockD) and module.norm2 is not None and not module.norm2.weight.is_meta:
                nn.init.zeros_(module.norm2.weight)
                nn.init.zeros_(module.norm2.bias)

    def deep_supervision_weights(self) -> list[float]:
        """nnU-Net v2's loss weights for the training-mode outputs, full resolution first: 1, 1/2,
        1/4, ... with the lowest decoder level's 0, normalised to sum 1 (``[1.0]`` without deep
        supervision)."""
        if not self.deep_supervision_heads:
            return [1.0]
        raw = [0.5**i for i in range(1 + self.deep_supervision_heads)]
        raw[-1] = 0.0
        total = sum(raw)
        return [w / total for w in raw]
