"""nnU-Net's intensity transforms, per channel: ranges, BGContrast sampling, kept statistics, per-channel firing."""

from __future__ import annotations

import pytest
import torch

from unet_trainer.training.augment import AUGMENTATIONS, BatchAugmenter, recipe
from unet_trainer.training.intensity import (
    ChannelBlur,
    ChannelBrightness,
    ChannelContrast,
    ChannelDraw,
    Gamma,
    InvertedGamma,
    LowResolution,
    below_or_above_one,
    gamma_channels,
    gaussian_blur_channels,
    scale_contrast_channels,
)

NEW = ["channel_blur", "channel_brightness", "channel_contrast", "low_resolution", "inverted_gamma", "gamma"]


def _batch(seed=0, shape=(3, 4, 10, 11, 12)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 3 + 0.5, torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.uint8)


def _apply(transform, image, fires, values):
    draw = ChannelDraw(fires=fires, values=values)
    return transform.apply(image.clone(), torch.zeros(1), draw, transform.device_scalars(draw), torch.Generator())[0]


def test_appended_after_the_resampling_and_off_by_default():
    assert list(AUGMENTATIONS)[6:] == NEW
    image, label = _batch()
    everything_off = {name: transform for name, transform in recipe().items() if name in NEW}
    out, _ = BatchAugmenter(everything_off, 3, "cpu", seed=0)(image, label)
    assert torch.equal(out, image)


def test_bgcontrast_draws_half_below_and_half_above_one_within_the_range():
    generator = torch.Generator().manual_seed(0)
    side, uniform = torch.rand(20000, generator=generator, dtype=torch.float64), torch.rand(20000, dtype=torch.float64)
    values = below_or_above_one(side, uniform, (0.75, 1.25))
    assert values.min() >= 0.75 and values.max() <= 1.25
    assert abs((values < 1).double().mean().item() - 0.5) < 0.02
    assert (below_or_above_one(side, uniform, (1.1, 1.5)) >= 1.1).all()  # no "below" half when low >= 1


@pytest.mark.parametrize("transform", [Gamma(), InvertedGamma()])
def test_gamma_keeps_each_channel_s_mean_and_std(transform):
    image, _ = _batch()
    gammas = torch.tensor([[0.7, 1.5, 1.0, 1.2]]).repeat(3, 1)
    out = _apply(transform, image, torch.ones(3, 4, dtype=torch.bool), gammas[..., None])
    torch.testing.assert_close(out.flatten(2).mean(2), image.flatten(2).mean(2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.flatten(2).std(2), image.flatten(2).std(2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[:, 0], image[:, 0], atol=1e-3)  # gamma 0.7 changed the shape
    torch.testing.assert_close(out[:, 2], image[:, 2], atol=1e-5, rtol=1e-5)  # gamma 1 is the identity
    # The inverted gamma is the plain one on -x, negated back.
    torch.testing.assert_close(gamma_channels(image, gammas, True), -gamma_channels(-image, gammas, False))


def test_a_channel_that_does_not_fire_is_untouched_and_probabilities_hold():
    image, _ = _batch()
    fires = torch.tensor([[True, False, True, False], [False] * 4, [False, True, False, False]])
    for transform in (ChannelBrightness(), ChannelContrast(), Gamma(), ChannelBlur(), LowResolution()):
        values = torch.full((3, 4, transform.values_per_channel), 0.8)
        out = _apply(transform, image, fires, values)
        assert torch.equal(out[~fires], image[~fires]), type(transform).__name__
        assert not torch.equal(out[fires], image[fires]), type(transform).__name__
    draws = ChannelBlur(p=0.4, p_per_channel=0.5).draw(torch.rand(40000, 1 + 4 * 5, dtype=torch.float64))
    assert abs(draws.fires.double().mean().item() - 0.2) < 0.01
    assert draws.values.min() >= 0.5 and draws.values.max() <= 1.0


def test_brightness_and_contrast_follow_nnunet():
    image, _ = _batch()
    factors = torch.tensor([[0.75, 1.25, 1.0, 0.9]]).repeat(3, 1)
    assert torch.equal(
        ChannelBrightness().transform_channels(image, factors[..., None]), image * factors[..., None, None, None]
    )
    contrasted = scale_contrast_channels(image, factors)
    flat, before = contrasted.flatten(2), image.flatten(2)
    assert (flat.amin(2) >= before.amin(2)).all() and (flat.amax(2) <= before.amax(2)).all()
    torch.testing.assert_close(flat[:, 0].mean(1), before[:, 0].mean(1), atol=1e-5, rtol=1e-5)  # no clamp at 0.75
    torch.testing.assert_close(scale_contrast_channels(image, torch.ones(3, 4)), image)


def test_blur_is_a_normalised_gaussian_per_axis_and_the_identity_for_a_tiny_sigma():
    image, _ = _batch()
    sigmas = torch.tensor([0.5, 0.75, 1.0]).expand(3, 4, 3)
    blurred = gaussian_blur_channels(image, sigmas, radius=4)
    torch.testing.assert_close(blurred.mean(), image.mean(), atol=2e-3, rtol=0)  # reflection keeps the level
    assert blurred.std() < image.std()
    torch.testing.assert_close(gaussian_blur_channels(image, torch.full((3, 4, 3), 1e-3), 4), image)
    constant = torch.full((1, 1, 6, 7, 8), 2.5)
    torch.testing.assert_close(gaussian_blur_channels(constant, sigmas[:1, :1], 4), constant)


def test_low_resolution_at_zoom_one_is_the_identity_and_below_it_loses_detail():
    image, _ = _batch()
    fires = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(_apply(LowResolution(), image, fires, torch.ones(3, 4, 1)), image)
    out = _apply(LowResolution(), image, fires, torch.full((3, 4, 1), 0.5))
    assert out.shape == image.shape and (out - image).abs().mean() > 0.1
    # Down then up: at half the size, each 2-voxel block holds one value before the linear smoothing.
    assert out.flatten(2).std(2).mean() < image.flatten(2).std(2).mean()


@pytest.mark.parametrize("name", NEW)
def test_each_runs_in_the_augmenter_in_2d_and_3d(name):
    for spatial in ((9, 10, 11), (12, 13)):
        image, label = _batch(shape=(2, 3, *spatial))
        augmenter = BatchAugmenter({name: AUGMENTATIONS[name](p=1.0)}, len(spatial), "cpu", seed=4)
        out, out_label = augmenter(image, label)
        assert out.shape == image.shape and torch.equal(out_label, label) and not torch.equal(out, image)


def test_the_channel_kernels_compile_without_a_graph_break():
    image, _ = _batch(shape=(2, 3, 8, 8, 8))
    values = torch.rand(2, 3) + 0.5
    for function, arguments in (
        (gamma_channels, (image, values, True)),
        (scale_contrast_channels, (image, values)),
        (gaussian_blur_channels, (image, torch.rand(2, 3, 3) + 0.5, 4)),
    ):
        explanation = torch._dynamo.explain(function)(*arguments)
        assert explanation.graph_break_count == 0, function.__name__
