"""One line on stderr and an exit status for every expected failure of a command, never a traceback.

Each command names, per step (reading its config, running), which exceptions end it and with which status
in an :class:`ErrorTable`; :func:`guard` applies the table around the step and :func:`command` turns the
outcome into the command's return value. A failure not in the table (a bug) keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config.engine import ConfigError
from ..core.fileio import os_error_line

USAGE_ERROR = 2  # a bad command line or config: nothing was run
FAILURE = 1
INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C (128 + SIGINT)


def fail(message: str, status: int = FAILURE) -> int:
    """Print ``error: message`` on stderr (after closing any open progress bar) and return ``status``."""
    # A progress bar left open by the failure would otherwise carry the error on its line.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    return status


def lost_peer_exit(exc: RuntimeError) -> int:
    """Under torchrun, a collective that failed because a peer rank went away: one line (from
    one rank per machine) instead of each rank's traceback, before the launcher's own report.

    Raises:
        RuntimeError: ``exc`` again, when it is no such failure (a bug shows its traceback).
    """
    from ..core.distributed import lost_peer

    lost = lost_peer(exc)
    if lost is None:
        raise exc
    return fail(lost.line) if lost.reporter else FAILURE


@dataclass(frozen=True)
class ErrorTable:
    """How one step of a command ends on an exception, checked in this order:

    ``rows``: (exception types, exit status), the first row that matches wins (so a subclass listed
    before its base class ends with its own status); then, when enabled, a RuntimeError that is a lost
    torchrun peer (:func:`lost_peer_exit`), an OSError as :func:`os_error_line` words it, and Ctrl-C
    as "interrupted" with status 130. Anything else propagates.
    """

    rows: tuple[tuple[tuple[type[BaseException], ...], int], ...]
    lost_peer: bool = False
    os_errors: bool = True
    interrupt: bool = True

    def exit_status(self, exc: BaseException, path: Path | None = None) -> int:
        """Print ``exc``'s one line and return its exit status; ``path``: the file or folder an
        OSError without a file name of its own is about.

        Raises:
            BaseException: ``exc`` again when the table does not list it.
        """
        for types, status in self.rows:
            if isinstance(exc, types):
                return fail(str(exc), status)
        if self.lost_peer and isinstance(exc, RuntimeError):
            return lost_peer_exit(exc)
        if self.os_errors and isinstance(exc, OSError):
            return fail(os_error_line(exc, path))
        if self.interrupt and isinstance(exc, KeyboardInterrupt):
            return fail("interrupted", INTERRUPTED)
        raise exc


# Reading a config (or a command line) only: its errors are usage errors, nothing else is expected.
CONFIG_ONLY = ErrorTable(rows=(((ConfigError,), USAGE_ERROR),), os_errors=False, interrupt=False)


class CommandExit(Exception):
    """A command ends now with ``status`` (its line is printed already)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@contextmanager
def guard(table: ErrorTable, path: Path | None = None) -> Iterator[None]:
    """Run the ``with`` block under ``table``: a listed exception prints its line and ends the command
    (:func:`command`) with its status. ``path``: see :meth:`ErrorTable.exit_status`.

    Raises:
        CommandExit: a listed exception.
    """
    try:
        yield
    except CommandExit:
        raise
    except BaseException as exc:
        raise CommandExit(table.exit_status(exc, path)) from exc


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command's ``main(argv) -> exit status`` whose :func:`guard` blocks may end it early."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except CommandExit as done:
            return done.status

    return run
