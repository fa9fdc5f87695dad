"""The plumbing of scripts/bench_quality.py that decides what is compared: the two pipelines'
settings, the axis order the MONAI network is scored in, and the noise rule of the verdicts.
The learning runs themselves live in the benchmark, never in tests."""

import pytest
import torch
from conftest import script_module


@pytest.fixture(scope="module")
def bench():
    with script_module("bench_quality") as module:  # it imports monai_pipeline and benchutil
        yield module


def test_both_pipelines_get_the_same_setting_and_only_ours_the_ablation(bench, tmp_path):
    args = bench.parse_args(
        [
            "--device",
            "cpu",
            "--steps",
            "40",
            "--points",
            "4",
            "--work",
            str(tmp_path),
            "--override",
            "optimizer.radam.lr=0.002",
            "--ours-override",
            "augmentation.noise.std=[0.0, 0.1]",
        ]
    )
    ours = bench.build_config(args, tmp_path / "phantom", tmp_path / "split.json", 1, "ours")
    monai = bench.build_config(args, tmp_path / "phantom", tmp_path / "split.json", 1, "monai")
    for cfg in (ours, monai):
        assert cfg["max_duration"] == "40ba" and cfg["eval_interval"] == "10ba" and cfg["seed"] == 1
        assert cfg["optimizer"]["radam"]["lr"] == 0.002 and cfg["data"]["split_file"] == str(tmp_path / "split.json")
    for key in ("model", "train_batch_size", "schedulers", "loss", "eval", "precision"):
        assert ours[key] == monai[key], key
    assert ours["data"]["patch_size"] == monai["data"]["patch_size"] == [32, 32, 32]
    assert ours["data"]["oversampling"] == monai["data"]["oversampling"]
    assert ours["augmentation"]["noise"]["std"] == [0.0, 0.1] and monai["augmentation"]["noise"]["std"] == [0.0, 0.33]
    assert ours["save_folder"] != monai["save_folder"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--steps", "30", "--points", "4"])  # not a multiple


def test_the_monai_network_is_scored_in_our_axis_order(bench):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, kernel_size=(3, 1, 1), padding=(1, 0, 0))  # acts along its first axis only
    x = torch.randn(1, 1, 5, 6, 7)  # (N, C, Z, Y, X)
    out = bench.ReversedAxes(net)(x)
    assert out.shape == x.shape
    # The network's first axis is X in its own (C, X, Y, Z) layout: our last one.
    assert torch.allclose(out, net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2))


def history(values: list[float], steps=(10, 20)) -> list[dict]:
    """A run's history where every key scores ``values[i]`` at point i."""
    return [{"step": s, **{k: v for k in ("NCR", "ED", "EN", "WT", "TC", "ET", "mean")}} for s, v in zip(steps, values)]


def test_verdicts_read_the_difference_against_the_seed_spread(bench):
    runs = {
        "ours": {0: history([0.50, 0.80]), 1: history([0.54, 0.82])},
        "monai": {0: history([0.30, 0.79]), 1: history([0.40, 0.81])},
    }
    result = bench.compare(runs, min_noise=0.02)
    first = next(r for r in result["table"] if r["step"] == 10 and r["key"] == "TC")
    assert first["diff"] == pytest.approx(0.17) and first["noise"] == pytest.approx(0.10)  # monai's spread
    assert first["verdict"] == "ahead"
    last = next(r for r in result["table"] if r["step"] == 20 and r["key"] == "TC")
    assert last["diff"] == pytest.approx(0.01) and last["noise"] == pytest.approx(0.02)  # the floor
    assert last["verdict"] == "level"
    summary = result["summary"]["TC"]
    assert summary["final"]["verdict"] == "level"
    # Curve means: ours 0.65 and 0.68, monai 0.545 and 0.605: a difference of 0.09 against a spread of 0.06.
    assert summary["curve"]["diff"] == pytest.approx(0.09) and summary["curve"]["verdict"] == "ahead"
    swapped = bench.compare({"ours": runs["monai"], "monai": runs["ours"]}, min_noise=0.02)
    assert swapped["summary"]["TC"]["curve"]["verdict"] == "behind"
    assert bench.verdict(0.05, 0.05) == "level"  # a difference equal to the noise is not beyond it
