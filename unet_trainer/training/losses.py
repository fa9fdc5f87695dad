"""Training losses: Dice + cross-entropy over classes, or Dice + BCE over a label scheme's regions.

Both take logits ``(B, K, *S)`` and class-index labels ``(B, 1, *S)`` (0 background, then the
scheme's classes; glioma: 1 necrotic core, 2 oedema, 3 enhancing). With deep supervision the model returns a list of
logits at decreasing resolutions; :class:`DeepSupervisionLoss` matches the target to each and
sums the losses with the model's normalised weights.

A loss declares what the model's outputs mean (:class:`OutputMode`, its ``output_mode``): the
evaluator, ``unet-predict`` and the ensembles read it from the loss a run trained with.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.schema import NonNegative
from ..data.schemes import DEFAULT_SCHEME, SCHEMES, LabelScheme

# Dice smoothing as in MONAI's defaults (smooth_nr = smooth_dr = 1e-5), so the values agree.
SMOOTH = 1e-5


class OutputMode(enum.Enum):
    """What a model's output channels mean, as its loss declares it (the value names it in messages).

    ``CLASSES``: one channel per label, softmax over them, the label is the argmax.
    ``REGIONS``: one channel per trained region of the scheme (the loss's ``regions``, in order),
    each a sigmoid; the label is built from the regions that are on.
    """

    CLASSES = "softmax classes"
    REGIONS = "sigmoid regions"


def labels_to_regions(
    labels: torch.Tensor, region_classes: Sequence[Sequence[int]] = SCHEMES[DEFAULT_SCHEME].trained_region_classes()
) -> torch.Tensor:
    """Class-index labels (B, 1, *S) -> float region masks (B, R, *S), one per entry of
    ``region_classes`` (each region's class indices, in output-channel order: a scheme's
    :meth:`~unet_trainer.data.schemes.LabelScheme.trained_region_classes`; glioma WT, TC, ET)."""
    return torch.cat(
        [torch.isin(labels, torch.tensor(members, device=labels.device)) for members in region_classes], dim=1
    ).float()


def _batch_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - mean over channels of the Dice computed over the batch and all voxels (MONAI batch=True)."""
    dims = [0] + list(range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """Softmax Dice (background excluded, batch-wise) + cross-entropy, as Composer and DLE train.

    Equals ``monai.losses.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
    batch=True)`` with the same weights (tested).
    """

    output_mode: ClassVar[OutputMode] = OutputMode.CLASSES

    def __init__(self, dice_weight: NonNegative = 1.0, ce_weight: NonNegative = 1.0):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *S) float; target (B, 1, *S) integer -> scalar loss (float32)."""
        logits = logits.float()
        labels = target[:, 0].long()
        ce = F.cross_entropy(logits, labels)
        probs = torch.softmax(logits, dim=1)[:, 1:]
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        return self.dice_weight * _batch_dice_loss(probs, onehot) + self.ce_weight * ce


class RegionDiceBCELoss(nn.Module):
    """nnU-Net's region mode: one sigmoid output per trained region of the label scheme (glioma: WT,
    TC, ET); batch Dice + binary cross-entropy.

    Args:
        dice_weight, bce_weight: the two terms' weights.
        scheme: the label scheme whose ``trained_regions`` the model predicts, in order (the
            builder supplies the data's).
    """

    output_mode: ClassVar[OutputMode] = OutputMode.REGIONS

    def __init__(
        self,
        dice_weight: NonNegative = 1.0,
        bce_weight: NonNegative = 1.0,
        scheme: LabelScheme = SCHEMES[DEFAULT_SCHEME],
    ):
        super().__init__()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight
        self.scheme = scheme
        self.regions = scheme.trained_regions  # the regions the output channels predict, in order
        self._region_classes = scheme.trained_region_classes()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, R, *S), R the scheme's trained regions; target (B, 1, *S) class indices -> scalar loss.

        Raises:
            ValueError: the model does not have one output per trained region (the message names them).
        """
        if logits.shape[1] != len(self.regions):
            raise ValueError(
                f"region loss needs {len(self.regions)} outputs ({', '.join(self.regions)}, the trained regions "
                f"of scheme {self.scheme.name}), got {logits.shape[1]}; set model.num_classes={len(self.regions)}"
            )
        logits = logits.float()
        regions = labels_to_regions(target, self._region_classes)
        bce = F.binary_cross_entropy_with_logits(logits, regions)
        return self.dice_weight * _batch_dice_loss(torch.sigmoid(logits), regions) + self.bce_weight * bce


def match_target(target: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Bring a label map (B, 1, *S) to an output's spatial size.

    A deep-supervision output at 1/k resolution gets the nearest-neighbour downsampled target;
    a smaller output from valid convolutions gets the centre crop (copy-and-crop geometry).
    """
    have = target.shape[2:]
    if tuple(have) == tuple(spatial):
        return target
    if all(h % s == 0 for h, s in zip(have, spatial)) and len({h // s for h, s in zip(have, spatial)}) == 1:
        step = have[0] // spatial[0]
        index = (slice(None), slice(None)) + tuple(slice(step // 2, None, step) for _ in spatial)
        return target[index]
    offsets = [(h - s) // 2 for h, s in zip(have, spatial)]
    index = (slice(None), slice(None)) + tuple(slice(o, o + s) for o, s in zip(offsets, spatial))
    return target[index]


class DeepSupervisionLoss(nn.Module):
    """Apply a loss to one output or to a list of deep-supervision outputs with weights.

    Args:
        loss: the per-output loss.
        weights: one weight per output (the model's ``deep_supervision_weights()``), normalised.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, match_target(target, outputs.shape[2:]))
        weights = self.weights or [1.0 / len(outputs)] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} deep-supervision outputs but {len(weights)} weights")
        # A zero weight (nnU-Net's lowest output) still multiplies its loss: every head stays in the
        # graph with a zero gradient, so DDP finds no unused parameter.
        return sum(w * self.loss(out, match_target(target, out.shape[2:])) for w, out in zip(weights, outputs))
