"""Hostile input to the commands ends in one line on stderr naming the file or key and what was
expected, a non-zero exit status, and nothing left behind: batches too large for the machine,
out-of-range seeds, nesting deeper than any real config, text that is not UTF-8, a peer rank lost
under torchrun, and OS errors that used to surface as "[Errno 17] ..." or a bare number."""

import errno
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides

from unet_trainer.cli.cv import main as cv_main
from unet_trainer.cli.data import main as data_main
from unet_trainer.cli.evaluate import main as eval_main
from unet_trainer.cli.predict import main as predict_main
from unet_trainer.cli.train import main as train_main
from unet_trainer.commands.datasets import raw_data_dir
from unet_trainer.commands.train import run_training
from unet_trainer.config.config import resolve_config
from unet_trainer.core.documents import MAX_NESTING
from unet_trainer.data.loader import SHARED_MEMORY

DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def prepared(cache_root, tmp_path_factory) -> None:
    """The tiny phantom generated and prepared beforehand, so the commands under test print
    nothing about it."""
    run_dir = tmp_path_factory.mktemp("warm") / "run"
    run_training(resolve_config(DEMO, tiny_overrides(cache_root, run_dir, "max_duration=0ba")), progress=False)


@pytest.fixture(scope="module")
def trained(cache_root, tmp_path_factory) -> dict:
    """A checkpoint of one step, and the raw phantom it was trained on."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve_config(DEMO, tiny_overrides(cache_root, run_dir, "max_duration=1ba"))
    run_training(cfg, progress=False)
    return {"checkpoint": run_dir / "checkpoints" / "latest-rank0.pt", "phantom": raw_data_dir(cfg, progress=False)}


def one_error_line(capsys) -> str:
    """The command's whole stderr, which must be one line "error: ..." and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def shared_memory_files() -> set[str]:
    return {p.name for p in SHARED_MEMORY.glob("*")} if SHARED_MEMORY.is_dir() else set()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# A batch larger than the machine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_a_patch_too_large_for_the_machine_is_refused_before_any_batch_is_built(
    prepared, cache_root, tmp_path, capsys, workers
):
    """A 2048^3 patch makes a batch of 2 weigh 272 GiB: refused before a worker starts or a
    shared-memory file is made (it used to end in a 60-line traceback and a 64 GiB file left in
    /dev/shm), naming the key, what the batch needs and what there is."""
    run = tmp_path / "run"
    before = shared_memory_files()
    overrides = tiny_overrides(cache_root, run, "data.patch_size=[2048, 2048, 2048]", f"data.num_workers={workers}")
    assert train_main([DEMO, *overrides]) == 1
    line = one_error_line(capsys)
    assert "'data.patch_size' = [2048, 2048, 2048]" in line and "a batch is 272.0 GiB" in line, line
    assert ("/dev/shm has" if workers and SHARED_MEMORY.is_dir() else "is available") in line, line
    assert shared_memory_files() - before == set()
    # The folder's lock file stays by design (runfolder.FolderLock); nothing else was written.
    assert files_under(run) == ["run.lock"]


@pytest.mark.skipif(
    not SHARED_MEMORY.is_dir() or multiprocessing.get_start_method() != "fork",
    reason="needs /dev/shm and forked loader workers",
)
def test_a_worker_that_finds_no_shared_memory_for_its_batch_leaves_no_file(
    prepared, cache_root, tmp_path, capsys, monkeypatch
):
    """When shared memory runs out after the check (another program filled it), the worker's
    failed allocation leaves a file named after it in /dev/shm, as torch's does; it is removed,
    and the run ends with one line naming /dev/shm and the settings to lower."""

    def no_room(size):
        name = f"torch_{os.getpid()}_onelinetest_0"
        with open(SHARED_MEMORY / name, "wb") as handle:  # as torch leaves it: created, never unlinked
            handle.truncate(size)
        raise RuntimeError(f"unable to allocate shared memory(shm) for file </{name}>: No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_using_fd_cpu", no_room)  # the forked worker inherits it
    run = tmp_path / "run"
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "data.num_workers=1", "max_duration=1ba")]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "/dev/shm: no room for a batch of" in errors[0] and "data.num_workers" in errors[0], errors[0]
    assert not list(SHARED_MEMORY.glob("torch_*_onelinetest_*"))


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["seed", "data.split_seed", "data.phantom.seed"])
@pytest.mark.parametrize("value", ["100000000000000000000000", "4294967296"])
def test_a_seed_beyond_what_numpy_and_scikit_learn_take_is_a_config_error(cache_root, tmp_path, capsys, key, value):
    run = tmp_path / "run"
    assert train_main([DEMO, *tiny_overrides(cache_root, run, "max_duration=1ba", f"{key}={value}")]) == 2
    line = one_error_line(capsys)
    assert f"'{key}' = {value} is not an integer in [0, 4294967295]" in line, line
    assert not run.exists()


@pytest.mark.parametrize("value", ["-1", "4294967296"])
def test_a_phantom_seed_out_of_range_names_the_flag(tmp_path, capsys, value):
    out = tmp_path / "phantom"
    assert data_main(["synth", "--out", str(out), "--cases", "2", "--seed", value]) == 2
    assert one_error_line(capsys) == f"error: --seed {value} must be in [0, 4294967295]"
    assert not out.exists()


def test_a_phantom_over_an_existing_dataset_is_refused_naming_it_once(tmp_path, capsys):
    dataset = tmp_path / "DS"
    (dataset / "case").mkdir(parents=True)
    (dataset / "case" / "case_t1.nii.gz").write_bytes(b"raw")
    assert data_main(["synth", "--out", str(dataset), "--cases", "2"]) != 0
    line = one_error_line(capsys)
    assert line.startswith(f"error: {dataset}: exists and is not a phantom") and line.count(str(dataset)) == 1, line
    assert (dataset / "case" / "case_t1.nii.gz").read_bytes() == b"raw"
    assert sorted(p.name for p in dataset.rglob("*")) == ["case", "case_t1.nii.gz"]


# ---------------------------------------------------------------------------------------------
# Nesting and encoding of what people hand us
# ---------------------------------------------------------------------------------------------

DEEP_FLOW = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    "text",
    [
        f"data:\n  patch_size: {DEEP_FLOW}\n",
        "".join(f"{'  ' * i}data:\n" for i in range(1000)),
    ],
    ids=["flow", "block"],
)
def test_a_config_nested_thousands_deep_is_refused_naming_the_file(tmp_path, capsys, text):
    config = tmp_path / "deep.yaml"
    config.write_text(text)
    assert train_main([str(config), f"save_folder={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert f"{config}: nested deeper than {MAX_NESTING} levels" in line, line
    assert files_under(tmp_path) == ["deep.yaml"]


def test_a_deep_recipe_and_a_deep_command_line_value_are_refused_too(tmp_path, capsys):
    recipe = tmp_path / "deep-recipe.yaml"
    recipe.write_text(f"schedulers: {DEEP_FLOW}\n")
    assert train_main([DEMO, f"recipe={recipe}", f"save_folder={tmp_path / 'run'}"]) == 2
    assert f"{recipe}: nested deeper than {MAX_NESTING} levels" in one_error_line(capsys)
    assert train_main([DEMO, f"data.patch_size={DEEP_FLOW}", f"save_folder={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert f"command line: the value of 'data.patch_size' is nested deeper than {MAX_NESTING}" in line, line
    assert not (tmp_path / "run").exists()


def test_a_config_nested_a_little_deeper_than_the_bound_is_refused_and_one_within_it_is_read(tmp_path, capsys):
    """The bound is one constant: MAX_NESTING levels are read (and fail on the key), one more is refused."""
    # The top level and 'data' are two levels; the lists under 'data.patch_size' the rest.
    for lists, expected in ((MAX_NESTING - 2, "is not a list of integers"), (MAX_NESTING - 1, "nested deeper")):
        config = tmp_path / f"depth{lists}.yaml"
        config.write_text("data:\n  patch_size: " + "[" * lists + "]" * lists + "\n")
        assert train_main([str(config)]) == 2
        assert expected in one_error_line(capsys)


def test_a_deep_postprocessing_json_is_refused_naming_the_file(tmp_path, capsys):
    rules = tmp_path / "postprocessing.json"
    rules.write_text('{"format": "unet-trainer postprocessing", "version": 1, "kept": ' + DEEP_FLOW + "}")
    out = tmp_path / "out"
    assert predict_main(["run.pt", str(tmp_path / "input"), str(out), "--postprocessing", str(rules)]) == 1
    line = one_error_line(capsys)
    assert f"{rules}: nested deeper than {MAX_NESTING} levels" in line, line
    assert not out.exists()


NOT_UTF8 = b"seed: 1\nrun_name: caf\xe9\n"  # Latin-1, as an editor on another system may save it


def test_a_config_or_recipe_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes(NOT_UTF8)
    assert train_main([str(config), f"save_folder={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert f"{config}: not UTF-8 text (byte 0xe9 at offset 21" in line, line
    recipe = tmp_path / "latin1-recipe.yaml"
    recipe.write_bytes(b"max_duration: 2ep # \xe9t\xe9\n")
    assert train_main([DEMO, f"recipe={recipe}", f"save_folder={tmp_path / 'run'}"]) == 2
    assert f"{recipe}: not UTF-8 text" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_stored_cross_validation_config_that_is_not_utf8_is_refused_by_unet_cv_and_unet_predict(
    cache_root, tmp_path, capsys
):
    cv_dir = tmp_path / "cv"
    (cv_dir / "fold_0").mkdir(parents=True)
    record = cv_dir / "cv_config.yaml"
    record.write_bytes(b"\xff\xfe" + "seed: 1\n".encode("utf-16-le"))
    before = files_under(cv_dir)
    assert cv_main([DEMO, f"save_folder={cv_dir}", f"data.cache_dir={cache_root}"]) == 1
    line = one_error_line(capsys)
    assert f"{record}: not UTF-8 text" in line, line
    assert predict_main([str(cv_dir), str(tmp_path / "input"), str(tmp_path / "out")]) == 1
    line = one_error_line(capsys)
    assert f"{record}: not UTF-8 text" in line, line
    # The folder's lock file (cv.lock) is kept by design; the record is untouched.
    assert [f for f in files_under(cv_dir) if f != "cv.lock"] == before and not (tmp_path / "out").exists()
    assert record.read_bytes() == b"\xff\xfe" + "seed: 1\n".encode("utf-16-le")


# ---------------------------------------------------------------------------------------------
# OS errors in words, with the file
# ---------------------------------------------------------------------------------------------


def test_a_file_where_an_output_folder_must_go_is_named_in_words(trained, tmp_path, capsys):
    """mkdir under a file raised FileExistsError, printed as "[Errno 17] File exists: 'x'"."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert data_main(["synth", "--out", str(blocker / "phantom"), "--cases", "2", "--shape", "8", "8", "8"]) == 1
    assert one_error_line(capsys) == f"error: {blocker}: exists and is a file, expected a folder"
    predict = [str(trained["checkpoint"]), str(trained["phantom"]), str(blocker), "--no-progress", "device=cpu"]
    assert predict_main(predict) == 1
    line = one_error_line(capsys)
    assert "[Errno" not in line and line.startswith(f"error: {blocker}: exists and is a file"), line
    assert blocker.read_text() == "not a folder" and files_under(tmp_path) == ["results"]


def test_a_folder_given_for_a_file_is_named_in_words(trained, tmp_path, capsys):
    """A folder given as a checkpoint, a postprocessing file or unet-eval's --out CSV used to
    surface as "[Errno 21] Is a directory: 'x'" or "(Is a directory)"."""
    folder = tmp_path / "folder"
    folder.mkdir()
    assert eval_main([str(folder)]) == 1
    assert one_error_line(capsys) == f"error: {folder}: is a directory, expected a file (reading a checkpoint)"
    out = tmp_path / "out"
    assert (
        predict_main([str(trained["checkpoint"]), str(trained["phantom"]), str(out), "--postprocessing", str(folder)])
        == 1
    )
    line = one_error_line(capsys)
    assert line.startswith(f"error: {folder}: is a directory, expected a file;"), line
    eval_args = [str(trained["checkpoint"]), "--out", str(folder), "--no-progress", "--no-overlays", "device=cpu"]
    assert eval_main(eval_args) == 1
    assert one_error_line(capsys) == f"error: {folder}: is a directory, expected a file"
    assert files_under(tmp_path) == ["folder"]


def test_an_os_error_with_only_a_number_names_the_run_folder_and_says_what_in_words(
    prepared, cache_root, tmp_path, capsys, monkeypatch
):
    """A lock call on a file system without a lock service raising OSError(ENOLCK), a bare
    number, used to print "error: 37"."""
    import unet_trainer.core.runfolder as runfolder

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK)

    monkeypatch.setattr(runfolder.fcntl, "lockf", no_locks)
    run = tmp_path / "run"
    assert train_main([DEMO, *tiny_overrides(cache_root, run)]) == 1
    assert one_error_line(capsys) == f"error: {run}: {os.strerror(errno.ENOLCK)}"


# ---------------------------------------------------------------------------------------------
# A rank lost under torchrun
# ---------------------------------------------------------------------------------------------


def ranks_of(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's child processes (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(item.split("=", 1) for item in (stat.parent / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(stat.parent.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_under_torchrun_is_named_in_one_line_by_the_survivor(prepared, cache_root, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "unet_trainer.cli",
        "train",
        DEMO,
        *tiny_overrides(cache_root, run, "max_duration=10000ba", "save_interval=2ba", "eval_interval=0ep"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((run / "checkpoints").glob("ep*-ba2-rank0.pt")):
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.05)
        ranks = ranks_of(launcher.pid)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.time()
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and time.time() - killed < 10
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(ours) == 1, err
    assert f"rank 1 (pid {ranks[1]}) of 2 went away, so rank 0 stops too" in ours[0], ours[0]
    # The ranks' own tracebacks are gone; what remains is torchrun's report, after our line.
    assert "[rank0]" not in err and "[rank1]" not in err and f'File "{ROOT / "unet_trainer"}' not in err, err
    assert err.index(ours[0]) < err.index("ChildFailedError")
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    assert json.loads((run / "split.json").read_text())["train"]
