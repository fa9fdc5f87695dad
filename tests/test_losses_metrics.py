"""Losses and Dice against MONAI as the reference; sliding-window inference."""

import math

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss as MonaiDiceCE
from monai.losses import DiceLoss as MonaiDice
from monai.metrics import DiceMetric

from unet_trainer.evaluation.inference import gaussian_importance, predict_volume, sliding_window_logits, window_starts
from unet_trainer.evaluation.metrics import case_dice, dice, mean_scores, regions_to_labels
from unet_trainer.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    RegionDiceBCELoss,
    labels_to_regions,
    match_target,
)


def random_batch(seed=0, shape=(2, 4, 8, 9, 10)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    target = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=g)
    return logits, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_ce_equals_monai(seed):
    logits, target = random_batch(seed)
    ours = DiceCELoss()(logits, target)
    ref = MonaiDiceCE(include_background=False, to_onehot_y=True, softmax=True, batch=True)(logits, target)
    assert torch.allclose(ours, ref, atol=1e-6)
    weighted = DiceCELoss(dice_weight=0.3, ce_weight=2.0)(logits, target)
    ref_w = MonaiDiceCE(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, lambda_dice=0.3, lambda_ce=2.0
    )(logits, target)
    assert torch.allclose(weighted, ref_w, atol=1e-6)


def test_region_loss_equals_monai_dice_plus_bce():
    logits, target = random_batch(3, (2, 3, 8, 8, 8))
    target = torch.randint(0, 4, target.shape, generator=torch.Generator().manual_seed(1))
    regions = labels_to_regions(target)
    ref = MonaiDice(sigmoid=True, batch=True)(logits, regions) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, regions
    )
    assert torch.allclose(RegionDiceBCELoss()(logits, target), ref, atol=1e-6)
    with pytest.raises(ValueError, match="needs 3 outputs"):
        RegionDiceBCELoss()(torch.zeros(1, 4, 4, 4, 4), target[:1, :, :4, :4, :4])


def test_labels_regions_round_trip():
    labels = torch.randint(0, 4, (2, 1, 6, 6, 6))
    regions = labels_to_regions(labels)
    assert torch.equal(regions[:, 0].bool(), labels[:, 0] > 0)  # WT
    assert torch.equal(regions[:, 1].bool(), (labels[:, 0] == 1) | (labels[:, 0] == 3))  # TC
    assert torch.equal(regions_to_labels(regions), labels[:, 0].to(torch.uint8))


def test_deep_supervision_weights_and_target_matching():
    target = torch.randint(0, 4, (2, 1, 16, 16, 16))
    assert match_target(target, (8, 8, 8)).shape == (2, 1, 8, 8, 8)
    assert torch.equal(match_target(target, (8, 8, 8)), target[:, :, 1::2, 1::2, 1::2])
    assert torch.equal(match_target(target, (12, 12, 12)), target[:, :, 2:14, 2:14, 2:14])  # valid-conv crop
    outputs = [torch.randn(2, 4, 16, 16, 16), torch.randn(2, 4, 8, 8, 8)]
    base = DiceCELoss()
    loss = DeepSupervisionLoss(base, [2 / 3, 1 / 3])(outputs, target)
    expected = 2 / 3 * base(outputs[0], target) + 1 / 3 * base(outputs[1], match_target(target, (8, 8, 8)))
    assert torch.allclose(loss, expected)


def monai_dice(pred, truth, ignore_empty):
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)
    return metric(pred[None, None].float(), truth[None, None].float()).item()


@pytest.mark.parametrize("policy,ignore_empty", [("one_if_both_empty", False), ("ignore", True)])
def test_dice_equals_monai_including_edge_cases(policy, ignore_empty):
    g = torch.Generator().manual_seed(0)
    cases = [(torch.rand(10, 10, 10, generator=g) > 0.5, torch.rand(10, 10, 10, generator=g) > 0.6) for _ in range(5)]
    empty = torch.zeros(6, 6, 6, dtype=torch.bool)
    some = empty.clone()
    some[1:3, 1:3, 1:3] = True
    cases += [(empty, empty), (some, empty), (empty, some), (some, some)]
    for pred, truth in cases:
        ours, ref = dice(pred, truth, policy), monai_dice(pred, truth, ignore_empty)
        assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref, abs=1e-6)


def test_case_dice_regions_perfect_and_policy():
    labels = torch.zeros(12, 12, 12, dtype=torch.uint8)
    labels[2:10, 2:10, 2:10] = 2
    labels[4:8, 4:8, 4:8] = 3
    labels[5:7, 5:7, 5:7] = 1
    perfect = case_dice(labels, labels)
    assert all(v == 1.0 for v in perfect.values())
    no_et_truth = labels.clone()
    no_et_truth[no_et_truth == 3] = 2
    scores = case_dice(labels, no_et_truth, "one_if_both_empty")
    assert scores["ET"] == 0.0 and scores["EN"] == 0.0
    ignored = case_dice(no_et_truth, no_et_truth, "ignore")
    assert math.isnan(ignored["ET"]) and ignored["mean"] == 1.0
    assert mean_scores([{"a": 1.0}, {"a": math.nan}, {"a": 0.5}]) == {"a": 0.75}


def test_window_starts_cover_and_overlap():
    assert window_starts(48, 16, 0.5) == [0, 8, 16, 24, 32]
    assert window_starts(16, 16, 0.5) == [0]
    starts = window_starts(155, 128, 0.5)
    assert starts[0] == 0 and starts[-1] == 155 - 128
    w = gaussian_importance((16, 16, 16))
    assert w.max() == 1.0 and w.min() > 0 and w[8, 8, 8] > w[0, 0, 0]


@pytest.mark.parametrize("gaussian", [True, False])
def test_sliding_window_of_a_pointwise_model_is_exact(gaussian):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 3, 1)
    image = torch.randn(4, 20, 23, 13)  # 13 < window on the last axis: padded
    out = sliding_window_logits(conv, image, (16, 16, 16), 3, overlap=0.5, sw_batch_size=3, gaussian=gaussian)
    with torch.no_grad():
        direct = conv(image[None])[0]
    assert out.shape == (3, 20, 23, 13)
    assert torch.allclose(out, direct, atol=1e-5)


def test_sliding_window_matches_monai_constant_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 3, padding=1))
    image = torch.randn(2, 32, 24, 24)
    ours = sliding_window_logits(net, image, (16, 16, 16), 2, overlap=0.5, sw_batch_size=4, gaussian=False)
    with torch.no_grad():
        ref = sliding_window_inference(image[None], (16, 16, 16), 4, net, overlap=0.5, mode="constant")[0]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mirror_tta_of_a_flip_equivariant_model_is_unchanged():
    conv = torch.nn.Conv3d(1, 2, 1)
    image = torch.randn(1, 16, 16, 16)
    plain = sliding_window_logits(conv, image, (16, 16, 16), 2)
    mirrored = sliding_window_logits(conv, image, (16, 16, 16), 2, mirror=True)
    assert torch.allclose(plain, mirrored, atol=1e-5)


def test_2d_model_runs_slice_by_slice():
    conv = torch.nn.Conv2d(4, 3, 1)
    image = torch.randn(4, 5, 20, 18)
    out = predict_volume(conv, image, (1, 16, 16), spatial_dims=2, num_outputs=3)
    with torch.no_grad():
        direct = torch.stack([conv(image[:, z][None])[0] for z in range(5)], dim=1)
    assert out.shape == (3, 5, 20, 18) and torch.allclose(out, direct, atol=1e-5)


@pytest.mark.parametrize("policy,ignore_empty", [("one_if_both_empty", False), ("ignore", True)])
def test_case_dice_from_one_histogram_equals_monai_per_structure(policy, ignore_empty):
    g = torch.Generator().manual_seed(4)
    structures = {"NCR": (1,), "ED": (2,), "EN": (3,), "WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    pairs = [
        (
            torch.randint(0, 4, (9, 10, 11), generator=g, dtype=torch.uint8),
            torch.randint(0, 4, (9, 10, 11), generator=g, dtype=torch.uint8),
        )
        for _ in range(3)
    ]
    no_tumour = torch.zeros(6, 6, 6, dtype=torch.uint8)
    enhancing_only = no_tumour.clone()
    enhancing_only[2:4, 2:4, 2:4] = 3
    pairs += [(no_tumour, no_tumour), (enhancing_only, no_tumour), (no_tumour, enhancing_only)]
    for pred, truth in pairs:
        scores = case_dice(pred, truth, policy)
        for name, members in structures.items():
            p, t = torch.isin(pred, torch.tensor(members)), torch.isin(truth, torch.tensor(members))
            ref = monai_dice(p, t, ignore_empty)
            assert (math.isnan(scores[name]) and math.isnan(ref)) or scores[name] == pytest.approx(ref, abs=1e-6), name
            assert (math.isnan(scores[name]) and math.isnan(dice(p, t, policy))) or scores[name] == dice(p, t, policy)
    with pytest.raises(ValueError, match="differ in shape"):
        case_dice(no_tumour, no_tumour[:5])
