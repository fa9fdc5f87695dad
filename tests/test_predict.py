"""Evaluation and prediction from checkpoints: putting predictions back into the original geometry,
unet-predict on every layout, unet-eval, HD95, and the sliding-window variants (mirroring, 2D
slice batching, valid-padding models) against reference computations."""

import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_overrides

import unet_trainer.commands.evaluate as evaluate_module
import unet_trainer.commands.predict as predict_module
from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.loading import load_model
from unet_trainer.commands.predict import labels_to_original, predict_case, prediction_to_original
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.data.layouts import RawCase, from_canonical, list_cases, write_case, write_label_nifti
from unet_trainer.data.prepare import PrepareSettings, prepare_case
from unet_trainer.evaluation.inference import predict_volume, sliding_window_logits, sliding_window_slices
from unet_trainer.evaluation.lesion_metrics import case_region_hd95 as case_hd95
from unet_trainer.models.unet import UNet

SHAPE = (12, 14, 10)  # (Z, Y, X)
HEAD = (slice(2, 10), slice(3, 12), slice(1, 8))  # nonzero box: a real sub-box of the volume


def oblique_affine() -> np.ndarray:
    """Rotation about z by 30 degrees, anisotropic voxels (x 0.8, y 1.2, z 2.5 mm), a translation."""
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-90.0, 40.0, 12.5]
    return affine


def synthetic_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head inside a larger zero volume with every tumour label: image (4, *SHAPE), labels (*SHAPE)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((4,) + SHAPE, np.float32)
    image[(slice(None),) + HEAD] = rng.uniform(1.0, 2.0, size=(4, 8, 9, 7))
    label = np.zeros(SHAPE, np.uint8)
    label[3:9, 4:11, 2:7] = 2
    label[4:8, 5:9, 3:6] = 3
    label[5:7, 6:8, 4] = 1
    return image, label


def raw_case(seed: int = 0) -> RawCase:
    image, label = synthetic_case(seed)
    return RawCase(f"case{seed}", image, label, oblique_affine(), (2.5, 1.2, 0.8), "brats2021", preprocessed=False)


def read_nifti_zyx(path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), image.affine


# ----------------------------------------------------------------------------------------------
# (a) back to the original geometry
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_spacing", [None, (1.25, 0.6, 0.4)])  # None; or resampled to half the voxel
def test_prepared_label_put_back_and_written_reproduces_the_original(tmp_path, target_spacing):
    raw = raw_case()
    _, prepared_label, meta = prepare_case(raw, PrepareSettings(target_spacing=target_spacing))
    assert [tuple(b) for b in meta["crop_box"]] == [(2, 10), (3, 12), (1, 8)]
    if target_spacing is not None:
        assert prepared_label.shape == (16, 18, 14)  # really resampled
    restored = labels_to_original(prepared_label, meta)
    path = tmp_path / "case0.nii.gz"
    write_label_nifti(path, restored, raw.affine, raw.label_convention)
    data, affine = read_nifti_zyx(path)
    assert data.shape == SHAPE and data.dtype == np.uint8
    assert np.allclose(affine, raw.affine, atol=1e-4)
    np.testing.assert_array_equal(data, from_canonical(raw.label, "brats2021"))
    assert set(np.unique(data)) == {0, 1, 2, 4}


def test_prediction_to_original_from_logits_and_probabilities():
    raw = raw_case()
    _, label, meta = prepare_case(raw, PrepareSettings())
    logits = F.one_hot(torch.from_numpy(label).long(), 4).permute(3, 0, 1, 2).float() * 10
    labels, probs = prediction_to_original(logits, meta, region_mode=False, probabilities=True)
    np.testing.assert_array_equal(labels, raw.label)
    assert probs.shape == (4,) + SHAPE and probs.dtype == np.float32
    outside = np.ones(SHAPE, bool)
    outside[HEAD] = False
    assert np.all(probs[0][outside] == 1.0) and np.all(probs[1:][:, outside] == 0.0)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # Region outputs (WT, TC, ET): nested thresholds give the same labels; outside the crop all 0.
    regions = torch.stack([torch.isin(torch.from_numpy(label), torch.tensor(v)) for v in ((1, 2, 3), (1, 3), (3,))])
    labels_r, probs_r = prediction_to_original(regions.float() * 20 - 10, meta, region_mode=True, probabilities=True)
    np.testing.assert_array_equal(labels_r, raw.label)
    assert np.all(probs_r[:, outside] == 0.0)


# ----------------------------------------------------------------------------------------------
# A real tiny checkpoint, shared by the command-line tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("predict-run") / "run"
    cfg = resolve_config(ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, run_dir, "max_duration=2ba"))
    summary = run_training(cfg, progress=False)
    return {
        "cfg": cfg,
        "summary": summary,
        "checkpoint": run_dir / "checkpoints" / "latest-rank0.pt",
        "run_dir": run_dir,
        "phantom": raw_data_dir(cfg, progress=False),
    }


def write_dataset(root, fmt: str, ids: list[str]) -> None:
    for seed, case_id in enumerate(ids):
        image, label = synthetic_case(seed)
        write_case(root, fmt, case_id, image, label, oblique_affine())


LAYOUT_IDS = {
    "msd": ["BRATS_001", "BRATS_002"],
    "brats2021": ["BraTS2021_00001", "BraTS2021_00002"],
    "brats2023": ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"],
    "dle": ["BRATS_001", "BRATS_002"],
}
NATIVE_VALUES = {"msd": {0, 1, 2, 3}, "brats2021": {0, 1, 2, 4}, "brats2023": {0, 1, 2, 3}, "dle": {0, 1, 2, 3}}


def native_label_of(case) -> np.ndarray:
    """The stored (native) label map of a listed case, as (Z, Y, X)."""
    if case.format == "dle":
        return np.load(case.label)[0]
    return read_nifti_zyx(case.label)[0]


# ----------------------------------------------------------------------------------------------
# (b), (c) unet-predict
# ----------------------------------------------------------------------------------------------


def test_unet_predict_on_the_phantom_keeps_shape_affine_and_convention(trained, tmp_path, capsys):
    out = tmp_path / "pred"
    status = predict_main(
        [
            str(trained["checkpoint"]),
            str(trained["phantom"]),
            str(out),
            "--probabilities",
            "--no-progress",
            "eval.mirror_tta=true",
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert "Wrote 6 segmentation(s) (12 files)" in capsys.readouterr().out
    for case in list_cases(trained["phantom"], "brats2021"):
        seg = nib.load(str(case.label))
        pred = nib.load(str(out / f"{case.case_id}.nii.gz"))
        assert pred.shape == seg.shape and pred.get_data_dtype() == np.uint8
        assert np.allclose(pred.affine, seg.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
        probs = nib.load(str(out / f"{case.case_id}_probabilities.nii.gz"))
        assert probs.shape == seg.shape + (4,)
        # The labels are the argmax of the written probabilities, in BraTS 2021 numbering.
        expected = from_canonical(np.asarray(probs.dataobj).argmax(-1).astype(np.uint8), "brats2021")
        np.testing.assert_array_equal(np.asarray(pred.dataobj), expected)


@pytest.mark.parametrize("fmt", ["msd", "brats2021", "brats2023", "dle"])
def test_unet_predict_on_every_layout(trained, tmp_path, fmt, capsys):
    source = tmp_path / fmt
    write_dataset(source, fmt, LAYOUT_IDS[fmt])
    out = tmp_path / "pred"
    assert predict_main([str(trained["checkpoint"]), str(source), str(out), "--no-progress"]) == 0
    capsys.readouterr()
    for case in list_cases(source, fmt):
        data, affine = read_nifti_zyx(out / f"{case.case_id}.nii.gz")
        assert data.shape == SHAPE
        assert np.allclose(affine, np.eye(4) if fmt == "dle" else oblique_affine(), atol=1e-4)
        assert set(np.unique(data)) <= NATIVE_VALUES[fmt]


@pytest.mark.parametrize("fmt", ["msd", "brats2021", "brats2023", "dle"])
def test_an_oracle_prediction_reproduces_every_layouts_label_files(trained, tmp_path, fmt, monkeypatch):
    """With logits replaced by the (one-hot) prepared ground truth, the whole predict path
    (prepare, put back, native convention, NIfTI writing) must give back the input's label files."""
    source = tmp_path / fmt
    write_dataset(source, fmt, LAYOUT_IDS[fmt])
    seen = {}
    real_prepare = predict_module.prepare_case

    def remembering_prepare(raw, settings):
        image, label, meta = real_prepare(raw, settings)
        seen["label"] = label
        return image, label, meta

    def oracle_logits(self, image):
        return F.one_hot(torch.from_numpy(seen["label"]).long(), 4).permute(3, 0, 1, 2).float().to(image.device)

    monkeypatch.setattr(predict_module, "prepare_case", remembering_prepare)
    monkeypatch.setattr(predict_module.LoadedModel, "logits", oracle_logits)
    out = tmp_path / "pred"
    summary = predict_module.predict_dataset(trained["checkpoint"], source, out, progress=False)
    assert not summary.failed and len(summary.written) == 2
    for case in list_cases(source, fmt):
        data, _ = read_nifti_zyx(out / f"{case.case_id}.nii.gz")
        np.testing.assert_array_equal(data, native_label_of(case))


# ----------------------------------------------------------------------------------------------
# (d) bad cases are refused, the others written
# ----------------------------------------------------------------------------------------------


def test_cases_with_wrong_channel_counts_are_skipped_with_a_clear_message(trained, tmp_path, capsys):
    dle = tmp_path / "dle"
    write_dataset(dle, "dle", ["good_a", "good_b"])
    np.save(dle / "two_channels_x.npy", np.ones((2,) + SHAPE, np.float32))
    msd = tmp_path / "msd"
    write_dataset(msd, "msd", ["BRATS_001"])
    three = np.ones(SHAPE[::-1] + (3,), np.float32)  # (x, y, z, 3): one modality missing
    nib.save(nib.Nifti1Image(three, oblique_affine()), str(msd / "imagesTr" / "BRATS_009.nii.gz"))
    for source, bad, good in ((dle, "two_channels", ["good_a", "good_b"]), (msd, "BRATS_009", ["BRATS_001"])):
        out = tmp_path / f"pred-{source.name}"
        status = predict_main([str(trained["checkpoint"]), str(source), str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert status == 1
        skipped = [line for line in err.splitlines() if line.startswith(f"skipped {bad}:")]
        assert len(skipped) == 1 and "expected" in skipped[0] and ("(4, 5)" in skipped[0] or ", 4)" in skipped[0])
        assert "Traceback" not in err and f"1 case(s) failed: {bad}" in err
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.nii.gz" for c in good)


def test_a_case_not_matching_the_models_input_channels_is_refused(trained):
    loaded = load_model(trained["checkpoint"])
    loaded.model.in_channels = 5
    with pytest.raises(
        predict_module.DataFormatError, match=r"case case0: has 4 channel\(s\) but .* takes 5 \(flair, t1, t1ce, t2\)$"
    ):
        predict_case(loaded, raw_case())


def test_predict_command_line_errors_are_one_line(trained, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing.pt"), str(tmp_path), str(tmp_path / "o")], 1, "no such checkpoint"),
        ([str(trained["checkpoint"]), str(tmp_path / "nothing"), str(tmp_path / "o")], 1, "does not exist"),
        (
            [str(trained["checkpoint"]), str(trained["phantom"]), str(tmp_path / "o"), "eval.overlapp=0.5"],
            2,
            "did you mean 'eval.overlap'",
        ),
        ([str(trained["checkpoint"]), str(trained["phantom"]), str(trained["phantom"])], 1, "must not be the input"),
        ([str(trained["checkpoint"])], 2, "expected 3 path argument"),
    ]
    for argv, status, fragment in cases:
        assert predict_main(argv + ["--no-progress"]) == status
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err


# ----------------------------------------------------------------------------------------------
# (e) unet-eval
# ----------------------------------------------------------------------------------------------


def test_unet_eval_prints_the_table_and_matches_trainings_evaluation(trained, capsys):
    assert eval_main([str(trained["checkpoint"]), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # Labels named by the values of the input's own convention: the phantom is BraTS 2021 (EN = 4).
    for row in ("WT", "TC", "ET", "mean", "NCR (1)", "ED (2)", "EN (4)"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "EN (3)" not in out
    assert "one_if_both_empty" in out and "validation cases (fold 0 of 3)" in out
    final = trained["summary"]["final_eval"]
    wt_line = next(line for line in out.splitlines() if line.startswith("WT"))
    assert wt_line.split()[1] == f"{final['dice/WT']:.4f}" and wt_line.split()[2] == "2"
    csv_path = trained["run_dir"] / "eval_ep1-ba2-rank0_val-fold0.csv"  # 2 batches: one finished epoch
    assert f"Per-case scores: {csv_path}" in out
    rows = csv_path.read_text().splitlines()
    split = json.loads((trained["run_dir"] / "split.json").read_text())
    assert len(rows) == 1 + len(split["val"]) and rows[0].startswith("case_id,NCR,ED,EN,WT,TC,ET,mean")


def test_unet_eval_on_a_dataset_with_ignore_policy_and_hd95(trained, tmp_path, capsys):
    source = tmp_path / "msd"
    write_dataset(source, "msd", LAYOUT_IDS["msd"])
    csv_path = tmp_path / "scores.csv"
    argv = [
        str(trained["checkpoint"]),
        "--dataset",
        str(source),
        "--out",
        str(csv_path),
        "--no-progress",
        "eval.empty_policy=ignore",
        "--eval.hd95",
        "true",
    ]
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    assert f"all 2 labelled cases of {source}" in out and "ignore" in out and "HD95 mm" in out
    # MSD numbers oedema 1, non-enhancing core 2, enhancing 3.
    for row in ("NCR (2)", "ED (1)", "EN (3)"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    header, *rows = csv_path.read_text().splitlines()
    assert header.endswith("hd95/WT,hd95/TC,hd95/ET") and len(rows) == 2


def test_unet_eval_on_another_dataset_scores_with_trainings_evaluator_and_leaves_the_config(trained, tmp_path):
    source = tmp_path / "msd"
    write_dataset(source, "msd", LAYOUT_IDS["msd"])
    built = []
    real_build = evaluate_module.build_evaluator

    def build_evaluator(cfg, *args, **kwargs):
        built.append(cfg["data"]["path"])
        return real_build(cfg, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "build_evaluator", build_evaluator)
        report = evaluate_module.evaluate_model(
            load_model(trained["checkpoint"]),
            dataset=source,
            out_csv=tmp_path / "scores.csv",
            progress=False,
            overlays=False,
        )
    assert built == [str(source)] and len(report.per_case) == 2
    # The loaded model's config is still the checkpoint's: the phantom, its own prepared cache.
    stored = load_model(trained["checkpoint"]).cfg
    assert report.loaded.cfg == stored and report.loaded.cfg["data"]["path"] is None


def test_unet_eval_lesion_wise_flag_adds_the_lesion_scores(trained, tmp_path, capsys):
    csv_path = tmp_path / "scores.csv"
    argv = [
        str(trained["checkpoint"]),
        "--out",
        str(csv_path),
        "--no-progress",
        "--no-overlays",
        "--lesion-wise",
        "eval.lesion_min_volume=10",
    ]
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    assert "Metric definition brats2023: per region" in out and "LW Dice" in out
    header, *rows = csv_path.read_text().splitlines()
    columns = header.split(",")
    lesion_keys = [f"lesion_{m}/{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")]
    assert columns[-6:] == lesion_keys and rows
    for row in rows:
        values = dict(zip(columns, row.split(",")))
        assert all(0.0 <= float(values[f"lesion_dice/{r}"]) <= 1.0 for r in ("WT", "TC", "ET"))
        assert all(0.0 <= float(values[f"lesion_hd95/{r}"]) <= 374.0 for r in ("WT", "TC", "ET"))


def test_unet_eval_bad_checkpoints_give_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    no_config = tmp_path / "no_config.pt"
    torch.save({"model": {}}, no_config)
    for path, fragment in (
        (tmp_path / "missing.pt", "no such checkpoint"),
        (garbage, "not a readable checkpoint"),
        (no_config, "holds no training config"),
    ):
        assert eval_main([str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err


# ----------------------------------------------------------------------------------------------
# (f) HD95
# ----------------------------------------------------------------------------------------------


def test_hd95_is_finite_for_a_tumour_scales_with_spacing_and_penalises_empties():
    truth = torch.zeros(20, 20, 20, dtype=torch.uint8)
    truth[5:15, 5:15, 5:15] = 2
    truth[8:12, 8:12, 8:12] = 3
    pred = torch.roll(truth, shifts=2, dims=0)  # everything 2 voxels off along z
    scores = case_hd95(pred, truth)
    assert set(scores) == {"hd95/WT", "hd95/TC", "hd95/ET"}
    for value in scores.values():
        assert math.isfinite(value) and value == pytest.approx(2.0, abs=0.01)
    assert case_hd95(pred, truth, spacing=(3.0, 3.0, 3.0))["hd95/WT"] == pytest.approx(6.0, abs=0.01)
    no_core = truth.clone()
    no_core[no_core == 3] = 2
    assert case_hd95(no_core, truth)["hd95/ET"] == 374.0  # empty prediction: the penalty
    assert case_hd95(truth, no_core)["hd95/TC"] == 374.0  # empty ground truth: the penalty
    assert case_hd95(no_core, no_core)["hd95/ET"] == 0.0  # empty on both sides
    assert case_hd95(truth, truth)["hd95/WT"] == 0.0


def test_training_reports_hd95_when_enabled(tiny_config):
    final = run_training(tiny_config("max_duration=1ba", "eval.hd95=true"), progress=False)["final_eval"]
    assert {"dice/WT", "hd95/WT", "hd95/TC", "hd95/ET"} <= set(final)
    assert math.isfinite(final["hd95/WT"])  # the penalty where a region is empty on one side


def test_training_logs_lesion_wise_scores_beside_dice(tiny_config, tmp_path):
    from unet_trainer.evaluation.visualize import eval_metric_groups

    result = run_training(tiny_config("max_duration=1ba", "eval.lesion_wise=true"), progress=False)
    final = result["final_eval"]
    lesion_keys = {f"lesion_{m}/{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")}
    assert {"dice/WT"} | lesion_keys <= set(final)
    assert all(math.isfinite(final[k]) for k in lesion_keys)  # lesion-wise scores are never NaN
    run = tmp_path / "run"
    assert lesion_keys <= set((run / "eval_metrics.csv").read_text().splitlines()[0].split(","))
    assert lesion_keys <= set((run / "eval_cases.csv").read_text().splitlines()[0].split(","))
    groups = eval_metric_groups([{"batch": 1, **final}])
    assert {"dice", "lesion_dice", "lesion_hd95"} <= set(groups)  # progress.png draws one panel each


# ----------------------------------------------------------------------------------------------
# (g) sliding-window variants against references
# ----------------------------------------------------------------------------------------------


def small_net(dims: int, channels: int = 2, outputs: int = 3) -> torch.nn.Module:
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    torch.manual_seed(0)
    return torch.nn.Sequential(conv(channels, 6, 3, padding=1), torch.nn.LeakyReLU(0.1), conv(6, outputs, 3, padding=1))


def test_mirror_tta_equals_the_average_over_flipped_volumes():
    # Window starts (0, 8, 16) are symmetric, so flipping the volume maps the tiling onto itself
    # and TTA per window equals the average of whole-volume predictions of flipped inputs.
    net = small_net(3)
    image = torch.randn(2, 32, 24, 16)
    mirrored = sliding_window_logits(net, image, (16, 16, 16), 3, sw_batch_size=3, mirror=True)
    flips = [f for r in range(4) for f in itertools.combinations((1, 2, 3), r)]
    reference = sum(
        sliding_window_logits(net, image.flip(f), (16, 16, 16), 3, sw_batch_size=3).flip(f) for f in flips
    ) / len(flips)
    assert len(flips) == 8 and torch.allclose(mirrored, reference, atol=1e-5)
    plain = sliding_window_logits(net, image, (16, 16, 16), 3, sw_batch_size=3)
    assert not torch.allclose(mirrored, plain, atol=1e-3)  # the net is not flip-invariant


@pytest.mark.parametrize("dims", [2, 3])
def test_mirror_tta_copes_with_a_model_that_reuses_its_output_buffer(dims):
    # A model compiled with CUDA graphs (mode "reduce-overhead"/"max-autotune") returns one static
    # output buffer that each call overwrites; the flip average must not accumulate into it.
    net = small_net(dims)
    buffers: dict = {}

    def static_output(x: torch.Tensor) -> torch.Tensor:
        result = net(x)
        buffer = buffers.setdefault(tuple(result.shape), torch.empty_like(result))
        return buffer.copy_(result)

    image = torch.randn(2, 20, 24, 16) if dims == 3 else torch.randn(2, 3, 24, 16)
    window = (16, 16, 16) if dims == 3 else (1, 16, 16)
    expected = predict_volume(net, image, window, dims, 3, sw_batch_size=3, mirror=True)
    got = predict_volume(static_output, image, window, dims, 3, sw_batch_size=3, mirror=True)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("sw_batch_size", [1, 3, 8])
def test_2d_window_batches_across_slices_match_slice_by_slice(mirror, sw_batch_size):
    net = small_net(2, channels=4)
    image = torch.randn(4, 5, 20, 18)  # several in-plane windows per slice
    batched = sliding_window_slices(net, image, (16, 16), 3, sw_batch_size=sw_batch_size, mirror=mirror)
    reference = torch.stack(
        [sliding_window_logits(net, image[:, z], (16, 16), 3, sw_batch_size=1, mirror=mirror) for z in range(5)], dim=1
    )
    assert batched.shape == (3, 5, 20, 18) and torch.allclose(batched, reference, atol=1e-5)
    calls = []
    counting = lambda x: (calls.append(x.shape[0]), net(x))[1]  # noqa: E731
    predict_volume(counting, image, (1, 16, 16), spatial_dims=2, num_outputs=3, sw_batch_size=sw_batch_size)
    windows = 5 * 4  # 5 slices x (2 x 2) in-plane windows
    assert sum(calls) == windows and max(calls) == min(sw_batch_size, windows)


def test_valid_convolutions_are_covered_by_output_windows():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3)  # unpadded: a 16^3 window gives 14^3
    image = torch.randn(2, 20, 23, 13)  # 13 < 14 on the last axis: padded
    out = sliding_window_logits(conv, image, (16, 16, 16), 3, output_window=(14, 14, 14))
    with torch.no_grad():
        direct = conv(F.pad(image, (1, 1, 1, 1, 1, 1))[None])[0]
    assert out.shape == (3, 20, 23, 13) and torch.allclose(out, direct, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        sliding_window_logits(conv, image, (16, 16, 16), 3)  # the output size must be declared


def test_predict_volume_with_a_valid_padding_unet():
    model = UNet(
        spatial_dims=3,
        in_channels=2,
        num_classes=3,
        filters=[4, 8],
        kernel_sizes=[3, 3],
        strides=[1, 2],
        padding="valid",
        norm="none",
    ).eval()
    window = next(n for n in range(16, 40) if model._trace_axis(n, 0) is not None)
    out = predict_volume(model, torch.randn(2, 30, 25, 21), (window,) * 3, 3, 3)
    assert out.shape == (3, 30, 25, 21) and torch.isfinite(out).all()


def test_amp_runs_the_model_in_bf16_and_accumulates_in_float32():
    net = small_net(3)
    image = torch.randn(2, 24, 24, 24)
    dtypes = []
    net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    amp = sliding_window_logits(net, image, (16, 16, 16), 3, amp_dtype=torch.bfloat16)
    full = sliding_window_logits(net, image, (16, 16, 16), 3)
    assert dtypes[0] == torch.bfloat16 and amp.dtype == torch.float32
    assert torch.allclose(amp, full, atol=0.1)


def test_load_model_prefers_the_moving_average_weights_a_checkpoint_holds(trained, tmp_path):
    from unet_trainer.core.checkpoint import load_checkpoint

    state = load_checkpoint(trained["checkpoint"])
    assert load_model(trained["checkpoint"]).weights == "model"
    state.setdefault("extra_state", {})["ema"] = {
        k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    path = tmp_path / "ema.pt"
    torch.save(state, path)
    loaded = load_model(path)
    assert loaded.weights == "ema"
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state["extra_state"]["ema"][key]), key


def test_target_spacing_trains_resampled_and_predicts_on_the_original_grid(tiny_config, tmp_path):
    """data.target_spacing reaches preparation (2 mm arrays) and unet-predict puts the prediction
    back on the raw 1 mm grid with the raw affine."""
    summary = run_training(tiny_config("max_duration=1ba", "data.target_spacing=[2.0, 2.0, 2.0]"), progress=False)
    prepared = Path(summary["prepared"])
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["settings"]["target_spacing"] == [2.0, 2.0, 2.0]
    meta = json.loads((prepared / f"{record['cases'][0]}_meta.json").read_text())
    assert meta["spacing"] == [2.0, 2.0, 2.0]
    crop = [b - a for a, b in meta["crop_box"]]
    assert all(abs(p - c / 2) <= 1 for p, c in zip(meta["prepared_shape"], crop))
    raw_dir = Path(json.loads((prepared / "prepare.json").read_text())["source"])
    out = tmp_path / "pred"
    assert (
        predict_main(
            [str(tmp_path / "run" / "checkpoints" / "latest-rank0.pt"), str(raw_dir), str(out), "--no-progress"]
        )
        == 0
    )
    case = record["cases"][0]
    written = nib.load(str(out / f"{case}.nii.gz"))
    seg = nib.load(str(raw_dir / case / f"{case}_seg.nii.gz"))
    assert written.shape == seg.shape and np.allclose(written.affine, seg.affine)


def test_unet_data_prepare_target_spacing_flag(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert data_main(["synth", "--out", str(raw), "--cases", "1", "--shape", "24", "24", "24"]) == 0
    assert data_main(["prepare", str(raw), "--out", str(tmp_path / "p"), "--target-spacing", "2", "2", "2"]) == 0
    meta = json.loads(next((tmp_path / "p").glob("*_meta.json")).read_text())
    assert meta["spacing"] == [2.0, 2.0, 2.0]
    assert data_main(["prepare", str(raw), "--out", str(tmp_path / "q"), "--target-spacing", "0", "1", "1"]) == 2
    assert "positive" in capsys.readouterr().err
