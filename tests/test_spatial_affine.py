"""RotateScale: nnU-Net's rotation and scaling as one affine per sample, resampled on the device from the
larger crop the loader cuts for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unet_trainer.data.loader import PatchDataset
from unet_trainer.training.augment import AUGMENTATIONS, BatchAugmenter, recipe, sampled_patch
from unet_trainer.training.spatial import AffineDraw, RotateScale, affine_reach, resample_affine, rotation_matrices


def _apply(transform: RotateScale, image, label, matrices, resampled=None):
    """Apply ``transform`` with given per-sample matrices (float64, (B, N, N))."""
    if resampled is None:
        identity = torch.eye(matrices.shape[1], dtype=matrices.dtype)
        resampled = (matrices != identity).flatten(1).any(dim=1)
    draw = AffineDraw(matrices=matrices, resampled=resampled)
    return transform.apply(image, label, draw, transform.device_scalars(draw), torch.Generator())


def _phantom(shape, seed=0):
    """A label volume of three nested blobs and a one-hot image of it (channel l is 1 where the label is l)."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    centre = [n / 2 + float(torch.rand(1, generator=generator)) * 3 for n in shape]
    radius = torch.sqrt(sum(((a - c) / (n / 4)) ** 2 for a, c, n in zip(axes, centre, shape)))
    label = torch.zeros(shape, dtype=torch.uint8)
    label[radius < 1.0] = 1
    label[radius < 0.7] = 2
    label[radius < 0.35] = 3
    image = torch.nn.functional.one_hot(label.long(), 4).movedim(-1, 0).float()
    return image[None], label[None, None]


def test_registered_last_and_off_by_default():
    assert list(AUGMENTATIONS)[5] == "rotate_scale" and AUGMENTATIONS["rotate_scale"] is RotateScale
    default = recipe()["rotate_scale"]
    assert not default.active and default.sampled_size((64, 64, 64)) == (64, 64, 64)
    assert sampled_patch(recipe(), (64, 64, 64)) == (64, 64, 64)


def test_identity_returns_the_input_bit_for_bit():
    transform = RotateScale(p_rotation=1.0, rotation_deg=0.0, p_scale=1.0, scale=(1.0, 1.0))
    image, label = torch.randn(2, 3, 9, 8, 7), torch.randint(0, 4, (2, 1, 9, 8, 7), dtype=torch.uint8)
    augmenter = BatchAugmenter({"rotate_scale": transform}, 3, "cpu", seed=0)
    out_image, out_label = augmenter(image, label)
    assert torch.equal(out_image, image) and torch.equal(out_label, label)
    assert not augmenter.last_params["rotate_scale"].resampled.any()


@pytest.mark.parametrize("plane", [0, 1, 2])
def test_a_90_degree_rotation_is_rot90_on_images_and_labels(plane):
    image, label = torch.randn(1, 2, 6, 6, 6), torch.randint(0, 4, (1, 1, 6, 6, 6), dtype=torch.uint8)
    angles = torch.zeros(1, 3, dtype=torch.float64)
    angles[0, plane] = math.pi / 2
    out_image, out_label = _apply(RotateScale(), image, label, rotation_matrices(angles))
    dims = [2 + axis for axis in range(3) if axis != plane]
    assert torch.allclose(out_image, torch.rot90(image, -1, dims), atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label, -1, dims))


def test_a_90_degree_rotation_in_2d_is_rot90_in_plane():
    image, label = torch.randn(2, 2, 6, 6), torch.randint(0, 4, (2, 1, 6, 6), dtype=torch.uint8)
    out_image, out_label = _apply(
        RotateScale(), image, label, rotation_matrices(torch.full((2, 1), math.pi / 2, dtype=torch.float64))
    )
    assert torch.allclose(out_image, torch.rot90(image, -1, (2, 3)), atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label, -1, (2, 3)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_labels_stay_on_the_intensities_they_label(spatial_dims):
    patch = (20, 24, 22)[-spatial_dims:]
    transform = RotateScale(p_rotation=1.0, rotation_deg=45.0, p_scale=1.0, scale=(0.7, 1.4), patch_size=patch)
    sampled = transform.sampled_size(patch)
    pairs = [_phantom(sampled, seed) for seed in range(3)]
    image, label = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    augmenter = BatchAugmenter({"rotate_scale": transform}, spatial_dims, "cpu", seed=3)
    for _ in range(3):
        out_image, out_label = augmenter(image, label)
        assert out_image.shape[2:] == patch and out_label.shape[2:] == patch
        # Trilinear weights sum to 1 and the nearest corner weighs at least 1/2**N: the channel of a
        # voxel's label holds at least that much, whatever the affine; a label moved off its image does not.
        own = out_image.gather(1, out_label.long())
        assert (own >= 0.5**spatial_dims - 1e-5).all()
        assert (out_image.argmax(1, keepdim=True) == out_label).float().mean() > 0.97


def test_foreground_volume_is_kept_at_scale_one():
    patch = (40, 40, 40)
    transform = RotateScale(p_rotation=1.0, rotation_deg=30.0, patch_size=patch)
    sampled = transform.sampled_size(patch)
    # An ellipsoid well inside the patch, whatever the rotation about the centre.
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in sampled], indexing="ij")
    label = ((axes[0] / 14) ** 2 + (axes[1] / 10) ** 2 + (axes[2] / 7) ** 2 < 1).to(torch.uint8)[None, None]
    image = label.float()
    before = int(label.sum())
    augmenter = BatchAugmenter({"rotate_scale": transform}, 3, "cpu", seed=1)
    for _ in range(4):
        _, out_label = augmenter(image.repeat(2, 1, 1, 1, 1), label.repeat(2, 1, 1, 1, 1))
        for sample in out_label:
            assert abs(int((sample > 0).sum()) - before) <= 0.02 * before


def test_a_sample_that_does_not_fire_is_untouched():
    transform = RotateScale(p_rotation=1.0, patch_size=(6, 6, 6))
    image, label = torch.randn(3, 2, 10, 10, 10), torch.randint(0, 4, (3, 1, 10, 10, 10), dtype=torch.uint8)
    matrices = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    matrices[1] = rotation_matrices(torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64))[0]
    out_image, out_label = _apply(transform, image, label, matrices)
    centre = (slice(None), slice(2, 8), slice(2, 8), slice(2, 8))
    for sample in (0, 2):
        assert torch.equal(out_image[sample], image[sample][centre])
        assert torch.equal(out_label[sample], label[sample][centre])
    assert not torch.equal(out_image[1], image[1][centre])


def test_the_sampled_region_holds_every_point_the_affine_reads():
    patch = (16, 20, 12)
    transform = RotateScale(p_rotation=1.0, rotation_deg=30.0, p_scale=1.0, scale=(0.7, 1.4), patch_size=patch)
    sampled = transform.sampled_size(patch)
    assert all((s - p) % 2 == 0 for s, p in zip(sampled, patch))
    # Extreme and random affines of the allowed set: the sampled coordinates stay inside [0, Q-1].
    corners = torch.cartesian_prod(*[torch.tensor([0.0, p - 1.0]) for p in patch]) - torch.tensor(patch) / 2 + 0.5
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0])] * 3).double()
    angles = torch.cat([signs * math.radians(30), (torch.rand(200, 3, dtype=torch.float64) * 2 - 1) * math.radians(30)])
    offsets = 1.4 * rotation_matrices(angles) @ corners.double().T
    reach = torch.tensor(affine_reach(patch, math.radians(30), 1.4), dtype=torch.float64)
    assert (offsets.abs().amax(dim=(0, 2)) <= reach + 1e-9).all()
    assert (reach <= (torch.tensor(sampled) - 1) / 2).all()


def test_the_loader_cuts_the_larger_region_around_the_same_patch(tmp_path):
    case = tmp_path / "c0"
    volume = np.random.default_rng(0).random((2, 30, 28, 26), dtype=np.float32)
    np.save(tmp_path / "c0_x.npy", volume)
    np.save(tmp_path / "c0_y.npy", (volume[0] > 0.5).astype(np.uint8))
    np.save(tmp_path / "c0_fg.npy", np.zeros((0, 4), np.int32))
    (tmp_path / "c0_meta.json").write_text("{}")
    del case
    plain = PatchDataset(tmp_path, ["c0"], (12, 12, 12), 0.0)
    grown = PatchDataset(tmp_path, ["c0"], (12, 12, 12), 0.0, sampled_size=(20, 18, 16))
    image, label = plain[(0, 7)]
    big_image, big_label = grown[(0, 7)]
    assert big_image.shape == (2, 20, 18, 16)
    assert torch.equal(big_image[:, 4:16, 3:15, 2:14], image) and torch.equal(big_label[:, 4:16, 3:15, 2:14], label)
    with pytest.raises(ValueError, match="even"):
        PatchDataset(tmp_path, ["c0"], (12, 12, 12), 0.0, sampled_size=(13, 12, 12))


def test_resampling_compiles_without_a_graph_break():
    image, label = torch.randn(2, 2, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8), dtype=torch.uint8)
    matrices = rotation_matrices(torch.rand(2, 3, dtype=torch.float64)).float()
    explanation = torch._dynamo.explain(resample_affine)(image, label, matrices, (6, 6, 6))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
