"""What a killed command leaves behind, a full disk while preparing, sizes checked before anything
is allocated, and data that is almost surely a mistake: each try as a hostile user would make it,
with the check that nothing was written or lost."""

import fnmatch
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, tiny_overrides

from unet_trainer.builders import raw_data_dir, run_training
from unet_trainer.cli import predict_main
from unet_trainer.config import resolve_config
from unet_trainer.data.layouts.files import save_nifti_atomic
from unet_trainer.data.phantom import write_phantom_dataset
from unet_trainer.fileio import temporary_sibling, temporary_target
from unet_trainer.runfolder import PREDICT_LOCK_NAME

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
from unet_trainer.cli import predict_main
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
from unet_trainer.runfolder import FolderLock
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
