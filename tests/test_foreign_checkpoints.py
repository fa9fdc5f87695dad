"""Another run's checkpoints in a run folder are never overwritten or resumed from, and a
checkpoint used in place of a refused best-rank0.pt is always named: each test is the hostile try
itself (a copied-in best, a copied-in newer checkpoint, a planted or damaged best, a command
on a run that is training), with the check that nothing was lost."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.folders import fold_state
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.core.checkpoint import CheckpointError, load_checkpoint, one_line
from unet_trainer.core.schema import Duration
from unet_trainer.training.trainer import Callback

DEMO = ROOT / "configs" / "demo.yaml"


def config(cache: Path, run_dir: Path, *extra: str) -> dict:
    return resolve_config(DEMO, tiny_overrides(cache, run_dir, *extra))


def digest(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def run_id_of(path: Path) -> str:
    return load_checkpoint(path)["run_id"]


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


class Planted:
    """Unpickling this would run a shell command creating ``marker``: a checkpoint with code in it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def runs(cache_root, tmp_path_factory):
    """Two finished tiny runs of 2 steps with a best-rank0.pt each: "other" (fold 1) is the
    stranger whose files get copied into the folder of "mine" (fold 0). Tests work on copies."""
    root = tmp_path_factory.mktemp("foreign")
    for name, fold in (("other", 1), ("mine", 0)):
        cfg = config(cache_root, root / name, "max_duration=2ba", "eval_interval=1ba", f"data.fold={fold}")
        run_training(cfg, progress=False)
    phantom = raw_data_dir(cfg, progress=False)
    one_case = root / "input"
    shutil.copytree(phantom / "BraTS2021_00000", one_case / "BraTS2021_00000")
    return {"root": root, "other": root / "other", "mine": root / "mine", "input": one_case}


def copy_run(runs: dict, name: str, target: Path) -> Path:
    shutil.copytree(runs[name], target, symlinks=True)
    return target


# ---------------------------------------------------------------------------------------------
# A foreign best-rank0.pt is moved aside, never replaced
# ---------------------------------------------------------------------------------------------


def test_a_foreign_best_copied_into_a_run_folder_is_moved_aside_and_the_run_writes_its_own(
    cache_root, runs, tmp_path, capsys
):
    run = tmp_path / "run"
    # The run's first part evaluates never, so it has no best yet; then a stranger's best is copied in.
    run_training(config(cache_root, run, "max_duration=2ba", "eval_interval=0ep"), progress=False)
    mine_id = run_id_of(run / "checkpoints" / "ep1-ba2-rank0.pt")
    foreign = run / "checkpoints" / "best-rank0.pt"
    shutil.copyfile(runs["other"] / "checkpoints" / "best-rank0.pt", foreign)
    foreign_digest, foreign_id = digest(foreign), run_id_of(foreign)
    capsys.readouterr()
    # Continue the run (the same command, longer), now evaluating.
    summary = run_training(config(cache_root, run, "max_duration=3ba", "eval_interval=1ba"), progress=False)
    err = capsys.readouterr().err
    assert Path(summary["resumed_from"]).name == "ep1-ba2-rank0.pt" and summary["batch"] == 3
    (kept,) = (run / "previous").glob("*/checkpoints/best-rank0.pt")
    assert digest(kept) == foreign_digest
    (note,) = lines_with(err, str(foreign))
    assert note.startswith("note:") and foreign_id[:8] in note and mine_id[:8] in note and str(kept.parent) in note
    assert run_id_of(foreign) == mine_id  # the run's own best, written at its evaluation


class DropAt(Callback):
    """Copies ``source`` to ``target`` after step ``batch`` (another run's file landing mid-run)."""

    def __init__(self, batch: int, source: Path, target: Path):
        self.batch, self.source, self.target = batch, source, target

    def batch_end(self, state):
        if state.timestamp.batch == self.batch:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.source, self.target)


def test_a_foreign_file_under_a_name_the_run_writes_is_moved_aside_not_overwritten(cache_root, runs, tmp_path, capsys):
    run = tmp_path / "run"
    source = runs["other"] / "checkpoints" / "ep1-ba2-rank0.pt"
    # Dropped after step 1, under the very name the run saves at step 2 (and a best too).
    drops = [DropAt(1, source, run / "checkpoints" / "ep1-ba2-rank0.pt")]
    drops.append(DropAt(1, runs["other"] / "checkpoints" / "best-rank0.pt", run / "checkpoints" / "best-rank0.pt"))
    capsys.readouterr()
    run_training(
        config(cache_root, run, "max_duration=2ba", "eval_interval=1ep"), progress=False, extra_callbacks=drops
    )
    err = capsys.readouterr().err
    kept = sorted((run / "previous").glob("*/checkpoints/*.pt"))
    assert sorted(p.name for p in kept) == ["best-rank0.pt", "ep1-ba2-rank0.pt"]
    assert {digest(p) for p in kept} == {digest(source), digest(runs["other"] / "checkpoints" / "best-rank0.pt")}
    assert len(lines_with(err, "rather than overwritten")) == 2
    own = run_id_of(run / "checkpoints" / "ep0-ba1-rank0.pt")
    assert (
        run_id_of(run / "checkpoints" / "ep1-ba2-rank0.pt") == own == run_id_of(run / "checkpoints" / "best-rank0.pt")
    )


# ---------------------------------------------------------------------------------------------
# A foreign newer checkpoint is never resumed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["latest link gone", "newest own checkpoint truncated"])
def test_a_foreign_newer_checkpoint_is_never_resumed(cache_root, runs, tmp_path, capsys, damage):
    run = copy_run(runs, "mine", tmp_path / "run")
    folder = run / "checkpoints"
    mine_id = run_id_of(folder / "ep1-ba2-rank0.pt")
    # Another fold's checkpoint copied in under a newer name than anything the run has.
    foreign = folder / "ep9-ba90-rank0.pt"
    shutil.copyfile(runs["other"] / "checkpoints" / "ep1-ba2-rank0.pt", foreign)
    foreign_digest = digest(foreign)
    if damage == "latest link gone":  # e.g. the folder was copied without its symlinks
        (folder / "latest-rank0.pt").unlink()
        resumes = "ep1-ba2-rank0.pt"
    else:  # a disk fault: the link's target no longer loads, so the link says nothing
        newest = folder / "ep1-ba2-rank0.pt"
        newest.write_bytes(newest.read_bytes()[:1000])
        resumes = "ep0-ba1-rank0.pt"
    capsys.readouterr()
    summary = run_training(config(cache_root, run, "max_duration=3ba", "eval_interval=1ba"), progress=False)
    err = capsys.readouterr().err
    assert Path(summary["resumed_from"]).name == resumes and summary["batch"] == 3
    assert run_id_of(folder / "ep1-ba3-rank0.pt") == mine_id == summary["state"].run_id
    assert digest(foreign) == foreign_digest  # the same bytes at the same path
    (warning,) = lines_with(err, f"{foreign} belongs to run")
    assert warning.startswith("warning:") and f"not this run ({mine_id[:8]})" in warning
    assert "not resumed, left in place" in warning
    assert "data.fold" not in err  # it never came to comparing another fold's config


def test_a_folder_that_does_not_say_which_run_is_its_own_resumes_none(cache_root, runs, tmp_path, capsys):
    """Neither the latest link nor the run's record (a folder from before records): one line, nothing changed."""
    run = copy_run(runs, "mine", tmp_path / "run")
    folder = run / "checkpoints"
    shutil.copyfile(runs["other"] / "checkpoints" / "ep1-ba2-rank0.pt", folder / "ep9-ba90-rank0.pt")
    (folder / "latest-rank0.pt").unlink()
    (run / "run.lock").unlink()
    before = {p.name: digest(p) for p in folder.iterdir()}
    capsys.readouterr()
    status = train_main([str(DEMO), *tiny_overrides(cache_root, run, "max_duration=3ba", "eval_interval=1ba")])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1 and "Traceback" not in err
    assert str(folder) in line and "load_path=" in line
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_a_fold_is_judged_by_its_own_checkpoints_only(runs, tmp_path):
    """unet-cv's view of a fold (finished? which checkpoint?) is the resume's: never another run's."""
    run = copy_run(runs, "mine", tmp_path / "fold_0")
    folder = run / "checkpoints"
    shutil.copyfile(runs["other"] / "checkpoints" / "ep1-ba2-rank0.pt", folder / "ep9-ba90-rank0.pt")
    (folder / "latest-rank0.pt").unlink()
    state = fold_state(run, 0, Duration.parse("3ba"))
    assert state.checkpoint.name == "ep1-ba2-rank0.pt" and state.batch == 2 and not state.finished
    assert state.run_id == run_id_of(folder / "ep1-ba2-rank0.pt")


# ---------------------------------------------------------------------------------------------
# A refused best-rank0.pt is named where the newest checkpoint stands in for it
# ---------------------------------------------------------------------------------------------


def spoil_best(best: Path, how: str, runs: dict, marker: Path) -> str:
    """Damage ``best`` as ``how`` says; returns words its refusal must contain."""
    if how == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
        return "not a readable checkpoint"
    if how == "code":
        torch.save({"model": {}, "payload": Planted(marker)}, best)
        return "needs code to load"
    shutil.copyfile(runs["other"] / "checkpoints" / "best-rank0.pt", best)
    return f"belongs to run {run_id_of(best)[:8]}"


@pytest.mark.parametrize("how", ["truncated", "code", "another run's"])
@pytest.mark.parametrize("folder_kind", ["run folder", "unet-cv folder"])
def test_a_refused_best_is_named_when_predict_uses_the_newest_instead(runs, tmp_path, capsys, how, folder_kind):
    if folder_kind == "run folder":
        given = run = copy_run(runs, "mine", tmp_path / "run")
    else:
        given = tmp_path / "cv"
        run = copy_run(runs, "mine", given / "fold_0")
    best = run / "checkpoints" / "best-rank0.pt"
    marker = tmp_path / "code-ran"
    words = spoil_best(best, how, runs, marker)
    spoiled = digest(best)
    capsys.readouterr()
    status = predict_main([str(given), str(runs["input"]), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 0 and (tmp_path / "out" / "BraTS2021_00000.nii.gz").is_file()
    (line,) = lines_with(err, str(best))
    assert line.startswith("warning:") and f"{best} refused (" in line and words in line
    assert line.endswith("; using ep1-ba2-rank0.pt") and "weights_only" not in line
    assert not marker.exists() and digest(best) == spoiled


def test_an_explicitly_named_refused_best_is_refused_outright(runs, tmp_path, capsys):
    run = copy_run(runs, "mine", tmp_path / "run")
    best = run / "checkpoints" / "best-rank0.pt"
    marker = tmp_path / "code-ran"
    spoil_best(best, "code", runs, marker)
    for main, argv in (
        (predict_main, [str(best), str(runs["input"]), str(tmp_path / "out"), "--no-progress"]),
        (eval_main, [str(best), "--no-progress"]),
    ):
        capsys.readouterr()
        status = main(argv)
        err = capsys.readouterr().err
        (line,) = err.splitlines()
        assert status == 1 and line.startswith(f"error: {best}: needs code to load")
        assert "GLOBAL posix.system" in line and line.endswith("so it is never loaded")
        assert "weights_only" not in line and "ep1-ba2" not in line  # no stand-in
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_refusal_of_a_checkpoint_with_code_is_our_own_whole_line(tmp_path):
    path = tmp_path / "planted.pt"
    torch.save({"model": {}, "payload": Planted(tmp_path / "code-ran")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message == f"{path}: needs code to load (its pickle asks for GLOBAL posix.system), so it is never loaded"
    assert not (tmp_path / "code-ran").exists()
    # A long reason is cut between words, never inside one.
    cut = one_line("checkpoint " * 100, limit=60)
    assert cut.endswith("checkpoint...") and len(cut) <= 60


# ---------------------------------------------------------------------------------------------
# A run that is training right now is said to be training, with its PID
# ---------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from unet_trainer.core.runfolder import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


class StopAt(Callback):
    def __init__(self, batch: int):
        self.batch = batch

    def batch_end(self, state):
        if state.timestamp.batch == self.batch:
            state.stop_reason = "stopped for the test"


def test_predict_on_a_run_that_is_training_says_so_and_names_the_pid(cache_root, tmp_path, runs, capsys):
    run = tmp_path / "run"
    run_training(
        config(cache_root, run, "max_duration=4ba", "eval_interval=1ba"), progress=False, extra_callbacks=[StopAt(2)]
    )
    # The run's command is running again: it holds the folder's lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        status = predict_main([str(run), str(runs["input"]), str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    (line,) = err.splitlines()
    assert status == 1 and line.startswith(f"error: {run}: run is training right now (process {holder.pid} ")
    assert "stopped" not in line and "run its command again" not in line
    assert not (tmp_path / "out").exists()
    # Once it is gone, the run is what it is: stopped, to be finished by its command.
    capsys.readouterr()
    assert predict_main([str(run), str(runs["input"]), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "stopped at batch 2" in capsys.readouterr().err


def test_a_checkpoint_cut_anywhere_is_not_readable_never_an_os_error_text(runs, tmp_path):
    """Cut at any length (torch's reader then fails in several ways, one an OSError with no file name),
    the line says the checkpoint is not readable, in words, and never quotes Python's "[Errno N]"."""
    whole = (runs["mine"] / "checkpoints" / "best-rank0.pt").read_bytes()
    for length in (0, 10, 1000, 5000, len(whole) // 2, len(whole) - 10):
        cut = tmp_path / f"cut{length}.pt"
        cut.write_bytes(whole[:length])
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(cut, mmap=mmap)
            message = str(caught.value)
            assert message.startswith(f"{cut}: not a readable checkpoint ("), message
            assert "[Errno" not in message and "\n" not in message
    with pytest.raises(CheckpointError, match="is a directory, expected a file"):
        load_checkpoint(tmp_path)
