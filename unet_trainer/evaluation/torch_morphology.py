"""Binary morphology in torch, on whatever device the masks live (CPU or CUDA): the operations the
lesion-wise metrics and the postprocessing need, equal to their SciPy counterparts.

* :func:`label_components`: 26-connected components, numbered as ``scipy.ndimage.label`` numbers
  them (1..n in the raster order of each component's first voxel).
* :func:`dilate_18`: ``ndimage.binary_dilation`` with ``generate_binary_structure(3, 2)`` (the
  18-neighbourhood), ``iterations`` times, outside the volume background.
* :func:`component_boxes`: the bounding box of every label, as ``ndimage.find_objects``.

Labelling (why it converges fast on long thin shapes): every foreground voxel starts as its own
tree, its label its flat index. Each round, every voxel looks at the smallest label in its 3x3x3
neighbourhood (a separable min-filter of shifted slices), hooks the root of its
own tree under that label (``scatter_reduce`` with ``amin``), and then pointer jumping
(``parent = parent[parent]``) flattens every tree. Plain min-propagation needs as many rounds as
the longest path through a component (hundreds for a spiral); hooking roots merges whole trees at
once, so the rounds stay few. A component ends labelled by its smallest flat index, so sorting
the roots numbers the components in scipy's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _along(values: torch.Tensor, axis: int, combine, outside) -> torch.Tensor:
    """``combine`` of each voxel with its two neighbours along ``axis`` of a (D, H, W) tensor;
    beyond the volume's faces the neighbour is ``outside`` (padding that never wins). Shifted
    slices rather than pooling: pooling is slow on the CPU and cannot take int64 labels."""
    index = [slice(None)] * 3
    pad = [0] * 6
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1  # F.pad counts axes from the last
    padded = F.pad(values, pad, value=outside)
    index[axis] = slice(None, -2)
    lower = padded[tuple(index)]
    index[axis] = slice(2, None)
    upper = padded[tuple(index)]
    return combine(combine(values, lower), upper)


def _min_filter_3x3x3(values: torch.Tensor, outside: int) -> torch.Tensor:
    """The minimum over each voxel's 3x3x3 neighbourhood (itself included) of an int64 (D, H, W)
    tensor, ``outside`` beyond the volume's faces (at most 2**53: F.pad takes it as a double).
    Separable: one 1-D minimum per axis."""
    for axis in range(3):
        values = _along(values, axis, torch.minimum, outside)
    return values


def label_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """26-connected components of a boolean mask.

    Args:
        mask: bool (D, H, W) on any device.

    Returns:
        (labels int64 (D, H, W) on the mask's device, 0 background and 1..n the components
        numbered as ``scipy.ndimage.label`` numbers them; n).

    Raises:
        ValueError: the mask is not 3-D.
    """
    if mask.ndim != 3:
        raise ValueError(f"label_components needs a 3-D mask, got shape {tuple(mask.shape)}")
    mask = mask.bool()
    count = mask.numel()
    flat = mask.reshape(-1)
    foreground = flat.nonzero().squeeze(1)
    if len(foreground) == 0:
        return torch.zeros(mask.shape, dtype=torch.int64, device=mask.device), 0
    sentinel = count  # the label of background; larger than every voxel's index
    # int32 halves the memory traffic of the dense min-filter; indices must fit.
    dtype = torch.int32 if count < 2**31 - 1 else torch.int64
    parent = torch.full((count + 1,), sentinel, dtype=dtype, device=mask.device)
    parent[foreground] = foreground.to(dtype)
    while True:
        labels = parent[foreground]
        smallest = _min_filter_3x3x3(parent[:count].view(mask.shape), sentinel).reshape(-1)[foreground]
        if torch.equal(smallest, labels):  # no voxel sees a smaller label: each component is uniform
            break
        # Hook each root under the least label next to any voxel of its tree.
        parent.scatter_reduce_(0, labels.long(), smallest, reduce="amin")
        while True:  # pointer jumping, on the foreground only (background stays at the sentinel)
            pointers = parent[foreground]
            jumped = parent[pointers.long()]
            if torch.equal(jumped, pointers):
                break
            parent[foreground] = jumped
    roots, numbers = torch.unique(parent[foreground], sorted=True, return_inverse=True)
    out = torch.zeros(count, dtype=torch.int64, device=mask.device)
    out[foreground] = numbers + 1
    return out.view(mask.shape), len(roots)


def dilate_18(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``iterations`` binary dilations of a bool (D, H, W) mask by the 18-neighbourhood (the 3x3x3
    cube less its 8 corners: ``generate_binary_structure(3, 2)``); outside the volume is
    background. Returns bool (D, H, W) on the mask's device.

    The 18-neighbourhood is the union of the three 3x3 squares through the centre in the planes
    (z, y), (z, x) and (y, x), each a pair of 1-D dilations.
    """
    # F.pad pads uint8, not bool.
    x = mask.to(torch.uint8)
    for _ in range(iterations):
        along_z, along_y = _along(x, 0, torch.maximum, 0), _along(x, 1, torch.maximum, 0)
        zy, zx = _along(along_z, 1, torch.maximum, 0), _along(along_z, 2, torch.maximum, 0)
        x = torch.maximum(torch.maximum(zy, zx), _along(along_y, 2, torch.maximum, 0))
    return x.bool()


def component_boxes(labels: torch.Tensor, count: int) -> list[tuple[slice, ...]]:
    """The bounding box of each label 1..count of an integer (D, H, W) label map, as
    ``ndimage.find_objects`` gives them (every label must occur)."""
    voxels = labels.nonzero()
    if count == 0:
        return []
    ids = (labels[tuple(voxels.T)] - 1)[:, None].expand(-1, 3)
    lows = torch.full((count, 3), labels.numel(), dtype=voxels.dtype, device=labels.device)
    highs = torch.full((count, 3), -1, dtype=voxels.dtype, device=labels.device)
    lows.scatter_reduce_(0, ids, voxels, reduce="amin")
    highs.scatter_reduce_(0, ids, voxels, reduce="amax")
    pairs = torch.stack([lows, highs + 1], dim=-1).tolist()  # one copy to the host
    return [tuple(slice(a, b) for a, b in box) for box in pairs]


def bounding_box(mask: torch.Tensor) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of a bool (D, H, W) mask, or None when empty."""
    box = []
    for axis in range(mask.ndim):
        hits = mask.any(dim=tuple(a for a in range(mask.ndim) if a != axis)).nonzero()
        if len(hits) == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
