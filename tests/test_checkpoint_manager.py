"""The checkpoint manager (core/checkpoints.py): the names files are written under, the run's own
newest checkpoint that loads, best and latest, a refused best's substitute and the foreign-file
rules. Checkpoints here are small files written by hand, so every case is cheap and exact."""

import os
from pathlib import Path

import pytest
import torch

from unet_trainer.commands.folders import FoldState, chosen_checkpoint
from unet_trainer.core.checkpoint import atomic_torch_save, load_checkpoint
from unet_trainer.core.checkpoints import (
    CHECKPOINT_CHOICES,
    CheckpointManager,
    checkpoint_run_folder,
    list_checkpoints,
    named_counters,
    run_file_name,
)
from unet_trainer.core.runfolder import FolderLock, RunFolderError

MINE = "a" * 32
OTHER = "b" * 32


class NotAValue:
    """An object the weights-only loader refuses to build: a checkpoint holding it needs code."""


def write(path: Path, run_id: str, batch: int) -> Path:
    """A minimal checkpoint of run ``run_id`` at ``batch``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": {"w": torch.full((2,), float(batch))}, "run_id": run_id, "timestamp": {"batch": batch}}
    atomic_torch_save(payload, path)
    return path


def cut(path: Path) -> Path:
    """Keep the first half of a file: a checkpoint a crash cut short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def with_code(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "run_id": MINE, "extra": NotAValue()}, path)
    return path


def link_latest(manager: CheckpointManager, name: str) -> None:
    os.symlink(name, manager.latest_link)


def record(run_dir: Path, run_id: str) -> None:
    """Have the run folder's lock file record ``run_id`` as the folder's run."""
    lock = FolderLock(run_dir).acquire()
    try:
        lock.record_run_id(run_id)
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_the_managers_names_are_the_ones_files_are_written_under(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager.of_run(run)
    assert manager.folder == run / "checkpoints" and manager.run_dir == run
    payload = {"model": {}, "run_id": MINE, "timestamp": {"batch": 4}}
    saved = manager.save_periodic(payload, 1, MINE, 4)
    manager.save(payload, manager.best_path, MINE, 4)
    assert saved == manager.path_for(1, 4) == run / "checkpoints" / "ep1-ba4-rank0.pt"
    assert sorted(p.name for p in manager.folder.iterdir()) == ["best-rank0.pt", "ep1-ba4-rank0.pt", "latest-rank0.pt"]
    assert os.readlink(manager.latest_link) == "ep1-ba4-rank0.pt"  # relative, so a copied folder keeps it
    assert manager.latest() == saved.resolve() and manager.best_path == run / "checkpoints" / "best-rank0.pt"
    assert load_checkpoint(saved)["run_id"] == MINE
    assert named_counters(saved) == (1, 4) and named_counters(manager.best_path) is None
    assert list_checkpoints(manager.folder) == manager.periodic() == [saved]
    assert run_file_name("ep1-ba4-rank0.pt") and run_file_name("best-rank0.pt") and not run_file_name("latest-rank0.pt")
    assert checkpoint_run_folder(manager.latest_link) == run.resolve()
    assert checkpoint_run_folder(tmp_path / "loose.pt") == tmp_path.resolve()
    rank1 = CheckpointManager.of_run(run, rank=1)
    assert rank1.path_for(0, 2).name == "ep0-ba2-rank1.pt" and rank1.best_path.name == "best-rank1.pt"
    assert rank1.periodic() == []  # rank 0's files are not rank 1's


def test_latest_is_the_link_else_the_highest_batch(tmp_path):
    manager = CheckpointManager.of_run(tmp_path / "run")
    assert manager.latest() is None
    for batch in (2, 10, 3):
        write(manager.path_for(0, batch), MINE, batch)
    assert manager.latest() == manager.path_for(0, 10)  # by batch, not by name
    link_latest(manager, "ep0-ba3-rank0.pt")
    assert manager.latest() == manager.path_for(0, 3).resolve()


# ---------------------------------------------------------------------------------------------
# The run's own newest checkpoint that loads
# ---------------------------------------------------------------------------------------------


def test_newest_loadable_skips_a_cut_file_and_a_foreign_one(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager.of_run(run)
    write(manager.path_for(0, 1), MINE, 1)
    write(manager.path_for(0, 2), MINE, 2)
    cut(write(manager.path_for(1, 3), MINE, 3))
    write(manager.path_for(1, 4), OTHER, 4)  # another run's, named as if newer
    link_latest(manager, "ep1-ba3-rank0.pt")  # the link points at the cut file
    record(run, MINE)
    warnings = []
    path, state = manager.newest_loadable(warn=warnings.append)
    assert path == manager.path_for(0, 2) and state["timestamp"]["batch"] == 2
    # Newest first: the foreign one, then the cut one.
    assert len(warnings) == 2
    assert warnings[0] == (
        f"{manager.path_for(1, 4)} belongs to run bbbbbbbb, not this run (aaaaaaaa); not resumed, left in place"
    )
    assert warnings[1].startswith(f"skipped {manager.path_for(1, 3)} for resuming: not a readable checkpoint")
    assert sorted(p.name for p in manager.periodic()) == [
        f"ep{e}-ba{b}-rank0.pt" for e, b in ((0, 1), (0, 2), (1, 3), (1, 4))
    ]


def test_a_link_left_one_behind_by_a_kill_resumes_from_the_newer_own_checkpoint(tmp_path):
    # Killed between writing ep1-ba3 and moving the link: the file is whole and the run's own.
    run = tmp_path / "run"
    manager = CheckpointManager.of_run(run)
    write(manager.path_for(0, 1), MINE, 1)
    write(manager.path_for(0, 2), MINE, 2)
    write(manager.path_for(1, 3), MINE, 3)
    link_latest(manager, "ep0-ba2-rank0.pt")
    warnings = []
    path, state = manager.newest_loadable(warn=warnings.append)
    assert path == manager.path_for(1, 3) and state["timestamp"]["batch"] == 3 and not warnings
    # Nothing past it would mix with the resumed run.
    assert manager.others(MINE, resumed_batch=3) == []


def _linked_to_newest(m: CheckpointManager) -> None:
    write(m.path_for(0, 1), MINE, 1)
    write(m.path_for(0, 2), MINE, 2)
    link_latest(m, "ep0-ba2-rank0.pt")
    record(m.run_dir, MINE)


def _relink(m: CheckpointManager, name: str) -> None:
    m.latest_link.unlink()
    link_latest(m, name)


def _truncated_newest(m: CheckpointManager) -> None:
    _linked_to_newest(m)
    cut(write(m.path_for(0, 3), MINE, 3))
    _relink(m, "ep0-ba3-rank0.pt")


def _code_in_newest(m: CheckpointManager) -> None:
    _linked_to_newest(m)
    with_code(m.path_for(5, 50))
    _relink(m, "ep5-ba50-rank0.pt")


def _foreign_newer_link_gone(m: CheckpointManager) -> None:
    _linked_to_newest(m)
    write(m.path_for(9, 90), OTHER, 90)
    m.latest_link.unlink()


def _foreign_newer_own_newest_truncated(m: CheckpointManager) -> None:
    _linked_to_newest(m)
    write(m.path_for(9, 90), OTHER, 90)
    cut(m.path_for(0, 2))


def _foreign_newer_beside_the_link(m: CheckpointManager) -> None:
    _linked_to_newest(m)
    write(m.path_for(9, 90), OTHER, 90)


def _one_copied_in_checkpoint(m: CheckpointManager) -> None:
    write(m.path_for(0, 7), OTHER, 7)


def _from_before_run_ids(m: CheckpointManager) -> None:
    m.folder.mkdir(parents=True)
    torch.save({"model": {}, "timestamp": {"batch": 3}}, m.path_for(0, 3))


def _nothing_loads(m: CheckpointManager) -> None:
    cut(write(m.path_for(0, 1), MINE, 1))


FOREIGN = "{folder}/ep9-ba90-rank0.pt belongs to run bbbbbbbb, not this run (aaaaaaaa); not resumed, left in place"
UNREADABLE = "skipped {folder}/ep0-ba%d-rank0.pt for resuming: not a readable checkpoint"
# (case, the pick as (epoch, batch) or None, the start of each warning, in order)
RESUME_CASES = [
    (_linked_to_newest, (0, 2), []),
    (_truncated_newest, (0, 2), [UNREADABLE % 3]),
    (_code_in_newest, (0, 2), ["{folder}/ep5-ba50-rank0.pt: needs code to load (its pickle asks for"]),
    (_foreign_newer_link_gone, (0, 2), [FOREIGN]),
    (_foreign_newer_own_newest_truncated, (0, 1), [FOREIGN, UNREADABLE % 2]),  # newest first
    (_foreign_newer_beside_the_link, (0, 2), [FOREIGN]),
    (_one_copied_in_checkpoint, (0, 7), []),
    (_from_before_run_ids, (0, 3), []),
    (_nothing_loads, None, [UNREADABLE % 1]),
]


@pytest.mark.parametrize("case, expected, starts", RESUME_CASES, ids=[c[0].__name__.strip("_") for c in RESUME_CASES])
def test_resume_picks_what_autoresume_always_picked(tmp_path, case, expected, starts):
    """The cases of the training tests (a truncated newest, code in the newest, a foreign newer
    checkpoint with the link gone or its target damaged) and the plain ones, without training:
    the same pick, and one warning naming each file passed over."""
    manager = CheckpointManager.of_run(tmp_path / "run")
    case(manager)
    warnings = []
    found = manager.newest_loadable(mmap=True, warn=warnings.append)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found[0] == manager.path_for(*expected).resolve()
        assert found[1]["timestamp"]["batch"] == expected[1]
    assert len(warnings) == len(starts), warnings
    for warning, start in zip(warnings, starts):
        assert warning.startswith(start.format(folder=manager.folder)), (warning, start)
    if case is _code_in_newest:
        assert warnings[0].endswith("; skipped, never resumed from; remove it if you did not put it there")


def test_a_folder_of_two_runs_that_says_neither_is_its_own_resumes_none(tmp_path):
    manager = CheckpointManager.of_run(tmp_path / "run")
    write(manager.path_for(0, 2), MINE, 2)
    write(manager.path_for(0, 3), OTHER, 3)
    with pytest.raises(RunFolderError, match=r"holds 2 checkpoint\(s\) of run aaaaaaaa, bbbbbbbb, newest ep0-ba3"):
        manager.newest_loadable()
    record(manager.run_dir, OTHER)  # the lock file's record settles it
    assert manager.run_id() == OTHER
    assert manager.newest_loadable(warn=lambda _: None)[0] == manager.path_for(0, 3)


# ---------------------------------------------------------------------------------------------
# Best, and a refused best's substitute
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path):
    """A finished run: periodic checkpoints at batches 2 and 4, the link at 4."""
    manager = CheckpointManager.of_run(tmp_path / "run")
    write(manager.path_for(0, 2), MINE, 2)
    write(manager.path_for(1, 4), MINE, 4)
    link_latest(manager, "ep1-ba4-rank0.pt")
    return manager


def test_best_stands_for_the_run_when_it_is_its_own(finished):
    newest = finished.path_for(1, 4)
    assert finished.choose("best", newest, MINE).path == newest  # no best saved: the newest
    write(finished.best_path, MINE, 2)
    chosen = finished.choose("best", newest, MINE)
    assert (chosen.path, chosen.why, chosen.refused, chosen.reason) == (finished.best_path, "best", None, "")
    assert finished.choose("latest", newest, MINE).path == newest
    assert CHECKPOINT_CHOICES[0] == "best"
    with pytest.raises(ValueError, match="checkpoint choice 'worst' is not one of best, latest"):
        finished.choose("worst", newest, MINE)


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda p: write(p, OTHER, 3), "belongs to run bbbbbbbb, not this run (aaaaaaaa)"),
        (lambda p: cut(write(p, MINE, 3)), "not a readable checkpoint"),
        (with_code, "needs code to load"),
    ],
    ids=["foreign", "cut", "code"],
)
def test_a_refused_best_yields_the_newest_with_its_reason(finished, capsys, spoil, reason):
    spoil(finished.best_path)
    newest = finished.path_for(1, 4)
    chosen = finished.choose("best", newest, MINE)
    assert (chosen.path, chosen.why, chosen.refused) == (newest, "latest", finished.best_path)
    assert reason in chosen.reason
    # The caller says so, in the line it always printed.
    state = FoldState(0, finished.run_dir, newest, 4, True, "finished", MINE)
    assert chosen_checkpoint(state, "best") == (newest, "latest")
    err = capsys.readouterr().err
    assert err == f"warning: {finished.best_path} refused ({chosen.reason}); using ep1-ba4-rank0.pt\n"
    assert chosen_checkpoint(state, "latest") == (newest, "latest") and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Another run's files: never overwritten, never rotated, moved to previous/
# ---------------------------------------------------------------------------------------------


def test_a_foreign_file_under_a_name_about_to_be_written_is_moved_aside(tmp_path):
    manager = CheckpointManager.of_run(tmp_path / "run")
    foreign = write(manager.path_for(0, 2), OTHER, 2)
    foreign_bytes = foreign.read_bytes()
    notes = []
    manager.save_periodic({"model": {}, "run_id": MINE, "timestamp": {"batch": 2}}, 0, MINE, 2, note=notes.append)
    assert load_checkpoint(manager.path_for(0, 2))["run_id"] == MINE
    (moved,) = (manager.run_dir / "previous").iterdir()
    assert moved.name.endswith("-bbbbbbbb")
    assert (moved / "checkpoints" / "ep0-ba2-rank0.pt").read_bytes() == foreign_bytes
    assert notes == [
        f"{manager.path_for(0, 2)} belongs to run bbbbbbbb, not this run (aaaaaaaa); moved to "
        f"{moved / 'checkpoints'} rather than overwritten"
    ]


def test_rotation_removes_only_the_runs_own_checkpoints(tmp_path):
    manager = CheckpointManager.of_run(tmp_path / "run")
    for batch in (1, 2, 3, 4):
        write(manager.path_for(0, batch), MINE, batch)
    stranger = write(manager.path_for(0, 0), OTHER, 0)
    renamed = write(manager.path_for(0, 5), MINE, 1)  # a copy under another batch's name
    manager.rotate(MINE, keep=2)
    assert [p.name for p in manager.periodic()] == [
        "ep0-ba0-rank0.pt",
        "ep0-ba3-rank0.pt",
        "ep0-ba4-rank0.pt",
        "ep0-ba5-rank0.pt",
    ]
    assert stranger.exists() and renamed.exists()


def test_another_runs_best_beside_the_runs_history_is_moved_aside(finished):
    write(finished.best_path, OTHER, 3)
    notes = []
    finished.move_foreign_best_aside(MINE, note=notes.append)
    assert not finished.best_path.exists()
    (moved,) = (finished.run_dir / "previous").iterdir()
    assert load_checkpoint(moved / "checkpoints" / "best-rank0.pt")["run_id"] == OTHER
    assert notes and notes[0].endswith("rather than overwritten by this run's best")
    assert finished.others(MINE, resumed_batch=4) == []  # the history left is the run's own
    assert [e[0].name for e in finished.others(OTHER, resumed_batch=None)] == ["ep0-ba2-rank0.pt", "ep1-ba4-rank0.pt"]
