"""Batched data augmentation on the training device: the recipe (:data:`AUGMENTATIONS`) and the augmenter.

DLE nnU-Net augmented on the GPU with DALI; Composer moved the same recipe to
per-sample torch code in CPU DataLoader workers. Here the recipe runs on the
whole batch after it reaches the training device (a trainer step), while the
DataLoader workers only crop. Every sample still draws its own parameters.

The recipe is :data:`AUGMENTATIONS`, an ordered registry of transform classes
keyed by their config section's name, applied in this order (DLE's and
Composer's, no zoom):

1. ``flip`` (:class:`~.spatial.Flip`): each spatial axis flipped independently
   with ``p`` (image and label);
2. ``noise`` (:class:`~.intensity.GaussianNoise`): additive, ``std ~ U(std)`` per sample;
3. ``blur`` (:class:`~.intensity.GaussianBlur`): separable, kernel size 3 per axis,
   ``sigma ~ U(sigma)`` per sample, the same sigma on every axis;
4. ``brightness`` (:class:`~.intensity.Brightness`): the whole sample multiplied by ``U(scale)``;
5. ``contrast`` (:class:`~.intensity.Contrast`): the whole sample multiplied by ``U(scale)``,
   then clamped to the minimum and maximum that sample had just before this step.

Then nnU-Net's transforms, off by default:

6. ``rotate_scale`` (:class:`~.spatial.RotateScale`): rotation and scaling, one affine per sample,
   resampled from the larger crop the loader takes for it (:func:`sampled_patch`) and cut to the patch;
7. ``channel_blur`` (:class:`~.intensity.ChannelBlur`): Gaussian blur, sigma per axis, per channel;
8. ``channel_brightness`` (:class:`~.intensity.ChannelBrightness`): multiplicative, per channel;
9. ``channel_contrast`` (:class:`~.intensity.ChannelContrast`): about the mean, range preserved, per channel;
10. ``low_resolution`` (:class:`~.intensity.LowResolution`): down and back up, per channel;
11. ``inverted_gamma`` and 12. ``gamma`` (:class:`~.intensity.InvertedGamma`, :class:`~.intensity.Gamma`):
    gamma on the inverted and on the plain image, mean and std retained, per channel.

Steps 2-5 touch the image only. Shapes: images are ``(B, C, *S)`` and labels
``(B, 1, *S)`` where ``S`` is ``(H, W)`` for 2D or ``(D, H, W)`` for 3D.

A transform is a :class:`~.batch_transform.BatchTransform` (the contract, in
:mod:`.batch_transform`), defined in :mod:`.spatial` or :mod:`.intensity`. Adding
one is that class plus its line at the end of :data:`AUGMENTATIONS`; its config
section, defaults, checks and builder follow.

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

import hashlib
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .batch_transform import BatchTransform
from .intensity import (
    Brightness,
    ChannelBlur,
    ChannelBrightness,
    ChannelContrast,
    Contrast,
    Gamma,
    GaussianBlur,
    GaussianNoise,
    InvertedGamma,
    LowResolution,
)
from .spatial import Flip, RotateScale

__all__ = ["AUGMENTATIONS", "AugmentationParameters", "BatchAugmenter", "recipe", "sampled_patch"]


# Multiplier used to derive the noise generator's seed from the user seed. The
# two generators must not share a seed: on a CPU training device both would be
# the same Mersenne Twister stream, and the noise would be correlated with the
# parameter draws. Any odd 64-bit constant gives a bijection on seeds.
_NOISE_SEED_MULTIPLIER = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64


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
    # nnU-Net's rotation and scaling (off unless a probability is set); the loader then crops larger.
    "rotate_scale": RotateScale,
    # nnU-Net's intensity transforms, after the resampling (so on the patch), in its order; all off.
    "channel_blur": ChannelBlur,
    "channel_brightness": ChannelBrightness,
    "channel_contrast": ChannelContrast,
    "low_resolution": LowResolution,
    "inverted_gamma": InvertedGamma,
    "gamma": Gamma,
}


def sampled_patch(transforms: Mapping[str, BatchTransform], patch: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial size the loader must crop so that ``transforms``, in order, return ``patch``.

    ``patch`` itself unless a transform resamples (:meth:`BatchTransform.sampled_size`).
    """
    for transform in reversed(list(transforms.values())):
        patch = transform.sampled_size(tuple(patch))
    return tuple(patch)


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
        channels: ``C``, the image channels they were drawn for (only per-channel transforms use it).
        draws: each transform's draw (CPU tensors), by name in the augmenter's order, e.g.
            ``draws["flip"]`` a :class:`~.spatial.FlipDraw`, ``draws["noise"]`` a
            :class:`~.batch_transform.SampleDraw`; ``parameters["noise"]`` is the same.
    """

    batch_size: int
    spatial_dims: int
    draws: Mapping[str, Any]
    channels: int = 1

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

    def sample_parameters(self, batch_size: int, channels: int = 1) -> AugmentationParameters:
        """Draw the parameters of one batch from the CPU generator (advancing it).

        Args:
            batch_size: number of samples ``B`` (``>= 1``).
            channels: image channels ``C``, for the transforms that draw per channel (the recipe's
                five do not, so their parameters do not depend on it).

        Returns:
            :class:`AugmentationParameters` of CPU tensors.

        Raises:
            ValueError: ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        shared = {name: t for name, t in self.transforms.items() if t.shares_recipe_draw}
        own = {name: t for name, t in self.transforms.items() if not t.shares_recipe_draw}
        widths = [transform.random_columns(self.spatial_dims, channels) for transform in shared.values()]
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
                (batch_size, transform.random_columns(self.spatial_dims, channels)),
                generator=generator,
                dtype=torch.float64,
            )
            draws[name] = transform.draw(own_uniform)
        ordered = {name: draws[name] for name in self.transforms}
        return AugmentationParameters(batch_size, self.spatial_dims, ordered, channels)

    # ------------------------------------------------------------------ applying

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch with freshly drawn per-sample parameters.

        Args:
            image: ``(B, C, *S)`` floating tensor on ``device`` (float32,
                float16, bfloat16 or float64).
            label: ``(B, 1, *S)`` integer or bool tensor on ``device``.

        Returns:
            ``(image, label)``: new contiguous tensors of the input dtypes, of the input shapes
            or, after ``rotate_scale``, of its patch; the inputs are not modified. The label only
            gets the spatial transforms.

        Raises:
            ValueError: wrong ranks or mismatched shapes, or a tensor on another device.
            TypeError: non-floating image or floating label.
        """
        self._check_batch(image, label)
        parameters = self.sample_parameters(image.shape[0], image.shape[1])
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
