"""The contract of an augmentation transform, and what the per-sample ones share.

A transform is a frozen dataclass subclass of :class:`BatchTransform` whose fields are its settings,
annotated with the bounds of :mod:`unet_trainer.core.schema` (``Probability``, :data:`Range`), so the
config schema is derived from it (``schema.fields_of``) and its values are checked on construction
(:meth:`Field.check`, raising :class:`SettingError`). It says how many uniform numbers per sample it
consumes (``random_columns``), turns them into its parameters (``draw``), and applies them to a batch
(``apply``). One that fires per sample with a probability and one value from a range subclasses
:class:`PerSampleTransform` and writes only ``value_range`` and ``transform_samples``.

The transforms themselves are in :mod:`.spatial` (they move voxels: image and label) and :mod:`.intensity`
(image only); the recipe that orders them (``AUGMENTATIONS``) and the augmenter that draws their
parameters are in :mod:`.augment`. A new transform is a class in one of those two and its line at the end
of ``AUGMENTATIONS``.

Shapes: images are ``(B, C, *S)`` and labels ``(B, 1, *S)`` where ``S`` is ``(H, W)`` for 2D or
``(D, H, W)`` for 3D.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch

from ..core.schema import Field, FieldError, Setting, fields_of

__all__ = [
    "BatchTransform",
    "PerSampleTransform",
    "Range",
    "SUPPLIED_SETTINGS",
    "SampleDraw",
    "Selection",
    "SettingError",
    "per_sample",
    "select_firing",
]

# A (low, high) range a value is drawn from uniformly per sample; non-negative, since a negative
# std or sigma is meaningless and a negative intensity scale would invert the image (and swap the
# contrast clamp's bounds): all three are configuration typos rather than augmentations.
Range = Annotated[tuple[float, float], Setting(minimum=0.0)]

# What the builder hands a transform rather than the config: ``patch_size``, the spatial size of the
# patch a transform that changes the size returns (``data.patch_size``'s last N axes). Not settings:
# the config schema and the checks leave them out.
SUPPLIED_SETTINGS = ("patch_size",)


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
    settings = fields_of(transform, exclude=SUPPLIED_SETTINGS)
    return settings, frozenset(name for name in settings if hints.get(name) == Range)


@dataclass(frozen=True)
class SampleDraw:
    """A per-sample transform's parameters: ``fires`` ``(B,)`` bool, ``value`` ``(B,)`` float32 (every sample)."""

    fires: torch.Tensor
    value: torch.Tensor


class BatchTransform:
    """One step of the recipe. Subclasses are frozen dataclasses whose fields are their settings.

    The augmenter draws ``random_columns(N, C)`` uniform numbers in ``[0, 1)`` per sample for it, every
    batch, whether or not it fires (so the stream advances by the same amount for every batch of a
    given size), hands them to ``draw``, moves what ``device_scalars`` returns to the device, and
    calls ``apply``.

    Class attributes:
        modifies_in_place: ``apply`` may modify the image and label it is given (the augmenter then
            hands it tensors it owns); False for one that always returns new tensors (the flips).
        shares_recipe_draw: True only for the recipe's five original transforms, whose columns keep
            the one draw per batch that seeds have always meant. A new transform leaves it False:
            it then draws from its own generator (see :mod:`.augment`).

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

    def random_columns(self, spatial_dims: int, channels: int) -> int:
        """How many uniform numbers per sample ``draw`` consumes, for ``spatial_dims`` (2 or 3) and
        ``channels`` image channels (only a transform that draws per channel uses it)."""
        raise NotImplementedError

    def sampled_size(self, patch: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial size this transform needs as input to return ``patch``; the loader crops it.

        The same ``patch`` for every transform that keeps the size (the default); larger for one that
        resamples, so that it never reads outside what was cropped.
        """
        return patch

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


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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

    def random_columns(self, spatial_dims: int, channels: int) -> int:
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


# A selection of samples in a batch: a slice when the firing samples form one
# contiguous run (operations then work on a view, with no gather or scatter),
# otherwise their indices.
Selection = slice | torch.Tensor


def select_firing(mask: torch.Tensor) -> Selection | None:
    """Turn a CPU ``(B,)`` bool mask into a selection, or None when nothing fires."""
    indices = mask.nonzero().flatten()
    if indices.numel() == 0:
        return None
    first, last = int(indices[0]), int(indices[-1])
    if last - first + 1 == indices.numel():
        return slice(first, last + 1)
    return indices


def _update_firing(
    batch: torch.Tensor,
    fire_mask: torch.Tensor,
    operation: Callable[[torch.Tensor, Selection], torch.Tensor],
) -> None:
    """Apply ``operation`` to the firing samples of ``batch`` in place.

    ``operation(samples, rows)`` gets the firing samples (a view of ``batch`` when they are
    contiguous, else a gathered copy; either way it may modify them in place) and ``rows`` to
    index per-sample device tensors with; it returns the new values of those samples. Samples
    that do not fire cost nothing, and nothing runs when none fires.
    """
    selection = select_firing(fire_mask)
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
