"""The commands' shared pieces: the error wrapper (each command's table of exit statuses and one-line
errors), the argparse parsing of flags and overrides, the console scripts and ``python -m unet_trainer.cli``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from unet_trainer.cli import __main__ as dispatch
from unet_trainer.cli import cv, data, errors, evaluate, parsing, predict, train
from unet_trainer.commands.cv import CrossValidationError
from unet_trainer.config.config import ConfigError
from unet_trainer.core.checkpoint import CheckpointError
from unet_trainer.core.guard import OutputPathError
from unet_trainer.core.runfolder import RunFolderError
from unet_trainer.data.layouts import DataFormatError
from unet_trainer.data.loader import SharedMemoryExhausted
from unet_trainer.evaluation.postprocessing import PostprocessingError
from unet_trainer.training.trainer import TrainingDiverged

ROOT = Path(__file__).resolve().parent.parent

# Each command step's table, and the exit status each exception ends it with (None: it propagates,
# traceback and all), as the commands have always answered.
TABLES = {
    "train": train.RUN_ERRORS,
    "train, reading the config": errors.CONFIG_ONLY,
    "data": data.ERRORS,
    "eval": evaluate.ERRORS,
    "eval --choose-postprocessing": evaluate.CHOOSE_ERRORS,
    "predict": predict.ERRORS,
    "cv": cv.run_errors(),
}
FAILURES = (DataFormatError, CheckpointError, RunFolderError)
EXPECTED = {
    "train": {
        **dict.fromkeys((ConfigError, *FAILURES, OutputPathError, TrainingDiverged, SharedMemoryExhausted), 1),
        **{OSError: 1, KeyboardInterrupt: 130, ValueError: None, CrossValidationError: None},
    },
    "train, reading the config": {ConfigError: 2, DataFormatError: None, OSError: None, KeyboardInterrupt: None},
    "data": {
        **dict.fromkeys((ConfigError, DataFormatError, RunFolderError, ValueError, OSError), 1),
        **{KeyboardInterrupt: None, TrainingDiverged: None, CheckpointError: None},
    },
    "eval": {
        **dict.fromkeys((*FAILURES[:2], ValueError, PostprocessingError, OSError), 1),
        **{ConfigError: 2, KeyboardInterrupt: 130, RunFolderError: None},
    },
    "eval --choose-postprocessing": {
        **dict.fromkeys((*FAILURES[:2], ValueError, OSError), 1),
        **{ConfigError: 2, PostprocessingError: 2, KeyboardInterrupt: 130, RunFolderError: None},
    },
    "predict": {
        **dict.fromkeys((*FAILURES, ValueError, PostprocessingError, OSError), 1),
        **{ConfigError: 2, KeyboardInterrupt: 130, TrainingDiverged: None},
    },
    "cv": {
        **dict.fromkeys((*FAILURES, CrossValidationError, TrainingDiverged, SharedMemoryExhausted, ValueError), 1),
        **{ConfigError: 2, PostprocessingError: 2, OSError: 1, KeyboardInterrupt: 130},
    },
}
CASES = [(name, kind, status) for name, table in EXPECTED.items() for kind, status in table.items()]


def _raising(table: errors.ErrorTable, exc: BaseException, path: Path | None = None):
    @errors.command
    def main(argv: list[str] | None = None) -> int:
        with errors.guard(table, path):
            raise exc
        return 0  # never reached

    return main


@pytest.mark.parametrize(("name", "kind", "status"), CASES, ids=[f"{n}-{k.__name__}" for n, k, _ in CASES])
def test_each_command_maps_each_exception_to_its_exit_status_and_one_line(name, kind, status, tmp_path, capsys):
    exc = kind("no space left there") if kind is not OSError else OSError(28, "No space left on device")
    main = _raising(TABLES[name], exc, tmp_path / "out")
    if status is None:
        with pytest.raises(kind):
            main([])
        assert capsys.readouterr().err == ""
        return
    assert main([]) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and "\n" not in err[:-1], err
    if kind is KeyboardInterrupt:
        assert err == "error: interrupted\n"
    elif kind is OSError:  # an OSError without a file name names the path the command was writing
        assert f"{tmp_path / 'out'}: no space left on the device" in err and "Errno" not in err
    else:
        assert err == "error: no space left there\n"


@pytest.mark.parametrize("name", TABLES)
def test_every_exception_a_table_lists_is_in_the_expectations(name):
    listed = {kind for types, _ in TABLES[name].rows for kind in types}
    assert listed <= set(EXPECTED[name]), listed - set(EXPECTED[name])


def test_a_runtime_error_that_is_no_lost_peer_keeps_its_traceback(capsys):
    # train and cv treat a RuntimeError as a torchrun peer gone away only when it is one.
    for table in (TABLES["train"], TABLES["cv"]):
        with pytest.raises(RuntimeError, match="a bug"):
            _raising(table, RuntimeError("a bug"))([])
    assert capsys.readouterr().err == ""


def test_a_status_returned_inside_a_guard_is_the_commands():
    @errors.command
    def main(argv: list[str] | None = None) -> int:
        with errors.guard(errors.CONFIG_ONLY):
            return 3

    assert main([]) == 3


def test_override_flags_are_parsed_by_each_commands_parser():
    args = ["cfg.yaml", "--no-progress", "--eval.overlap", "0.5", "--folds=0,2", "seed=3", "--lesion-wise"]
    (config,), flags, overrides = parsing.parse_command_line(cv.make_parser(), args, 1)
    assert config == "cfg.yaml" and overrides == ["--eval.overlap", "0.5", "seed=3"]
    assert flags["--folds"] == "0,2" and flags["--no-progress"] and flags["--lesion-wise"]
    assert flags["--checkpoint"] is None and not flags["--aggregate-only"]
    # No abbreviations: --form is an override, never --format.
    _, flags, overrides = parsing.parse_command_line(evaluate.make_parser(), ["a.pt", "--form", "msd"], 1)
    assert flags["--format"] is None and overrides == ["--form", "msd"]


@pytest.mark.parametrize(
    ("module", "argv"),
    [(evaluate, ["a.pt", "--out"]), (predict, ["a.pt", "in", "out", "--postprocessing"]), (cv, ["c.yaml", "--folds"])],
    ids=["eval", "predict", "cv"],
)
def test_a_value_flag_without_its_value_is_a_one_line_usage_error(module, argv, capsys):
    assert module.main(argv) == 2
    assert capsys.readouterr().err == f"error: command line: {argv[-1]} needs a value\n"


def test_every_console_script_resolves_to_a_command_that_python_m_runs_too():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == ["unet-cv", "unet-data", "unet-eval", "unet-export", "unet-predict", "unet-train"]
    # python -m unet_trainer.cli dispatches through the installed console scripts: the same ones, the same mains.
    dispatched = dispatch.commands()
    assert sorted(dispatched) == sorted(name.removeprefix("unet-") for name in scripts)
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        main = getattr(importlib.import_module(module), attribute)
        assert callable(main) and main is dispatched[name.removeprefix("unet-")].load(), name


def test_python_m_without_a_known_command_prints_its_usage_and_exits_2(capsys):
    for argv in ([], ["--help"], ["tran", "configs/demo.yaml"]):
        assert dispatch.main(argv) == 2
        err = capsys.readouterr().err
        assert err == "usage: python -m unet_trainer.cli {train,data,eval,predict,cv,export} ...\n", argv
    done = subprocess.run(
        [sys.executable, "-m", "unet_trainer.cli", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 2 and done.stdout == "" and "{train,data,eval,predict,cv,export}" in done.stderr
    assert dispatch.main(["eval", "--help"]) == 0 and capsys.readouterr().out.startswith("usage: unet-eval CHECKPOINT")
