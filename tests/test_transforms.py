"""Tests for the batched on-device augmentation (unet_trainer.training: augment, batch_transform, spatial, intensity).

All tensors are tiny; the statistical tests use a few thousand samples of
4^3 voxels so the whole file stays within seconds on a shared CPU.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from unet_trainer.commands.builders import build_augmenter
from unet_trainer.config.config import augmentation_schema, defaults
from unet_trainer.config.engine import ConfigError, check_layer
from unet_trainer.core.schema import Field, Probability
from unet_trainer.training.augment import AUGMENTATIONS, AugmentationParameters, BatchAugmenter, recipe
from unet_trainer.training.batch_transform import BatchTransform, PerSampleTransform, Range, SampleDraw, SettingError
from unet_trainer.training.intensity import Brightness, Contrast, GaussianBlur, GaussianNoise
from unet_trainer.training.spatial import Flip, FlipDraw

TRANSFORM_NAMES = ("noise", "blur", "brightness", "contrast")  # the per-sample intensity transforms
ALL_NAMES = ("flip",) + TRANSFORM_NAMES


def settings_with_only(**enabled: float | dict) -> dict[str, BatchTransform]:
    """The recipe where every probability not named in ``enabled`` is 0.

    A value is the transform's probability, or a mapping of its settings (``{"p": 1.0, "std": (0.1, 1.0)}``).
    """
    sections = {name: {"p": 0.0} for name in ALL_NAMES}
    for name, value in enabled.items():
        sections[name] = dict(value) if isinstance(value, dict) else {"p": value}
    return recipe(**sections)


def always_fire_settings() -> dict[str, BatchTransform]:
    return recipe(**{name: {"p": 1.0} for name in ALL_NAMES})


def parameter_tensors(parameters: AugmentationParameters) -> dict[str, torch.Tensor]:
    """Every tensor of a batch's parameters, as "name.field" -> tensor."""
    return {
        f"{name}.{field.name}": getattr(draw, field.name)
        for name, draw in parameters.draws.items()
        for field in dataclasses.fields(draw)
    }


def binomial_tolerance(probability: float, trials: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(probability * (1.0 - probability) / trials)


def coordinate_image(batch: int, channels: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Image whose voxel value encodes its position: sum of index * 100**(axis from last)."""
    value = torch.zeros(spatial)
    for axis, size in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = size
        value = value + torch.arange(size, dtype=torch.float32).view(shape) * 100.0 ** (len(spatial) - 1 - axis)
    channel_offset = torch.arange(channels, dtype=torch.float32).view(channels, *([1] * len(spatial))) * 1e-2
    return (value + channel_offset).expand(batch, channels, *spatial).clone()


def random_batch(
    batch: int, channels: int, spatial: tuple[int, ...], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, channels, *spatial), generator=generator)
    label = torch.randint(0, 4, (batch, 1, *spatial), generator=generator)
    return image, label


# The recipe's five, then nnU-Net's transforms appended after them (off by default).
RECIPE = ["flip", "noise", "blur", "brightness", "contrast"]
NNUNET = ["rotate_scale", "channel_blur", "channel_brightness", "channel_contrast", "low_resolution"]
NNUNET += ["inverted_gamma", "gamma"]


def hand_made_parameters(
    batch: int, spatial_dims: int, channels: int = 2, **overrides: FlipDraw | SampleDraw
) -> AugmentationParameters:
    """Parameters of the recipe where nothing fires, all factors 1 (noise std 0.1), unless overridden by name;
    the appended transforms drawn from uniforms of 1, where nothing fires."""
    nothing = torch.zeros(batch, dtype=torch.bool)
    ones = torch.ones(batch)
    draws = dict(
        flip=FlipDraw(axes=torch.zeros(batch, spatial_dims, dtype=torch.bool)),
        noise=SampleDraw(fires=nothing, value=ones * 0.1),
        blur=SampleDraw(fires=nothing, value=ones),
        brightness=SampleDraw(fires=nothing, value=ones),
        contrast=SampleDraw(fires=nothing, value=ones),
    )
    for name in NNUNET:
        transform = AUGMENTATIONS[name]()
        draws[name] = transform.draw(torch.ones(batch, transform.random_columns(spatial_dims, channels)))
    draws.update(overrides)
    return AugmentationParameters(batch, spatial_dims, draws, channels)


def reference_blur(sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """Full (non-separable) convolution with the outer-product 3-tap Gaussian, reflect padding.

    sample: (C, *S) with S of length 2 or 3. Computed in float64.
    """
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2.0 * sigma**2))
    taps = taps / taps.sum()
    spatial_dims = sample.dim() - 1
    channels = sample.shape[0]
    if spatial_dims == 3:
        kernel = torch.einsum("i,j,k->ijk", taps, taps, taps)
        padded = F.pad(sample.double().unsqueeze(0), (1, 1, 1, 1, 1, 1), mode="reflect")
        weight = kernel.expand(channels, 1, 3, 3, 3)
        return F.conv3d(padded, weight, groups=channels).squeeze(0)
    kernel = torch.outer(taps, taps)
    padded = F.pad(sample.double().unsqueeze(0), (1, 1, 1, 1), mode="reflect")
    weight = kernel.expand(channels, 1, 3, 3)
    return F.conv2d(padded, weight, groups=channels).squeeze(0)


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "transform, field_name, bad_value",
    [
        (Flip, "p", 1.5),
        (GaussianNoise, "p", -0.1),
        (GaussianBlur, "p", float("nan")),
        (Contrast, "p", True),
        (GaussianNoise, "std", (0.3, 0.1)),
        (GaussianNoise, "std", (-0.1, 0.3)),
        (GaussianBlur, "sigma", (-0.5, 1.5)),
        (GaussianBlur, "sigma", (0.5, float("inf"))),
        (Brightness, "scale", (0.7,)),
        (Brightness, "scale", (1.3, 0.7)),
        (Contrast, "scale", "wide"),
        (Contrast, "scale", (-1.0, 1.0)),
    ],
)
def test_settings_reject_invalid_values_naming_the_field(transform, field_name, bad_value):
    with pytest.raises(ValueError, match=rf"{transform.__name__}\.{field_name} must be") as raised:
        transform(**{field_name: bad_value})
    assert isinstance(raised.value, SettingError) and raised.value.setting == field_name
    assert "\n" not in str(raised.value)


def test_settings_accept_lists_and_store_tuples():
    noise, flip = GaussianNoise(std=[0.0, 0.2]), Flip(p=1)
    assert noise.std == (0.0, 0.2)
    assert isinstance(noise.std, tuple)
    assert flip.p == 1.0
    hash(noise)  # frozen dataclass with tuples stays hashable


def test_augmenter_rejects_bad_construction_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        BatchAugmenter(recipe(), 4, "cpu", 0)
    with pytest.raises(ValueError, match="seed"):
        BatchAugmenter(recipe(), 3, "cpu", -1)
    with pytest.raises(TypeError, match="transforms"):
        BatchAugmenter({"flip": 0.5}, 3, "cpu", 0)
    with pytest.raises(TypeError, match="transforms"):
        BatchAugmenter([Flip()], 3, "cpu", 0)
    with pytest.raises(KeyError, match="no augmentation named elastic"):  # gamma is one now
        recipe(elastic={"p": 0.3})


# ---------------------------------------------------------------------- statistics


def test_parameters_fire_at_their_probability_and_stay_in_range():
    # Distinct probabilities and ranges per transform, so swapped fields fail.
    settings = recipe(
        flip={"p": 0.5},
        noise={"p": 0.1, "std": (0.05, 0.33)},
        blur={"p": 0.2, "sigma": (0.5, 1.5)},
        brightness={"p": 0.3, "scale": (0.7, 1.3)},
        contrast={"p": 0.4, "scale": (0.65, 1.5)},
    )
    augmenter = BatchAugmenter(settings, 3, "cpu", seed=11)
    draws = [augmenter.sample_parameters(500) for _ in range(8)]
    samples = 4000

    flip_mask = torch.cat([d["flip"].axes for d in draws])
    assert flip_mask.shape == (samples, 3)
    for axis in range(3):
        rate = flip_mask[:, axis].double().mean().item()
        assert abs(rate - 0.5) < binomial_tolerance(0.5, samples), (axis, rate)
    # Axes are drawn independently: all-three-flipped happens 1/8 of the time.
    all_axes_rate = flip_mask.all(dim=1).double().mean().item()
    assert abs(all_axes_rate - 0.125) < binomial_tolerance(0.125, samples)

    for name, probability, (low, high) in [
        ("noise", 0.1, settings["noise"].std),
        ("blur", 0.2, settings["blur"].sigma),
        ("brightness", 0.3, settings["brightness"].scale),
        ("contrast", 0.4, settings["contrast"].scale),
    ]:
        mask = torch.cat([d[name].fires for d in draws])
        values = torch.cat([d[name].value for d in draws])
        assert mask.dtype == torch.bool and mask.shape == (samples,)
        rate = mask.double().mean().item()
        assert abs(rate - probability) < binomial_tolerance(probability, samples), (name, rate)
        assert values.min().item() >= low and values.max().item() <= high, name
        # Uniform on [low, high]: mean within 4 standard errors of the midpoint.
        standard_error = (high - low) / math.sqrt(12 * samples)
        assert abs(values.double().mean().item() - (low + high) / 2) < 4 * standard_error, name


def test_parameters_are_drawn_independently():
    # Every fire decision and value comes from its own uniform draw: reusing one
    # draw for two parameters would correlate them perfectly.
    augmenter = BatchAugmenter(recipe(), 3, "cpu", seed=12)
    draws = [augmenter.sample_parameters(500) for _ in range(8)]
    columns = [torch.cat([d["flip"].axes for d in draws]).double().T]
    for name in TRANSFORM_NAMES:
        for field in ("fires", "value"):
            columns.append(torch.cat([getattr(d[name], field) for d in draws]).double().unsqueeze(0))
    assert len(columns) == 1 + 8
    correlation = torch.corrcoef(torch.cat(columns))
    off_diagonal = correlation - torch.eye(correlation.shape[0], dtype=correlation.dtype)
    # Null standard error of a correlation is 1/sqrt(N) = 0.016 for N = 4000.
    assert off_diagonal.abs().max().item() < 4 / math.sqrt(4000)


@pytest.mark.parametrize("name", TRANSFORM_NAMES)
def test_each_transform_changes_exactly_the_samples_it_fires_on(name):
    probability = 0.3
    augmenter = BatchAugmenter(settings_with_only(**{name: probability}), 3, "cpu", seed=5)
    changed, fired = [], []
    for batch_index in range(4):
        image, label = random_batch(500, 1, (4, 4, 4), seed=batch_index)
        out_image, out_label = augmenter(image, label)
        changed.append((out_image != image).flatten(1).any(dim=1))
        fired.append(augmenter.last_params[name].fires)
        assert torch.equal(out_label, label)  # intensity transforms never touch the label
    changed, fired = torch.cat(changed), torch.cat(fired)
    assert torch.equal(changed, fired)
    rate = changed.double().mean().item()
    assert abs(rate - probability) < binomial_tolerance(probability, changed.numel())


def test_flips_fire_per_axis_at_their_probability_in_the_output():
    spatial = (4, 5, 6)
    augmenter = BatchAugmenter(settings_with_only(flip=0.5), 3, "cpu", seed=9)
    observed, drawn = [], []
    for _ in range(4):
        image = coordinate_image(500, 1, spatial)
        label = torch.zeros((500, 1, *spatial), dtype=torch.long)
        out_image, _ = augmenter(image, label)
        corner = out_image[:, 0, 0, 0, 0].round().long()
        # Digit k of the corner value is the source index along axis k.
        source_index = torch.stack([corner // 10000, corner // 100 % 100, corner % 100], dim=1)
        observed.append(source_index == torch.tensor(spatial) - 1)
        drawn.append(augmenter.last_params["flip"].axes)
    observed, drawn = torch.cat(observed), torch.cat(drawn)
    assert torch.equal(observed, drawn)
    for axis in range(3):
        rate = observed[:, axis].double().mean().item()
        assert abs(rate - 0.5) < binomial_tolerance(0.5, observed.shape[0])


# ---------------------------------------------------------------------- flips


@pytest.mark.parametrize("spatial", [(5, 6, 7), (6, 7)])
def test_flips_keep_image_and_label_aligned(spatial):
    batch = 32
    augmenter = BatchAugmenter(settings_with_only(flip=0.5), len(spatial), "cpu", seed=3)
    image = coordinate_image(batch, 2, spatial)
    # The label is a function of the voxel's coordinates, hence of the image.
    label = (image[:, :1].round().long() % 7).to(torch.uint8)
    out_image, out_label = augmenter(image, label)
    assert torch.equal(out_label.long(), out_image[:, :1].round().long() % 7)
    for sample in range(batch):
        dims = [axis + 1 for axis in range(len(spatial)) if augmenter.last_params["flip"].axes[sample, axis]]
        assert torch.equal(out_image[sample], image[sample].flip(dims))
        assert torch.equal(out_label[sample], label[sample].flip(dims))
    # A batch of 32 with 2-3 axes at p=0.5 has several flip patterns, so the
    # grouped path (not the single-pattern shortcut) is what ran.
    assert augmenter.last_params["flip"].axes.unique(dim=0).shape[0] > 1


@pytest.mark.parametrize("firing_samples", [[1, 2], [0, 2], [0, 1, 2, 3]])
def test_flip_with_contiguous_and_scattered_groups(firing_samples):
    image, label = random_batch(4, 2, (4, 5, 6))
    flip_mask = torch.zeros(4, 3, dtype=torch.bool)
    flip_mask[firing_samples, 1] = True
    augmenter = BatchAugmenter(recipe(), 3, "cpu", seed=0)
    out_image, out_label = augmenter.apply(image, label, hand_made_parameters(4, 3, flip=FlipDraw(flip_mask)))
    for sample in range(4):
        # Spatial axis 1 is dimension 2 of a single (C, D, H, W) sample.
        dims = [2] if sample in firing_samples else []
        assert torch.equal(out_image[sample], image[sample].flip(dims))
        assert torch.equal(out_label[sample], label[sample].flip(dims))


# ---------------------------------------------------------------------- blur


@pytest.mark.parametrize("spatial", [(6, 7, 8), (2, 5, 9), (9, 10), (2, 7)])
def test_blur_equals_reference_full_convolution(spatial):
    image, label = random_batch(4, 2, spatial, seed=1)
    augmenter = BatchAugmenter(settings_with_only(blur=1.0), len(spatial), "cpu", seed=4)
    out_image, _ = augmenter(image, label)
    sigmas = augmenter.last_params["blur"].value
    for sample in range(4):
        expected = reference_blur(image[sample], sigmas[sample].item()).float()
        torch.testing.assert_close(out_image[sample], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("firing_samples", [[1], [0, 2], [1, 2]])
def test_blur_touches_only_firing_samples(firing_samples):
    image, label = random_batch(4, 1, (5, 6, 7), seed=2)
    blur_mask = torch.zeros(4, dtype=torch.bool)
    blur_mask[firing_samples] = True
    sigmas = torch.tensor([0.6, 0.9, 1.2, 1.4])
    parameters = hand_made_parameters(4, 3, blur=SampleDraw(fires=blur_mask, value=sigmas))
    augmenter = BatchAugmenter(recipe(), 3, "cpu", seed=0)
    out_image, _ = augmenter.apply(image, label, parameters)
    for sample in range(4):
        if sample in firing_samples:
            expected = reference_blur(image[sample], sigmas[sample].item()).float()
            torch.testing.assert_close(out_image[sample], expected, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out_image[sample], image[sample])


def test_blur_of_bfloat16_rounds_once():
    # The blur runs in float32 on half-precision input, so each output voxel is
    # the exact result rounded once to bfloat16 (unit roundoff 2**-8); computing in
    # bfloat16 itself rounds after every multiply-add and misses this bound.
    image, label = random_batch(4, 2, (8, 8, 8), seed=5)
    image = image.bfloat16()
    augmenter = BatchAugmenter(settings_with_only(blur=1.0), 3, "cpu", seed=4)
    out_image, _ = augmenter(image, label)
    assert out_image.dtype == torch.bfloat16
    sigmas = augmenter.last_params["blur"].value
    for sample in range(4):
        expected = reference_blur(image[sample].float(), sigmas[sample].item()).float()
        error = (out_image[sample].float() - expected).abs()
        assert (error <= expected.abs() * 2**-8 + 1e-6).all()


# ---------------------------------------------------------------------- intensity


def test_contrast_clamps_each_sample_to_its_own_range():
    image, label = random_batch(16, 3, (4, 4, 4), seed=3)
    image = image * torch.linspace(0.5, 4.0, 16).view(16, 1, 1, 1, 1)  # a different range per sample
    settings = settings_with_only(contrast={"p": 1.0, "scale": (0.5, 2.0)})
    augmenter = BatchAugmenter(settings, 3, "cpu", seed=8)
    out_image, _ = augmenter(image, label)
    factors = augmenter.last_params["contrast"].value
    assert (factors > 1.2).any() and (factors < 0.8).any()
    for sample in range(16):
        low, high = image[sample].min(), image[sample].max()
        assert out_image[sample].min() >= low and out_image[sample].max() <= high
        expected = (image[sample] * factors[sample]).clamp(low, high)
        torch.testing.assert_close(out_image[sample], expected, atol=0, rtol=0)
    # A factor above 1 pushes the extremes out, so the clamp must have bitten.
    strongest = factors.argmax()
    assert out_image[strongest].max() == image[strongest].max()


@pytest.mark.parametrize("firing_samples", [[2], [0, 3], [0, 1, 2, 3]])
def test_brightness_multiplies_firing_samples(firing_samples):
    image, label = random_batch(4, 2, (4, 4, 4))
    brightness_mask = torch.zeros(4, dtype=torch.bool)
    brightness_mask[firing_samples] = True
    factors = torch.tensor([0.7, 0.9, 1.1, 1.3])
    parameters = hand_made_parameters(4, 3, brightness=SampleDraw(fires=brightness_mask, value=factors))
    out_image, _ = BatchAugmenter(recipe(), 3, "cpu", seed=0).apply(image, label, parameters)
    for sample in range(4):
        factor = factors[sample] if sample in firing_samples else 1.0
        torch.testing.assert_close(out_image[sample], image[sample] * factor, atol=0, rtol=0)


def test_noise_has_the_drawn_standard_deviation():
    settings = settings_with_only(noise={"p": 1.0, "std": (0.1, 1.0)})
    augmenter = BatchAugmenter(settings, 3, "cpu", seed=6)
    image = torch.full((6, 1, 16, 16, 16), 2.0)
    out_image, _ = augmenter(image, torch.zeros((6, 1, 16, 16, 16), dtype=torch.long))
    noise = (out_image - image).flatten(1)
    drawn = augmenter.last_params["noise"].value
    # 4096 voxels: the sample std has a relative standard error of about 1.1 %.
    torch.testing.assert_close(noise.std(dim=1), drawn, rtol=0.05, atol=0)
    assert (noise.mean(dim=1).abs() < 4 * drawn / 64).all()
    # Independent noise per sample, not one field scaled per sample.
    normalised = noise / drawn.view(-1, 1)
    assert not torch.allclose(normalised[0], normalised[1], atol=0.1)


# ---------------------------------------------------------------------- randomness


def test_same_seed_same_output_other_seed_different():
    image, label = random_batch(8, 2, (8, 8, 8))

    def run(seed: int) -> list[torch.Tensor]:
        augmenter = BatchAugmenter(recipe(noise={"p": 0.5}, blur={"p": 0.5}), 3, "cpu", seed=seed)
        return [t for _ in range(3) for t in augmenter(image, label)]

    first, again, other = run(123), run(123), run(124)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_noise_stream_depends_on_the_seed():
    image, label = random_batch(2, 1, (6, 6, 6))
    parameters = hand_made_parameters(
        2, 3, noise=SampleDraw(fires=torch.ones(2, dtype=torch.bool), value=torch.full((2,), 0.1))
    )
    first = BatchAugmenter(recipe(), 3, "cpu", seed=1).apply(image, label, parameters)[0]
    again = BatchAugmenter(recipe(), 3, "cpu", seed=1).apply(image, label, parameters)[0]
    other = BatchAugmenter(recipe(), 3, "cpu", seed=2).apply(image, label, parameters)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_state_dict_round_trip_continues_the_stream_exactly():
    image, label = random_batch(6, 2, (6, 6, 6))
    # Noise always fires, so the device generator's state matters too.
    settings = recipe(noise={"p": 1.0}, blur={"p": 0.5}, brightness={"p": 0.5}, contrast={"p": 0.5})
    augmenter = BatchAugmenter(settings, 3, "cpu", seed=21)
    for _ in range(2):
        augmenter(image, label)
    buffer = io.BytesIO()
    torch.save(augmenter.state_dict(), buffer)
    recorded = [augmenter(image, label) for _ in range(3)]

    buffer.seek(0)
    restored = BatchAugmenter(settings, 3, "cpu", seed=999)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    replayed = [restored(image, label) for _ in range(3)]
    for (image_a, label_a), (image_b, label_b) in zip(recorded, replayed):
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)


def test_load_state_dict_rejects_wrong_keys():
    augmenter = BatchAugmenter(recipe(), 3, "cpu", seed=0)
    state = augmenter.state_dict()
    del state["noise_generator"]
    with pytest.raises(KeyError, match="noise_generator"):
        augmenter.load_state_dict(state)


# ---------------------------------------------------------------------- shapes, dtypes, inputs


@pytest.mark.parametrize("spatial", [(16, 16, 16), (8, 12, 10), (32, 32), (16, 24)])
@pytest.mark.parametrize("settings", [recipe(), always_fire_settings()], ids=["default", "always"])
def test_shapes_dtypes_and_inputs_left_untouched(spatial, settings):
    image, label = random_batch(3, 4, spatial)
    label = label.to(torch.uint8)
    image_before, label_before = image.clone(), label.clone()
    augmenter = BatchAugmenter(settings, len(spatial), "cpu", seed=1)
    for _ in range(3):
        out_image, out_label = augmenter(image, label)
        assert out_image.shape == image.shape and out_image.dtype == image.dtype
        assert out_label.shape == label.shape and out_label.dtype == label.dtype
        assert out_image.is_contiguous() and out_label.is_contiguous()
        assert out_image.data_ptr() != image.data_ptr() and out_label.data_ptr() != label.data_ptr()
    assert torch.equal(image, image_before) and torch.equal(label, label_before)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_matches_float32(dtype, tolerance):
    image, label = random_batch(4, 2, (8, 8, 8))
    outputs = {}
    for run_dtype in (torch.float32, dtype):
        augmenter = BatchAugmenter(always_fire_settings(), 3, "cpu", seed=2)
        out_image, out_label = augmenter(image.to(run_dtype), label)
        assert out_image.dtype == run_dtype
        outputs[run_dtype] = (out_image, out_label)
    torch.testing.assert_close(outputs[dtype][0].float(), outputs[torch.float32][0], atol=tolerance, rtol=tolerance)
    assert torch.equal(outputs[dtype][1], outputs[torch.float32][1])


def test_rejects_malformed_batches():
    augmenter = BatchAugmenter(recipe(), 3, "cpu", seed=0)
    image, label = random_batch(2, 4, (4, 4, 4))
    with pytest.raises(ValueError, match="spatial dims"):
        augmenter(image[:, :, 0], label[:, :, 0])
    with pytest.raises(TypeError, match="floating"):
        augmenter(image.long(), label)
    with pytest.raises(TypeError, match="label"):
        augmenter(image, label.float())
    with pytest.raises(ValueError, match="label must have shape"):
        augmenter(image, label.expand(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="meta"):
        augmenter(image.to("meta"), label.to("meta"))
    with pytest.raises(ValueError, match="parameters"):
        augmenter.apply(image, label, augmenter.sample_parameters(3))
    with pytest.raises(ValueError, match="parameters are for transforms flip, noise"):
        parameters = augmenter.sample_parameters(2)
        augmenter.apply(image, label, AugmentationParameters(2, 3, {k: parameters[k] for k in ("flip", "noise")}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_same_parameters_as_cpu():
    image, label = random_batch(4, 2, (8, 8, 8))
    # No noise: its stream is per device (with the default noise_p = 0.15, seed 7 adds noise to
    # the second sample of the first batch, so the CUDA image would differ from the CPU one).
    settings = recipe(noise={"p": 0.0}, blur={"p": 0.5}, brightness={"p": 0.5}, contrast={"p": 0.5})
    cpu = BatchAugmenter(settings, 3, "cpu", seed=7)
    cuda = BatchAugmenter(settings, 3, "cuda", seed=7)
    for _ in range(3):
        cpu_image, cpu_label = cpu(image, label)
        cuda_image, cuda_label = cuda(image.cuda(), label.cuda())
        cpu_parameters, cuda_parameters = parameter_tensors(cpu.last_params), parameter_tensors(cuda.last_params)
        assert list(cpu_parameters) == list(cuda_parameters) and len(cpu_parameters) == 9
        for name, tensor in cpu_parameters.items():
            assert torch.equal(tensor, cuda_parameters[name]), name
        torch.testing.assert_close(cuda_image.cpu(), cpu_image, atol=1e-5, rtol=1e-5)
        assert torch.equal(cuda_label.cpu(), cpu_label)


# ---------------------------------------------------------------------- the list: appending a transform


@dataclass(frozen=True)
class Offset(PerSampleTransform):
    """A throwaway transform for these tests: adds ``U(shift)`` to the firing samples.

    All it takes is this class; the registry line is ``AUGMENTATIONS["offset"] = Offset``.
    """

    p: Probability = 0.5
    shift: Range = (0.0, 1.0)

    @property
    def value_range(self) -> tuple[float, float]:
        return self.shift

    def transform_samples(self, samples, scalar, noise_generator):
        return samples.add_(scalar.view(-1, *([1] * (samples.dim() - 1))))


def with_offset(transforms: dict[str, BatchTransform], offset: BatchTransform) -> dict[str, BatchTransform]:
    return {**transforms, "offset": offset}


@pytest.mark.parametrize("spatial", [(6, 6, 6), (8, 8)])
def test_an_appended_transform_leaves_the_recipe_s_draws_and_outputs_for_a_seed_unchanged(spatial):
    image, label = random_batch(6, 2, spatial)
    settings = recipe(noise={"p": 0.5}, blur={"p": 0.5}, brightness={"p": 0.5}, contrast={"p": 0.5})
    alone = BatchAugmenter(settings, len(spatial), "cpu", seed=31)
    never = BatchAugmenter(with_offset(settings, Offset(p=0.0)), len(spatial), "cpu", seed=31)
    always = BatchAugmenter(with_offset(settings, Offset(p=1.0)), len(spatial), "cpu", seed=31)
    for _ in range(3):  # batches after the first too: the parameter stream must not shift
        expected_image, expected_label = alone(image, label)
        for augmenter in (never, always):
            out_image, out_label = augmenter(image, label)
            recipe_parameters = parameter_tensors(augmenter.last_params)
            offset_fires = recipe_parameters.pop("offset.fires")
            offset_value = recipe_parameters.pop("offset.value")
            assert recipe_parameters.keys() == parameter_tensors(alone.last_params).keys()
            for name, tensor in parameter_tensors(alone.last_params).items():
                assert torch.equal(recipe_parameters[name], tensor), name
            assert torch.equal(out_label, expected_label)
            if augmenter is never:
                assert not offset_fires.any()
                assert torch.equal(out_image, expected_image)
            else:
                assert offset_fires.all()
                # It runs last, on the recipe's output.
                shift = offset_value.view(-1, *([1] * (image.dim() - 1)))
                assert torch.equal(out_image, expected_image + shift)


def test_a_transform_joining_the_recipe_s_draw_would_change_the_seed_s_values():
    # Why an appended transform draws from its own generator: one row-major draw per batch cannot
    # grow without moving the values of every sample after the first, and of every later batch.
    @dataclass(frozen=True)
    class SharedOffset(Offset):
        shares_recipe_draw = True

    alone = BatchAugmenter(recipe(), 3, "cpu", seed=31)
    joined = BatchAugmenter(with_offset(recipe(), SharedOffset()), 3, "cpu", seed=31)
    first_alone, first_joined = alone.sample_parameters(4), joined.sample_parameters(4)
    # The first sample's columns come first in both draws; the second sample's do not.
    assert torch.equal(first_alone["flip"].axes[0], first_joined["flip"].axes[0])
    assert not torch.equal(first_alone["contrast"].value[1:], first_joined["contrast"].value[1:])


def test_an_appended_transform_fires_at_its_probability_independently_of_the_recipe():
    augmenter = BatchAugmenter(with_offset(recipe(), Offset(p=0.3, shift=(0.2, 0.6))), 3, "cpu", seed=13)
    draws = [augmenter.sample_parameters(500) for _ in range(8)]
    fires = torch.cat([d["offset"].fires for d in draws])
    values = torch.cat([d["offset"].value for d in draws])
    assert abs(fires.double().mean().item() - 0.3) < binomial_tolerance(0.3, 4000)
    assert values.min().item() >= 0.2 and values.max().item() <= 0.6
    assert abs(values.double().mean().item() - 0.4) < 4 * 0.4 / math.sqrt(12 * 4000)
    # Fresh values every batch, uncorrelated with the recipe's columns and with each other.
    assert not torch.equal(draws[0]["offset"].value, draws[1]["offset"].value)
    columns = torch.cat(
        [
            torch.cat([d["flip"].axes for d in draws]).double().T,
            *[
                torch.cat([getattr(d[name], field) for d in draws]).double().unsqueeze(0)
                for name in (*TRANSFORM_NAMES, "offset")
                for field in ("fires", "value")
            ],
        ]
    )
    correlation = torch.corrcoef(columns)
    off_diagonal = correlation - torch.eye(correlation.shape[0], dtype=correlation.dtype)
    assert off_diagonal.abs().max().item() < 4 / math.sqrt(4000)


def test_an_appended_transform_keeps_the_state_format_and_resumes_exactly():
    image, label = random_batch(6, 2, (6, 6, 6))
    transforms = with_offset(recipe(noise={"p": 1.0}), Offset(p=0.5))
    augmenter = BatchAugmenter(transforms, 3, "cpu", seed=21)
    augmenter(image, label)
    state = augmenter.state_dict()
    assert set(state) == {"parameter_generator", "noise_generator"}
    recorded = [augmenter(image, label) for _ in range(3)]
    restored = BatchAugmenter(transforms, 3, "cpu", seed=999)
    restored.load_state_dict(state)
    for expected, (out_image, out_label) in zip(recorded, (restored(image, label) for _ in range(3))):
        assert torch.equal(out_image, expected[0]) and torch.equal(out_label, expected[1])


def test_an_appended_transform_gets_a_config_section_and_a_builder_from_its_registry_line(monkeypatch):
    monkeypatch.setitem(AUGMENTATIONS, "offset", Offset)  # the one registry line
    schema = augmentation_schema()
    assert list(schema) == ["enabled", *RECIPE, *NNUNET, "offset"]
    assert schema["offset"] == {
        "p": Field("float", 0.5, minimum=0.0, maximum=1.0),
        "shift": Field("float_list", [0.0, 1.0], length=2, minimum=0.0),
    }
    layer = check_layer({"augmentation": {"offset": {"p": 0.25}}}, "x.yaml", {"augmentation": schema})
    assert layer == {"augmentation": {"offset": {"p": 0.25}}}
    with pytest.raises(ConfigError, match=r"^x.yaml: 'augmentation.offset.shift' = \[-1, 1\] is not a list"):
        check_layer({"augmentation": {"offset": {"shift": [-1, 1]}}}, "x.yaml", {"augmentation": schema})
    with pytest.raises(SettingError, match=r"Offset.shift must be \[low, high\] with low <= high"):
        Offset(shift=(1.0, 0.5))

    sections = {name: dict(section) for name, section in defaults()["augmentation"].items() if name != "enabled"}
    sections["offset"] = {"p": 1.0, "shift": [0.5, 0.5]}
    cfg = {
        "augmentation": {"enabled": True, **sections},
        "model": {"unet": {"spatial_dims": 3}},
        "data": {"patch_size": [4, 4, 4]},
    }
    augmenter = build_augmenter(cfg, torch.device("cpu"), seed=0)
    assert list(augmenter.transforms) == list(schema)[1:]
    assert augmenter.transforms["offset"] == Offset(p=1.0, shift=(0.5, 0.5))
    image, label = random_batch(2, 1, (4, 4, 4))
    recipe_only = {name: transform for name, transform in augmenter.transforms.items() if name != "offset"}
    without = BatchAugmenter(recipe_only, 3, "cpu", seed=0)(image, label)[0]
    assert torch.equal(augmenter(image, label)[0], without + 0.5)
