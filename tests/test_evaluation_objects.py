"""The evaluation stage's objects: the sliding-window settings (SlidingWindow), the registry of the
evaluator's per-case metrics (eval.metrics) and the lesion-wise settings."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch

from unet_trainer.cli.evaluate import _eval_table
from unet_trainer.commands.builders import build_evaluator, build_metrics, build_model, build_sliding_window
from unet_trainer.commands.datasets import ensure_prepared
from unet_trainer.config.config import ConfigError, defaults
from unet_trainer.core.distributed import DistInfo
from unet_trainer.data.schemes import SCHEMES
from unet_trainer.evaluation import case_metrics
from unet_trainer.evaluation.case_metrics import (
    HD95,
    METRICS,
    CaseMetric,
    Dice,
    LesionWise,
    UnknownMetric,
    make_metrics,
    metric_names,
)
from unet_trainer.evaluation.inference import SlidingWindow, predict_volume
from unet_trainer.evaluation.lesion_metrics import LesionSettings
from unet_trainer.evaluation.metrics import mean_scores

# The per-case columns of the evaluator before eval.metrics existed (Dice per label, region, mean).
DICE_COLUMNS = ["NCR", "ED", "EN", "WT", "TC", "ET", "mean"]


def test_the_registry_refuses_an_unknown_metric_naming_the_known_ones():
    with pytest.raises(UnknownMetric) as caught:
        make_metrics(["dice", "volume"], {"empty_policy": "ignore"})
    assert str(caught.value) == f"unknown metric 'volume'; the metrics are {', '.join(METRICS)}"


def test_the_config_refuses_an_unknown_metric_in_one_line(tiny_config):
    with pytest.raises(ConfigError) as caught:
        tiny_config("eval.metrics=[dice, volume]")
    line = str(caught.value)
    assert "\n" not in line and "'eval.metrics'" in line and "item 'volume'" in line
    assert "one of dice, hd95, lesion_wise" in line
    # A config built by hand (not resolved) is refused by the builder, naming the key too.
    cfg = tiny_config()
    cfg["eval"]["metrics"] = ["volume"]
    with pytest.raises(ConfigError, match=r"^eval\.metrics: unknown metric 'volume'; the metrics are dice, hd95"):
        build_metrics(cfg)


def test_a_metric_list_without_dice_is_refused_in_one_line(tiny_config):
    # The best checkpoint, early stopping and the curves follow the mean Dice: a run without it would
    # train without ever choosing a best.
    with pytest.raises(ConfigError) as caught:
        tiny_config("eval.metrics=[hd95]")
    line = str(caught.value)
    assert "\n" not in line and line.startswith("'eval.metrics' = ['hd95'] must name dice")
    assert tiny_config("eval.metrics=[hd95, dice]")["eval"]["metrics"] == ["hd95", "dice"]


def test_eval_metrics_default_is_the_dice_columns_and_the_flags_add_theirs(tiny_config):
    assert defaults()["eval"]["metrics"] == ["dice"]
    cfg = tiny_config()
    assert [type(m) for m in build_metrics(cfg)] == [Dice]
    label = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.uint8)
    assert list(build_metrics(cfg)[0](label, label, None)) == DICE_COLUMNS
    both = tiny_config("eval.hd95=true", "eval.lesion_wise=true", "eval.lesion_min_volume=7")
    metrics = build_metrics(both)
    assert [type(m) for m in metrics] == [Dice, HD95, LesionWise]
    assert metrics[2].lesion == LesionSettings(min_lesion_volume=7.0)
    # Named already: the flag adds nothing; the list's order is the columns' order.
    assert metric_names(["hd95", "dice"], hd95=True, lesion_wise=False) == ("hd95", "dice")
    assert [type(m) for m in build_metrics(tiny_config("eval.metrics=[hd95, dice]"))] == [HD95, Dice]


class VoxelCount(CaseMetric):
    """A toy metric: predicted tumour voxels, per case."""

    def __init__(self, empty_policy: str) -> None:
        self.empty_policy = empty_policy  # filled by name from the eval settings

    def __call__(self, prediction, truth, spacing):
        return {"voxels/tumour": float((prediction > 0).sum())}


@pytest.fixture
def prepared(tiny_config):
    cfg = tiny_config()
    folder, index = ensure_prepared(cfg, DistInfo(), progress=False)
    return cfg, folder, sorted(index["cases"])[:2]


def test_a_registered_toy_metric_is_a_column_of_the_evaluator(prepared, monkeypatch, tmp_path):
    cfg, folder, cases = prepared
    monkeypatch.setitem(METRICS, "voxels", VoxelCount)  # the one registry line
    cfg["eval"]["metrics"] = ["dice", "voxels"]
    evaluator = build_evaluator(cfg, folder, cases, torch.device("cpu"), cases_csv=tmp_path / "cases.csv")
    assert isinstance(evaluator.metrics[1], VoxelCount) and evaluator.metrics[1].empty_policy == "one_if_both_empty"
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    record = evaluator(SimpleNamespace(unwrapped_model=model))
    assert math.isfinite(record["voxels/tumour"]) and math.isfinite(record["dice/WT"])
    with open(tmp_path / "cases.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case_id", *DICE_COLUMNS, "voxels/tumour"] and len(rows) == 2
    # unet-eval's table prints the new group as a column of its own, the name as a row.
    means = mean_scores([{k: v for k, v in r.items() if k != "case_id"} for r in evaluator.last_per_case])
    counts = {k: 2 for k in means}
    header, *table = _eval_table(means, counts, "brats2023", SCHEMES["brats2021"])
    assert header.split() == ["Dice", "cases", "voxels", "cases"]
    assert table[-1].split()[0] == "tumour" and table[-1].split()[-2] == f"{means['voxels/tumour']:.4f}"


@pytest.mark.parametrize("dims", [3, 2])
def test_the_sliding_window_gives_the_old_call_paths_logits(dims):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    net = conv(4, 3, 3, padding=1).eval()
    patch = (8, 8, 8) if dims == 3 else (1, 8, 8)
    image = torch.randn(4, 11, 13, 9)
    window = SlidingWindow(patch, dims, 3, overlap=0.25, batch_size=3, gaussian=False, mirror=True, amp_dtype=None)
    old = predict_volume(net, image, patch, dims, 3, 0.25, 3, False, None, True)
    assert torch.equal(window(net, image), old)


def test_the_config_builds_the_sliding_window_the_loose_arguments_were(tiny_config):
    cfg = tiny_config("eval.mirror_tta=true", "eval.overlap=0.25", "eval.sw_batch_size=2", "eval.gaussian=false")
    window = build_sliding_window(cfg)
    assert window == SlidingWindow((16, 16, 16), 3, 4, 0.25, 2, False, True, None)
    assert build_sliding_window(tiny_config("precision=amp_bf16")).amp_dtype is torch.bfloat16
    with pytest.raises(AttributeError):
        window.overlap = 0.5  # frozen: one object, shared by the evaluator and the loaded models


def test_the_module_keeps_the_metric_choices_in_the_registry_only():
    # The config's choices come from the registry, not a copy of it.
    from unet_trainer.config.config import SCHEMA

    assert SCHEMA["eval"]["metrics"].choices == tuple(case_metrics.METRICS)
