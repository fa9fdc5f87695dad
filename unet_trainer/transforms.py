"""Batched data augmentation that runs on the training device.

DLE nnU-Net augmented on the GPU with DALI; Composer moved the same recipe to
per-sample torch code in CPU DataLoader workers. Here the recipe runs on the
whole batch after it reaches the training device (a trainer step), while the
DataLoader workers only crop. Every sample still draws its own parameters.

The recipe, in the order DLE and Composer apply it (no zoom):

1. flips: each spatial axis flipped independently with ``flip_p`` (image and label);
2. Gaussian noise: additive, ``std ~ U(noise_std)`` per sample;
3. Gaussian blur: separable, kernel size 3 per axis, ``sigma ~ U(blur_sigma)``
   per sample, the same sigma on every axis;
4. brightness: the whole sample multiplied by ``U(brightness_scale)``;
5. contrast: the whole sample multiplied by ``U(contrast_scale)``, then clamped
   to the minimum and maximum that sample had just before this step.

Steps 2-5 touch the image only. Shapes: images are ``(B, C, *S)`` and labels
``(B, 1, *S)`` where ``S`` is ``(H, W)`` for 2D or ``(D, H, W)`` for 3D.

Randomness: all per-sample parameters come from a CPU ``torch.Generator``, so a
seed gives the same parameters whichever device the batch is on, and the firing
decisions are known on the host without a device synchronisation. The noise
voxels come from a second generator on the training device (CPU and CUDA noise
streams therefore differ for the same seed; the parameters do not).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

__all__ = [
    "AugmentationSettings",
    "AugmentationParameters",
    "BatchAugmenter",
    "blur_side_weight",
]

# Multiplier used to derive the noise generator's seed from the user seed. The
# two generators must not share a seed: on a CPU training device both would be
# the same Mersenne Twister stream, and the noise would be correlated with the
# parameter draws. Any odd 64-bit constant gives a bijection on seeds.
_NOISE_SEED_MULTIPLIER = 0x9E3779B97F4A7C15
_SEED_MODULUS = 2**64

_FLOATING_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AugmentationSettings:
    """Probabilities and parameter ranges of the augmentation recipe.

    Ranges are ``(low, high)`` and parameters are drawn uniformly from them per
    sample. Lists (as read from YAML) are accepted and stored as tuples.

    Raises:
        ValueError: a probability outside ``[0, 1]``, a range that is not two
            finite numbers with ``low <= high``, or a negative noise std, blur
            sigma or intensity scale. The message names the offending field.
    """

    flip_p: float = 0.5
    noise_p: float = 0.15
    noise_std: tuple[float, float] = (0.0, 0.33)
    blur_p: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    brightness_p: float = 0.15
    brightness_scale: tuple[float, float] = (0.7, 1.3)
    contrast_p: float = 0.15
    contrast_scale: tuple[float, float] = (0.65, 1.5)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_p"):
                self._check_probability(field.name, value)
            else:
                object.__setattr__(self, field.name, self._check_range(field.name, value))

    @staticmethod
    def _check_probability(name: str, value: object) -> None:
        if not _is_real_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"AugmentationSettings.{name} must be a probability in [0, 1], got {value!r}")

    @staticmethod
    def _check_range(name: str, value: object) -> tuple[float, float]:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"AugmentationSettings.{name} must be a (low, high) pair, got {value!r}")
        low, high = value
        if not (_is_real_number(low) and _is_real_number(high)) or not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"AugmentationSettings.{name} must hold two finite numbers, got {value!r}")
        if low > high:
            raise ValueError(f"AugmentationSettings.{name} must have low <= high, got {value!r}")
        # A negative std or sigma is meaningless, and a negative intensity scale
        # would invert the image (and swap the contrast clamp bounds): all
        # three are configuration typos rather than augmentations.
        if low < 0:
            raise ValueError(f"AugmentationSettings.{name} must be non-negative, got {value!r}")
        return (float(low), float(high))


def _is_real_number(value: object) -> bool:
    # bool is an int subclass; True as a probability is almost surely a typo.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class AugmentationParameters:
    """Per-sample parameters of one batch, as drawn by :meth:`BatchAugmenter.sample_parameters`.

    All tensors live on the CPU. ``B`` is the batch size and ``N`` the number of
    spatial dimensions. Every parameter is drawn for every sample, whether or
    not its transform fires, so the parameter stream advances by the same
    amount for every batch of a given size.

    Attributes:
        flip_mask: ``(B, N)`` bool; ``flip_mask[b, a]`` flips sample ``b`` along
            spatial axis ``a`` (tensor dimension ``a + 2``).
        noise_mask: ``(B,)`` bool; the sample gets Gaussian noise.
        noise_std: ``(B,)`` float32; noise standard deviation, image units.
        blur_mask: ``(B,)`` bool; the sample is blurred.
        blur_sigma: ``(B,)`` float32; Gaussian sigma in voxels, all axes.
        brightness_mask: ``(B,)`` bool; the sample is multiplied by its factor.
        brightness_factor: ``(B,)`` float32; multiplicative factor.
        contrast_mask: ``(B,)`` bool; the sample's contrast is scaled.
        contrast_factor: ``(B,)`` float32; multiplicative factor before the clamp.
    """

    flip_mask: torch.Tensor
    noise_mask: torch.Tensor
    noise_std: torch.Tensor
    blur_mask: torch.Tensor
    blur_sigma: torch.Tensor
    brightness_mask: torch.Tensor
    brightness_factor: torch.Tensor
    contrast_mask: torch.Tensor
    contrast_factor: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.flip_mask.shape[0]

    @property
    def spatial_dims(self) -> int:
        return self.flip_mask.shape[1]


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


class BatchAugmenter:
    """Applies the augmentation recipe to whole batches on the training device.

    Args:
        settings: probabilities and ranges.
        spatial_dims: 2 for ``(B, C, H, W)`` batches, 3 for ``(B, C, D, H, W)``.
        device: the device the batches live on; the noise generator lives there.
        seed: integer in ``[0, 2**64)``; seeds the CPU parameter generator
            directly and the device noise generator with a seed derived from it.

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, or ``seed`` out of range.
        TypeError: ``settings`` is not an :class:`AugmentationSettings`.

    Attributes:
        last_params: the :class:`AugmentationParameters` used by the latest
            ``__call__`` (None before the first), for logging and tests.
    """

    _STATE_KEYS = ("parameter_generator", "noise_generator")

    def __init__(self, settings: AugmentationSettings, spatial_dims: int, device: torch.device | str, seed: int):
        if not isinstance(settings, AugmentationSettings):
            raise TypeError(f"settings must be an AugmentationSettings, got {type(settings).__name__}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        # numbers.Integral admits NumPy integers (seeds often come from NumPy).
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < _SEED_MODULUS:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        seed = int(seed)
        self.settings = settings
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
        s = self.settings
        # One draw of fixed size per batch, in float64 so that `u < p` fires with
        # probability p to well below any test's resolution and p = 1 always
        # fires. Columns: N flip axes, then (fire, value) for noise, blur,
        # brightness and contrast.
        uniform = torch.rand(
            (batch_size, self.spatial_dims + 8), generator=self._parameter_generator, dtype=torch.float64
        )
        transform_columns = uniform[:, self.spatial_dims :]

        def fires(column: int, probability: float) -> torch.Tensor:
            return transform_columns[:, column] < probability

        def in_range(column: int, value_range: tuple[float, float]) -> torch.Tensor:
            low, high = value_range
            # The clamp only guards against a rounding of low + (high-low)*u
            # landing one ulp outside the range.
            values = (low + (high - low) * transform_columns[:, column]).clamp_(low, high)
            return values.to(torch.float32)

        return AugmentationParameters(
            flip_mask=uniform[:, : self.spatial_dims] < s.flip_p,
            noise_mask=fires(0, s.noise_p),
            noise_std=in_range(1, s.noise_std),
            blur_mask=fires(2, s.blur_p),
            blur_sigma=in_range(3, s.blur_sigma),
            brightness_mask=fires(4, s.brightness_p),
            brightness_factor=in_range(5, s.brightness_scale),
            contrast_mask=fires(6, s.contrast_p),
            contrast_factor=in_range(7, s.contrast_scale),
        )

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
        whose batch size and spatial dims must match the batch (ValueError).
        """
        self._check_batch(image, label)
        if parameters.batch_size != image.shape[0] or parameters.spatial_dims != self.spatial_dims:
            raise ValueError(
                f"parameters are for batch {parameters.batch_size} with {parameters.spatial_dims} spatial dims, "
                f"the batch is {image.shape[0]} with {self.spatial_dims}"
            )
        image_out, label_out = self._flip(image, label, parameters.flip_mask)

        # One host-to-device copy carries every per-sample scalar the intensity
        # steps need; non_blocking from pageable memory is safe (the source is
        # staged before the call returns) and avoids a stream synchronisation.
        per_sample_scalars = torch.stack(
            [
                parameters.noise_std,
                blur_side_weight(parameters.blur_sigma.double()).float(),
                parameters.brightness_factor,
                parameters.contrast_factor,
            ],
            dim=1,
        ).to(self.device, non_blocking=True)
        noise_std, blur_weight, brightness_factor, contrast_factor = per_sample_scalars.unbind(dim=1)
        broadcast_shape = (-1,) + (1,) * (image.dim() - 1)

        def add_noise(samples: torch.Tensor, rows: _Selection) -> torch.Tensor:
            # Drawn in float32 whatever the image dtype, so that the noise
            # stream of a seed does not depend on the dtype; the in-place add
            # computes in float32 and rounds once to the image dtype.
            noise = torch.randn(samples.shape, generator=self._noise_generator, device=self.device, dtype=torch.float32)
            noise.mul_(noise_std[rows].view(broadcast_shape))
            return samples.add_(noise)

        def blur(samples: torch.Tensor, rows: _Selection) -> torch.Tensor:
            # Three passes of multiply-adds would round three times per axis in
            # half precision; the firing subset is upcast to float32 instead.
            volume = samples.float() if samples.dtype in _FLOATING_LOW_PRECISION else samples
            side_weight = blur_weight[rows].view(broadcast_shape)
            for axis in range(2, image.dim()):
                volume = _blur_axis_reflect(volume, side_weight, axis)
            return volume

        def scale_brightness(samples: torch.Tensor, rows: _Selection) -> torch.Tensor:
            return samples.mul_(brightness_factor[rows].view(broadcast_shape))

        def scale_contrast(samples: torch.Tensor, rows: _Selection) -> torch.Tensor:
            # Bounds over all channels and voxels of the sample, as DLE and
            # Composer do: a per-channel clamp would change the relative
            # intensities of the MRI sequences, which the rest of the recipe
            # treats as one multichannel image. min/max are exact in any dtype.
            flat = samples.flatten(1)
            if flat.is_cuda:
                low, high = torch.aminmax(flat, dim=1)  # one pass instead of two
            else:
                # The CPU aminmax-along-dim kernel measured 15x slower than
                # amin + amax (2x4x64^3), which are vectorised reductions.
                low, high = flat.amin(dim=1), flat.amax(dim=1)
            samples.mul_(contrast_factor[rows].view(broadcast_shape))
            return samples.clamp_(min=low.view(broadcast_shape), max=high.view(broadcast_shape))

        self._update_firing(image_out, parameters.noise_mask, add_noise)
        self._update_firing(image_out, parameters.blur_mask, blur)
        self._update_firing(image_out, parameters.brightness_mask, scale_brightness)
        self._update_firing(image_out, parameters.contrast_mask, scale_contrast)
        return image_out, label_out

    def _flip(
        self, image: torch.Tensor, label: torch.Tensor, flip_mask: torch.Tensor
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
        pattern_codes = (flip_mask.long() << torch.arange(self.spatial_dims)).sum(dim=1)
        patterns = pattern_codes.unique().tolist()

        def flipped_dims(pattern: int) -> list[int]:
            return [axis + 2 for axis in range(self.spatial_dims) if pattern >> axis & 1]

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
                indices = selection.to(self.device, non_blocking=True)
                image_out.index_copy_(0, indices, flip_or_copy(image.index_select(0, indices), dims))
                label_out.index_copy_(0, indices, flip_or_copy(label.index_select(0, indices), dims))
        return image_out, label_out

    def _update_firing(
        self,
        batch: torch.Tensor,
        fire_mask: torch.Tensor,
        operation: Callable[[torch.Tensor, _Selection], torch.Tensor],
    ) -> None:
        """Apply ``operation`` to the firing samples of ``batch`` in place.

        ``operation(samples, rows)`` gets the firing samples (a view of
        ``batch`` when they are contiguous, else a gathered copy; either way it
        may modify them in place) and ``rows`` to index per-sample device
        tensors with; it returns the new values of those samples. Samples that
        do not fire cost nothing, and nothing runs when none fires.
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
        indices = selection.to(self.device, non_blocking=True)
        updated = operation(batch.index_select(0, indices), indices)
        batch.index_copy_(0, indices, updated.to(batch.dtype))

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
