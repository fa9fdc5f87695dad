"""Outputs never land in inputs: the one check every writing command makes before its first write.

A command names what it will write (folders or files, existing or not) and what it reads:
dataset folders (a raw dataset, a prepared cache), which no output may be, lie inside or hold, and
single inputs (a checkpoint file, a run or ``unet-cv`` folder given as a model), which no output
may be or hold. :func:`check_outputs` refuses the first clash in one line naming both paths.

Paths are compared twice: as the file system will see them (``~`` expanded, absolute, symlinks
resolved; a path that does not exist yet through its nearest existing parent), which catches a
symlink leading into a dataset; and as written (absolute, ``..`` folded), which catches a path
through a dataset's symlinked sub-folder (``DS/labelsTr`` where ``labelsTr`` links elsewhere).
Both compare whole path components, never string prefixes: ``DS_pred`` is not inside ``DS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output that would be written into, over or around an input; one line naming both."""


def _forms(path: PathLike) -> tuple[Path, Path]:
    """(as written: absolute with ``..`` folded, as the file system sees it: symlinks resolved)."""
    written = Path(os.path.abspath(Path(path).expanduser()))
    # Non-strict resolve follows every existing component and keeps the missing rest as written.
    return written, written.resolve()


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or below it, component by component."""
    return inner == outer or outer in inner.parents


def _shown(given: PathLike, form: Path, written: Path) -> str:
    """The path as the user gave it, with where it really leads when a symlink made the difference."""
    shown = str(Path(given).expanduser())
    return shown if form == written else f"{shown} (-> {form})"


def _clash(output: PathLike, source: PathLike, folder: bool) -> tuple[str, str, str] | None:
    """How ``output`` clashes with the input ``source``: ("equal" | "inside" | "holds", output
    shown, input shown), or None; "inside" only counts for a dataset folder (``folder``)."""
    out_forms, in_forms = _forms(output), _forms(source)
    for out, inp in zip(out_forms, in_forms):
        if out == inp:
            relation = "equal"
        elif folder and _within(out, inp):
            relation = "inside"
        elif _within(inp, out):
            relation = "holds"
        else:
            continue
        return relation, _shown(output, out, out_forms[0]), _shown(source, inp, in_forms[0])
    return None


def check_outputs(
    outputs: Iterable[tuple[str, PathLike]],
    folders: Iterable[tuple[str, PathLike]] = (),
    files: Iterable[tuple[str, PathLike]] = (),
) -> None:
    """Refuse any output that would write into, over or around an input; call before the first write.

    Args:
        outputs: (what it is in words, path) of every folder or file the command writes, e.g.
            ("the output folder", Path("preds")).
        folders: (what, path) of the dataset folders it reads, e.g. ("the input dataset", DS): an
            output may not be one, lie inside one or hold one.
        files: (what, path) of single inputs, e.g. ("the checkpoint", ck): an output may not be
            one or hold one (it may lie inside a run folder given as a model).

    Raises:
        OutputPathError: the first clash, as one line naming the output and the input.
    """
    inputs = [(what, path, True) for what, path in folders] + [(what, path, False) for what, path in files]
    for out_what, output in outputs:
        for in_what, source, folder in inputs:
            clash = _clash(output, source, folder)
            if clash is None:
                continue
            relation, out_shown, in_shown = clash
            if relation == "equal":
                problem, advice = f"must not be {in_what} {in_shown}", "choose a path outside it"
            elif relation == "inside":
                problem, advice = f"is inside {in_what} {in_shown}", "choose a path outside it"
            else:
                problem, advice = f"holds {in_what} {in_shown}", "choose a path that does not hold it"
            raise OutputPathError(f"{out_what} {out_shown} {problem}; {advice} (inputs are never written)")
