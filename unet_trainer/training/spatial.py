"""The spatial transforms: they move voxels, so they apply to the image and the label alike.

:class:`Flip`: each spatial axis flipped independently with ``p``. Shapes as in :mod:`.batch_transform`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.schema import Probability
from .batch_transform import BatchTransform, select_firing

__all__ = ["Flip", "FlipDraw"]


@dataclass(frozen=True)
class FlipDraw:
    """A batch's flips. ``axes``: ``(B, N)`` bool, ``axes[b, a]`` flips sample ``b`` along spatial axis ``a``."""

    axes: torch.Tensor


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
            selection = select_firing(pattern_codes == pattern)
            if isinstance(selection, slice):
                image_out[selection] = flip_or_copy(image[selection], dims)
                label_out[selection] = flip_or_copy(label[selection], dims)
            else:
                indices = selection.to(image.device, non_blocking=True)
                image_out.index_copy_(0, indices, flip_or_copy(image.index_select(0, indices), dims))
                label_out.index_copy_(0, indices, flip_or_copy(label.index_select(0, indices), dims))
        return image_out, label_out
