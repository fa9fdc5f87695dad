"""No command writes into what it reads: unet-predict, unet-eval --out, unet-data prepare, unet-train
and unet-cv refuse an output inside (or equal to, or holding) their input dataset, prepared data or
checkpoint in one line, before anything is written; and run_name must be a plain folder name."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.cv import main as cv_main
from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.datasets import prepared_data_dir, raw_data_dir
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.guard import OutputPathError, check_outputs
from unet_trainer.data.layouts import list_cases, write_case

DEMO = str(ROOT / "configs" / "demo.yaml")
SHAPE = (12, 14, 10)  # (Z, Y, X)


def write_dataset(root: Path, fmt: str, cases: int = 2) -> list[str]:
    """A tiny labelled dataset in layout ``fmt``: a head box with every tumour label; its case ids."""
    rng = np.random.default_rng(0)
    ids = [f"BRATS_{k:03d}" for k in range(1, cases + 1)]
    for case_id in ids:
        image = np.zeros((4,) + SHAPE, np.float32)
        image[:, 2:10, 3:12, 1:8] = rng.uniform(1.0, 2.0, size=(4, 8, 9, 7))
        label = np.zeros(SHAPE, np.uint8)
        label[3:9, 4:11, 2:7] = 2
        label[4:8, 5:9, 3:6] = 3
        label[5:7, 6:8, 4] = 1
        write_case(root, fmt, case_id, image, label, np.diag([1.0, 1.0, 1.0, 1.0]))
    return ids


def tree_state(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` -> its content hash ("dir" for a folder, the target for a link)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def one_error_line(err: str) -> str:
    """The one error line on stderr (notes such as "Model: ..." may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory):
    """A tiny one-step run on the phantom: its checkpoint and run folder."""
    run_dir = tmp_path_factory.mktemp("guard-run") / "run"
    cfg = resolve_config(DEMO, tiny_overrides(cache_root, run_dir, "max_duration=1ba"))
    run_training(cfg, progress=False)
    return {"cfg": cfg, "run_dir": run_dir, "checkpoint": run_dir / "checkpoints" / "latest-rank0.pt"}


# ----------------------------------------------------------------------------------------------
# The guard itself
# ----------------------------------------------------------------------------------------------


def test_the_guard_compares_whole_path_components_not_string_prefixes(tmp_path):
    ds = tmp_path / "DS"
    (ds / "labelsTr").mkdir(parents=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    inputs = dict(folders=[("the input dataset", ds)], files=[("the checkpoint", checkpoint)])
    # Siblings sharing a name prefix, new folders, and folders beside the checkpoint are fine.
    for fine in ("DS_pred", "DS2/labelsTr", "DSX", "run/pred", "run/checkpoints/pred", "run/checkpoints/best.pt.csv"):
        check_outputs([("the output folder", tmp_path / fine)], **inputs)
    refused = {
        "DS": "must not be the input dataset",
        "DS/labelsTr": "is inside the input dataset",
        "DS/new/deeper": "is inside the input dataset",
        "DS/../DS/imagesTr": "is inside the input dataset",
        ".": "holds the input dataset",
        "run/checkpoints/best.pt": "must not be the checkpoint",
        "run/checkpoints": "holds the checkpoint",
    }
    for output, fragment in refused.items():
        with pytest.raises(OutputPathError, match=fragment) as error:
            check_outputs([("the output folder", tmp_path / output)], **inputs)
        assert "\n" not in str(error.value) and str(tmp_path / output) in str(error.value)


def test_the_guard_follows_symlinks_and_the_home_folder(tmp_path, monkeypatch):
    ds = tmp_path / "DS"
    (ds / "labelsTr").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link-into-ds"
    link.symlink_to(ds / "labelsTr")
    with pytest.raises(OutputPathError, match=r"link-into-ds/new \(-> .*DS/labelsTr/new\) is inside the input dataset"):
        check_outputs([("the output folder", link / "new")], folders=[("the input dataset", ds)])
    # A dataset whose sub-folder is a link elsewhere: the path through it is still inside.
    (ds / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputPathError, match="is inside the input dataset"):
        check_outputs([("the output folder", ds / "linked")], folders=[("the input dataset", ds)])
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(OutputPathError, match="is inside the input dataset"):
        check_outputs([("the output folder", "~/DS/labelsTr")], folders=[("the input dataset", ds)])


# ----------------------------------------------------------------------------------------------
# unet-predict
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["msd", "nnunetv2"])
def test_unet_predict_into_the_datasets_own_folders_is_refused_and_nothing_changes(trained, tmp_path, capsys, fmt):
    ds = tmp_path / "DS"
    write_dataset(ds, fmt)
    labels, images = ("labelsTr", "imagesTr")
    before, around = tree_state(ds), tree_state(tmp_path)
    for output in (ds / labels, ds / images, ds / "predictions", ds, tmp_path):
        status = predict_main([str(trained["checkpoint"]), str(ds), str(output), "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert status == 1 and str(output) in line and str(ds) in line, line
        assert tree_state(tmp_path) == around
    assert tree_state(ds) == before


def test_unet_predict_over_or_around_its_checkpoint_is_refused(trained, tmp_path, capsys):
    ds = tmp_path / "DS"
    write_dataset(ds, "msd")
    run_dir, checkpoint = trained["run_dir"], trained["checkpoint"]
    before = tree_state(run_dir)
    for model, output, fragment in (
        (checkpoint, checkpoint.parent, "holds the checkpoint"),
        (checkpoint, run_dir, "holds the checkpoint"),
        (run_dir, run_dir, "must not be the model folder"),  # a run folder given as the model
        (run_dir, run_dir / "checkpoints", "holds the checkpoint"),
    ):
        status = predict_main([str(model), str(ds), str(output), "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert status == 1 and fragment in line and str(output) in line, line
    assert tree_state(run_dir) == before


def test_unet_predict_into_a_sibling_with_a_common_prefix_or_a_run_folder_is_accepted(trained, tmp_path, capsys):
    ds = tmp_path / "DS"
    ids = write_dataset(ds, "msd")
    before = tree_state(ds)
    for output in (tmp_path / "DS_pred", trained["run_dir"] / "predictions"):
        assert predict_main([str(trained["checkpoint"]), str(ds), str(output), "--no-progress"]) == 0
        assert "Wrote 2 segmentation(s)" in capsys.readouterr().out
        assert sorted(p.name for p in output.iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    assert tree_state(ds) == before


# ----------------------------------------------------------------------------------------------
# unet-eval --out
# ----------------------------------------------------------------------------------------------


def test_unet_eval_out_inside_the_scored_dataset_is_refused_and_nothing_changes(trained, tmp_path, capsys):
    ds = tmp_path / "DS_overlays"  # what the overlays folder of --out DS.csv would be
    write_dataset(ds, "msd")
    label = next(iter(list_cases(ds, "msd"))).label
    cfg = trained["cfg"]
    own_prepared = prepared_data_dir(cfg, raw_data_dir(cfg, progress=False))
    ds_cfg = {**cfg, "data": {**cfg["data"], "path": str(ds), "prepared_path": None}}
    ds_prepared = prepared_data_dir(ds_cfg, ds)
    before, prepared_before = tree_state(ds), tree_state(own_prepared)
    checkpoint_before = tree_state(trained["checkpoint"].parent)
    tries = (
        (["--dataset", str(ds), "--out", str(label)], "the per-case CSV", ds),
        (["--dataset", str(ds), "--out", str(ds / "scores.csv")], "the per-case CSV", ds),
        # The CSV beside the dataset is fine, but its overlays folder <CSV name>_overlays is the dataset.
        (["--dataset", str(ds), "--out", str(tmp_path / "DS.csv")], "the overlays folder", ds),
        (["--out", str(own_prepared / "scores.csv")], "the per-case CSV", own_prepared),
        (["--out", str(trained["checkpoint"])], "the per-case CSV", trained["checkpoint"]),
    )
    for extra, what, clash in tries:
        status = eval_main([str(trained["checkpoint"]), *extra, "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert status == 1 and line.startswith(f"error: {what} ") and str(clash) in line, line
    assert tree_state(ds) == before
    assert tree_state(own_prepared) == prepared_before
    assert tree_state(trained["checkpoint"].parent) == checkpoint_before
    assert not ds_prepared.exists()  # refused before the scored data was prepared
    assert not (tmp_path / "DS.csv").exists()


def test_unet_eval_out_beside_the_dataset_with_a_common_prefix_is_accepted(trained, tmp_path, capsys):
    ds = tmp_path / "DS"
    write_dataset(ds, "msd")
    before = tree_state(ds)
    out = tmp_path / "DS_scores.csv"
    status = eval_main([str(trained["checkpoint"]), "--dataset", str(ds), "--out", str(out), "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert out.is_file() and (tmp_path / "DS_scores_overlays" / "summary.png").is_file()
    assert tree_state(ds) == before


# ----------------------------------------------------------------------------------------------
# unet-data prepare
# ----------------------------------------------------------------------------------------------


def test_unet_data_prepare_into_the_raw_dataset_is_refused(tmp_path, capsys):
    ds = tmp_path / "DS"
    write_dataset(ds, "nnunetv2")
    before, around = tree_state(ds), tree_state(tmp_path)
    for out in (ds / "prepared", ds / "imagesTr", ds, tmp_path):
        assert data_main(["prepare", str(ds), "--out", str(out), "--workers", "1"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: the prepared folder {out} ") and str(ds) in line, line
        assert tree_state(tmp_path) == around
    assert tree_state(ds) == before
    assert data_main(["prepare", str(ds), "--out", str(tmp_path / "DS_prepared"), "--workers", "1"]) == 0
    assert "Prepared 2 nnunetv2 cases" in capsys.readouterr().out
    assert tree_state(ds) == before


# ----------------------------------------------------------------------------------------------
# unet-train and unet-cv
# ----------------------------------------------------------------------------------------------


def test_unet_train_with_a_run_folder_in_or_around_the_data_is_refused(cache_root, tmp_path, capsys):
    ds = tmp_path / "DS"
    write_dataset(ds, "msd", cases=3)
    before, around = tree_state(ds), tree_state(tmp_path)
    run, prepared = tmp_path / "run", tmp_path / "run" / "prepared"
    tries = (
        (
            [],
            ds / "runs" / "demo",
            f"the run folder (save_folder) {ds / 'runs' / 'demo'} is inside the raw dataset {ds};",
        ),
        ([], tmp_path, f"the run folder (save_folder) {tmp_path} holds the raw dataset {ds};"),
        ([f"data.prepared_path={prepared}"], run, f"the run folder (save_folder) {run} holds the prepared data folder"),
        (
            [f"data.prepared_path={ds / 'prep'}"],
            run,
            f"the prepared data folder {ds / 'prep'} is inside the raw dataset",
        ),
    )
    for extra, run_dir, start in tries:
        overrides = tiny_overrides(cache_root, run_dir, f"data.path={ds}", "max_duration=1ba", *extra)
        status = train_main([DEMO, *overrides])
        line = one_error_line(capsys.readouterr().err)
        assert status == 1 and line.startswith(f"error: {start}"), line
        assert tree_state(tmp_path) == around  # no run folder, no lock file, no prepared data
    assert tree_state(ds) == before


def test_unet_cv_with_its_folder_inside_the_data_is_refused(cache_root, tmp_path, capsys):
    ds = tmp_path / "DS"
    write_dataset(ds, "msd", cases=3)
    before, around = tree_state(ds), tree_state(tmp_path)
    for cv_dir in (ds / "cv", tmp_path):
        overrides = tiny_overrides(cache_root, cv_dir, f"data.path={ds}", "max_duration=1ba", "data.num_folds=2")
        status = cv_main([DEMO, *overrides, "--no-progress"])
        line = one_error_line(capsys.readouterr().err)
        assert status == 1 and line.startswith("error: the cross-validation folder (save_folder) "), line
        assert str(ds) in line and str(cv_dir) in line, line
        assert tree_state(tmp_path) == around
    assert tree_state(ds) == before


# ----------------------------------------------------------------------------------------------
# run_name is a plain name
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", ".", "..", "a\\b", "''", "' '"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match=r"^'run_name' = .* must be a plain folder name"):
        resolve_config(DEMO, [f"run_name={name}"])


def test_run_name_climbing_out_of_runs_writes_nothing(cache_root, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    overrides = [o for o in tiny_overrides(cache_root, tmp_path / "unused") if not o.startswith("save_folder=")]
    for main, extra in ((train_main, []), (cv_main, ["--no-progress"])):
        status = main([DEMO, *overrides, "max_duration=1ba", "run_name=../../x", *extra])
        line = one_error_line(capsys.readouterr().err)
        assert status == 2 and "'run_name' = '../../x'" in line, line
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]
    assert resolve_config(DEMO, ["run_name=my.run-2"])["save_folder"] == "runs/my.run-2"
