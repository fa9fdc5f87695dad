"""Pictures: progress.png, overlays after evaluations (training, unet-eval, unet-predict), the
TensorBoard summary image. Each PNG is checked for its size and for not being blank."""

import math

import numpy as np
import pytest
import torch
from conftest import ROOT
from matplotlib.image import imread

from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.evaluation.visualize import (
    LABEL_COLOURS,
    CaseView,
    draw_case_overlay,
    draw_progress,
    draw_summary,
    eval_metric_groups,
    extract_case_view,
    pick_worst_and_best,
    tumour_centre,
)
from unet_trainer.training.trainer import Callback

OVERLAY_SIZE = (400, 960)  # (height, width) of one case's PNG: 12 x 5 inches at 80 dpi


def read_png(path) -> np.ndarray:
    """RGB float in [0, 1], (H, W, 3)."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path))[..., :3]


def assert_not_blank(pixels: np.ndarray, min_colours: int = 50) -> None:
    """A drawn picture, not a flat or nearly empty canvas: varied grey levels and many colours."""
    assert pixels.std() > 0.05, pixels.std()
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours, len(colours)


def colour_share(pixels: np.ndarray, hex_colour: str, tolerance: float = 0.08) -> float:
    """The share of pixels within ``tolerance`` of a colour (anti-aliased edges aside)."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return float((np.abs(pixels - rgb).max(-1) < tolerance).mean())


def sphere_case(shape=(20, 24, 22), centre=(8, 12, 13)):
    """An image with a bright ball, and labels: edema shell > enhancing rim > necrotic core."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    dist = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[dist < 7] = 2
    label[dist < 4.5] = 3
    label[dist < 2.5] = 1
    rng = np.random.default_rng(0)
    image = np.zeros((4,) + shape, np.float32)
    image[:, 1:-1, 1:-1, 1:-1] = 1.0 + rng.normal(0, 0.1, (4, shape[0] - 2, shape[1] - 2, shape[2] - 2))
    image[0][dist < 7] += 1.5
    return image, label


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def test_slices_go_through_the_tumours_centre_and_always_hold_some_of_it():
    image, label = sphere_case()
    assert tumour_centre(torch.from_numpy(label > 0)) == (8, 12, 13)
    assert tumour_centre(torch.zeros(4, 4, 4, dtype=torch.bool)) is None
    # Two lesions far apart: the centre of mass lies between them, in empty slices; the chosen
    # slices are the nearest that hold tumour.
    two = np.zeros((30, 10, 10), bool)
    two[2:5, 4:6, 4:6] = True
    two[25:28, 4:6, 4:6] = True
    z, y, x = tumour_centre(torch.from_numpy(two))
    assert two[z].any() and z in (4, 25) and (y, x) in ((4, 4), (4, 5), (5, 4), (5, 5))
    view = extract_case_view(
        "c",
        torch.from_numpy(image),
        torch.from_numpy(label),
        torch.zeros_like(torch.from_numpy(label)),
        (2.0, 1.0, 1.0),
    )
    assert view.centre == (8, 12, 13)
    assert [s.shape for s in view.image] == [(24, 22), (20, 22), (20, 24)]
    assert all(s.dtype == np.float16 and 0 <= s.min() and s.max() <= 1 for s in view.image)
    assert {1, 2, 3} <= set(np.unique(view.truth[0])) and not view.prediction[0].any()
    # No truth: the prediction's tumour; neither: the volume's centre.
    assert extract_case_view("c", image, None, label, None).centre == (8, 12, 13)
    assert extract_case_view("c", image, None, np.zeros_like(label), None).centre == (10, 12, 11)


def test_case_overlay_has_its_size_and_every_label_in_its_own_colour(tmp_path):
    image, label = sphere_case()
    prediction = np.roll(label, 2, axis=2)  # every label, two voxels off
    view = extract_case_view("BraTS_007", image, label, prediction, (1.0, 1.0, 1.0))
    path = tmp_path / "case.png"
    draw_case_overlay(path, view, "BraTS_007 | epoch 3 | Dice ...")
    pixels = read_png(path)
    assert pixels.shape[:2] == OVERLAY_SIZE
    assert_not_blank(pixels)
    for label_value, colour in LABEL_COLOURS.items():
        assert colour_share(pixels, colour) > 5e-4, (label_value, colour)  # contour and legend pixels
    # Prediction only (unet-predict): the same size, still every colour in the legend.
    only = extract_case_view("BraTS_007", image, None, prediction, None)
    draw_case_overlay(tmp_path / "pred.png", only, "prediction")
    assert read_png(tmp_path / "pred.png").shape[:2] == OVERLAY_SIZE


def test_summary_shows_the_worst_and_best_four_by_mean_dice(tmp_path):
    image, label = sphere_case()
    view = extract_case_view("x", image, label, label, None)
    cases = [
        (CaseView(f"case{i:02d}", view.centre, view.image, view.truth, view.prediction), {"mean": m})
        for i, m in enumerate([0.5, 0.9, 0.1, 0.7, math.nan, 0.95, 0.3, 0.8, 0.6, 0.2])
    ]
    rows = pick_worst_and_best(cases, 4)
    assert [g for g, _ in rows] == ["worst", "best"]
    assert [c[0].case_id for c in rows[0][1]] == ["case04", "case02", "case09", "case06"]  # NaN counts as worst
    assert [c[0].case_id for c in rows[1][1]] == ["case03", "case07", "case01", "case05"]
    assert [g for g, _ in pick_worst_and_best(cases[:6], 4)] == ["worst", "best"]
    assert sum(len(r) for _, r in pick_worst_and_best(cases[:6], 4)) == 6  # each case once
    assert [g for g, _ in pick_worst_and_best(cases[:3], 4)] == ["all"]
    picture = draw_summary(tmp_path / "summary.png", cases, "title")
    pixels = read_png(tmp_path / "summary.png")
    assert picture.shape == pixels.shape and picture.dtype == np.uint8
    assert pixels.shape[:2] == (int((3.5 * 2 + 0.9) * 80), int(3.2 * 4 * 80))
    assert_not_blank(pixels)
    with pytest.raises(ValueError):
        draw_summary(tmp_path / "none.png", [], "title")


def test_progress_draws_every_metric_group_and_marks_the_best(tmp_path):
    evals = [
        {
            "epoch": e,
            "batch": 10 * e,
            "dice/WT": 0.2 * e,
            "dice/mean": 0.15 * e,
            "hd95/WT": 20.0 / e,
            "lesion_dice/WT": 0.1 * e,
            "time/overlays_s": 0.3,
            "dice/ET": math.nan,
        }
        for e in (1, 2, 3)
    ]
    groups = eval_metric_groups(evals)
    assert set(groups) == {"dice", "hd95", "lesion_dice"}  # time/ is bookkeeping, not a curve
    assert groups["dice"]["WT"].steps == [10, 20, 30] and "ET" not in groups["dice"]  # NaN skipped
    from unet_trainer.evaluation.visualize import Series

    train = {
        "loss/train": Series(list(range(1, 31)), [1.0 / s for s in range(1, 31)]),
        "lr/group0": Series(list(range(1, 31)), [1e-3] * 30),
        "throughput/samples_per_sec": Series(list(range(2, 31)), [5.0] * 29),
    }
    draw_progress(tmp_path / "progress.png", train, evals, batches_per_epoch=10)
    pixels = read_png(tmp_path / "progress.png")
    assert pixels.shape[:2] == (int(3.9 * 2 * 80), int(6.2 * 3 * 80))  # 6 panels: 2 rows of 3
    assert_not_blank(pixels, min_colours=20)
    assert colour_share(pixels, "#c03030", tolerance=0.1) > 1e-4  # the best-epoch marker
    draw_progress(
        tmp_path / "four.png",
        train,
        [{k: v for k, v in r.items() if k.startswith(("dice", "epoch", "batch"))} for r in evals],
    )
    assert read_png(tmp_path / "four.png").shape[:2] == (int(3.9 * 2 * 80), int(6.2 * 2 * 80))  # 2 x 2


# ---------------------------------------------------------------------------------------------
# In a run, unet-eval and unet-predict
# ---------------------------------------------------------------------------------------------


def test_training_draws_progress_overlays_and_logs_the_grid_to_tensorboard(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_training(tiny_config("max_duration=2ep", "callbacks.tensorboard={}"), progress=False)
    run = tmp_path / "run"
    progress = read_png(run / "progress.png")
    assert progress.shape[:2] == (624, 992)
    assert_not_blank(progress, min_colours=20)
    val = summary["state"].evaluator.case_ids
    pngs = sorted(p.name for p in (run / "overlays").iterdir())
    assert pngs == sorted([f"{c}.png" for c in val] + ["summary.png"])
    for name in pngs:
        pixels = read_png(run / "overlays" / name)
        if name != "summary.png":
            assert pixels.shape[:2] == OVERLAY_SIZE
        assert_not_blank(pixels)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"eval/dice/{k}" for k in ("WT", "TC", "ET", "mean", "NCR", "ED", "EN")} <= scalars
    images = events.Images("eval/overlay_summary")
    assert [i.step for i in images] == [r["batch"] for r in summary["state"].eval_history]
    assert images[-1].height > 100 and images[-1].width > 100


class ViewsSeen(Callback):
    """Records, per evaluation, whether the evaluator cut slices for the overlays (extra callbacks
    run before the built-in ones, so the overlay writer has not cleared them yet)."""

    def __init__(self):
        self.seen = []

    def eval_end(self, state):
        self.seen.append(sorted(state.evaluator.last_views))


def test_overlay_settings_cases_and_every(tiny_config, tmp_path):
    views = ViewsSeen()
    summary = run_training(
        tiny_config("max_duration=3ep", "callbacks.overlays.cases=1", "callbacks.overlays.every=2"),
        progress=False,
        extra_callbacks=[views],
    )
    run = tmp_path / "run"
    val = sorted(summary["state"].evaluator.case_ids)
    assert sorted(p.name for p in (run / "overlays").iterdir()) == [f"{val[0]}.png", "summary.png"]
    # Slices of every case at the 1st and the last evaluation (for the summary); none at the 2nd.
    assert views.seen == [val, [], val]
    off = run_training(
        tiny_config("max_duration=1ep", "callbacks.overlays=null", run_dir=tmp_path / "off"), progress=False
    )
    assert off["batch"] > 0 and not (tmp_path / "off" / "overlays").exists()
    assert resolve_config(ROOT / "configs" / "demo.yaml", ["callbacks.overlays.cases=all"])["callbacks"][
        "overlays"
    ] == {"cases": "all", "every": 1}
    for bad in ("callbacks.overlays.cases=some", "callbacks.overlays.cases=0", "callbacks.overlays.every=0"):
        with pytest.raises(ConfigError, match="callbacks.overlays"):
            resolve_config(ROOT / "configs" / "demo.yaml", [bad])


def test_unet_eval_and_unet_predict_draw_overlays(tiny_config, tmp_path, capsys):
    summary = run_training(tiny_config("max_duration=2ba"), progress=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "latest-rank0.pt"
    assert eval_main([str(checkpoint), "--no-progress"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "eval_ep1-ba2-rank0_val-fold0_overlays"
    assert f"Overlays:        {folder}" in out
    val = summary["state"].evaluator.case_ids
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{c}.png" for c in val] + ["summary.png"])
    assert_not_blank(read_png(folder / f"{val[0]}.png"))
    assert eval_main([str(checkpoint), "--no-progress", "--no-overlays", "--out", str(tmp_path / "s.csv")]) == 0
    assert "Overlays" not in capsys.readouterr().out and not (tmp_path / "s_overlays").exists()

    from unet_trainer.commands.datasets import raw_data_dir

    phantom = raw_data_dir(summary["state"].config, progress=False)
    out_dir = tmp_path / "pred"
    assert predict_main([str(checkpoint), str(phantom), str(out_dir), "--overlays", "--no-progress"]) == 0
    assert "Wrote 6 segmentation(s) (12 files)" in capsys.readouterr().out
    for nifti in sorted(out_dir.glob("*.nii.gz")):
        pixels = read_png(out_dir / nifti.name.replace(".nii.gz", "_overlay.png"))
        assert pixels.shape[:2] == OVERLAY_SIZE
        assert_not_blank(pixels)
