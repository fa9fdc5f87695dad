"""Scores, losses, postprocessing and pictures in any label scheme: the glioma scheme gives exactly
the values it gave before schemes existed (pinned), BraTS 2024 post-treatment glioma (a fifth
class, RC, and six regions) gives hand-computed ones."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from monai.losses import DiceLoss as MonaiDice

from unet_trainer.data.schemes import SCHEMES, LabelScheme, LesionSettings
from unet_trainer.evaluation import postprocessing as pp
from unet_trainer.evaluation.case_metrics import make_metrics, table_rows
from unet_trainer.evaluation.evaluation import logits_to_labels
from unet_trainer.evaluation.lesion_metrics import LesionSettings as MetricLesionSettings
from unet_trainer.evaluation.lesion_metrics import case_lesion_scores
from unet_trainer.evaluation.metrics import case_dice, regions_to_labels
from unet_trainer.evaluation.visualize import draw_case_overlay, draw_progress, extract_case_view, label_legend
from unet_trainer.evaluation.visualize import label_colours as colours_of
from unet_trainer.training.losses import RegionDiceBCELoss, labels_to_regions

GLIOMA = SCHEMES["brats2021"]
POST = SCHEMES["brats2024-gli"]
POST_REGIONS = ("ET", "NETC", "SNFH", "RC", "TC", "WT")


def glioma_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nested glioma (ED shell, ET, NCR core) and a prediction with 15% of its voxels random."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(16, 16, 16, dtype=torch.uint8)
    truth[3:12, 3:12, 3:12] = 2
    truth[5:10, 5:10, 5:10] = 3
    truth[6:9, 6:9, 6:9] = 1
    noise = torch.randint(0, 4, truth.shape, generator=g).to(torch.uint8)
    flip = torch.rand(truth.shape, generator=g) < 0.15
    return torch.where(flip, noise, truth), truth


def post_case() -> tuple[torch.Tensor, torch.Tensor]:
    """4x4x4: truth NETC 2 voxels, ET 2, SNFH 4, RC 1; the prediction calls one NETC voxel ET, adds
    an RC voxel next to the true one, and a value (7) of no class."""
    truth = torch.zeros(4, 4, 4, dtype=torch.uint8)
    truth[0, 0, 0:2] = 1
    truth[0, 1, 0:2] = 3
    truth[1, 0:2, 0:2] = 2
    truth[3, 3, 3] = 4
    pred = truth.clone()
    pred[0, 0, 0] = 3
    pred[3, 3, 2] = 4
    pred[2, 2, 2] = 7
    return pred, truth


# Hand-computed: NETC 2*1/(1+2), SNFH 1, ET 2*2/(3+2), RC 2*1/(2+1), TC (NETC+ET: 4 and 4) 1, WT 1.
POST_DICE = {"NETC": 2 / 3, "SNFH": 1.0, "ET": 0.8, "RC": 2 / 3, "TC": 1.0, "WT": 1.0}


# --- glioma: the values of the code before schemes (pinned) --------------------------------------


def test_glioma_scores_are_the_pinned_values():
    pred, truth = glioma_case(0)
    expected = {"NCR": 0.2376237623762376, "ED": 0.8443396226415094, "EN": 0.5087719298245614}
    expected.update(WT=0.7775330396475771, TC=0.4264705882352941, ET=0.5087719298245614, mean=0.5709251859024775)
    assert case_dice(pred, truth) == case_dice(pred, truth, scheme=GLIOMA) == pytest.approx(expected, abs=1e-15)
    assert list(case_dice(pred, truth)) == list(expected)
    lesion = case_lesion_scores(pred.numpy(), truth.numpy(), (1.0, 1.0, 2.0), 1, 2.0, scheme=GLIOMA)
    assert lesion == pytest.approx(
        {
            "lesion_dice/WT": 0.013919146712932385,
            "lesion_dice/TC": 0.007802253236926181,
            "lesion_dice/ET": 0.010184372256365232,
            "lesion_hd95/WT": 367.9672131147541,
            "lesion_hd95/TC": 370.11683178435356,
            "lesion_hd95/ET": 369.6263066820882,
        },
        abs=1e-12,
    )


def test_glioma_loss_painting_and_postprocessing_are_the_pinned_values(tmp_path):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 1, 6, 6, 6), generator=g)
    assert float(RegionDiceBCELoss(0.7, 1.3)(logits, target)) == pytest.approx(1.4044805765151978, abs=1e-7)
    assert int(regions_to_labels(torch.sigmoid(logits)).long().sum()) == 869
    store = pp.PredictionStore(tmp_path)
    for s in range(3):
        pred, truth = glioma_case(s + 10)
        store.put(f"c{s}", truth, pred)
    choice = pp.choose_postprocessing(store, pp.MetricSettings(lesion_dilation=1, lesion_min_volume=2.0))
    assert (choice.score_before, choice.score_after) == pytest.approx((0.010569634190522757, 0.8171451542535667))
    assert choice.kept == [
        {"rule": "largest_component", "region": "WT"},
        {"rule": "remove_small_components", "region": "TC", "min_voxels": 50},
        {"rule": "remove_small_components", "region": "ET", "min_voxels": 10},
    ]
    assert len(choice.stages) == 5 and choice.regions == ("WT", "TC", "ET")
    assert [pp.removal_class(GLIOMA, r) for r in ("WT", "TC", "ET")] == [0, 2, 1]


# --- BraTS 2024 post-treatment glioma: hand-computed ---------------------------------------------


def test_case_dice_of_a_five_class_scheme():
    pred, truth = post_case()
    scores = case_dice(pred, truth, scheme=POST)
    assert list(scores) == ["NETC", "SNFH", "ET", "RC", "TC", "WT", "mean"]
    assert scores == pytest.approx({**POST_DICE, "mean": sum(POST_DICE.values()) / 6}, abs=1e-12)
    # The glioma scheme sees the RC voxels as no class at all.
    assert case_dice(pred, truth, scheme=GLIOMA)["WT"] == 1.0


def test_region_outputs_paint_in_the_scheme_order():
    probs = torch.zeros(1, 4, 4, 4, 4)  # WT, TC, ET, RC
    probs[0, 0, 0:3, 0:3, 0:3] = 1  # WT
    probs[0, 1, 0:2, 0:2, 0:2] = 1  # TC inside it
    probs[0, 2, 0, 0, 0] = 1  # ET inside that
    probs[0, 3, 3, 3, 3] = 1  # RC outside WT
    probs[0, 3, 2, 2, 2] = 1  # RC over a WT voxel: painted last, it wins
    labels = regions_to_labels(probs, POST)[0]
    expected = torch.zeros(4, 4, 4, dtype=torch.uint8)
    expected[0:3, 0:3, 0:3] = 2
    expected[0:2, 0:2, 0:2] = 1
    expected[0, 0, 0] = 3
    expected[3, 3, 3] = expected[2, 2, 2] = 4
    assert torch.equal(labels, expected)
    assert torch.equal(logits_to_labels(torch.logit(probs[0].clamp(0.01, 0.99)), True, POST), expected)
    with pytest.raises(ValueError, match=r"scheme brats2024-gli trains 4 \(WT, TC, ET, RC\)"):
        regions_to_labels(probs[:, :3], POST)


def test_region_loss_with_four_outputs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, 5, 5, generator=g)
    target = torch.randint(0, 5, (2, 1, 5, 5, 5), generator=g)
    regions = labels_to_regions(target, POST.trained_region_classes())
    assert torch.equal(regions[:, 3].bool(), target[:, 0] == 4)  # RC
    assert torch.equal(regions[:, 0].bool(), (target[:, 0] > 0) & (target[:, 0] < 4))  # WT leaves RC out
    loss = RegionDiceBCELoss(scheme=POST)
    reference = MonaiDice(sigmoid=True, batch=True)(logits, regions)
    reference = reference + torch.nn.functional.binary_cross_entropy_with_logits(logits, regions)
    assert loss.regions == ("WT", "TC", "ET", "RC")
    assert torch.allclose(loss(logits, target), reference, atol=1e-6)
    with pytest.raises(ValueError, match=r"needs 4 outputs \(WT, TC, ET, RC"):
        loss(logits[:, :3], target)


def test_lesion_wise_and_plain_metrics_per_region_of_the_scheme():
    pred, truth = post_case()
    lesion = MetricLesionSettings(dilation_iterations=0, min_lesion_volume=0.0, backend="scipy")
    metrics = make_metrics(
        ["dice", "hd95", "lesion_wise"], {"empty_policy": "ignore", "lesion": lesion, "scheme": POST}
    )
    row = {}
    for metric in metrics:
        row.update(metric(pred, truth, (1.0, 1.0, 1.0)))
    # Every region is one lesion here, matched to one predicted component: its Dice is the plain Dice.
    assert {r: row[f"lesion_dice/{r}"] for r in POST_REGIONS} == pytest.approx(POST_DICE, abs=1e-12)
    assert [k for k in row if k.startswith("hd95/")] == [f"hd95/{r}" for r in POST_REGIONS]
    assert row["hd95/WT"] == 0.0 and row["hd95/RC"] == 1.0  # RC: one extra voxel 1 mm from the true one
    assert table_rows(POST) == (*POST_REGIONS, "mean")
    assert table_rows(GLIOMA) == ("WT", "TC", "ET", "mean", "NCR", "ED", "EN")


def test_postprocessing_speaks_the_scheme_regions(tmp_path):
    pred, truth = post_case()
    rules = pp.postprocessing_from_rules(
        tmp_path / "p.json", [{"rule": "remove_small_components", "region": "RC", "min_voxels": 3}], scheme=POST
    )
    cleaned = rules(pred.numpy())
    assert (cleaned == 4).sum() == 0 and np.array_equal(cleaned[pred.numpy() != 4], pred.numpy()[pred.numpy() != 4])
    with pytest.raises(pp.PostprocessingError, match="expected one of ET, NETC, SNFH, RC, TC, WT"):
        pp.postprocessing_from_rules(tmp_path / "p.json", [{"rule": "largest_component", "region": "XX"}], scheme=POST)
    with pytest.raises(pp.PostprocessingError, match="expected one of WT, TC, ET"):
        pp.postprocessing_from_rules(tmp_path / "p.json", [{"rule": "largest_component", "region": "RC"}])
    assert {r: pp.removal_class(POST, r) for r in POST_REGIONS} == {
        "ET": 1,
        "NETC": 3,
        "SNFH": 0,
        "RC": 0,
        "TC": 2,
        "WT": 0,
    }
    stages = pp.candidate_stages(small_grid=(5,), enhancing_grid=(9,), scheme=POST)
    assert [s[0].get("region") for s in stages] == ["WT", *POST_REGIONS, None]
    # ET to necrosis: ET's voxels become NETC, the class TC adds to ET.
    assert (pp.enhancing_to_necrosis(truth.numpy(), 9, POST) == 1).sum() == 4


def test_enhancing_to_necrosis_is_refused_for_a_scheme_without_enhancing_tumour(tmp_path):
    plain = LabelScheme(
        name="two-class",
        title="two classes",
        channels=("t1",),
        classes=("A", "B"),
        class_descriptions=("a", "b"),
        regions={"AB": (1, 2), "B": (2,)},
        trained_regions=("AB",),
        regions_class_order=(1,),
        lesion=LesionSettings("brats2023", 1, 0.0),
        source="test",
    )
    assert [s[0]["rule"] for s in pp.candidate_stages(scheme=plain)] == ["largest_component"] + [
        "remove_small_components"
    ] * 2
    with pytest.raises(pp.PostprocessingError, match="scheme two-class has no ET region inside a larger one"):
        pp.postprocessing_from_rules(
            tmp_path / "p.json", [{"rule": "enhancing_to_necrosis", "max_voxels": 5}], "", plain
        )
    with pytest.raises(pp.PostprocessingError, match="no ET region"):
        pp.enhancing_to_necrosis(np.zeros((2, 2, 2), np.uint8), 5, plain)


def test_a_five_class_overlay_and_progress_plot_are_drawn(tmp_path):
    truth = torch.zeros(12, 12, 12, dtype=torch.uint8)
    truth[2:9, 2:9, 2:9] = 2
    truth[3:8, 3:8, 3:8] = 3
    truth[4:7, 4:7, 4:7] = 1
    truth[5:10, 8:11, 5:10] = 4  # a resection cavity beside the tumour
    image = torch.rand(4, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    view = extract_case_view("post", image, truth, torch.roll(truth, 1, 2), (1.0, 1.0, 1.0))
    path = tmp_path / "post.png"
    draw_case_overlay(path, view, "post | Dice ...", POST)
    pixels = (imread(path)[..., :3] * 255).round().astype(int)
    rc = tuple(int(colours_of(POST)[4][i : i + 2], 16) for i in (1, 3, 5))
    assert (np.abs(pixels - rc).sum(-1) <= 6).mean() > 1e-4  # the RC contour and legend swatch
    assert label_legend(POST)[4] == "RC resection cavity"
    evals = [{"epoch": 1, "batch": 5, **{f"dice/{k}": 0.5 for k in (*POST_REGIONS, "mean")}}]
    draw_progress(tmp_path / "progress.png", {}, evals, scheme=POST)
    assert (tmp_path / "progress.png").is_file()
