"""The plumbing of scripts/bench_quality.py that decides what is compared: the two pipelines'
settings, the axis order the MONAI network is scored in, and the noise rule of the verdicts.
The learning runs themselves live in the benchmark, never in tests."""

import json

import numpy as np
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


def test_the_recipes_differ_only_in_their_augmentation(bench, tmp_path):
    args = bench.parse_args(["--device", "cpu", "--compare", "recipes", "--work", str(tmp_path)])
    cfgs = {
        r: bench.build_config(args, tmp_path / "phantom", tmp_path / "split.json", 0, r)
        for r in bench.pose_shift.RECIPES
    }
    demo = bench.resolve_config(bench.DEMO_CONFIG)["augmentation"]
    nnunet = bench.resolve_config(bench.REPO / "configs" / "brats-nnunet.yaml")["augmentation"]
    for key in set(cfgs["composer"]) - {"augmentation", "save_folder", "run_name"}:
        assert cfgs["rotate_scale"][key] == cfgs["nnunet"][key] == cfgs["composer"][key], key
    assert cfgs["composer"]["augmentation"] == demo
    assert cfgs["rotate_scale"]["augmentation"] == {**demo, "rotate_scale": nnunet["rotate_scale"]}
    assert nnunet["rotate_scale"] == {"p_rotation": 0.2, "rotation_deg": 30.0, "p_scale": 0.2, "scale": [0.7, 1.4]}
    assert cfgs["nnunet"]["augmentation"] == nnunet != demo
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--compare", "recipes", "--only", "monai"])


def test_the_pose_shift_draws_rotations_and_scales_in_range_and_keeps_labels(bench):
    pose = bench.pose_shift
    matrices = pose.pose_matrices(64, seed=3)
    assert torch.equal(matrices, pose.pose_matrices(64, seed=3)) and not torch.equal(
        matrices, pose.pose_matrices(64, 4)
    )
    gram = matrices.transpose(1, 2) @ matrices  # s^2 I for a rotation times the scale s
    scales = gram[:, 0, 0].sqrt()
    assert torch.allclose(gram, scales[:, None, None] ** 2 * torch.eye(3), atol=1e-9)
    assert 0.85 <= scales.min() and scales.max() <= 1.15 and scales.max() - scales.min() > 0.2
    assert torch.det(matrices).gt(0).all()  # turned, never mirrored
    rng = np.random.default_rng(0)
    image = rng.random((4, 12, 14, 16), dtype=np.float32)
    label = rng.integers(0, 4, (12, 14, 16), dtype=np.uint8)
    same_image, same_label = pose.shift_case(image, label, torch.eye(3, dtype=torch.float64))
    # The identity's grid lands on the voxel centres up to float rounding: the image within it, labels exact.
    assert np.allclose(same_image, image, atol=1e-5) and np.array_equal(same_label, label)
    shifted_image, shifted_label = pose.shift_case(image, label, matrices[0])
    assert shifted_image.shape == image.shape and shifted_label.dtype == np.uint8
    assert set(np.unique(shifted_label)) <= {0, 1, 2, 3} and not np.array_equal(shifted_label, label)
    # A scale above 1 samples a wider field: a centred ball shrinks by the cube of the factor.
    grid = np.stack(np.meshgrid(*[np.arange(33) - 16.0] * 3, indexing="ij"))
    ball = (np.sqrt((grid**2).sum(0)) < 10).astype(np.uint8)
    _, smaller = pose.shift_case(ball[None].astype(np.float32), ball, 1.15 * torch.eye(3, dtype=torch.float64))
    assert smaller.sum() / ball.sum() == pytest.approx(1.15**-3, rel=0.05)


def test_the_recipe_comparison_scores_both_validation_sets_under_the_noise_rule(bench, tmp_path, capsys):
    tiny = ["--device", "cpu", "--cases", "5", "--shape", "24", "--patch", "16", "--filters", "4", "8"]
    tiny += ["--batch", "1", "--steps", "2", "--points", "2", "--seeds", "1", "--override", "data.num_workers=0"]
    out = tmp_path / "recipes.json"
    assert bench.main([*tiny, "--compare", "recipes", "--pose-shift", "--work", str(tmp_path), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    shifted_set = tmp_path / "phantom-brats-5cases-24-seed0-pose-seed0"
    assert sorted(json.loads((shifted_set / "pose.json").read_text())["cases"]) == sorted(record["split"]["val"])
    for recipe in bench.pose_shift.RECIPES:
        (history,) = record["runs"][recipe].values()
        assert [row["step"] for row in history] == [1, 2]
        assert all(key in row and "pose/" + key in row for row in history for key in bench.KEYS)
        assert any(row[key] != row["pose/" + key] for row in history for key in bench.KEYS)  # another set scored
    comparison = record["comparison"]
    assert set(comparison) == {"unshifted", "shifted"}
    for pairs in comparison.values():
        assert set(pairs) == {"rotate_scale - composer", "nnunet - composer"}
        for result in pairs.values():
            for entry in result["summary"].values():
                for side in entry.values():
                    assert side["noise"] >= 0.02 and side["verdict"] == bench.verdict(side["diff"], side["noise"])
    unshifted = comparison["unshifted"]["nnunet - composer"]["summary"]["WT"]["final"]
    assert unshifted["nnunet"] == record["runs"]["nnunet"]["0"][-1]["WT"]
    shifted = comparison["shifted"]["nnunet - composer"]["summary"]["WT"]["final"]
    assert shifted["nnunet"] == record["runs"]["nnunet"]["0"][-1]["pose/WT"]
    assert "shifted     nnunet - composer" in capsys.readouterr().out
