"""Hostile but realistic use: other runs' checkpoints in the folder, two runs at once, a full disk,
damaged or planted checkpoints, SIGKILL leftovers and values that used to reach a traceback."""

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides

import unet_trainer.core.checkpoint as checkpoint_module
from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.config.engine import ConfigError
from unet_trainer.core.checkpoint import CheckpointError, load_checkpoint
from unet_trainer.core.checkpoints import list_checkpoints
from unet_trainer.core.runfolder import FolderLock, RunFolderError
from unet_trainer.data.layouts import open_dataset
from unet_trainer.data.phantom import write_phantom_dataset
from unet_trainer.data.prepare import prepare_dataset
from unet_trainer.training.trainer import Callback

DEMO = str(ROOT / "configs" / "demo.yaml")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links as their target) -> its content hash."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def run_id_of(path: Path) -> str:
    return load_checkpoint(path)["run_id"]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*") if ".tmp" in p.name)


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. Run identity: rotation and 'latest' touch only the run's own files
# ---------------------------------------------------------------------------------------------


def test_a_new_run_in_a_folder_holding_another_runs_checkpoints_stops_with_one_line(cache_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=3ba", "eval_interval=0ep")]) == 0
    before = tree_digest(run / "checkpoints")
    capsys.readouterr()
    status = train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=2ba", "autoresume=false")])
    line = one_error_line(capsys.readouterr().err)
    assert status != 0
    assert str(run / "checkpoints") in line and "ep1-ba3-rank0.pt" in line
    assert "run_name=" in line and "save_overwrite=true" in line
    assert tree_digest(run / "checkpoints") == before


def test_save_overwrite_moves_the_old_run_aside_and_never_deletes_it(tiny_config, tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config("max_duration=3ba", "eval_interval=0ep"), progress=False)
    old = tree_digest(run / "checkpoints")
    old_id = run_id_of(run / "checkpoints" / "ep1-ba3-rank0.pt")
    fresh = run_training(tiny_config("max_duration=2ba", "autoresume=false", "save_overwrite=true"), progress=False)
    assert fresh["resumed_from"] is None and fresh["batch"] == 2
    moved = [p for p in (run / "previous").iterdir()]
    assert len(moved) == 1 and tree_digest(moved[0] / "checkpoints") == old
    assert run_id_of(moved[0] / "checkpoints" / "ep1-ba3-rank0.pt") == old_id
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ep0-ba1-rank0.pt", "ep1-ba2-rank0.pt"]
    assert run_id_of(run / "checkpoints" / "ep1-ba2-rank0.pt") != old_id
    assert (run / "checkpoints" / "latest-rank0.pt").resolve().name == "ep1-ba2-rank0.pt"


class DropForeignCheckpoint(Callback):
    """Copies another run's checkpoint into the run's folder under a high batch number, mid-run."""

    def __init__(self, source: Path, target: Path):
        self.source, self.target = source, target

    def batch_end(self, state):
        if state.timestamp.batch == 2:
            shutil.copyfile(self.source, self.target)


def test_rotation_and_latest_never_touch_another_runs_or_a_stray_file(tiny_config, tmp_path):
    other = run_training(
        tiny_config("max_duration=1ba", "eval_interval=0ep", run_dir=tmp_path / "other"), progress=False
    )
    assert other["batch"] == 1
    folder = tmp_path / "run" / "checkpoints"
    stray = folder / "ep9-ba99-rank0.pt"
    summary = run_training(
        tiny_config("max_duration=5ba", "save_num_checkpoints_to_keep=2", "eval_interval=0ep"),
        progress=False,
        extra_callbacks=[DropForeignCheckpoint(tmp_path / "other" / "checkpoints" / "ep0-ba1-rank0.pt", stray)],
    )
    names = [p.name for p in list_checkpoints(folder)]
    assert names == ["ep2-ba4-rank0.pt", "ep2-ba5-rank0.pt", "ep9-ba99-rank0.pt"]
    assert stray.read_bytes() == (tmp_path / "other" / "checkpoints" / "ep0-ba1-rank0.pt").read_bytes()
    assert (folder / "latest-rank0.pt").resolve().name == "ep2-ba5-rank0.pt"
    assert Path(summary["checkpoint"]).name == "ep2-ba5-rank0.pt"
    # The stray file is not this run's: a plain resume goes on from the run's own newest.
    resumed = run_training(
        tiny_config("max_duration=6ba", "save_num_checkpoints_to_keep=2", "eval_interval=0ep"), progress=False
    )
    assert Path(resumed["resumed_from"]).name == "ep2-ba5-rank0.pt" and resumed["batch"] == 6
    assert stray.is_file()


def test_the_readme_fine_tune_in_an_occupied_folder_then_the_plain_resume_loses_nothing(cache_root, tmp_path, capsys):
    """README: unet-train configs/demo.yaml load_path=other/best-rank0.pt load_weights_only=true
    autoresume=false, run where an earlier run's checkpoints are; then the plain command again."""
    source, run = tmp_path / "other", tmp_path / "run"
    base = ("eval_interval=1ba", "save_num_checkpoints_to_keep=-1")
    assert train_main([DEMO, *tiny_overrides(cache_root, source, "max_duration=2ba", *base)]) == 0
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=3ba", *base)]) == 0
    earlier = tree_digest(run / "checkpoints")
    earlier_id = run_id_of(run / "checkpoints" / "ep1-ba3-rank0.pt")
    fine_tune = (
        "max_duration=2ba",
        f"load_path={source / 'checkpoints' / 'best-rank0.pt'}",
        "load_weights_only=true",
        "autoresume=false",
        *base,
    )
    capsys.readouterr()
    assert train_main([DEMO, *tiny_overrides(cache_root, run, *fine_tune)]) != 0
    one_error_line(capsys.readouterr().err)
    assert tree_digest(run / "checkpoints") == earlier
    # As the message says: save_overwrite=true moves the earlier run aside, whole.
    assert train_main([DEMO, *tiny_overrides(cache_root, run, *fine_tune, "save_overwrite=true")]) == 0
    (moved,) = (run / "previous").iterdir()
    assert tree_digest(moved / "checkpoints") == earlier
    tuned = list_checkpoints(run / "checkpoints")
    assert [p.name for p in tuned] == ["ep0-ba1-rank0.pt", "ep1-ba2-rank0.pt"]
    tuned_id = run_id_of(tuned[-1])
    assert tuned_id != earlier_id
    tuned_files = tree_digest(run / "checkpoints")
    # The plain resume continues the fine-tune, keeping every file of both runs.
    capsys.readouterr()
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=4ba", *base)]) == 0
    assert "Resuming from" in capsys.readouterr().err
    after = tree_digest(run / "checkpoints")
    assert {k: v for k, v in after.items() if k in tuned_files and k.startswith("ep")} == {
        k: v for k, v in tuned_files.items() if k.startswith("ep")
    }
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == "ep2-ba4-rank0.pt"
    assert run_id_of(run / "checkpoints" / "ep2-ba4-rank0.pt") == tuned_id
    assert tree_digest(moved / "checkpoints") == earlier


# ---------------------------------------------------------------------------------------------
# 2. One run per folder: an exclusive lock
# ---------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from unet_trainer.core.runfolder import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_run_folder_stops_a_second_run_at_once_and_sigkill_frees_it(cache_root, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # A checkpoint being written by the live run holding the lock: never removed under it.
    writing = run / "checkpoints" / f".ep1-ba3-rank0.pt.{uuid.uuid4().hex}.tmp.pt"
    writing.write_bytes(b"half a checkpoint")
    holder = hold_lock(run)
    try:
        started = time.perf_counter()
        status = train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=1ba")])
        elapsed = time.perf_counter() - started
        line = one_error_line(capsys.readouterr().err)
        assert status != 0 and str(run) in line and f"process {holder.pid}" in line
        assert elapsed < 5, "the second run must stop before preparing data or building anything"
        assert writing.is_file() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released the lock; the leftover temporary is now an orphan and is removed.
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=1ba")]) == 0
    assert temporaries(run) == []


HOLD_LOCK_WITH_A_FORKED_WORKER = """
import os, sys, time
from unet_trainer.core.runfolder import FolderLock
FolderLock(sys.argv[1]).acquire()
worker = os.fork()  # as the data loader and the preparation pool fork their workers
if worker == 0:
    time.sleep(60)
    os._exit(0)
print(worker, flush=True)
time.sleep(120)
"""


def test_a_killed_runs_forked_workers_do_not_keep_its_folder_locked(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK_WITH_A_FORKED_WORKER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    worker = int(proc.stdout.readline())
    try:
        with pytest.raises(RunFolderError, match=f"in use by process {proc.pid} "):
            FolderLock(tmp_path).acquire()
        proc.kill()
        proc.wait()
        FolderLock(tmp_path).acquire().release()  # the worker still lives, but holds no lock
    finally:
        proc.kill()
        os.kill(worker, 9)


def test_two_identical_train_commands_cannot_share_a_folder(cache_root, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "unet_trainer.cli",
        "train",
        DEMO,
        *tiny_overrides(cache_root, run, "max_duration=500ba", "save_interval=1000ba", "eval_interval=0ep"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        line = one_error_line(second.stderr)
        assert str(run) in line and str(first.pid) in line
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    rows = [json.loads(l)["batch"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)), "every log row is written once"


# ---------------------------------------------------------------------------------------------
# 3. A full disk
# ---------------------------------------------------------------------------------------------


class FullDiskFile(io.FileIO):
    """A real file whose writes fail with ENOSPC once ``room`` bytes are written, as on a full disk."""

    room = 0

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
    cache_root, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    opened = []
    real_open = open

    def open_for_checkpoint(path, mode="r", *args, **kwargs):
        opened.append(path)
        if len(opened) >= 2:  # the first checkpoint fits, the second fills the disk
            FullDiskFile.room = 4096
            return FullDiskFile(path, "w")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", open_for_checkpoint, raising=False)
    status = train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=3ba", "eval_interval=0ep")])
    line = one_error_line(capsys.readouterr().err)
    assert status != 0
    assert str(run / "checkpoints" / "ep1-ba2-rank0.pt") in line and "free" in line
    folder = run / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["ep0-ba1-rank0.pt"]
    assert load_checkpoint(folder / "ep0-ba1-rank0.pt")["timestamp"]["batch"] == 1
    assert (folder / "latest-rank0.pt").resolve().name == "ep0-ba1-rank0.pt"
    assert temporaries(run) == []


def test_disk_full_at_start_up_names_the_file(cache_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if run in self.parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=1ba")]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert str(run / "split.json") in line and "free" in line
    assert temporaries(run) == []


def test_disk_full_while_preparing_names_the_file(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, cases=2, shape=(24, 24, 24), seed=0, progress=False)
    out = tmp_path / "prepared"
    real_save = np.save

    def save(file, *args, **kwargs):
        if "BraTS2021_00001_x" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    assert data_main(["prepare", str(raw), "--out", str(out), "--workers", "1"]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "BraTS2021_00001_x.npy") in line and "free" in line
    assert temporaries(out) == []


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True).returncode
        == 0
    )


class FillTheDisk(Callback):
    """After the first checkpoint, fills the file system so that the next one cannot be written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def batch_end(self, state):
        if state.timestamp.batch == 2:
            with open(self.folder / "filler", "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
            # A few bytes at a time until not one more fits.
            with open(self.folder / "filler", "ab", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 512)
                except OSError:
                    pass


def test_a_really_full_disk_while_saving(tiny_config, tmp_path):
    """The same on a tiny tmpfs, where the OS itself runs out of space (needs mount rights; skipped
    without them)."""
    mount_point = tmp_path / "small"
    if not _can_mount_tmpfs(mount_point):
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = mount_point / "run"
        with pytest.raises(OSError) as info:
            run_training(
                tiny_config("max_duration=3ba", "eval_interval=0ep", run_dir=run),
                progress=False,
                extra_callbacks=[FillTheDisk(mount_point)],
            )
        message = str(info.value)
        assert "\n" not in message and str(run / "checkpoints" / "ep1-ba2-rank0.pt") in message and "free" in message
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ep0-ba1-rank0.pt"]
        assert load_checkpoint(run / "checkpoints" / "ep0-ba1-rank0.pt")["timestamp"]["batch"] == 1
        assert temporaries(run) == []
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# ---------------------------------------------------------------------------------------------
# 4. Damaged and planted checkpoints
# ---------------------------------------------------------------------------------------------


class Planted:
    """Unpickling this would run a shell command creating ``marker``: a checkpoint with code in it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_that_loads(tiny_config, tmp_path, capsys):
    run_training(
        tiny_config("max_duration=3ba", "eval_interval=0ep", "save_num_checkpoints_to_keep=-1"), progress=False
    )
    folder = tmp_path / "run" / "checkpoints"
    newest = folder / "ep1-ba3-rank0.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # what a disk fault or a bad copy leaves
    capsys.readouterr()
    resumed = run_training(
        tiny_config("max_duration=4ba", "eval_interval=0ep", "save_num_checkpoints_to_keep=-1"), progress=False
    )
    err = capsys.readouterr().err
    assert Path(resumed["resumed_from"]).name == "ep1-ba2-rank0.pt" and resumed["batch"] == 4
    warnings = [l for l in err.splitlines() if l.startswith("warning:") and str(newest) in l]
    assert len(warnings) == 1 and "skipped" in warnings[0]


def test_a_checkpoint_with_code_is_never_a_fallback_and_is_reported_by_name(tiny_config, tmp_path, capsys):
    run_training(tiny_config("max_duration=2ba", "eval_interval=0ep"), progress=False)
    folder = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "code-ran"
    planted = folder / "ep5-ba50-rank0.pt"
    torch.save({"model": {}, "payload": Planted(marker)}, planted)
    (folder / "latest-rank0.pt").unlink()
    (folder / "latest-rank0.pt").symlink_to(planted.name)
    capsys.readouterr()
    resumed = run_training(tiny_config("max_duration=3ba", "eval_interval=0ep"), progress=False)
    err = capsys.readouterr().err
    assert not marker.exists()
    assert Path(resumed["resumed_from"]).name == "ep1-ba2-rank0.pt"
    (warning,) = [l for l in err.splitlines() if str(planted) in l]
    assert warning.startswith("warning:") and "code" in warning and "posix.system" in warning
    # Asked for by name, it is refused with the reason in full.
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(planted)
    assert "posix.system" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_error_reasons_are_not_cut(tmp_path):
    path = tmp_path / "mismatch.pt"
    torch.save({"model": {}, "payload": Planted(tmp_path / "m")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    # The line used to stop at 120 characters, before the name of what was refused.
    assert "GLOBAL posix.system" in str(info.value)


def test_a_checkpoint_that_does_not_fit_names_what_differs(tiny_config, tmp_path):
    run_training(tiny_config("max_duration=1ba", "eval_interval=0ep", run_dir=tmp_path / "small"), progress=False)
    ckpt = tmp_path / "small" / "checkpoints" / "ep0-ba1-rank0.pt"
    with pytest.raises(CheckpointError) as info:
        run_training(tiny_config("max_duration=1ba", "model.unet.filters=[8, 16]", f"load_path={ckpt}"), progress=False)
    message = str(info.value)
    # Not just torch's first line ("Error(s) in loading state_dict for UNet:"): which tensor, which sizes.
    assert "\n" not in message and "size mismatch for" in message and "torch.Size([8" in message


# ---------------------------------------------------------------------------------------------
# 5. Orphan temporaries left by SIGKILL
# ---------------------------------------------------------------------------------------------


def test_orphan_temporaries_are_removed_by_the_next_run_and_preparation(tiny_config, tmp_path):
    run = tmp_path / "run"
    run_training(tiny_config("max_duration=1ba", "eval_interval=0ep"), progress=False)
    orphan = run / "checkpoints" / f".ep1-ba2-rank0.pt.{uuid.uuid4().hex}.tmp.pt"
    orphan.write_bytes(b"x" * 1000)
    someone_elses = run / "checkpoints" / "notes.tmp.txt"
    someone_elses.write_text("not ours")
    run_training(tiny_config("max_duration=2ba", "eval_interval=0ep"), progress=False)
    assert not orphan.exists() and someone_elses.is_file()

    raw = tmp_path / "raw"
    staging = tmp_path / ".raw-k1ll3d_x"  # a phantom being written when its writer was killed
    (staging / "BraTS2021_00000").mkdir(parents=True)
    neighbour = tmp_path / ".raw-2-abcdefgh"  # another dataset's staging: not ours to remove
    neighbour.mkdir()
    write_phantom_dataset(raw, cases=2, shape=(24, 24, 24), seed=0, progress=False)
    assert not staging.exists() and neighbour.is_dir()
    out = tmp_path / "prepared"
    prepare_dataset(open_dataset(raw), out, progress=False)
    leftover = out / f".BraTS2021_00000_x.npy.{uuid.uuid4().hex}.tmp.npy"
    leftover.write_bytes(b"x" * 1000)
    (out / "prepare.json").unlink()  # the interrupted preparation never finished
    prepare_dataset(open_dataset(raw), out, progress=False)
    assert temporaries(out) == []


# ---------------------------------------------------------------------------------------------
# 6. Values that used to reach a traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["data.patch_size=[0, 16, 16]"], ["'data.patch_size' = [0, 16, 16]", "at least 1"]),
        (["data.patch_size=[15, 16, 16]"], ["'data.patch_size' = [15, 16, 16]", "multiple of 2", "14 or 16"]),
        (
            [
                "model.unet.strides=[1, 2, 2]",
                "model.unet.filters=[4, 8, 16]",
                "model.unet.kernel_sizes=[3, 3, 3]",
                "data.patch_size=[16, 18, 16]",
            ],
            ["'data.patch_size' = [16, 18, 16]", "multiple of 4", "16 or 20"],
        ),
        (["optimizer.radam.lr=.nan"], ["'optimizer.radam.lr' = nan", "finite"]),
        (["optimizer.radam.lr=nan"], ["'optimizer.radam.lr' = nan", "finite"]),
        (["optimizer.radam.lr=.inf"], ["'optimizer.radam.lr' = inf", "finite"]),
        (["optimizer.radam.lr=1e999"], ["'optimizer.radam.lr' = inf", "finite"]),
    ],
)
def test_bad_values_are_caught_when_the_config_is_resolved(cache_root, tmp_path, args, fragments):
    with pytest.raises(ConfigError) as info:
        resolve_config(DEMO, tiny_overrides(cache_root, tmp_path / "run", *args))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_valid_padding_patch_size_is_checked_before_training(tiny_config):
    # Caught when the config is resolved: the check asks the model itself (built on the meta device).
    with pytest.raises(ConfigError, match=r"'data\.patch_size' = \[16, 16, 16\] does not fit the model"):
        run_training(
            tiny_config("model.unet.padding=valid", "data.patch_size=[16, 16, 16]", "max_duration=1ba"), progress=False
        )


# ---------------------------------------------------------------------------------------------
# 7. Inputs that are almost surely mistakes
# ---------------------------------------------------------------------------------------------


def test_all_zero_modality_or_case_is_warned_with_case_and_channel(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, cases=3, shape=(24, 24, 24), seed=0, progress=False)

    def zero(case: str, modality: str) -> None:
        path = raw / case / f"{case}_{modality}.nii.gz"
        image = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), str(path))

    zero("BraTS2021_00001", "t1ce")
    for modality in ("flair", "t1", "t1ce", "t2"):
        zero("BraTS2021_00002", modality)
    prepare_dataset(open_dataset(raw), tmp_path / "prepared", progress=False)
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "BraTS2021_00001" in warnings[0] and "t1ce" in warnings[0] and "all zeros" in warnings[0]
    assert "BraTS2021_00002" in warnings[1] and "every channel" in warnings[1]


def test_a_patch_larger_than_the_volumes_is_warned_once(tiny_config, capsys):
    run_training(tiny_config("data.patch_size=[32, 32, 32]", "max_duration=2ba", "eval_interval=0ep"), progress=False)
    warnings = [l for l in capsys.readouterr().err.splitlines() if "padding" in l]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "'data.patch_size' = [32, 32, 32]" in warnings[0] and "%" in warnings[0]


# ---------------------------------------------------------------------------------------------
# 8. Small ones
# ---------------------------------------------------------------------------------------------


def test_did_you_mean_handles_keys_with_dots():
    with pytest.raises(ConfigError) as info:
        resolve_config(DEMO, ["optimizer={os.system: {}}"])
    message = str(info.value)
    assert "'optimizer.os.sgd'" not in message and "os.system" in message
    assert "radam" in message  # what is valid there


def test_a_directory_as_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_config(tmp_path)
    assert "is a directory" in str(info.value) and "no such config file" not in str(info.value)


def test_the_summary_lists_only_files_that_were_written(cache_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=1ba", "eval_interval=0ep")]) == 0
    out = capsys.readouterr().out
    assert not (run / "eval_metrics.csv").exists() and not (run / "eval_cases.csv").exists()
    assert "eval_metrics.csv" not in out and "eval_cases.csv" not in out and "train_metrics.csv" in out


def test_a_per_case_csv_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from unet_trainer.core import fileio
    from unet_trainer.core.fileio import DiskFullError
    from unet_trainer.evaluation.cases import write_cases_csv

    path = tmp_path / "eval_cases.csv"
    write_cases_csv(path, [{"case_id": "a", "WT": 0.5}, {"case_id": "b", "WT": float("nan")}])
    before = path.read_bytes()
    assert before == b"case_id,WT\r\na,0.5\r\nb,nan\r\n"

    def full(temporary):  # the disk fills while the new table is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "fsync_path", full)
    with pytest.raises(DiskFullError):
        write_cases_csv(path, [{"case_id": "a", "WT": 0.9}])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["eval_cases.csv"]
