"""The intensity transforms: each fires per sample with ``p`` and changes the image only.

- :class:`GaussianNoise`: additive, ``std ~ U(std)`` per sample;
- :class:`GaussianBlur`: separable, kernel size 3 per axis, ``sigma ~ U(sigma)`` per sample, the same
  sigma on every axis;
- :class:`Brightness`: the whole sample multiplied by ``U(scale)``;
- :class:`Contrast`: the whole sample multiplied by ``U(scale)``, then clamped to the minimum and
  maximum that sample had just before this step.

Each is a :class:`~.batch_transform.PerSampleTransform`. Then nnU-Net v2's, as batchgeneratorsv2 writes
them: each fires per sample with ``p``, then on each channel of a firing sample with ``p_per_channel``,
with its own value per channel (a :class:`ChannelTransform`):

- :class:`ChannelBlur`: Gaussian blur, ``sigma ~ U(sigma)`` per axis, truncated at 4 sigma, reflecting;
- :class:`ChannelBrightness`: the channel multiplied by a factor;
- :class:`ChannelContrast`: the channel scaled about its mean, clamped to the range it had;
- :class:`LowResolution`: the channel downsampled by ``zoom ~ U(zoom)`` on every axis (nearest-exact),
  then back up (linear);
- :class:`Gamma`, :class:`InvertedGamma`: ``x -> x ** gamma`` on the channel rescaled to [0, 1] (on the
  negated channel for the inverted one), then its mean and std restored.

Brightness, contrast and gamma draw their factor the batchgeneratorsv2 ``BGContrast`` way: half the
time from ``[low, 1)``, half from ``[1, high]``. Shapes as in :mod:`.batch_transform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..core.schema import Probability
from .batch_transform import BatchTransform, PerSampleTransform, Range, SampleDraw, _update_firing, per_sample

__all__ = [
    "Brightness",
    "ChannelBlur",
    "ChannelBrightness",
    "ChannelContrast",
    "ChannelDraw",
    "ChannelTransform",
    "Contrast",
    "Gamma",
    "GaussianBlur",
    "GaussianNoise",
    "InvertedGamma",
    "LowResolution",
    "blur_side_weight",
    "gamma_channels",
    "gaussian_blur_channels",
    "scale_contrast_channels",
]

_FLOATING_LOW_PRECISION = (torch.float16, torch.bfloat16)


def blur_side_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Weight of each outer tap of the normalised 3-tap Gaussian ``[w, 1 - 2w, w]``.

    Args:
        sigma: any shape, standard deviation in voxels (``>= 0``; ``0`` gives
            the identity kernel ``[0, 1, 0]``).

    Returns:
        Tensor of ``sigma``'s shape and dtype, values in ``[0, 1/3)``.
    """
    # Unnormalised taps are exp(-x^2 / (2 sigma^2)) at x = -1, 0, 1, i.e.
    # [e, 1, e]; normalising gives e / (1 + 2e) for the outer taps.
    outer = torch.exp(-0.5 / sigma.square())
    return outer / (1.0 + 2.0 * outer)


def _blur_axis_reflect(volume: torch.Tensor, side_weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Convolve along one axis with ``[w, 1 - 2w, w]``, reflecting at the borders.

    The border mode mirrors about the edge voxel without repeating it (torch
    ``"reflect"``, OpenCV ``BORDER_REFLECT_101``): a constant region stays
    constant up to the border, unlike zero padding, which would darken the
    edges of every blurred patch.

    Written as three shifted elementwise products rather than a depthwise
    convolution: with a 3-tap kernel the work is purely memory-bound, and on
    the CPU this measured 2.6x faster than ``F.pad`` + three grouped ``conv3d``
    (4x4x64^3); it also works for every floating dtype on every device and
    needs no cuDNN algorithm search.

    Args:
        volume: ``(n, C, *S)`` floating tensor, not modified.
        side_weight: ``(n, 1, ..., 1)`` outer-tap weight per sample, broadcastable.
        axis: tensor dimension to blur along (``>= 2``).

    Returns:
        New tensor of ``volume``'s shape and dtype. An axis of length 1 has no
        neighbour to reflect onto and is returned unchanged.
    """
    length = volume.shape[axis]
    if length == 1:
        return volume
    centre_weight = 1.0 - 2.0 * side_weight
    blurred = torch.empty_like(volume, memory_format=torch.contiguous_format)

    inner = length - 2
    inner_out = blurred.narrow(axis, 1, inner)
    torch.mul(volume.narrow(axis, 1, inner), centre_weight, out=inner_out)
    inner_out.addcmul_(volume.narrow(axis, 0, inner), side_weight)
    inner_out.addcmul_(volume.narrow(axis, 2, inner), side_weight)

    # With reflection the single neighbour of an edge voxel counts twice.
    for edge, neighbour in ((0, 1), (length - 1, length - 2)):
        torch.addcmul(
            volume.narrow(axis, edge, 1) * centre_weight,
            volume.narrow(axis, neighbour, 1),
            side_weight,
            value=2.0,
            out=blurred.narrow(axis, edge, 1),
        )
    return blurred


@dataclass(frozen=True)
class GaussianNoise(PerSampleTransform):
    """Additive Gaussian noise with ``std ~ U(std)`` per sample, in image units."""

    p: Probability = 0.15
    std: Range = (0.0, 0.33)

    shares_recipe_draw = True

    @property
    def value_range(self) -> tuple[float, float]:
        return self.std

    def transform_samples(
        self, samples: torch.Tensor, scalar: torch.Tensor, noise_generator: torch.Generator
    ) -> torch.Tensor:
        # Drawn in float32 whatever the image dtype, so that the noise stream of a seed does not
        # depend on the dtype; the in-place add computes in float32 and rounds once to the image dtype.
        noise = torch.randn(samples.shape, generator=noise_generator, device=samples.device, dtype=torch.float32)
        noise.mul_(per_sample(scalar, samples))
        return samples.add_(noise)


@dataclass(frozen=True)
class GaussianBlur(PerSampleTransform):
    """Separable Gaussian blur, 3 taps per axis, ``sigma ~ U(sigma)`` voxels per sample, on every axis."""

    p: Probability = 0.15
    sigma: Range = (0.5, 1.5)

    shares_recipe_draw = True

    @property
    def value_range(self) -> tuple[float, float]:
        return self.sigma

    def device_scalars(self, draw: SampleDraw) -> torch.Tensor:
        # The kernel's outer-tap weight, computed in float64 on the host.
        return blur_side_weight(draw.value.double()).float().unsqueeze(1)

    def transform_samples(
        self, samples: torch.Tensor, scalar: torch.Tensor, noise_generator: torch.Generator
    ) -> torch.Tensor:
        # Three passes of multiply-adds would round three times per axis in half precision; the
        # firing subset is upcast to float32 instead.
        volume = samples.float() if samples.dtype in _FLOATING_LOW_PRECISION else samples
        side_weight = per_sample(scalar, samples)
        for axis in range(2, samples.dim()):
            volume = _blur_axis_reflect(volume, side_weight, axis)
        return volume


@dataclass(frozen=True)
class Brightness(PerSampleTransform):
    """The whole sample multiplied by ``U(scale)``."""

    p: Probability = 0.15
    scale: Range = (0.7, 1.3)

    shares_recipe_draw = True

    @property
    def value_range(self) -> tuple[float, float]:
        return self.scale

    def transform_samples(
        self, samples: torch.Tensor, scalar: torch.Tensor, noise_generator: torch.Generator
    ) -> torch.Tensor:
        return samples.mul_(per_sample(scalar, samples))


@dataclass(frozen=True)
class Contrast(PerSampleTransform):
    """The whole sample multiplied by ``U(scale)``, then clamped to the range it had before."""

    p: Probability = 0.15
    scale: Range = (0.65, 1.5)

    shares_recipe_draw = True

    @property
    def value_range(self) -> tuple[float, float]:
        return self.scale

    def transform_samples(
        self, samples: torch.Tensor, scalar: torch.Tensor, noise_generator: torch.Generator
    ) -> torch.Tensor:
        # Bounds over all channels and voxels of the sample, as DLE and Composer do: a per-channel
        # clamp would change the relative intensities of the MRI sequences, which the rest of the
        # recipe treats as one multichannel image. min/max are exact in any dtype.
        flat = samples.flatten(1)
        if flat.is_cuda:
            low, high = torch.aminmax(flat, dim=1)  # one pass instead of two
        else:
            # The CPU aminmax-along-dim kernel measured 15x slower than amin + amax (2x4x64^3),
            # which are vectorised reductions.
            low, high = flat.amin(dim=1), flat.amax(dim=1)
        samples.mul_(per_sample(scalar, samples))
        return samples.clamp_(min=per_sample(low, samples), max=per_sample(high, samples))


# ---------------------------------------------------------------------- nnU-Net's, per channel


def below_or_above_one(side: torch.Tensor, uniform: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """batchgeneratorsv2's ``BGContrast`` sampling: where ``side < 0.5`` and ``low < 1``, ``U(low, 1)``;
    elsewhere ``U(max(low, 1), high)``. Float64 in, float32 out, of the inputs' shape."""
    low, high = value_range
    above_low = max(low, 1.0)
    below = low + (min(high, 1.0) - low) * uniform
    above = above_low + (high - above_low) * uniform
    return torch.where((side < 0.5) & (low < 1.0), below, above).to(torch.float32)


@dataclass(frozen=True)
class ChannelDraw:
    """A per-channel transform's parameters: ``fires`` ``(B, C)`` bool (the sample fired and then the
    channel), ``values`` ``(B, C, k)`` float32, its ``k`` values per channel (every channel)."""

    fires: torch.Tensor
    values: torch.Tensor


class ChannelTransform(BatchTransform):
    """A transform that fires per sample with ``p``, then per channel with ``p_per_channel``, with its
    own values per channel; the channels that do not fire keep their voxels exactly.

    Subclasses declare ``p``, ``p_per_channel`` and a range, and write ``channel_values`` (from the
    uniforms) and ``transform_channels``. Columns: sample fire, then per channel: fire, side (for
    ``BGContrast`` sampling), and ``values_per_channel`` values.
    """

    p: float
    p_per_channel: float

    # Values drawn per channel (the blur's one sigma per axis, 3 whatever the dims: a 2D batch uses two).
    values_per_channel: ClassVar[int] = 1

    def random_columns(self, spatial_dims: int, channels: int) -> int:
        return 1 + channels * (2 + self.values_per_channel)

    def channel_values(self, side: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """``(B, C, k)`` float32 values from float64 uniforms ``side`` ``(B, C, 1)`` and ``uniform`` ``(B, C, k)``."""
        raise NotImplementedError

    def draw(self, uniform: torch.Tensor) -> ChannelDraw:
        per_channel = uniform[:, 1:].reshape(uniform.shape[0], -1, 2 + self.values_per_channel)
        fires = (uniform[:, :1] < self.p) & (per_channel[:, :, 0] < self.p_per_channel)
        return ChannelDraw(fires=fires, values=self.channel_values(per_channel[:, :, 1:2], per_channel[:, :, 2:]))

    def device_scalars(self, draw: ChannelDraw) -> torch.Tensor:
        return torch.cat([draw.fires.float(), draw.values.flatten(1)], dim=1)

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        draw: ChannelDraw,
        scalars: torch.Tensor | None,
        noise_generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        channels = image.shape[1]
        if not draw.fires.any():
            return image, label
        _check_channels(self, draw, channels)
        mask, values = scalars[:, :channels] > 0.5, scalars[:, channels:].view(scalars.shape[0], channels, -1)

        def update(samples: torch.Tensor, rows: Any) -> torch.Tensor:
            fires = mask[rows].view(*mask[rows].shape, *([1] * (samples.dim() - 2)))
            return torch.where(fires, self.transform_channels(samples, values[rows]).to(samples.dtype), samples)

        _update_firing(image, draw.fires.any(dim=1), update)
        return image, label

    def transform_channels(self, samples: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The new values of every channel of the firing samples ``(n, C, *S)`` (not modified), from
        their ``values`` ``(n, C, k)`` on the device; the caller keeps the channels that did not fire."""
        raise NotImplementedError


def _check_channels(transform: ChannelTransform, draw: ChannelDraw, channels: int) -> None:
    """Raise ValueError when ``draw`` was made for another channel count than the batch's ``channels``."""
    if draw.fires.shape[1] != channels:
        raise ValueError(
            f"{type(transform).__name__}: parameters drawn for {draw.fires.shape[1]} channels, the batch has {channels}"
        )


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(n, C)`` values as ``(n, C, 1, ..., 1)`` against ``like`` ``(n, C, *S)``."""
    return values.view(*values.shape, *([1] * (like.dim() - 2)))


def gaussian_blur_channels(samples: torch.Tensor, sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of each channel with its own sigma per axis, reflecting at the borders.

    Args:
        samples: ``(n, C, *S)`` floating, not modified.
        sigmas: ``(n, C, N)`` voxels, ``> 0``, one per spatial axis.
        radius: taps each side (``2 * radius + 1`` per axis); fewer on an axis shorter than that.

    Returns:
        A new float32 (or float64) tensor of ``samples``' shape; each kernel sums to 1.
    """
    volume = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()
    n, channels, *spatial = volume.shape
    rows = volume.reshape(1, n * channels, *spatial)
    convolve = F.conv3d if len(spatial) == 3 else F.conv2d
    for axis, size in enumerate(spatial):
        reach = min(radius, size - 1)
        if reach == 0:
            continue
        offsets = torch.arange(-reach, reach + 1, dtype=volume.dtype, device=volume.device)
        taps = torch.exp(-0.5 * (offsets / sigmas[..., axis].reshape(-1, 1).to(volume.dtype)) ** 2)
        taps = taps / taps.sum(dim=1, keepdim=True)
        shape = [n * channels, 1] + [1] * len(spatial)
        shape[2 + axis] = 2 * reach + 1
        padding = [0, 0] * len(spatial)
        padding[2 * (len(spatial) - 1 - axis)] = padding[2 * (len(spatial) - 1 - axis) + 1] = reach
        rows = convolve(F.pad(rows, padding, mode="reflect"), taps.view(shape), groups=n * channels)
    return rows.view(volume.shape)


@dataclass(frozen=True)
class ChannelBlur(ChannelTransform):
    """nnU-Net's blur: ``sigma ~ U(sigma)`` voxels per axis and channel, truncated at 4 sigma (scipy's)."""

    p: Probability = 0.0
    p_per_channel: Probability = 0.5
    sigma: Range = (0.5, 1.0)

    values_per_channel = 3

    def channel_values(self, side: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        low, high = self.sigma
        return (low + (high - low) * uniform).to(torch.float32)

    def transform_channels(self, samples: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # A zero sigma is the identity: a tiny one gives the kernel [0, ..., 1, ..., 0].
        radius = max(1, int(4 * self.sigma[1] + 0.5))
        return gaussian_blur_channels(samples, values[..., : samples.dim() - 2].clamp(min=1e-3), radius)


@dataclass(frozen=True)
class ScaledChannels(ChannelTransform):
    """A per-channel factor drawn the ``BGContrast(scale)`` way (half below 1, half above); what it scales is
    the subclass's."""

    p: Probability = 0.0
    p_per_channel: Probability = 1.0
    scale: Range = (0.75, 1.25)

    def channel_values(self, side: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return below_or_above_one(side, uniform, self.scale)


@dataclass(frozen=True)
class ChannelBrightness(ScaledChannels):
    """nnU-Net's multiplicative brightness: each firing channel multiplied by its ``BGContrast(scale)`` factor."""

    def transform_channels(self, samples: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return samples * _per_channel(values[..., 0], samples)


def scale_contrast_channels(samples: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each channel of ``samples`` ``(n, C, *S)`` scaled by ``factors`` ``(n, C)`` about its mean, then
    clamped to the minimum and maximum it had (batchgeneratorsv2's ``preserve_range``)."""
    flat = samples.flatten(2)
    mean, low, high = flat.mean(dim=2), flat.amin(dim=2), flat.amax(dim=2)
    mean, low, high = (_per_channel(value, samples) for value in (mean, low, high))
    scaled = (samples - mean) * _per_channel(factors, samples) + mean
    return torch.maximum(torch.minimum(scaled, high), low)


@dataclass(frozen=True)
class ChannelContrast(ScaledChannels):
    """nnU-Net's contrast: each firing channel scaled about its mean by ``BGContrast(scale)``, range preserved."""

    def transform_channels(self, samples: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return scale_contrast_channels(samples, values[..., 0])


@dataclass(frozen=True)
class LowResolution(ChannelTransform):
    """nnU-Net's simulated low resolution: each firing channel zoomed by ``U(zoom)`` on every axis with
    nearest-exact sampling, then back to its size with (bi/tri)linear interpolation (batchgeneratorsv2's
    modes). A sample's channels differ in size once zoomed, so they are resampled one by one."""

    p: Probability = 0.0
    p_per_channel: Probability = 0.5
    zoom: Range = (0.5, 1.0)

    _UP_MODES: ClassVar[dict[int, str]] = {2: "bilinear", 3: "trilinear"}

    def channel_values(self, side: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        low, high = self.zoom
        return (low + (high - low) * uniform).to(torch.float32)

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        draw: ChannelDraw,
        scalars: torch.Tensor | None,
        noise_generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if draw.fires.any():
            _check_channels(self, draw, image.shape[1])
        spatial = image.shape[2:]
        for sample, channel in draw.fires.nonzero().tolist():
            zoom = float(draw.values[sample, channel, 0])
            small = [max(1, round(size * zoom)) for size in spatial]
            volume = image[sample, channel][None, None]
            down = F.interpolate(volume.float(), size=small, mode="nearest-exact")
            up = F.interpolate(down, size=list(spatial), mode=self._UP_MODES[len(spatial)], align_corners=False)
            image[sample, channel] = up[0, 0].to(image.dtype)
        return image, label


def gamma_channels(samples: torch.Tensor, gammas: torch.Tensor, invert: bool) -> torch.Tensor:
    """batchgeneratorsv2's gamma with its statistics retained, per channel.

    Each channel of ``samples`` ``(n, C, *S)`` (negated first when ``invert``) is rescaled to [0, 1],
    raised to its ``gammas`` ``(n, C)``, rescaled back, then shifted and scaled to the mean and std it had
    (negated back when ``invert``). Returns a new float tensor of ``samples``' shape.
    """
    volume = samples if samples.dtype in (torch.float32, torch.float64) else samples.float()
    volume = -volume if invert else volume
    flat = volume.flatten(2)
    mean, std = _per_channel(flat.mean(dim=2), volume), _per_channel(flat.std(dim=2), volume)
    low, high = _per_channel(flat.amin(dim=2), volume), _per_channel(flat.amax(dim=2), volume)
    spread = high - low
    powered = ((volume - low) / spread.clamp(min=1e-7)).pow(_per_channel(gammas, volume)) * spread + low
    powered_flat = powered.flatten(2)
    powered_mean = _per_channel(powered_flat.mean(dim=2), volume)
    powered_std = _per_channel(powered_flat.std(dim=2), volume)
    restored = (powered - powered_mean) * (std / powered_std.clamp(min=1e-7)) + mean
    return -restored if invert else restored


@dataclass(frozen=True)
class Gamma(ChannelTransform):
    """nnU-Net's gamma: ``gamma ~ BGContrast(gamma)`` per channel, mean and std retained (:func:`gamma_channels`)."""

    p: Probability = 0.0
    p_per_channel: Probability = 1.0
    gamma: Range = (0.7, 1.5)

    inverted: ClassVar[bool] = False

    def channel_values(self, side: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return below_or_above_one(side, uniform, self.gamma)

    def transform_channels(self, samples: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return gamma_channels(samples, values[..., 0], self.inverted)


@dataclass(frozen=True)
class InvertedGamma(Gamma):
    """nnU-Net's gamma on the inverted image: :class:`Gamma` on ``-x``, negated back."""

    inverted: ClassVar[bool] = True
