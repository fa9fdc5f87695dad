"""Batched data augmentation that runs on the training device, as a list of small transforms.

DLE nnU-Net augmented on the GPU with DALI; Composer moved the same recipe to
per-sample torch code in CPU DataLoader workers. Here the recipe runs on the
whole batch after it reaches the training device (a trainer step), while the
DataLoader workers only crop. Every sample still draws its own parameters.

The recipe is :data:`AUGMENTATIONS`, an ordered registry of transform classes
keyed by their config section's name, applied in this order (DLE's and
Composer's, no zoom):

1. ``flip`` (:class:`Flip`): each spatial axis flipped independently with ``p``
   (image and label);
2. ``noise`` (:class:`GaussianNoise`): additive, ``std ~ U(std)`` per sample;
3. ``blur`` (:class:`GaussianBlur`): separable, kernel size 3 per axis,
   ``sigma ~ U(sigma)`` per sample, the same sigma on every axis;
4. ``brightness`` (:class:`Brightness`): the whole sample multiplied by ``U(scale)``;
5. ``contrast`` (:class:`Contrast`): the whole sample multiplied by ``U(scale)``,
   then clamped to the minimum and maximum that sample had just before this step.

Steps 2-5 touch the image only. Shapes: images are ``(B, C, *S)`` and labels
``(B, 1, *S)`` where ``S`` is ``(H, W)`` for 2D or ``(D, H, W)`` for 3D.

A transform is a frozen dataclass whose fields are its settings, annotated with
the bounds of :mod:`unet_trainer.core.schema` (``Probability``, :data:`Range`), so the
config schema is derived from it (``schema.fields_of``) and its values are checked
on construction (:class:`SettingError`). It says how many uniform numbers per
sample it consumes (``random_columns``), turns them into its parameters
(``draw``), and applies them to a batch (``apply``); one that fires per sample
with a probability and one value from a range subclasses
:class:`PerSampleTransform` and writes only ``value_range`` and
``transform_samples``. Adding one is that class plus its line at the end of
:data:`AUGMENTATIONS`; its config section, defaults, checks and builder follow.

Randomness: all per-sample parameters come from a CPU ``torch.Generator``, so a
seed gives the same parameters whichever device the batch is on, and the firing
decisions are known on the host without a device synchronisation. The recipe's
five transforms take their columns from one ``torch.rand((B, N + 8))`` per batch,
row-major, in list order (``N`` flip axes, then fire and value for noise, blur,
brightness and contrast): the draw a seed has always meant. A transform added
after them draws from its own generator, seeded per batch from that draw and its
name, because a row-major draw cannot grow without changing what the seed means:
a wider one moves the values of every sample after the first, and a longer one
shifts every later batch. So adding a transform leaves the existing ones'
parameters for a seed, the augmenter's state and old checkpoints' resumption as
they were (and with its ``p: 0`` a seed's batches are exactly what they were). The noise voxels come from a second generator on the training device
(CPU and CUDA noise streams therefore differ for the same seed; the parameters
do not).
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from ..core.schema import Field, FieldError, Probability, Setting, fields_of

__all__ = [
    "AUGMENTATIONS",
    "AugmentationParameters",
    "BatchAugmenter",
    "BatchTransform",
    "Brightness",
    "Contrast",
    "Flip",
    "FlipDraw",
    "GaussianBlur",
    "GaussianNoise",
    "PerSampleTransform",
    "Range",
    "SampleDraw",
    "SettingError",
    "blur_side_weight",
    "recipe",
]

# Multiplier used to derive the noise generator's seed from the user seed. The
# two generators must not share a seed: on a CPU training device both would be
# the same Mersenne Twister stream, and the noise would be correlated with the
# parameter draws. Any odd 64-bit constant gives a bijection on seeds.
_NOISE_SEED_MULTIPLIER = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64

_FLOATING_LOW_PRECISION = (torch.float16, torch.bfloat16)

# A (low, high) range a value is drawn from uniformly per sample; non-negative, since a negative
# std or sigma is meaningless and a negative intensity scale would invert the image (and swap the
# contrast clamp's bounds): all three are configuration typos rather than augmentations.
Range = Annotated[tuple[float, float], Setting(minimum=0.0)]


class SettingError(ValueError):
    """A transform's setting outside its domain, as one line naming ``Class.setting``.

    Attributes:
        setting: the setting's name (its key in the config section).
        value: the value given, as given.
        expected: what was expected, e.g. ``"[low, high] with low <= high"``.
    """

    def __init__(self, owner: str, setting: str, value: Any, expected: str):
        super().__init__(f"{owner}.{setting} must be {expected}, got {value!r}")
        self.setting = setting
        self.value = value
        self.expected = expected


@functools.cache
def _declared_settings(transform: type) -> tuple[dict[str, Field], frozenset[str]]:
    """A transform class's settings as schema fields, and the names of those that are a :data:`Range`."""
    hints = typing.get_type_hints(transform, include_extras=True)
    settings = fields_of(transform)
    return settings, frozenset(name for name in settings if hints.get(name) == Range)


@dataclass(frozen=True)
class FlipDraw:
    """A batch's flips. ``axes``: ``(B, N)`` bool, ``axes[b, a]`` flips sample ``b`` along spatial axis ``a``."""

    axes: torch.Tensor


@dataclass(frozen=True)
class SampleDraw:
    """A per-sample transform's parameters: ``fires`` ``(B,)`` bool, ``value`` ``(B,)`` float32 (every sample)."""

    fires: torch.Tensor
    value: torch.Tensor


class BatchTransform:
    """One step of the recipe. Subclasses are frozen dataclasses whose fields are their settings.

    The augmenter draws ``random_columns(N)`` uniform numbers in ``[0, 1)`` per sample for it, every
    batch, whether or not it fires (so the stream advances by the same amount for every batch of a
    given size), hands them to ``draw``, moves what ``device_scalars`` returns to the device, and
    calls ``apply``.

    Class attributes:
        modifies_in_place: ``apply`` may modify the image and label it is given (the augmenter then
            hands it tensors it owns); False for one that always returns new tensors (the flips).
        shares_recipe_draw: True only for the recipe's five original transforms, whose columns keep
            the one draw per batch that seeds have always meant. A new transform leaves it False:
            it then draws from its own generator (see the module docstring).

    Raises (on construction):
        SettingError: a setting outside what its annotation declares, or a range with low > high.
    """

    modifies_in_place: ClassVar[bool] = True
    shares_recipe_draw: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Check every setting with its field (:meth:`Field.check`, as the config does); a list
        becomes a tuple, so the transform stays hashable."""
        owner = type(self).__name__
        settings, ranges = _declared_settings(type(self))
        for name, spec in settings.items():
            value = getattr(self, name)
            try:
                checked = spec.check(value)
            except FieldError as error:
                raise SettingError(owner, name, value, error.expected) from None
            if isinstance(checked, list):
                checked = tuple(checked)
            if name in ranges and checked[0] > checked[1]:
                raise SettingError(owner, name, value, "[low, high] with low <= high")
            object.__setattr__(self, name, checked)

    def random_columns(self, spatial_dims: int) -> int:
        """How many uniform numbers per sample ``draw`` consumes, for ``spatial_dims`` (2 or 3)."""
        raise NotImplementedError

    def draw(self, uniform: torch.Tensor) -> Any:
        """This batch's parameters from ``uniform``: ``(B, random_columns)`` float64 on the CPU, in ``[0, 1)``."""
        raise NotImplementedError

    def device_scalars(self, draw: Any) -> torch.Tensor | None:
        """``(B, k)`` float32 CPU per-sample numbers ``apply`` needs on the device, or None.

        The augmenter moves every transform's scalars to the device in one copy.
        """
        return None

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        draw: Any,
        scalars: torch.Tensor | None,
        noise_generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``draw`` to the batch and return ``(image, label)``.

        Args:
            image: ``(B, C, *S)`` floating, on the device.
            label: ``(B, 1, *S)`` integer, on the device.
            draw: what ``draw`` returned for this batch.
            scalars: ``device_scalars(draw)`` on the device, or None.
            noise_generator: the augmenter's generator on the device, for voxel-wise noise.
        """
        raise NotImplementedError


def _uniform_in(column: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Map a float64 column of uniforms in ``[0, 1)`` onto ``[low, high]``, as float32."""
    low, high = value_range
    # The clamp only guards against a rounding of low + (high-low)*u landing one ulp outside the range.
    values = (low + (high - low) * column).clamp_(low, high)
    return values.to(torch.float32)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View ``(n,)`` per-sample values as ``(n, 1, ..., 1)`` to broadcast against the ``(n, C, *S)`` ``like``."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


class PerSampleTransform(BatchTransform):
    """A transform that fires on each sample with probability ``p`` and draws one value per sample.

    Subclasses declare ``p`` and a range setting, name it in ``value_range``, and write
    ``transform_samples``. Columns: (fire, value); ``fires = u0 < p`` (``p = 1`` always fires:
    the draws are in float64 in ``[0, 1)``) and ``value ~ U(value_range)``. Samples that do not
    fire cost nothing, and nothing runs when none fires.
    """

    p: float

    @property
    def value_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def random_columns(self, spatial_dims: int) -> int:
        return 2

    def draw(self, uniform: torch.Tensor) -> SampleDraw:
        return SampleDraw(fires=uniform[:, 0] < self.p, value=_uniform_in(uniform[:, 1], self.value_range))

    def device_scalars(self, draw: SampleDraw) -> torch.Tensor:
        return draw.value.unsqueeze(1)

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        draw: SampleDraw,
        scalars: torch.Tensor | None,
        noise_generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _update_firing(
            image,
            draw.fires,
            lambda samples, rows: self.transform_samples(samples, scalars[rows, 0], noise_generator),
        )
        return image, label

    def transform_samples(
        self, samples: torch.Tensor, scalar: torch.Tensor, noise_generator: torch.Generator
    ) -> torch.Tensor:
        """The new values of the firing samples.

        Args:
            samples: ``(n, C, *S)``, the firing samples (a view of the batch or a gathered copy;
                either way it may be modified in place and returned).
            scalar: ``(n,)`` on the device, this transform's ``device_scalars`` for those samples.
            noise_generator: the device generator, for voxel-wise noise.
        """
        raise NotImplementedError


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


# A selection of samples in a batch: a slice when the firing samples form one
# contiguous run (operations then work on a view, with no gather or scatter),
# otherwise their indices.
_Selection = slice | torch.Tensor


def _select_firing(mask: torch.Tensor) -> _Selection | None:
    """Turn a CPU ``(B,)`` bool mask into a selection, or None when nothing fires."""
    indices = mask.nonzero().flatten()
    if indices.numel() == 0:
        return None
    first, last = int(indices[0]), int(indices[-1])
    if last - first + 1 == indices.numel():
        return slice(first, last + 1)
    return indices


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


def _update_firing(
    batch: torch.Tensor,
    fire_mask: torch.Tensor,
    operation: Callable[[torch.Tensor, _Selection], torch.Tensor],
) -> None:
    """Apply ``operation`` to the firing samples of ``batch`` in place.

    ``operation(samples, rows)`` gets the firing samples (a view of ``batch`` when they are
    contiguous, else a gathered copy; either way it may modify them in place) and ``rows`` to
    index per-sample device tensors with; it returns the new values of those samples. Samples
    that do not fire cost nothing, and nothing runs when none fires.
    """
    selection = _select_firing(fire_mask)
    if selection is None:
        return
    if isinstance(selection, slice):
        samples = batch[selection]
        updated = operation(samples, selection)
        if updated is not samples:
            samples.copy_(updated)
        return
    indices = selection.to(batch.device, non_blocking=True)
    updated = operation(batch.index_select(0, indices), indices)
    batch.index_copy_(0, indices, updated.to(batch.dtype))


# ---------------------------------------------------------------------- the transforms


@dataclass(frozen=True)
class Flip(BatchTransform):
    """Each spatial axis flipped independently with probability ``p``, image and label alike.

    Columns: one per spatial axis (``axis a`` flips where ``u_a < p``).
    """

    p: Probability = 0.5

    modifies_in_place = False
    shares_recipe_draw = True

    def random_columns(self, spatial_dims: int) -> int:
        return spatial_dims

    def draw(self, uniform: torch.Tensor) -> FlipDraw:
        return FlipDraw(axes=uniform < self.p)

    def apply(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        draw: FlipDraw,
        scalars: torch.Tensor | None,
        noise_generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return flipped copies of image and label, each sample along its own axes.

        Samples are grouped by flip pattern (at most 2**N groups, so the loop
        is bounded by 8 in 3D, not by the batch size) and each group is flipped
        with one ``torch.flip``, a plain bandwidth-bound copy. Alternatives
        measured on the CPU (4x4x64^3, about half the axes flipped), relative
        to a plain clone: grouping 5x, one gather with broadcast index tensors
        37x (the advanced-indexing kernel is not vectorised), and a
        ``torch.where(mask, x.flip(a), x)`` per axis 60x (it materialises the
        flip of the whole batch and reads both branches, three times).
        """
        spatial_dims = draw.axes.shape[1]
        pattern_codes = (draw.axes.long() << torch.arange(spatial_dims)).sum(dim=1)
        patterns = pattern_codes.unique().tolist()

        def flipped_dims(pattern: int) -> list[int]:
            return [axis + 2 for axis in range(spatial_dims) if pattern >> axis & 1]

        def flip_or_copy(tensor: torch.Tensor, dims: list[int]) -> torch.Tensor:
            return tensor.flip(dims) if dims else tensor

        if len(patterns) == 1:
            dims = flipped_dims(patterns[0])
            if dims:
                return image.flip(dims).contiguous(), label.flip(dims).contiguous()
            return image.clone(memory_format=torch.contiguous_format), label.clone(
                memory_format=torch.contiguous_format
            )

        image_out = torch.empty(image.shape, dtype=image.dtype, device=image.device)
        label_out = torch.empty(label.shape, dtype=label.dtype, device=label.device)
        for pattern in patterns:
            dims = flipped_dims(pattern)
            selection = _select_firing(pattern_codes == pattern)
            if isinstance(selection, slice):
                image_out[selection] = flip_or_copy(image[selection], dims)
                label_out[selection] = flip_or_copy(label[selection], dims)
            else:
                indices = selection.to(image.device, non_blocking=True)
                image_out.index_copy_(0, indices, flip_or_copy(image.index_select(0, indices), dims))
                label_out.index_copy_(0, indices, flip_or_copy(label.index_select(0, indices), dims))
        return image_out, label_out


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
        noise.mul_(_per_sample(scalar, samples))
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
        side_weight = _per_sample(scalar, samples)
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
        return samples.mul_(_per_sample(scalar, samples))


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
        samples.mul_(_per_sample(scalar, samples))
        return samples.clamp_(min=_per_sample(low, samples), max=_per_sample(high, samples))


# The recipe, in the order it runs and its columns are drawn; each key is the transform's section
# in the config's ``augmentation`` (whose schema is derived from the class). A new transform goes
# at the END: its place in the list decides when it runs, and appending keeps every earlier
# transform's columns and values for a seed.
AUGMENTATIONS: dict[str, type[BatchTransform]] = {
    "flip": Flip,
    "noise": GaussianNoise,
    "blur": GaussianBlur,
    "brightness": Brightness,
    "contrast": Contrast,
}


def recipe(**settings: Mapping[str, Any]) -> dict[str, BatchTransform]:
    """Every transform of :data:`AUGMENTATIONS`, in order, with its defaults except the settings given.

    ``recipe(noise={"p": 1.0}, blur={"sigma": [0.5, 1.0]})``.

    Raises:
        KeyError: a keyword that names no transform.
        SettingError: a setting outside its domain.
        TypeError: a setting the transform does not have.
    """
    unknown = sorted(set(settings) - set(AUGMENTATIONS))
    if unknown:
        raise KeyError(f"no augmentation named {', '.join(unknown)}; the recipe has {', '.join(AUGMENTATIONS)}")
    return {name: transform(**settings.get(name, {})) for name, transform in AUGMENTATIONS.items()}


# ---------------------------------------------------------------------- the augmenter


@dataclass(frozen=True)
class AugmentationParameters:
    """Per-sample parameters of one batch, as drawn by :meth:`BatchAugmenter.sample_parameters`.

    Attributes:
        batch_size: ``B``.
        spatial_dims: ``N``, 2 or 3.
        draws: each transform's draw (CPU tensors), by name in the augmenter's order, e.g.
            ``draws["flip"]`` a :class:`FlipDraw`, ``draws["noise"]`` a :class:`SampleDraw`;
            ``parameters["noise"]`` is the same.
    """

    batch_size: int
    spatial_dims: int
    draws: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.draws[name]


def _stream_seed(recipe_draw: torch.Tensor, name: str) -> int:
    """The seed of a later transform's per-batch generator: a hash of the batch's recipe draw and its name."""
    digest = hashlib.blake2b(recipe_draw.numpy().tobytes() + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BatchAugmenter:
    """Applies a list of transforms to whole batches on the training device.

    Args:
        transforms: name -> :class:`BatchTransform`, in the order they run (usually
            :func:`recipe`, or the builder's transforms from the config).
        spatial_dims: 2 for ``(B, C, H, W)`` batches, 3 for ``(B, C, D, H, W)``.
        device: the device the batches live on; the noise generator lives there.
        seed: integer in ``[0, 2**64)``; seeds the CPU parameter generator
            directly and the device noise generator with a seed derived from it.

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, or ``seed`` out of range.
        TypeError: ``transforms`` is not a mapping of names to :class:`BatchTransform`.

    Attributes:
        transforms: the name -> transform mapping, in order.
        last_params: the :class:`AugmentationParameters` used by the latest
            ``__call__`` (None before the first), for logging and tests.
    """

    _STATE_KEYS = ("parameter_generator", "noise_generator")

    def __init__(
        self, transforms: Mapping[str, BatchTransform], spatial_dims: int, device: torch.device | str, seed: int
    ):
        if not isinstance(transforms, Mapping) or not all(
            isinstance(name, str) and isinstance(transform, BatchTransform) for name, transform in transforms.items()
        ):
            raise TypeError(f"transforms must map names to BatchTransform instances, got {transforms!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        # numbers.Integral admits NumPy integers (seeds often come from NumPy).
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < _SEED_MODULUS:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        seed = int(seed)
        self.transforms = dict(transforms)
        self.spatial_dims = spatial_dims
        self.device = _normalise_device(device)
        self.seed = seed
        self._parameter_generator = torch.Generator(device="cpu")
        self._parameter_generator.manual_seed(seed)
        self._noise_generator = torch.Generator(device=self.device)
        self._noise_generator.manual_seed((seed * _NOISE_SEED_MULTIPLIER + 1) % _SEED_MODULUS)
        self.last_params: AugmentationParameters | None = None

    # ------------------------------------------------------------------ parameters

    def sample_parameters(self, batch_size: int) -> AugmentationParameters:
        """Draw the parameters of one batch from the CPU generator (advancing it).

        Args:
            batch_size: number of samples ``B`` (``>= 1``).

        Returns:
            :class:`AugmentationParameters` of CPU tensors.

        Raises:
            ValueError: ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shared = {name: t for name, t in self.transforms.items() if t.shares_recipe_draw}
        own = {name: t for name, t in self.transforms.items() if not t.shares_recipe_draw}
        widths = [transform.random_columns(self.spatial_dims) for transform in shared.values()]
        # One draw of fixed size per batch, in float64 so that `u < p` fires with probability p
        # to well below any test's resolution and p = 1 always fires. It is never empty when a
        # transform seeds its own generator from it: one column then keys the batch.
        columns = max(sum(widths), 1 if own else 0)
        uniform = torch.rand((batch_size, columns), generator=self._parameter_generator, dtype=torch.float64)
        draws: dict[str, Any] = {}
        start = 0
        for (name, transform), width in zip(shared.items(), widths):
            draws[name] = transform.draw(uniform[:, start : start + width])
            start += width
        for name, transform in own.items():
            generator = torch.Generator(device="cpu").manual_seed(_stream_seed(uniform, name))
            own_uniform = torch.rand(
                (batch_size, transform.random_columns(self.spatial_dims)), generator=generator, dtype=torch.float64
            )
            draws[name] = transform.draw(own_uniform)
        return AugmentationParameters(batch_size, self.spatial_dims, {name: draws[name] for name in self.transforms})

    # ------------------------------------------------------------------ applying

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch with freshly drawn per-sample parameters.

        Args:
            image: ``(B, C, *S)`` floating tensor on ``device`` (float32,
                float16, bfloat16 or float64).
            label: ``(B, 1, *S)`` integer or bool tensor on ``device``.

        Returns:
            ``(image, label)``: new contiguous tensors of the input shapes and
            dtypes; the inputs are not modified. The label only gets the flips.

        Raises:
            ValueError: wrong ranks or mismatched shapes, or a tensor on another device.
            TypeError: non-floating image or floating label.
        """
        self._check_batch(image, label)
        parameters = self.sample_parameters(image.shape[0])
        self.last_params = parameters
        return self.apply(image, label, parameters)

    @torch.no_grad()
    def apply(
        self, image: torch.Tensor, label: torch.Tensor, parameters: AugmentationParameters
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch with given parameters (noise still comes from the device generator).

        Same arguments, result and errors as ``__call__``, plus ``parameters``
        whose batch size, spatial dims and transforms must match (ValueError).
        """
        self._check_batch(image, label)
        if parameters.batch_size != image.shape[0] or parameters.spatial_dims != self.spatial_dims:
            raise ValueError(
                f"parameters are for batch {parameters.batch_size} with {parameters.spatial_dims} spatial dims, "
                f"the batch is {image.shape[0]} with {self.spatial_dims}"
            )
        if list(parameters.draws) != list(self.transforms):
            raise ValueError(
                f"parameters are for transforms {', '.join(parameters.draws)}, "
                f"the augmenter has {', '.join(self.transforms)}"
            )
        scalars = self._scalars_on_device(parameters)
        # The inputs are never modified: a transform that works in place gets copies, made once,
        # and a transform that returns new tensors (the flips, first) makes them for free.
        owned = False
        for name, transform in self.transforms.items():
            if transform.modifies_in_place and not owned:
                image = image.clone(memory_format=torch.contiguous_format)
                label = label.clone(memory_format=torch.contiguous_format)
            image, label = transform.apply(image, label, parameters[name], scalars.get(name), self._noise_generator)
            owned = True
        if not owned:
            image = image.clone(memory_format=torch.contiguous_format)
            label = label.clone(memory_format=torch.contiguous_format)
        return image, label

    def _scalars_on_device(self, parameters: AugmentationParameters) -> dict[str, torch.Tensor]:
        """Every transform's ``device_scalars``, on the device, by name."""
        on_host = {}
        for name, transform in self.transforms.items():
            values = transform.device_scalars(parameters[name])
            if values is not None:
                on_host[name] = values.to(torch.float32)
        if not on_host:
            return {}
        # One host-to-device copy carries every per-sample scalar; non_blocking from pageable
        # memory is safe (the source is staged before the call returns) and avoids a stream
        # synchronisation.
        on_device = torch.cat(list(on_host.values()), dim=1).to(self.device, non_blocking=True)
        return dict(zip(on_host, on_device.split([values.shape[1] for values in on_host.values()], dim=1)))

    def _check_batch(self, image: torch.Tensor, label: torch.Tensor) -> None:
        rank = 2 + self.spatial_dims
        if image.dim() != rank:
            raise ValueError(
                f"image must be (B, C, *S) with {self.spatial_dims} spatial dims, got {tuple(image.shape)}"
            )
        if not image.is_floating_point():
            raise TypeError(f"image must be floating point, got {image.dtype}")
        if label.is_floating_point() or label.is_complex():
            raise TypeError(f"label must be an integer or bool tensor, got {label.dtype}")
        expected_label_shape = (image.shape[0], 1, *image.shape[2:])
        if tuple(label.shape) != expected_label_shape:
            raise ValueError(f"label must have shape {expected_label_shape}, got {tuple(label.shape)}")
        for name, tensor in (("image", image), ("label", label)):
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device}, the augmenter on {self.device}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both generator states as CPU uint8 tensors (safe for ``torch.load(weights_only=True)``).

        Keys: ``"parameter_generator"`` and ``"noise_generator"``. The noise
        state's format depends on the device type (CPU and CUDA differ).
        """
        return {
            "parameter_generator": self._parameter_generator.get_state().clone(),
            "noise_generator": self._noise_generator.get_state().clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore both generators so that the random streams continue exactly.

        Raises:
            KeyError: a key is missing or unexpected.
            ValueError: a state that the generator rejects, e.g. a noise state
                saved on another device type.
        """
        if set(state) != set(self._STATE_KEYS):
            raise KeyError(f"augmenter state must have keys {sorted(self._STATE_KEYS)}, got {sorted(state)}")
        for key, generator in (
            ("parameter_generator", self._parameter_generator),
            ("noise_generator", self._noise_generator),
        ):
            try:
                generator.set_state(state[key].to("cpu", torch.uint8))
            except RuntimeError as error:
                raise ValueError(f"cannot restore {key} on {generator.device}: {error}") from error


def _normalise_device(device: torch.device | str) -> torch.device:
    """Give CUDA devices an explicit index so that ``tensor.device == device`` comparisons hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
