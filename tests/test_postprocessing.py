"""Postprocessing chosen on validation: the rules, the selection (a rule that helps is kept, one
that hurts refused), postprocessing.json (round trip, one-line errors), unet-eval
--choose-postprocessing and unet-predict applying it, on a tiny phantom run; and the evaluator's
lesion-metric backend."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_overrides

import unet_trainer.commands.predict as predict_module
from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.data.layouts import list_cases
from unet_trainer.evaluation.metrics import case_dice
from unet_trainer.evaluation.postprocessing import (
    POSTPROCESSING_FILE,
    MetricSettings,
    PostprocessingError,
    PredictionStore,
    apply_rules,
    candidate_stages,
    choose_postprocessing,
    enhancing_to_necrosis,
    keep_largest_component,
    load_postprocessing,
    postprocessing_for,
    remove_small_components,
    write_postprocessing,
)

SHAPE = (32, 32, 32)


def labels_with(*blocks) -> np.ndarray:
    """A canonical label map of SHAPE with ((z0, z1), (y0, y1), (x0, x1), label) blocks painted in order."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for (z0, z1), (y0, y1), (x0, x1), value in blocks:
        labels[z0:z1, y0:y1, x0:x1] = value
    return labels


# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------


def test_largest_component_keeps_only_the_biggest_tumour():
    labels = labels_with(((2, 8), (2, 8), (2, 8), 2), ((3, 5), (3, 5), (3, 5), 3), ((20, 23), (20, 23), (20, 23), 1))
    out = keep_largest_component(labels, "WT")
    np.testing.assert_array_equal(out[:10], labels[:10])  # the 216-voxel tumour, ET inside it, stays
    assert not out[15:].any() and labels[15:].any()  # the 27-voxel one is gone
    assert keep_largest_component(out, "WT") is out  # one component: nothing to do


def test_small_components_take_the_enclosing_regions_label():
    labels = labels_with(
        ((2, 10), (2, 10), (2, 10), 2),  # oedema, 512 voxels
        ((3, 6), (3, 6), (3, 6), 3),  # an ET block of 27 inside it
        ((8, 9), (8, 9), (8, 9), 3),  # an ET speck of 1 inside it
        ((20, 22), (20, 22), (20, 22), 1),  # a separate NCR lump of 8
    )
    et = remove_small_components(labels, "ET", 2)
    assert et[8, 8, 8] == 1 and (et[3:6, 3:6, 3:6] == 3).all()  # the ET speck became necrosis (still TC)
    assert (et != labels).sum() == 1
    wt = remove_small_components(labels, "WT", 10)
    assert not wt[20:22, 20:22, 20:22].any() and (wt[:12] == labels[:12]).all()  # the 8-voxel lump is background
    tc = remove_small_components(labels, "TC", 10)
    assert (tc[20:22, 20:22, 20:22] == 2).all() and tc[8, 8, 8] == 2  # the lump and the speck: oedema now
    assert (tc[3:6, 3:6, 3:6] == 3).all() and (tc != labels).sum() == 9
    assert remove_small_components(labels, "WT", 8) is labels  # 8 is not fewer than 8


def test_tc_removal_keeps_the_whole_tumour():
    labels = labels_with(((2, 10), (2, 10), (2, 10), 2), ((4, 6), (4, 6), (4, 6), 1))
    out = remove_small_components(labels, "TC", 10)
    assert (out[2:10, 2:10, 2:10] == 2).all()  # the 8-voxel core became oedema: WT unchanged


def test_enhancing_to_necrosis_below_the_threshold_only():
    labels = labels_with(((2, 10), (2, 10), (2, 10), 2), ((4, 6), (4, 6), (4, 6), 3))  # 8 ET voxels
    out = enhancing_to_necrosis(labels, 9)
    assert (out[4:6, 4:6, 4:6] == 1).all() and (out == 3).sum() == 0
    assert enhancing_to_necrosis(labels, 8) is labels  # 8 is not below 8
    empty = labels_with(((2, 10), (2, 10), (2, 10), 2))
    assert enhancing_to_necrosis(empty, 100) is empty


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------

CUBE_A = ((2, 6), (2, 6), (2, 6))  # 64 voxels each, gaps of 9 (the dilation of 3 merges gaps <= 6)
CUBE_B = ((15, 19), (2, 6), (2, 6))
CUBE_C = ((2, 6), (15, 19), (15, 19))
SPECK = ((27, 29), (27, 29), (27, 29))  # 8 voxels, far from everything


def store_of(tmp_path, cases, memory_bytes=2**30) -> PredictionStore:
    store = PredictionStore(tmp_path, memory_bytes)
    for case_id, (truth, pred) in cases.items():
        store.put(case_id, truth, pred)
    return store


def helpful_and_harmful_cases():
    """Case "three": three true lesions, predicted exactly (the largest-component rule would
    delete two of them: lesion-wise Dice 1 -> 1/3). Case "speck": one lesion predicted exactly
    plus an 8-voxel false positive (1/2 -> 1 once it goes). Oedema only, so TC and ET are empty
    in both (score 1 each)."""
    three = labels_with((*CUBE_A, 2), (*CUBE_B, 2), (*CUBE_C, 2))
    one = labels_with((*CUBE_A, 2))
    return {"three": (three, three.copy()), "speck": (one, labels_with((*CUBE_A, 2), (*SPECK, 2)))}


def test_selection_keeps_the_rule_that_helps_and_refuses_the_one_that_hurts(tmp_path):
    store = store_of(tmp_path, helpful_and_harmful_cases())
    stages = candidate_stages(small_grid=(5, 10, 100), enhancing_grid=(10,))
    choice = choose_postprocessing(store, MetricSettings("lesion", lesion_min_volume=10), stages)
    mean = lambda wt: (wt + 1 + 1) / 3  # noqa: E731  (the case's mean over WT, TC, ET)
    before = (mean(1.0) + mean(0.5)) / 2
    largest, wt, tc, et, necrosis = choice.stages
    # The largest WT component: helps "speck" (+1/2 WT) but hurts "three" (-2/3 WT): refused.
    assert largest["rule"] == "largest_component" and not largest["kept"]
    assert largest["before"] == pytest.approx(before)
    assert largest["after"] == pytest.approx((mean(1 / 3) + mean(1.0)) / 2) and largest["after"] < before
    # Small WT components: 10 removes the speck (5 does not, 100 removes the lesions too): kept.
    assert wt["rule"] == "remove_small_components" and wt["region"] == "WT" and wt["kept"]
    assert wt["min_voxels"] == 10 and wt["after"] == pytest.approx(1.0) and wt["changed_cases"] == 1
    grid = {row["min_voxels"]: row["score"] for row in wt["grid"]}
    assert grid[5] == pytest.approx(before) and grid[10] == pytest.approx(1.0) and grid[100] < before
    # Nothing left to gain: later stages start from 1.0 and are refused.
    assert tc["before"] == pytest.approx(1.0) and not tc["kept"] and not et["kept"] and not necrosis["kept"]
    assert choice.kept == [{"rule": "remove_small_components", "region": "WT", "min_voxels": 10}]
    assert choice.score_before == pytest.approx(before) and choice.score_after == pytest.approx(1.0)
    # The store's predictions end postprocessed.
    truth, pred = store.get("speck")
    np.testing.assert_array_equal(pred, truth)


def test_selection_keeps_nothing_when_every_rule_hurts_or_does_nothing(tmp_path):
    cases = helpful_and_harmful_cases()
    del cases["speck"]
    store = store_of(tmp_path, cases)
    choice = choose_postprocessing(store, MetricSettings(lesion_min_volume=10), candidate_stages((5, 100), (10,)))
    assert choice.kept == [] and choice.score_after == choice.score_before == pytest.approx(1.0)
    assert [s["kept"] for s in choice.stages] == [False] * 5


def test_plain_dice_metric_is_the_mean_of_case_dice(tmp_path):
    cases = helpful_and_harmful_cases()
    store = store_of(tmp_path, cases)
    choice = choose_postprocessing(store, MetricSettings("dice"), candidate_stages((10,), (10,)))
    expected = np.mean([case_dice(torch.from_numpy(p), torch.from_numpy(t))["mean"] for t, p in cases.values()])
    assert choice.metric == "dice" and choice.score_before == pytest.approx(expected)
    assert choice.kept[0] == {"rule": "remove_small_components", "region": "WT", "min_voxels": 10}
    with pytest.raises(PostprocessingError, match="unknown postprocessing metric 'hd95'; expected lesion or dice"):
        choose_postprocessing(store, MetricSettings("hd95"))


@pytest.mark.parametrize("metric", ["lesion", "dice"])
def test_scoring_on_the_foreground_box_equals_scoring_whole_volumes(tmp_path, metric):
    """Selection scores each case on its tumour's box; on phantom cases (tumours anywhere, false
    positives at the volume's faces) every stage's scores equal those of the whole volumes."""
    from unet_trainer.data.phantom import make_phantom_case

    rng = np.random.default_rng(5)
    cases = {}
    for index in range(3):
        _, truth = make_phantom_case((28, 30, 32), rng, style="brats")
        pred = np.roll(truth, 1, axis=index).copy()
        pred[0, 0, :3] = 2  # a speck on the volume's edge
        pred[-2:, -2:, -1] = 3
        cases[f"case{index}"] = (truth, pred)
    settings = MetricSettings(metric, lesion_min_volume=5)
    stages = candidate_stages((2, 5), (20, 2000))
    choice = choose_postprocessing(store_of(tmp_path, cases), settings, stages)
    current = {case_id: pred for case_id, (_, pred) in cases.items()}
    for stage, record in zip(stages, choice.stages, strict=True):
        before = np.mean([settings.score(current[c], cases[c][0]) for c in cases])
        assert record["before"] == pytest.approx(before, abs=1e-12)
        for candidate, row in zip(stage, record.get("grid", [record]), strict=True):
            after = np.mean([settings.score(apply_rules(current[c], [candidate]), cases[c][0]) for c in cases])
            assert row.get("score", row.get("after")) == pytest.approx(after, abs=1e-12)
        if record["kept"]:
            kept = next(c for c in stage if all(c[k] == record[k] for k in c if k != "rule"))
            current = {c: apply_rules(labels, [kept]) for c, labels in current.items()}


def test_the_et_rule_is_kept_when_small_et_is_spurious(tmp_path):
    """Truth without ET; the prediction marks 8 voxels of the core enhancing: relabelling them
    necrosis repairs ET (no false positive) and leaves TC as it is."""
    truth = labels_with((*CUBE_A, 2), ((3, 5), (3, 5), (3, 5), 1))
    pred = labels_with((*CUBE_A, 2), ((3, 5), (3, 5), (3, 5), 3))
    store = store_of(tmp_path, {"case": (truth, pred)})
    choice = choose_postprocessing(store, MetricSettings(lesion_min_volume=5), candidate_stages((5,), (5, 50)))
    assert choice.kept == [{"rule": "enhancing_to_necrosis", "max_voxels": 50}]
    assert choice.score_after == pytest.approx(1.0)


def test_the_store_spills_to_a_temporary_folder_and_removes_it(tmp_path):
    cases = helpful_and_harmful_cases()
    with PredictionStore(tmp_path, memory_bytes=2 * SHAPE[0] ** 3) as store:  # one case in memory
        for case_id, (truth, pred) in cases.items():
            store.put(case_id, torch.from_numpy(truth), pred)  # tensors too
        spilled = list(tmp_path.iterdir())
        assert len(spilled) == 1 and spilled[0].name.startswith(".postprocessing-predictions-")
        assert sorted(p.name for p in spilled[0].iterdir()) == ["0-pred.npy", "0-truth.npy"]
        assert store.case_ids == ["three", "speck"]
        for case_id, (truth, pred) in cases.items():
            got_truth, got_pred = store.get(case_id)
            np.testing.assert_array_equal(got_truth, truth)
            np.testing.assert_array_equal(got_pred, pred)
        choice = choose_postprocessing(store, MetricSettings(lesion_min_volume=10), candidate_stages((10,), (10,)))
        assert choice.kept and np.array_equal(store.get("speck")[1], cases["speck"][0])  # rewritten on disk
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# postprocessing.json
# ----------------------------------------------------------------------------------------------


def test_postprocessing_json_round_trip(tmp_path):
    store = store_of(tmp_path / "store", helpful_and_harmful_cases())
    settings = MetricSettings(lesion_min_volume=10)
    choice = choose_postprocessing(store, settings, candidate_stages((5, 10), (10,)))
    path = write_postprocessing(tmp_path / POSTPROCESSING_FILE, choice, tmp_path / "ck.pt", "two cases", settings)
    document = json.loads(path.read_text())
    assert document["metric"] == "lesion" and document["checkpoint"] == str(tmp_path / "ck.pt")
    assert document["cases"] == 2 and document["settings"]["lesion_min_volume"] == 10
    assert [s["rule"] for s in document["stages"]] == [
        "largest_component",
        "remove_small_components",
        "remove_small_components",
        "remove_small_components",
        "enhancing_to_necrosis",
    ]
    assert all({"before", "after", "kept"} <= set(s) for s in document["stages"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]  # atomic
    loaded = load_postprocessing(path)
    assert list(loaded.rules) == choice.kept and loaded.checkpoint == str(tmp_path / "ck.pt")
    assert loaded.describe() == "remove WT components < 10 voxels"
    _, speck = helpful_and_harmful_cases()["speck"]
    np.testing.assert_array_equal(loaded(speck), apply_rules(speck, choice.kept))
    assert loaded(speck)[27:29, 27:29, 27:29].sum() == 0 and speck[27:29, 27:29, 27:29].all()  # not in place


def valid_document(**changes) -> dict:
    document = {
        "format": "unet-trainer postprocessing",
        "version": 1,
        "kept": [
            {"rule": "largest_component", "region": "WT"},
            {"rule": "remove_small_components", "region": "ET", "min_voxels": 20},
            {"rule": "enhancing_to_necrosis", "max_voxels": 300},
        ],
    }
    document.update(changes)
    return document


def broken_kept(index: int, **rule) -> dict:
    document = valid_document()
    document["kept"][index] = rule
    return document


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON (Expecting property name"),
        (json.dumps([1, 2]), 'not a postprocessing file (expected an object with "format"'),
        (json.dumps({"kept": []}), "not a postprocessing file"),
        (json.dumps(valid_document(version=2)), "version 2 is not supported (expected 1)"),
        (json.dumps(valid_document(kept={"rule": "x"})), '"kept" must be a list of rules'),
        (json.dumps(broken_kept(1, region="ET")), 'kept[1] must be an object with a "rule"'),
        (json.dumps(broken_kept(0, rule="__import__")), "kept[0].rule '__import__' is not one of largest_component, "),
        (json.dumps(broken_kept(1, rule="remove_small_components", region="ET")), "kept[1].min_voxels is missing"),
        (
            json.dumps(broken_kept(1, rule="remove_small_components", region="ET", min_voxels="20")),
            'kept[1].min_voxels: expected an integer of at least 1, got "20"',
        ),
        (
            json.dumps(broken_kept(2, rule="enhancing_to_necrosis", max_voxels=0)),
            "kept[2].max_voxels: expected an integer of at least 1, got 0",
        ),
        (
            json.dumps(broken_kept(2, rule="enhancing_to_necrosis", max_voxels=True)),
            "kept[2].max_voxels: expected an integer of at least 1, got true",
        ),
        (json.dumps(broken_kept(0, rule="largest_component", region="XT")), "kept[0].region: expected one of WT, TC"),
        (
            json.dumps(broken_kept(0, rule="largest_component", region="WT", code="rm -rf")),
            "kept[0]: unknown key(s) code for rule largest_component",
        ),
    ],
)
def test_a_strangers_postprocessing_json_is_checked_with_one_line_errors(tmp_path, content, fragment):
    path = tmp_path / "postprocessing.json"
    path.write_text(content)
    with pytest.raises(PostprocessingError) as error:
        load_postprocessing(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_a_valid_strangers_file_applies_its_rules_in_order(tmp_path):
    path = tmp_path / "pp.json"
    path.write_text(json.dumps(valid_document()))
    loaded = load_postprocessing(path)
    assert len(loaded.rules) == 3 and loaded.checkpoint == ""
    labels = labels_with((*CUBE_A, 2), ((3, 5), (3, 5), (3, 5), 3), (*SPECK, 2))
    expected = enhancing_to_necrosis(remove_small_components(keep_largest_component(labels, "WT"), "ET", 20), 300)
    np.testing.assert_array_equal(loaded(labels), expected)
    with pytest.raises(PostprocessingError, match="cannot read the postprocessing file"):
        load_postprocessing(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# unet-eval --choose-postprocessing and unet-predict, on a tiny phantom run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("postprocessing-run") / "run"
    cfg = resolve_config(ROOT / "configs" / "demo.yaml", tiny_overrides(cache_root, run_dir, "max_duration=2ba"))
    run_training(cfg, progress=False)
    return {
        "checkpoint": run_dir / "checkpoints" / "latest-rank0.pt",
        "run_dir": run_dir,
        "phantom": raw_data_dir(cfg, progress=False),
    }


@pytest.mark.parametrize("metric", ["lesion", "dice"])
def test_unet_eval_chooses_postprocessing_and_writes_it_into_the_run_folder(trained, tmp_path, capsys, metric):
    run_dir = trained["run_dir"]
    (run_dir / POSTPROCESSING_FILE).unlink(missing_ok=True)
    argv = [str(trained["checkpoint"]), "--choose-postprocessing", "--no-progress", "--no-overlays"]
    argv += ["eval.lesion_min_volume=10", "--out", str(tmp_path / "scores.csv")]
    if metric == "dice":
        argv += ["--postprocessing-metric", "dice"]
    assert eval_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Per-case scores:" in out  # the evaluation's own table first
    assert f"Postprocessing chosen on 2 case(s), metric: {'plain' if metric == 'dice' else 'lesion-wise'}" in out
    assert f"Written: {run_dir / POSTPROCESSING_FILE}" in out
    document = json.loads((run_dir / POSTPROCESSING_FILE).read_text())
    assert document["metric"] == metric and document["cases"] == 2
    assert document["checkpoint"] == str(trained["checkpoint"].resolve())
    assert "validation cases (fold 0 of 3)" in document["chosen_on"]
    assert len(document["stages"]) == 5 and all("before" in s and "after" in s for s in document["stages"])
    rows = [line for line in out.splitlines() if line.startswith(("keep the", "remove", "ET -> NCR"))]
    assert len(rows) == 5 and all(line.endswith(("yes", "no")) for line in rows)
    assert all(stage["after"] > stage["before"] for stage in document["stages"] if stage["kept"])
    # Each kept stage's "after" is the next stage's "before"; the totals chain through.
    befores = [s["before"] for s in document["stages"]]
    afters = [s["after"] if s["kept"] else s["before"] for s in document["stages"]]
    assert befores[1:] == pytest.approx(afters[:-1]) and document["score_after"] == pytest.approx(afters[-1])
    load_postprocessing(run_dir / POSTPROCESSING_FILE)  # what it wrote, it reads
    # No temporary folder or file left in the run folder.
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".postprocessing")]
    (run_dir / POSTPROCESSING_FILE).unlink()


def test_unet_eval_choose_postprocessing_spills_predictions_and_cleans_up(trained, tmp_path, monkeypatch):
    import unet_trainer.evaluation.postprocessing as postprocessing_module
    from unet_trainer.commands.evaluate import choose_postprocessing_for
    from unet_trainer.commands.loading import load_model

    seen = {}
    real_choose = postprocessing_module.choose_postprocessing

    def watching(store, *args, **kwargs):
        seen["spilled"] = store.spill_dir is not None and store.spill_dir.parent == trained["run_dir"]
        seen["files"] = sorted(p.name for p in store.spill_dir.iterdir())
        return real_choose(store, *args, **kwargs)

    monkeypatch.setattr(postprocessing_module, "choose_postprocessing", watching)
    report, choice, path = choose_postprocessing_for(
        load_model(trained["checkpoint"], ["eval.lesion_min_volume=10"]),
        out_csv=tmp_path / "s.csv",
        progress=False,
        overlays=False,
        memory_bytes=0,
    )
    assert seen["spilled"] and seen["files"] == ["0-pred.npy", "0-truth.npy", "1-pred.npy", "1-truth.npy"]
    assert choice.cases == len(report.per_case) == 2 and path == trained["run_dir"] / POSTPROCESSING_FILE
    assert not [p.name for p in trained["run_dir"].iterdir() if p.name.startswith(".postprocessing")]
    path.unlink()


def test_unet_eval_postprocessing_flags_are_checked(trained, tmp_path, capsys):
    cases = [
        (["--postprocessing-metric", "dice"], "goes with --choose-postprocessing"),
        (["--choose-postprocessing", "--dataset", str(tmp_path)], "drop --dataset"),
        (["--choose-postprocessing", "--postprocessing-metric", "hd95"], "unknown postprocessing metric 'hd95'"),
    ]
    for extra, fragment in cases:
        assert eval_main([str(trained["checkpoint"]), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert not (trained["run_dir"] / POSTPROCESSING_FILE).exists()


@pytest.fixture
def oracle_model(monkeypatch):
    """Predictions equal to the phantom's own labels (one-hot logits of the prepared truth), so
    that the tests know what unet-predict writes before postprocessing."""
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


def read_labels(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_unet_predict_applies_the_run_folders_postprocessing_unless_told_not_to(
    trained, tmp_path, capsys, oracle_model
):
    run_dir = trained["run_dir"]
    rules = [{"rule": "enhancing_to_necrosis", "max_voxels": 10**9}]  # every case's ET becomes necrosis
    (run_dir / POSTPROCESSING_FILE).write_text(json.dumps(valid_document(kept=rules)))
    try:
        common = [str(trained["checkpoint"]), str(trained["phantom"])]
        assert predict_main([*common, str(tmp_path / "plain"), "--no-progress", "--no-postprocessing"]) == 0
        out = capsys.readouterr().out
        assert "Postprocessing" not in out
        assert predict_main([*common, str(tmp_path / "post"), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"Postprocessing from {run_dir / POSTPROCESSING_FILE}: ET -> NCR when ET < 1000000000 voxels" in out
    finally:
        (run_dir / POSTPROCESSING_FILE).unlink()
    plain, post = read_labels(tmp_path / "plain"), read_labels(tmp_path / "post")
    assert plain.keys() == post.keys() and len(plain) == 6
    # The oracle's labels are the phantom's own (BraTS 2021 numbering: ET is 4).
    for case in list_cases(trained["phantom"], "brats2021"):
        np.testing.assert_array_equal(plain[f"{case.case_id}.nii.gz"], np.asarray(nib.load(str(case.label)).dataobj))
    assert any((labels == 4).any() for labels in plain.values())
    for name, labels in plain.items():
        expected = np.where(labels == 4, 1, labels)  # enhancing relabelled necrosis
        np.testing.assert_array_equal(post[name], expected)


def test_unet_predict_takes_an_explicit_postprocessing_file(trained, tmp_path, capsys, oracle_model):
    path = tmp_path / "chosen.json"
    path.write_text(
        json.dumps(valid_document(kept=[{"rule": "remove_small_components", "region": "WT", "min_voxels": 10**9}]))
    )
    common = [str(trained["checkpoint"]), str(trained["phantom"])]
    assert predict_main([*common, str(tmp_path / "out"), "--no-progress", "--postprocessing", str(path)]) == 0
    assert f"Postprocessing from {path}: remove WT components < 1000000000 voxels" in capsys.readouterr().out
    assert all(not labels.any() for labels in read_labels(tmp_path / "out").values())  # every tumour removed
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(broken_kept(0, rule="largest_component", region="XT")))
    for extra, status, fragment in (
        (["--postprocessing", str(broken)], 1, "kept[0].region: expected one of WT, TC, ET"),
        (["--postprocessing", str(tmp_path / "none.json")], 1, "cannot read the postprocessing file"),
        (["--postprocessing", str(path), "--no-postprocessing"], 2, "exclude each other"),
    ):
        assert predict_main([*common, str(tmp_path / "out2"), "--no-progress", *extra]) == status
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert not (tmp_path / "out2").exists()  # refused before any case was written


def test_postprocessing_for_finds_the_run_folders_file(trained, tmp_path):
    run_dir = trained["run_dir"]
    assert postprocessing_for(trained["checkpoint"]) is None
    (run_dir / POSTPROCESSING_FILE).write_text(json.dumps(valid_document()))
    try:
        found = postprocessing_for(trained["checkpoint"])
        assert found is not None and found.path == run_dir / POSTPROCESSING_FILE and len(found.rules) == 3
        assert postprocessing_for(trained["checkpoint"], enabled=False) is None
    finally:
        (run_dir / POSTPROCESSING_FILE).unlink()


# ----------------------------------------------------------------------------------------------
# The evaluator's lesion-metric backend
# ----------------------------------------------------------------------------------------------


def test_the_evaluator_hands_its_device_tensors_to_the_lesion_metrics(trained, tmp_path, monkeypatch, capsys):
    import unet_trainer.evaluation.case_metrics as evaluation_module

    calls = []
    real = evaluation_module.case_lesion_scores

    def recording(pred, truth, *args, **kwargs):
        calls.append((type(pred), pred.device, type(truth), kwargs["backend"]))
        return real(pred, truth, *args, **kwargs)

    monkeypatch.setattr(evaluation_module, "case_lesion_scores", recording)
    rows = {}
    for backend in ("scipy", "torch"):
        csv_path = tmp_path / f"{backend}.csv"
        argv = [str(trained["checkpoint"]), "--lesion-wise", "--no-progress", "--no-overlays", "--out", str(csv_path)]
        assert eval_main([*argv, "eval.lesion_min_volume=10", f"eval.lesion_backend={backend}"]) == 0
        capsys.readouterr()
        header, *lines = csv_path.read_text().splitlines()
        rows[backend] = [dict(zip(header.split(","), line.split(","))) for line in lines]
    assert calls and all(c[0] is torch.Tensor and c[2] is torch.Tensor for c in calls)
    assert {c[1].type for c in calls} == {"cpu"} and {c[3] for c in calls} == {"scipy", "torch"}
    for a, b in zip(rows["scipy"], rows["torch"], strict=True):
        for key in a:
            if key.startswith("lesion_"):
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    assert not math.isnan(float(rows["torch"][0]["lesion_dice/WT"]))


def test_a_new_run_in_the_folder_moves_the_old_runs_postprocessing_aside(tiny_config, tmp_path):
    """postprocessing.json was chosen on the old run's checkpoints: a fresh run (save_overwrite)
    must not leave it for unet-predict to apply to the new ones."""
    run = tmp_path / "run"
    run_training(tiny_config("max_duration=1ba", "eval_interval=0ep"), progress=False)
    (run / POSTPROCESSING_FILE).write_text(json.dumps(valid_document()))
    run_training(tiny_config("max_duration=1ba", "autoresume=false", "save_overwrite=true"), progress=False)
    assert not (run / POSTPROCESSING_FILE).exists()
    (moved,) = (run / "previous").iterdir()
    assert json.loads((moved / POSTPROCESSING_FILE).read_text()) == valid_document()
    assert postprocessing_for(run / "checkpoints" / "latest-rank0.pt") is None


def test_selection_measures_lesion_sizes_in_mm3_at_each_cases_spacing(tmp_path):
    # The truth's 8-voxel speck is missed: 8 mm³ at 1 mm (dropped at 10 mm³, so WT scores 1) but
    # 64 mm³ at 2 mm (kept and missed, so WT scores 1/2).
    truth, pred = labels_with((*CUBE_A, 2), (*SPECK, 2)), labels_with((*CUBE_A, 2))
    settings = MetricSettings("lesion", lesion_min_volume=10)
    mean = lambda wt: (wt + 1 + 1) / 3  # noqa: E731  (the case's mean over WT, TC, ET)
    assert settings.score(pred, truth) == settings.score(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(mean(1.0))
    assert settings.score(pred, truth, (2.0, 2.0, 2.0)) == pytest.approx(mean(0.5))
    for spacing, expected in (((1.0, 1.0, 1.0), mean(1.0)), ((2.0, 2.0, 2.0), mean(0.5))):
        store = PredictionStore(tmp_path / str(spacing[0]), 2**30)
        store.put("case", truth, pred, spacing)
        assert store.spacing("case") == spacing
        choice = choose_postprocessing(store, settings, candidate_stages(small_grid=(5,), enhancing_grid=(10,)))
        assert choice.score_before == pytest.approx(expected)
