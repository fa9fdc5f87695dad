"""The per-case score table: one CSV row per case, ``case_id`` first, then the score columns.

It imports only the atomic writes of ``core.fileio``, so that the evaluator, the checkpoint
callback keeping the best evaluation's table and ``unet-eval`` write it alike without importing
one another.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from ..core.fileio import atomic_write_text


def write_cases_csv(path: Path, rows: Sequence[dict]) -> None:
    """Per-case rows (``case_id`` then the score keys) as CSV; NaN written as ``nan``. Written
    atomically: a kill mid-write, or two commands writing one file, never leave a partial CSV.

    Raises:
        DiskFullError: no space left (the previous file, if any, is untouched); OSError.
    """
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buffer.getvalue())
