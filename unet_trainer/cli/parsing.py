"""Argument parsing shared by the commands: their argparse parsers, and the split of what they do not
declare into positional paths and config overrides (``key=value``, ``--key value``, ``--key=value``)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config.engine import ConfigError
from ..data.layouts import FORMAT_CHOICES
from .errors import USAGE_ERROR, CommandExit

# The layouts the --format flags accept, for the usage texts: "auto (default), msd, ...".
FORMAT_LIST = ", ".join(f"{name} (default)" if name == "auto" else name for name in FORMAT_CHOICES)


class _OverrideParser(argparse.ArgumentParser):
    """A parser of a command's own flags that leaves the rest (paths and overrides) alone."""

    def error(self, message: str):
        # argparse's own words for a flag without its value, in those of the config's override errors.
        missing = re.fullmatch(r"argument (\S+): expected one argument", message)
        raise ConfigError(f"command line: {missing[1]} needs a value" if missing else f"command line: {message}")


def command_parser(prog: str) -> argparse.ArgumentParser:
    """A parser for a command that also takes config overrides: declare its flags with ``add_argument``
    (a value flag plain, a switch with ``action="store_true"``), then parse with :func:`parse_command_line`.

    No ``-h`` (each command prints its own usage text) and no abbreviated flags (``--form`` could be
    an override); an error raises ConfigError instead of exiting.
    """
    return _OverrideParser(prog=prog, add_help=False, allow_abbrev=False)


def parse_command_line(
    parser: argparse.ArgumentParser, args: Sequence[str], positional: int, more_positionals: bool = False
) -> tuple[list[str], dict, list[str]]:
    """Parse ``args`` into positionals (the first ``positional`` plain words; with ``more_positionals``
    every plain word without '=', at least ``positional``), the parser's flags ({"--flag": value, None
    when absent; a switch: True or False}) and config overrides, in their order.

    Raises:
        ConfigError: a flag without its value, or missing positionals.
    """
    namespace, rest = parser.parse_known_args(list(args))
    flags = {action.option_strings[0]: getattr(namespace, action.dest) for action in parser._actions}
    positionals: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        eq = "=" in arg
        if (len(positionals) < positional or (more_positionals and not eq)) and not arg.startswith("-"):
            positionals.append(arg)
        elif arg.startswith("--") and not eq and i + 1 < len(rest):
            overrides += [arg, rest[i + 1]]  # --key value
            i += 1
        else:
            overrides.append(arg)
        i += 1
    if len(positionals) < positional:
        expected = f"{positional} path argument(s){' or more' if more_positionals else ''}"
        raise ConfigError(f"command line: expected {expected} first, got {len(positionals)}")
    return positionals, flags, overrides


def wants_help(args: Sequence[str]) -> bool:
    """Whether the command line is empty or asks for the usage text anywhere."""
    return not args or "-h" in args or "--help" in args


def command_arguments(argv: Sequence[str] | None, usage: str) -> list[str]:
    """A command's arguments (``sys.argv[1:]`` when ``argv`` is None).

    Raises:
        CommandExit: the line is empty (status 2) or asks for help (status 0), after printing ``usage``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print(usage)
        raise CommandExit(0 if args else USAGE_ERROR)
    return args


def format_flag(flags: dict) -> str:
    """The ``--format`` flag's layout ("auto" when absent).

    Raises:
        ConfigError: a layout that does not exist.
    """
    fmt = flags.get("--format") or "auto"
    if fmt not in FORMAT_CHOICES:
        raise ConfigError(f"command line: --format {fmt!r} is not one of {', '.join(FORMAT_CHOICES)}")
    return fmt


def postprocessing_flags(checkpoints: list[str], flags: dict):
    """The postprocessing rules that ``--postprocessing FILE`` / ``--no-postprocessing`` choose for the models
    given (None: none), announced in one line: by default the rules of one checkpoint's run folder, of a
    given run or ``unet-cv`` folder, or those an exported folder's model.json records.

    Raises:
        ConfigError: both --postprocessing FILE and --no-postprocessing.
        PostprocessingError: rules that cannot be read. ExportError: an exported folder's bad model.json.
    """
    if flags["--postprocessing"] and flags["--no-postprocessing"]:
        raise ConfigError("command line: --postprocessing FILE and --no-postprocessing exclude each other")
    from ..commands.exported import exported_postprocessing, is_exported_folder
    from ..evaluation.postprocessing import postprocessing_for

    explicit, enabled = flags["--postprocessing"], not flags["--no-postprocessing"]
    # One checkpoint (or one run or unet-cv folder): its folder's postprocessing.json by default.
    # Several: only the one named, since each model's folder may hold its own rules.
    single = Path(checkpoints[0]) if len(checkpoints) == 1 else None
    if single is not None and is_exported_folder(single) and not explicit:
        postprocess = exported_postprocessing(single) if enabled else None
    else:
        postprocess = postprocessing_for(single, Path(explicit) if explicit else None, enabled=enabled)
    if postprocess is not None:
        other = (
            single is not None
            and single.is_file()
            and postprocess.checkpoint
            and Path(postprocess.checkpoint) != single.expanduser().resolve()
        )
        note = f" (chosen on another checkpoint, {Path(postprocess.checkpoint).name})" if other else ""
        print(f"Postprocessing from {postprocess.path}{note}: {postprocess.describe()}")
    return postprocess
