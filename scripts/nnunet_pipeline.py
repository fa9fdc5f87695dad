"""nnU-Net v2's training augmentation two ways, for ``scripts/bench_transforms.py --set nnunet``:

* as nnU-Net's default trainer builds it (``nnUNetTrainer.get_training_transforms``, 3D, BraTS), with
  batchgeneratorsv2's transforms, one sample at a time on the CPU, from nnU-Net's larger initial patch
  (``get_patch_size``: the patch rotated by the largest angle about each axis, over the smallest scale
  0.85), as its data loader crops it;
* ours: the transforms ``configs/brats-nnunet.yaml`` trains with, batched, from the region
  ``builders.build_sampled_size`` crops.

Both leave out what follows the augmentation in nnU-Net (masking, regions, deep-supervision targets).
With ``all_fire`` every transform fires (probabilities 1), the worst case.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from unet_trainer.commands.builders import build_sampled_size, build_transforms
from unet_trainer.config.config import resolve_config
from unet_trainer.training.batch_transform import BatchTransform

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "brats-nnunet.yaml"
# nnU-Net's probabilities, in its order (ANCHORS.md, "nnU-Net v2 augmentation").
NNUNET_PROBABILITIES = {
    "noise": 0.1,
    "blur": 0.2,
    "brightness": 0.15,
    "contrast": 0.15,
    "low_resolution": 0.25,
    "inverted_gamma": 0.1,
    "gamma": 0.3,
}
OUR_PROBABILITY_KEYS = (
    "augmentation.noise.p",
    "augmentation.channel_blur.p",
    "augmentation.channel_brightness.p",
    "augmentation.channel_contrast.p",
    "augmentation.low_resolution.p",
    "augmentation.inverted_gamma.p",
    "augmentation.gamma.p",
    "augmentation.rotate_scale.p_rotation",
    "augmentation.rotate_scale.p_scale",
)


def nnunet_initial_patch(patch: tuple[int, ...], max_angle: float = math.pi / 6, smallest_scale: float = 0.85):
    """nnU-Net's initial patch for a 3D patch (batchgenerators' ``get_patch_size``): each axis the
    largest extent of the patch's corner rotated by ``max_angle`` about x, y or z, over ``smallest_scale``."""
    corner = np.asarray(patch, dtype=float)
    extent = corner.copy()
    c, s = math.cos(max_angle), math.sin(max_angle)
    rotations = (
        np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    )
    for rotation in rotations:
        extent = np.maximum(extent, np.abs(rotation @ corner))
    return tuple(int(v) for v in extent / smallest_scale)


def batchgenerators_pipeline(patch: tuple[int, ...], all_fire: bool):
    """nnU-Net v2's 3D training transforms (batchgeneratorsv2), as its default trainer composes them."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    def p(name: str) -> float:
        return 1.0 if all_fire else NNUNET_PROBABILITIES[name]

    spatial_p = 1.0 if all_fire else 0.2
    return ComposeTransforms(
        [
            SpatialTransform(
                patch,
                patch_center_dist_from_border=0,
                random_crop=False,
                p_elastic_deform=0,
                p_rotation=spatial_p,
                rotation=(-math.pi / 6, math.pi / 6),
                p_scaling=spatial_p,
                scaling=(0.7, 1.4),
                p_synchronize_scaling_across_axes=1,
                bg_style_seg_sampling=False,
            ),
            RandomTransform(
                GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True), p("noise")
            ),
            RandomTransform(
                GaussianBlurTransform(
                    blur_sigma=(0.5, 1.0),
                    synchronize_channels=False,
                    synchronize_axes=False,
                    p_per_channel=0.5,
                    benchmark=True,
                ),
                p("blur"),
            ),
            RandomTransform(
                MultiplicativeBrightnessTransform(
                    multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False, p_per_channel=1
                ),
                p("brightness"),
            ),
            RandomTransform(
                ContrastTransform(
                    contrast_range=BGContrast((0.75, 1.25)),
                    preserve_range=True,
                    synchronize_channels=False,
                    p_per_channel=1,
                ),
                p("contrast"),
            ),
            RandomTransform(
                SimulateLowResolutionTransform(
                    scale=(0.5, 1),
                    synchronize_channels=False,
                    synchronize_axes=True,
                    ignore_axes=None,
                    allowed_channels=None,
                    p_per_channel=0.5,
                ),
                p("low_resolution"),
            ),
            # Gamma on the inverted image, then plain.
            *(
                RandomTransform(
                    GammaTransform(
                        gamma=BGContrast((0.7, 1.5)),
                        p_invert_image=invert,
                        synchronize_channels=False,
                        p_per_channel=1,
                        p_retain_stats=1,
                    ),
                    p(name),
                )
                for name, invert in (("inverted_gamma", 1), ("gamma", 0))
            ),
            MirrorTransform(allowed_axes=(0, 1, 2)),
        ]
    )


def our_transforms(patch: tuple[int, ...], all_fire: bool) -> tuple[dict[str, BatchTransform], tuple[int, ...]]:
    """The transforms ``configs/brats-nnunet.yaml`` trains with for ``patch`` (every probability 1 with
    ``all_fire``), and the region the loader crops for them."""
    overrides = [f"data.patch_size={list(patch)}", "data.path=null"]
    if all_fire:
        overrides += [f"{key}=1" for key in OUR_PROBABILITY_KEYS]
    cfg = resolve_config(CONFIG, overrides)
    return build_transforms(cfg), tuple(build_sampled_size(cfg))
