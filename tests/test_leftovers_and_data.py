"""What a killed command leaves behind, a full disk while preparing, sizes checked before anything
is allocated, and data that is almost surely a mistake: each try as a hostile user would make it,
with the check that nothing was written or lost."""

import fnmatch
import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.core.fileio import temporary_sibling, temporary_target
from unet_trainer.core.runfolder import PREDICT_LOCK_NAME
from unet_trainer.data.layouts import MAX_IMAGE_VALUES
from unet_trainer.data.layouts.files import save_nifti_atomic
from unet_trainer.data.phantom import write_phantom_dataset

DEMO = ROOT / "configs" / "demo.yaml"
# What users (and their scripts) list prediction and data folders with.
DATA_GLOBS = ("*.nii.gz", "*.nii", "*.npy", "*.csv", "*.json", "*.png", "*.pt")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its content hash (lock files: their holder's PID, so just listed)."""
    return {
        str(p.relative_to(folder)): "lock" if p.name.endswith(".lock") else hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def globbed(folder: Path) -> dict[str, list[str]]:
    """What each data glob finds in ``folder``, as Path.glob and as ``find -name`` see it (both
    match hidden names, unlike the shell)."""
    found = {pattern: sorted(p.name for p in folder.glob(pattern)) for pattern in DATA_GLOBS}
    for pattern in DATA_GLOBS:
        walked = sorted(name for _, _, names in os.walk(folder) for name in names if fnmatch.fnmatch(name, pattern))
        assert walked == found[pattern]
    return found


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("leftovers-run") / "run"
    cfg = resolve_config(DEMO, tiny_overrides(cache_root, run_dir, "max_duration=1ba", "eval_interval=0ep"))
    run_training(cfg, progress=False)
    # Two of the phantom's cases are enough to predict on, and take a third of the time.
    phantom = run_dir.parent / "raw"
    for case in sorted(c for c in raw_data_dir(cfg, progress=False).iterdir() if c.is_dir())[:2]:
        shutil.copytree(case, phantom / case.name)
    return {"checkpoint": run_dir / "checkpoints" / "latest-rank0.pt", "phantom": phantom}


@pytest.fixture
def phantom(tmp_path) -> Path:
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, cases=3, shape=(24, 24, 24), seed=0, progress=False)
    return raw


# ---------------------------------------------------------------------------------------------
# 1. Temporaries: never found by a glob for data files, cleared by the next command
# ---------------------------------------------------------------------------------------------


def test_temporary_names_match_no_data_glob_and_name_their_target():
    for name in ("BraTS_001.nii.gz", "BraTS_001.nii", "case_x.npy", "cv_summary.csv", "meta.json", "ep1-ba2-rank0.pt"):
        temporary = temporary_sibling(Path("/out") / name)
        assert temporary.parent == Path("/out") and temporary.name.startswith(".")
        assert not any(fnmatch.fnmatch(temporary.name, pattern) for pattern in DATA_GLOBS), temporary.name
        assert temporary_target(temporary) == name
    # What earlier versions left (the extension kept last) is still recognised, so it is cleared too.
    assert temporary_target(Path(f".a.nii.gz.{uuid.uuid4().hex}.tmp.nii.gz")) == "a.nii.gz"


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii"])
def test_a_nifti_written_under_a_temporary_name_is_the_file_nib_save_writes(tmp_path, name):
    data = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    affine = np.diag([0.8, 1.2, 2.5, 1.0])
    affine[:3, 3] = [-90.0, 40.0, 12.5]
    save_nifti_atomic(tmp_path / name, data, affine)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(tmp_path / f"reference-{name}"))
    assert (tmp_path / name).read_bytes() == (tmp_path / f"reference-{name}").read_bytes()
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / name)).dataobj), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"reference-{name}"])


KILLED_AT_THE_PROBABILITIES = """
import os, signal, sys
real_replace = os.replace

def replace(source, target):
    # SIGKILL as the probabilities are complete but not yet renamed: their temporary stays behind.
    if str(target).endswith("_probabilities.nii.gz"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target)

os.replace = replace
from unet_trainer.cli.predict import main as predict_main
predict_main(sys.argv[1:])
"""


def test_a_killed_predict_leaves_nothing_a_glob_finds_and_the_rerun_clears_it(trained, tmp_path, capsys):
    out = tmp_path / "predictions"
    command = [str(trained["checkpoint"]), str(trained["phantom"]), str(out), "--probabilities", "--no-progress"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_PROBABILITIES, *command], env=ENV, capture_output=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    first = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    leftovers = sorted(p.name for p in out.iterdir() if temporary_target(p) is not None)
    assert len(first) == 1 and leftovers == [
        f".{first[0][: -len('.nii.gz')]}_probabilities.nii.gz.{leftovers[0][-36:]}"
    ]
    assert all(found == (first if pattern == "*.nii.gz" else []) for pattern, found in globbed(out).items())
    # An earlier version's leftover, and files that are not ours, next to it.
    old_style = out / f".{first[0]}.{uuid.uuid4().hex}.tmp.nii.gz"
    old_style.write_bytes(b"half a label map")
    not_ours = [out / "notes.tmp", out / f".scratch.{uuid.uuid4().hex}.tmp"]
    for path in not_ours:
        path.write_text("someone else's")

    assert predict_main(command) == 0
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    cases = sorted(case.name for case in trained["phantom"].iterdir() if case.is_dir())
    expected = sorted([f"{c}.nii.gz" for c in cases] + [f"{c}_probabilities.nii.gz" for c in cases])
    assert globbed(out)["*.nii.gz"] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + [p.name for p in not_ours])  # no lock left
    for name in expected:
        assert np.isfinite(np.asarray(nib.load(str(out / name)).dataobj)).all()


HOLD_PREDICT_LOCK = """
import sys, time
from unet_trainer.core.runfolder import FolderLock
FolderLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_predict_into_a_busy_folder_stops_and_keeps_the_live_ones_temporaries(trained, tmp_path, capsys):
    out = tmp_path / "predictions"
    out.mkdir()
    case = sorted(c.name for c in trained["phantom"].iterdir() if c.is_dir())[0]
    being_written = temporary_sibling(out / f"{case}_probabilities.nii.gz")
    being_written.write_bytes(b"the live command's half-written probabilities")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_PREDICT_LOCK, str(out), PREDICT_LOCK_NAME],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    command = [str(trained["checkpoint"]), str(trained["phantom"]), str(out), "--no-progress"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert predict_main(command) == 1
        line = one_error_line(capsys.readouterr().err)
        assert str(out) in line and f"process {holder.pid}" in line and "unet-predict" in line
        assert being_written.is_file() and sorted(p.name for p in out.iterdir()) == sorted(
            [being_written.name, PREDICT_LOCK_NAME]
        )
    finally:
        holder.kill()
        holder.wait()
    # Its holder killed, the temporary is an orphan: the next command removes it.
    assert predict_main(command) == 0
    assert not being_written.exists() and not (out / PREDICT_LOCK_NAME).exists()
    assert f"{case}.nii.gz" in globbed(out)["*.nii.gz"]


# ---------------------------------------------------------------------------------------------
# 2. The workers of a killed preparation end with it
# ---------------------------------------------------------------------------------------------

SLOW_PREPARE = """
import os, sys, time
from pathlib import Path
import unet_trainer.data.prepare as prepare

def slow_prepare_case(raw, settings):
    Path(sys.argv[3], str(os.getpid())).touch()  # this worker is at work
    time.sleep(60)
    raise SystemExit("the test should have killed this worker")

prepare.prepare_case = slow_prepare_case
from unet_trainer.cli.data import main as data_main
data_main(["prepare", sys.argv[1], "--out", sys.argv[2], "--workers", "2"])
"""

# The phantom's writers, held at work the same way.
SLOW_SYNTH = """
import os, sys, time
from pathlib import Path
import unet_trainer.data.phantom as phantom

def slow_write_one_case(*args):
    Path(sys.argv[3], str(os.getpid())).touch()  # this worker is at work
    time.sleep(60)
    raise SystemExit("the test should have killed this worker")

phantom._write_one_case = slow_write_one_case
from unet_trainer.cli.data import main as data_main
data_main(["synth", "--out", sys.argv[2], "--cases", "4", "--workers", "2"])
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.parametrize("script", [SLOW_PREPARE, SLOW_SYNTH], ids=["prepare", "synth"])
def test_the_workers_of_a_killed_data_command_end_with_it(phantom, tmp_path, script):
    working = tmp_path / "working"
    working.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(phantom), str(tmp_path / "prepared"), str(working)],
        env=ENV,
        start_new_session=True,  # its own process group, so the test can clean up whatever remains
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            workers = [int(p.name) for p in working.iterdir()]
        assert len(workers) == 2, "the command did not start two workers"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _running(pid)], "workers outlived the killed command"
    finally:
        parent.kill()
        parent.wait()
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# 3. A full disk while preparing
# ---------------------------------------------------------------------------------------------


def test_a_full_disk_while_preparing_is_one_line_and_loses_nothing(phantom, tmp_path, capsys, monkeypatch):
    out = tmp_path / "prepared"
    assert data_main(["prepare", str(phantom), "--out", str(out), "--workers", "1"]) == 0
    # The last case is yet to be prepared (as after adding it to the raw folder).
    for path in out.glob("BraTS2021_00002_*"):
        path.unlink()
    raw_before, prepared_before = tree_digest(phantom), tree_digest(out)
    real_save = np.save

    def save(file, array, *args, **kwargs):
        # numpy's tofile on a full disk: part of the bytes written, an OSError without errno.
        if "BraTS2021_00002_y" in str(getattr(file, "name", file)):
            half = b"\x93NUMPY half an array"
            if hasattr(file, "write"):
                file.write(half)
            else:
                Path(file).write_bytes(half)
            raise OSError("87808 requested and 42976 written")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    assert data_main(["prepare", str(phantom), "--out", str(out), "--workers", "1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "BraTS2021_00002_y.npy") in line and "no space left" in line and " free" in line
    assert tree_digest(phantom) == raw_before
    assert tree_digest(out) == prepared_before  # the earlier cases untouched, no file of the failed one


# ---------------------------------------------------------------------------------------------
# 4. Sizes checked before anything is allocated
# ---------------------------------------------------------------------------------------------


def write_with_claimed_shape(path: Path, shape: tuple[int, int, int]) -> None:
    """Rewrite a NIfTI file by hand so that its header claims ``shape`` while its voxels stay few."""
    image = nib.load(str(path))
    header = image.header.copy()
    header.set_data_shape(shape)
    voxels = np.asarray(image.dataobj, dtype=np.float32).tobytes()
    raw = header.binaryblock + b"\0" * (int(header.get_data_offset()) - len(header.binaryblock)) + voxels
    path.write_bytes(gzip.compress(raw))


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((30000, 30000, 30000), "at most 1,073,741,824 values"),  # beyond any brain MRI
        ((900, 900, 900), "cannot read"),  # plausible, but far more bytes than the file holds
    ],
)
def test_a_header_claiming_a_huge_shape_is_one_line_and_nothing_is_allocated(
    phantom, tmp_path, capsys, shape, expected
):
    bad = phantom / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    write_with_claimed_shape(bad, shape)
    raw_before = tree_digest(phantom)
    out = tmp_path / "prepared"
    assert data_main(["prepare", str(phantom), "--out", str(out), "--workers", "1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "BraTS2021_00001" in line and str(bad) in line and str(shape) in line and expected in line
    assert tree_digest(phantom) == raw_before
    assert not [p.name for p in out.glob("BraTS2021_00001_*")] and not (out / "prepare.json").exists()


def test_a_target_spacing_that_makes_cases_huge_is_one_line_before_resampling(phantom, tmp_path, capsys):
    raw_before = tree_digest(phantom)
    out = tmp_path / "prepared"
    command = ["prepare", str(phantom), "--out", str(out), "--workers", "2", "--target-spacing", "0.01", "0.01", "0.01"]
    started = time.monotonic()
    assert data_main(command) == 1
    line = one_error_line(capsys.readouterr().err)
    assert time.monotonic() - started < 30
    assert "case BraTS2021_0000" in line and "(0.01, 0.01, 0.01) mm" in line and "x 4 channels" in line
    assert f"at most {MAX_IMAGE_VALUES:,} values" in line and "target_spacing" in line
    assert tree_digest(phantom) == raw_before and not list(out.glob("*.npy"))


def test_train_with_a_huge_target_spacing_is_one_line(cache_root, tmp_path, capsys):
    overrides = tiny_overrides(cache_root, tmp_path / "run", "max_duration=1ba", "data.target_spacing=[0.01,0.01,0.01]")
    assert train_main([str(DEMO), *overrides]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert "(0.01, 0.01, 0.01) mm" in line and "gives shape" in line


# ---------------------------------------------------------------------------------------------
# 5. A case missing a modality at prediction; labels that are all background
# ---------------------------------------------------------------------------------------------


def test_a_case_missing_a_modality_is_skipped_and_the_others_are_predicted(trained, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(trained["phantom"], raw)
    cases = sorted(c.name for c in raw.iterdir() if c.is_dir())
    missing = raw / cases[1] / f"{cases[1]}_t2.nii.gz"
    missing.unlink()
    raw_before = tree_digest(raw)
    out = tmp_path / "predictions"
    assert predict_main([str(trained["checkpoint"]), str(raw), str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {cases[1]}: ") and "t2" in skipped[0]
    assert "Traceback" not in captured.err and f"1 case(s) failed: {cases[1]}" in captured.err
    assert globbed(out)["*.nii.gz"] == sorted(f"{c}.nii.gz" for c in cases if c != cases[1])
    assert tree_digest(raw) == raw_before


def test_a_dataset_whose_labels_are_all_background_is_warned_once(phantom, tmp_path, capsys):
    assert data_main(["prepare", str(phantom), "--out", str(tmp_path / "with-tumours"), "--workers", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
    for seg in sorted(phantom.glob("*/*_seg.nii.gz")):
        image = nib.load(str(seg))
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(seg))
    assert data_main(["prepare", str(phantom), "--out", str(tmp_path / "prepared"), "--workers", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(phantom) in warnings[0] and "all 3 labelled cases are empty" in warnings[0]
