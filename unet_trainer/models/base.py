"""What every model offers and what the encoder-decoder nets share.

:class:`SegmentationModel` (what the rest of the code asks of any model), :class:`EncoderDecoderNet`
(the forward pass, deep supervision, the decoder and heads builder, the weight initialisation and
the size arithmetic that :class:`~unet_trainer.models.unet.UNet` and
:class:`~unet_trainer.models.resenc.ResidualEncoderUNet` share) and :func:`optimize_model` (the
training-speed helper: channels-last, ``torch.compile``). Also the annotated types of the
geometry settings both nets take (:data:`SpatialDims`, :data:`PerStage`; the config schema reads
their bounds).

Imports :mod:`unet_trainer.models.blocks`, :mod:`unet_trainer.models.checks` and
:mod:`unet_trainer.core.schema` only, each of which imports nothing from the package, so the
models' import chains stay three modules long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.schema import Setting
from .blocks import DecoderStage, _LayerFactory
from .checks import StageLayout, stage_size_error, trace_stage_sizes

__all__ = ["EncoderDecoderNet", "PerStage", "SegmentationModel", "SpatialDims", "optimize_model"]

SpatialDims = Annotated[int, Setting(minimum=2, maximum=3)]
# One entry per stage: an int (isotropic) or one int per spatial axis; a config gives ints.
PerStage = Annotated[Sequence[int | Sequence[int]], Setting(kind="int_list")]


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
    (one module per stage, shallowest first), calls :meth:`_build_decoder` (the decoder stages and
    the heads, the same for every subclass) and then :meth:`_initialise_weights`. The order of
    these steps is the order of the parameters in the ``state_dict`` and of the random draws of
    the initialisation, which checkpoints and seeded runs depend on.
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
    def _build_decoder(self, layers: _LayerFactory, *, upsample: str, convs_per_stage: int) -> None:
        """Set the decoder side: ``decoder``, ``output_head`` and ``deep_supervision_outputs``.

        ``decoder`` is deepest first: ``decoder[j]`` produces encoder level ``num_stages - 2 - j``
        from the deeper features and that level's skip (a :class:`DecoderStage` with the kernel of
        that level, upsampling by the stride of the level below it). ``output_head`` is a 1x1 conv
        with bias to ``num_classes`` at full resolution; ``deep_supervision_outputs[k - 1]`` is the
        same for decoder level ``k`` (k = 1 is one level below full resolution), one per
        ``deep_supervision_heads``.
        """
        filters, kernels, strides = self.filters, self.kernel_sizes, self.strides
        self.decoder = nn.ModuleList(
            DecoderStage(
                layers,
                filters[level + 1],
                filters[level],
                kernels[level],
                strides[level + 1],
                upsample,
                convs_per_stage,
            )
            for level in reversed(range(len(filters) - 1))
        )
        pointwise = (1,) * self.spatial_dims
        self.output_head = layers.conv_type(filters[0], self.num_classes, pointwise, bias=True)
        self.deep_supervision_outputs = nn.ModuleList(
            layers.conv_type(filters[level], self.num_classes, pointwise, bias=True)
            for level in range(1, self.deep_supervision_heads + 1)
        )

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
